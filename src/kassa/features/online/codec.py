"""The stored form of one view's values, shared by the online-store backends (memory, Redis).

One view's values for one entity key are one msgpack blob, ``[ts, schema_hash, [values in field order]]``:

- ``ts`` is always a float64, so the blob starts with the bytes ``0x93 0xcb`` followed by the big-endian
  double; the Redis write script reads the stored event time at that fixed offset without decoding the
  values (`blob_ts` does the same in Python);
- ``schema_hash`` is `FeatureView.schema_hash()` at write time: a blob written under another hash (the view
  was redefined) is ignored on read and counted as stale, never decoded into the wrong field names;
- values are a list in field order, so field names are stored once per view (in its `ViewCodec`) rather
  than once per row; they become a ``{field: value}`` dict only when read.

The embedded store's legacy ``put`` (no `FeatureView` at hand) stores ``[ts, "", {field: value}]``:
an *untyped* blob (`UNTYPED`), which typed reads treat as stale.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec.structs import astuple

from kassa.features.definitions import FeatureView, Field, check_value
from kassa.features.online.base import ViewValues

UNTYPED = ""  # schema hash of blobs written without a view definition (legacy `put`)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_TS = struct.Struct(">d")
_HEADER = b"\x93\xcb"  # fixarray(3), float64

_SCALAR_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool}


@dataclass(slots=True)
class StoreStats:
    """Counters a backend keeps about what it skipped; exported as metrics by the caller."""

    stale_schema: int = 0  # values written under another schema hash, ignored on read
    expired: int = 0  # values older than their view's ttl, omitted on read
    unknown_view: int = 0  # stored views the reader has no definition for (reads without `views`)
    older_ignored: int = 0  # writes that lost to newer stored values


def _field_type(f: Field) -> Any:
    """The msgspec type that accepts exactly what `check_value` accepts (bool is not an int, an int is a
    float, strings and lists bounded by ``max_length``); validation then runs in C, not per value in Python."""
    if f.dtype.startswith("list["):
        inner: Any = _SCALAR_TYPES[f.dtype[5:-1]]
        if inner is str:
            inner = Annotated[str, msgspec.Meta(max_length=f.max_length)]
        return Annotated[list[inner], msgspec.Meta(max_length=f.max_length)] | None
    scalar: Any = _SCALAR_TYPES[f.dtype]
    if scalar is str:
        scalar = Annotated[str, msgspec.Meta(max_length=f.max_length)]
    return scalar | None


def _default(f: Field) -> Any:
    if isinstance(f.default, (list, dict)):  # each row gets its own copy of a mutable default
        value = f.default
        return msgspec.field(default_factory=lambda: list(value) if isinstance(value, list) else dict(value))
    return f.default


class ViewCodec:
    """Encodes and decodes one view's values; built once per view definition and reused."""

    __slots__ = ("_names_set", "_struct", "field", "name", "names", "schema_hash", "ttl", "view")

    def __init__(self, view: FeatureView) -> None:
        self.view = view
        self.name = view.name
        self.field = view.name.encode()  # the Redis hash field
        self.names: tuple[str, ...] = tuple(f.name for f in view.fields)
        self._names_set = frozenset(self.names)
        self.schema_hash = view.schema_hash()
        self.ttl = view.ttl_seconds
        # A Struct per view: msgspec caches its type analysis on the class, so validating, ordering and
        # defaulting a row is one C call (~2 us for 20 fields; a `tuple[...]` type would be re-analysed
        # on every call, ~50x slower).
        self._struct: Any = msgspec.defstruct(
            f"_{view.name}_values", [(f.name, _field_type(f), _default(f)) for f in view.fields],
            forbid_unknown_fields=True,
        )

    def _values(self, values: dict[str, Any]) -> tuple[Any, ...]:
        try:
            return astuple(msgspec.convert(values, self._struct))
        except msgspec.ValidationError:
            # Re-check field by field only on failure, for a message that names the field.
            if not values.keys() <= self._names_set:
                unknown = sorted(map(str, set(values) - self._names_set))
                raise ValueError(f"view {self.name!r}: unknown field(s) {', '.join(map(repr, unknown))}") from None
            for f in self.view.fields:
                try:
                    check_value(f, values.get(f.name))
                except ValueError as exc:
                    raise ValueError(f"view {self.name!r} field {f.name!r}: {exc}") from None
            raise

    def encode(self, values: dict[str, Any], ts: float) -> bytes:
        ts = float(ts)
        if not math.isfinite(ts):
            raise ValueError(f"view {self.name!r}: event time must be a finite number, got {ts!r}")
        return _encode((ts, self.schema_hash, self._values(values)))

    def decode(self, blob: bytes, now: float, stats: StoreStats) -> ViewValues | None:
        """The stored values, or None (and counted) when written under another schema or expired."""
        ts, schema_hash, values = _decode(blob)
        if schema_hash != self.schema_hash:
            stats.stale_schema += 1
            return None
        if self.ttl is not None and now - ts > self.ttl:
            stats.expired += 1
            return None
        return ViewValues(ts, dict(zip(self.names, values, strict=True)))

    def expire_at_ms(self, ts: float) -> int:
        """When a value written at event time ``ts`` stops being served (0: never)."""
        return 0 if self.ttl is None else int((ts + self.ttl) * 1000)


class CodecCache:
    """View name -> `ViewCodec`, rebuilt when a view object is replaced by a new definition."""

    __slots__ = ("_codecs",)

    def __init__(self) -> None:
        self._codecs: dict[str, ViewCodec] = {}

    def get(self, view: FeatureView) -> ViewCodec:
        codec = self._codecs.get(view.name)
        # Identity first: hashing the schema on every call would cost more than the read it serves.
        if codec is None or (codec.view is not view and codec.schema_hash != view.schema_hash()):
            codec = self._codecs[view.name] = ViewCodec(view)
        return codec

    def by_name(self, name: str) -> ViewCodec | None:
        return self._codecs.get(name)

    def __iter__(self) -> Iterator[ViewCodec]:
        return iter(self._codecs.values())


def encode_untyped(values: dict[str, Any], ts: float) -> bytes:
    return _encode((float(ts), UNTYPED, values))


def decode_blob(blob: bytes) -> tuple[float, str, Any]:
    """``(ts, schema_hash, values)``: values is a list in field order, or a dict for untyped blobs."""
    ts, schema_hash, values = _decode(blob)
    return ts, schema_hash, values


def blob_ts(blob: bytes) -> float:
    """The event time stored in a blob, read at its fixed offset without decoding the values."""
    if blob[:2] == _HEADER:
        return float(_TS.unpack_from(blob, 2)[0])
    return float(_decode(blob)[0])
