"""Batch views' sources: the Parquet/CSV file (or glob) a batch view names in ``source.path``.

This module owns how such a source is read with DuckDB, for both of its readers: materialization (the
newest row per key, into the online store) and training sets (the full history, ASOF-joined). It finds
the columns a view needs (the entity's join key, ``source.timestamp_field``, the optional
``source.created_timestamp_field`` and one column per field), turns timestamps into UTC microseconds
(naive timestamps are UTC, numbers are unix seconds, strings are parsed with their zone), and checks
field columns against their dtypes columnarly (`check_column`), naming the view, the field and the
first entity key holding a bad value.

``created_timestamp`` is when a row was written: it orders rows that share an event time (the later
write is the newer version) and lets a training set ignore versions written after its entity time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kassa.features.definitions import Entity, FeatureView, Field
from kassa.nativeimport import import_duckdb

ARROW_TYPES: dict[str, pa.DataType] = {
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
    "bool": pa.bool_(),
    "list[str]": pa.list_(pa.string()),
    "list[float]": pa.list_(pa.float64()),
    "list[int]": pa.list_(pa.int64()),
}
DEFAULT_CREATED_FIELD = "created_timestamp"


class SourceError(ValueError):
    """A batch source that cannot be read as its view says; the message names the view and, where it
    applies, the field."""


def quote_ident(name: str) -> str:
    """``name`` as a DuckDB identifier (column names come from user files)."""
    return '"' + name.replace('"', '""') + '"'


def source_scan(path: str) -> str:
    """DuckDB table function reading ``path`` (Parquet, or CSV by its extension; globs allowed)."""
    quoted = path.replace("'", "''")
    if path.lower().endswith((".csv", ".csv.gz", ".tsv")):
        return f"read_csv('{quoted}', auto_detect = true, union_by_name = true)"
    return f"read_parquet('{quoted}', union_by_name = true)"


def micros_expr(column: str, duck_type: str) -> str:
    """SQL turning a source's timestamp column into UTC microseconds (naive timestamps are UTC)."""
    t = duck_type.upper()
    c = quote_ident(column)
    if t.startswith("TIMESTAMP WITH TIME ZONE") or t == "TIMESTAMPTZ":
        return f"epoch_us({c})"
    if t.startswith("TIMESTAMP") or t == "DATE":
        return f"epoch_us(CAST({c} AS TIMESTAMP))"
    if t in ("VARCHAR", "TEXT", "STRING"):
        return f"epoch_us(CAST({c} AS TIMESTAMPTZ))"
    # Numbers are unix seconds.
    return f"CAST(round(CAST({c} AS DOUBLE) * 1e6) AS BIGINT)"


def _sorts_like_time(duck_type: str) -> bool:
    return duck_type.upper() not in ("VARCHAR", "TEXT", "STRING")


@dataclass(frozen=True, slots=True)
class BatchSource:
    """A batch view's source as DuckDB sees it: SQL fragments for its key, times and fields."""

    view: FeatureView
    path: str
    scan: str  # the table function reading the files
    join_key: str  # the entity's join key column
    ts_us: str  # SQL: event time in UTC microseconds
    ts_order: str  # SQL: sorts like ts_us (the raw column when it can: much faster than the expression)
    created_us: str | None  # SQL: write time in UTC microseconds; None when the source has none

    @property
    def created_order(self) -> str:
        """ORDER BY terms putting the newest version of an event time first (no created time: last)."""
        return f"{self.created_us} DESC NULLS LAST" if self.created_us else ""


def describe(con: Any, view: FeatureView, entities: Iterable[Entity]) -> BatchSource:
    """`BatchSource` for batch ``view``, or `SourceError` if the source lacks a column the view needs.

    ``entities`` name the join key of ``view``'s entity (``<entity>_id`` when they do not); ``con`` is
    an open DuckDB connection."""
    duckdb = import_duckdb()

    v = view
    if v.kind != "batch" or v.source is None or not v.source.path:
        raise SourceError(f"view {v.name!r}: only batch views (with source.path) have a batch source")
    entity = next((e for e in entities if e.name == v.entity), None)
    join_key = entity.join_key if entity else f"{v.entity}_id"
    path = v.source.path
    scan = source_scan(path)
    try:
        described = con.sql(f"DESCRIBE SELECT * FROM {scan}").fetchall()
    except duckdb.Error as exc:
        raise SourceError(f"view {v.name!r}: cannot read source {path!r}: {exc}") from None
    types = {row[0]: str(row[1]) for row in described}
    ts_field = v.source.timestamp_field
    created_field = v.source.created_timestamp_field
    needed = [(join_key, f"join key of entity {v.entity!r}"), (ts_field, "source.timestamp_field")]
    if created_field is not None:
        needed.append((created_field, "source.created_timestamp_field"))
    for column, what in needed:
        if column not in types:
            raise SourceError(f"view {v.name!r}: source {path!r} has no column {column!r} ({what})")
    for f in v.fields:
        if f.name not in types:
            raise SourceError(f"view {v.name!r} field {f.name!r}: source {path!r} has no such column")
    # Unset, a column named created_timestamp is used when the source has one (Feast's usual name).
    created = created_field or (DEFAULT_CREATED_FIELD if DEFAULT_CREATED_FIELD in types else None)
    ts_us = micros_expr(ts_field, types[ts_field])
    return BatchSource(
        view=v, path=path, scan=scan, join_key=join_key, ts_us=ts_us,
        ts_order=quote_ident(ts_field) if _sorts_like_time(types[ts_field]) else ts_us,
        created_us=None if created is None else micros_expr(created, types[created]),
    )


# -- validating field columns ---------------------------------------------------------------------------


def check_column(view: FeatureView, f: Field, column: pa.ChunkedArray, keys: pa.ChunkedArray) -> pa.ChunkedArray:
    """``column`` as ``f``'s Arrow type, or `SourceError` naming the view, the field and, for a bad
    value, the first entity key holding one. The columnar equivalent of ``check_value``."""
    where = f"view {view.name!r} field {f.name!r}"
    dtype = f.dtype
    t = column.type
    if dtype.startswith("list["):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            if pa.types.is_null(t):
                return column.cast(ARROW_TYPES[dtype])
            raise SourceError(f"{where}: expected {dtype}, source column has type {_shown(t)}")
        inner = dtype[5:-1]
        _check_max(where, pc.list_value_length(column), f.max_length, keys, "list of {} items exceeds max_length {}")
        items = pc.list_flatten(column)
        # Problems inside lists are found on the flattened items and traced back to their row's key.
        item_keys = keys.take(pc.list_parent_indices(column))
        _check_values(where, inner, items, f.max_length, item_keys, f"{dtype}, source column has type {_shown(t)}")
    else:
        _check_values(where, dtype, column, f.max_length, keys, f"{dtype}, source column has type {_shown(t)}")
    try:
        return column.cast(ARROW_TYPES[dtype])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # e.g. a uint64 beyond int64
        raise SourceError(f"{where}: cannot convert to {dtype}: {exc}") from None


def _shown(t: pa.DataType) -> str:
    # Arrow prints a list's child name (DuckDB calls it "l"): noise in an error message.
    return f"list<{_shown(t.value_type)}>" if pa.types.is_list(t) or pa.types.is_large_list(t) else str(t)


def _check_values(where: str, dtype: str, values: Any, max_length: int, keys: Any, mismatch: str) -> None:
    t = values.type
    if pa.types.is_dictionary(t):
        values = values.cast(t.value_type)
        t = t.value_type
    ok = {
        # A pandas int column with missing values arrives as float64: accepted when every value is whole.
        "int": pa.types.is_integer(t) or pa.types.is_floating(t),
        "float": pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t),
        "str": pa.types.is_string(t) or pa.types.is_large_string(t),
        "bool": pa.types.is_boolean(t),
    }[dtype] or pa.types.is_null(t)
    if not ok:
        raise SourceError(f"{where}: expected {mismatch}")
    if dtype == "int" and pa.types.is_floating(t):
        fractional = pc.fill_null(pc.not_equal(values, pc.floor(values)), False)
        if pc.any(fractional).as_py():
            raise SourceError(f"{where}: expected int, found a fractional value "
                              f"(entity key {_first(keys, fractional)!r})")
    if dtype == "str" and not pa.types.is_null(t):
        _check_max(where, pc.utf8_length(values), max_length, keys, "string of {} characters exceeds max_length {}")


def _check_max(where: str, lengths: Any, limit: int, keys: Any, message: str) -> None:
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > limit:
        too_long = pc.fill_null(pc.greater(lengths, limit), False)
        raise SourceError(f"{where}: {message.format(longest, limit)} (entity key {_first(keys, too_long)!r})")


def _first(keys: Any, mask: Any) -> Any:
    return keys.filter(mask)[0].as_py()
