"""The embedded online store: entity rows in process memory, snapshotted to a local file.

Owns `InMemoryOnlineStore`, which implements `features.online.base.OnlineStore` (``read``, ``write``,
``write_many``, ``delete``, ``close``), plus ``snapshot``/``restore`` and, for older callers, the
untyped dict API (``get``, ``get_now``, ``put``, ``event_time``: the `LegacyOnlineStore` protocol).

Layout. The target is 1,000,000 customers x 20 features in at most 1 GiB RSS, so values are stored in
columns, ``entity -> view -> key -> blob``, where a blob is the view's values encoded by
`features.online.codec` (msgpack, field order, no field names; the same bytes the Redis backend stores).
Compared with ``{key: {view: {feature: value}}}`` this drops a dict per row (~200 B) and a Python object
per value (24-60 B, against 1-9 B encoded); a row is assembled from the entity's few columns on read,
and decoding one view costs about a microsecond. TTLs are checked on read, like the Redis backend
(`purge_expired` gives back the memory of expired values, as Redis expiring a row does).

Rows read on every decision (an offer's views, for each candidate) are decoded once per change, not per
read: `row_reader` keeps each decoded row until a write to that key or its oldest value's ttl, so a
decision's 50 offer rows cost 50 dict lookups instead of 50 decodes (issue 13: ~150 µs per decision).

Snapshots (`snapshot` / `restore`, used at stop and start) are one msgpack file holding the columns as
they are, written to a temp file, fsynced and renamed into place, so a crash leaves the previous file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec

from kassa.features.definitions import FeatureView
from kassa.features.online.base import EntityKey, Row, ViewValues, WriteItem
from kassa.features.online.codec import (
    UNTYPED,
    CodecCache,
    StoreStats,
    ViewCodec,
    blob_ts,
    decode_blob,
    encode_untyped,
)

LegacyRow = dict[str, dict[str, Any]]  # view -> {feature: value}, what `get` returns
Columns = dict[str, dict[str, bytes]]  # view -> key -> blob, for one entity

SNAPSHOT_FORMAT = "kassa.online.memory/2"
_ROW_CACHE_MAX = 100_000  # decoded rows `row_reader` keeps per entity
_TTL_MARGIN = 1e-3  # seconds before a value's ttl from which `row_reader` reads its row again
INF = float("inf")
_YIELD_EVERY = 10_000  # bulk writes hand the event loop back this often, so serving is not starved


class LegacyOnlineStore(Protocol):
    """The dict API `decide.engine` still types against; `base.OnlineStore` replaces it."""

    async def get(self, entity: str, key: str) -> LegacyRow | None: ...
    def put(self, entity: str, key: str, view: str, values: dict[str, Any], ts: float | None = None) -> None: ...
    def snapshot(self, path: Path) -> int: ...
    def restore(self, path: Path) -> int: ...


class _Snapshot(msgspec.Struct):
    format: str
    schemas: dict[str, list[str]]  # schema hash -> field names, so typed blobs decode after a restart
    data: dict[str, Columns]


class InMemoryOnlineStore:
    def __init__(self, views: Iterable[FeatureView] = (), clock: Callable[[], float] = time.time) -> None:
        self._data: dict[str, Columns] = {}
        self._codecs = CodecCache()
        self._names: dict[str, tuple[str, ...]] = {}  # schema hash -> field names (legacy `get`, snapshots)
        self._codecs_seen: dict[str, ViewCodec] = {}
        self._rows = 0  # distinct (entity, key) pairs, kept current so len() stays O(1)
        self.clock = clock
        self.stats = StoreStats()
        # entity -> key -> (row, read at, served until): the decoded rows `row_reader` serves again
        self._row_caches: dict[str, dict[str, tuple[Row | None, float, float]]] = {}
        for view in views:
            self.register(view)

    def register(self, view: FeatureView) -> ViewCodec:
        """Make ``view`` known, so reads without an explicit view list can decode it."""
        codec = self._codecs.get(view)
        if self._row_caches and self._codecs_seen.get(codec.name) is not codec:
            self._drop_row_caches()  # a new or changed view decodes its column differently from now on
        self._codecs_seen[codec.name] = codec
        self._names.setdefault(codec.schema_hash, codec.names)
        return codec

    def row_reader(self, entity: str) -> Callable[[str], Row | None]:
        """`read_now` for one entity whose rows are read far more often than written (offers: every
        candidate of every decision), answering from the decoded row until the key is written or one of
        its values nears its ttl. The rows returned are shared: callers must not modify them. Meant for
        entities with few keys; the cache starts afresh past ``_ROW_CACHE_MAX`` keys."""
        many = self.rows_reader(entity)
        return lambda key: many((key,))[0]

    def rows_reader(self, entity: str) -> Callable[[Sequence[str]], list[Row | None]]:
        """`row_reader` for many keys at once (a decision's candidates: one clock read, one call)."""
        cache = self._row_caches.setdefault(entity, {})
        read_all, clock, until = self._read_all, self.clock, self._until

        def get_many(keys: Sequence[str]) -> list[Row | None]:
            now = clock()
            out: list[Row | None] = []
            for key in keys:
                hit = cache.get(key)
                if hit is not None and hit[1] <= now <= hit[2]:
                    out.append(hit[0])
                    continue
                row = read_all(entity, key, now)
                if len(cache) >= _ROW_CACHE_MAX:
                    cache.clear()
                cache[key] = (row, now, until(row))
                out.append(row)
            return out

        return get_many

    def _until(self, row: Row | None) -> float:
        """Until when every value of ``row`` is surely within its ttl. A millisecond short of ``ts + ttl``,
        so that rounding never serves a value `_read_all`'s ``now - ts > ttl`` would omit: within that
        margin the row is read again, exactly."""
        out = INF
        for name, vv in (row or {}).items():
            codec = self._codecs.by_name(name)
            if codec is not None and codec.ttl is not None:
                out = min(out, vv.ts + codec.ttl - _TTL_MARGIN)
        return out

    def _drop_row_caches(self) -> None:
        for cache in self._row_caches.values():  # emptied in place: each `row_reader` holds its own
            cache.clear()

    # -- the OnlineStore protocol

    async def read(self, keys: Sequence[EntityKey], views: Sequence[FeatureView] | None = None) -> list[Row | None]:
        """Rows in ``keys`` order; a row is None when nothing current is stored for it (missing, expired,
        or only values of another schema)."""
        now = self.clock()
        if views is None:
            return [self._read_all(entity, key, now) for entity, key in keys]
        codecs = [self.register(v) for v in views]
        out: list[Row | None] = []
        for entity, key in keys:
            row: Row | None = None
            columns = self._data.get(entity)
            if columns is not None:
                for codec in codecs:
                    if codec.view.entity != entity:
                        continue
                    col = columns.get(codec.name)
                    blob = col.get(key) if col is not None else None
                    if blob is None:
                        continue
                    values = codec.decode(blob, now, self.stats)
                    if values is not None:
                        if row is None:
                            row = {}
                        row[codec.name] = values
            out.append(row)
        return out

    def _read_all(self, entity: str, key: str, now: float) -> Row | None:
        columns = self._data.get(entity)
        if columns is None:
            return None
        row: Row = {}
        for name, col in columns.items():
            blob = col.get(key)
            if blob is None:
                continue
            codec = self._codecs.by_name(name)
            if codec is not None:
                values = codec.decode(blob, now, self.stats)
                if values is not None:
                    row[name] = values
                continue
            ts, schema_hash, raw = decode_blob(blob)
            if schema_hash == UNTYPED:  # written by the legacy `put`: names are in the blob, no ttl known
                row[name] = ViewValues(ts, raw)
            else:
                self.stats.unknown_view += 1
        return row or None

    async def write(self, view: FeatureView, key: str, values: dict[str, Any], ts: float) -> None:
        codec = self.register(view)
        self._store(view.entity, codec.name, key, codec.encode(values, ts), ts)

    async def write_many(self, view: FeatureView, items: Iterable[WriteItem]) -> int:
        """Bulk write; returns the rows stored (rows older than what is stored are skipped)."""
        codec = self.register(view)
        entity, name, encode, store = view.entity, codec.name, codec.encode, self._store
        written = 0
        for i, (key, values, ts) in enumerate(items, 1):
            written += store(entity, name, key, encode(values, ts), ts)
            if i % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
        return written

    async def delete(self, entity: str, key: str) -> None:
        columns = self._data.get(entity)
        if columns is None:
            return
        cached = self._row_caches.get(entity)
        if cached:
            cached.pop(key, None)
        found = False
        for col in columns.values():
            found = col.pop(key, None) is not None or found
        if found:
            self._rows -= 1

    async def close(self) -> None:
        """Nothing to release: whoever owns the store decides when to `snapshot` it."""

    def purge_expired(self, now: float | None = None) -> int:
        """Drop values past their view's ttl, the embedded counterpart of Redis expiring a row (reads skip
        them anyway; this gives the memory back). Returns how many values were dropped."""
        now = self.clock() if now is None else now
        dropped = 0
        for columns in self._data.values():
            for name, col in columns.items():
                codec = self._codecs.by_name(name)
                if codec is None or codec.ttl is None:
                    continue
                cutoff = now - codec.ttl
                stale = [key for key, blob in col.items() if blob_ts(blob) < cutoff]
                for key in stale:
                    del col[key]
                dropped += len(stale)
        if dropped:
            self._rows = _count_rows(self._data)
            self._drop_row_caches()
        return dropped

    def _store(self, entity: str, view: str, key: str, blob: bytes, ts: float, force: bool = False) -> bool:
        cached = self._row_caches.get(entity)
        if cached:
            cached.pop(key, None)
        columns = self._data.get(entity)
        if columns is None:
            columns = self._data[entity] = {}
        col = columns.get(view)
        if col is None:
            col = columns[view] = {}
        old = col.get(key)
        if old is None:
            if not any(key in other for other in columns.values() if other is not col):
                self._rows += 1
        elif not force and blob_ts(old) > ts:  # equal event times replace: a re-materialization corrects
            self.stats.older_ignored += 1
            return False
        col[key] = blob
        return True

    # -- the older dict API (profile.py, engine.py), kept until callers use `read` / `write`

    async def get(self, entity: str, key: str) -> LegacyRow | None:
        return self.get_now(entity, key)

    def read_now(self, entity: str, key: str) -> Row | None:
        """One row, synchronously, with every view's ttl honoured (for in-process callers)."""
        return self._read_all(entity, key, self.clock())

    def get_now(self, entity: str, key: str) -> LegacyRow | None:
        """``{view: {feature: value}}`` for every view stored for the key; no ttl check (as before)."""
        columns = self._data.get(entity)
        if columns is None:
            return None
        row: LegacyRow = {}
        for name, col in columns.items():
            blob = col.get(key)
            if blob is None:
                continue
            _, schema_hash, values = decode_blob(blob)
            if schema_hash == UNTYPED:
                row[name] = values
            else:
                names = self._names.get(schema_hash)
                if names is not None:
                    row[name] = dict(zip(names, values, strict=True))
        return row or None

    def put(self, entity: str, key: str, view: str, values: dict[str, Any], ts: float | None = None) -> None:
        """Replace a view's values unconditionally (the legacy semantics; `write` is newer-wins)."""
        ts = self.clock() if ts is None else ts
        self._store(entity, view, key, encode_untyped(values, ts), ts, force=True)

    def event_time(self, entity: str, key: str, view: str) -> float | None:
        col = self._data.get(entity, {}).get(view)
        blob = col.get(key) if col is not None else None
        return blob_ts(blob) if blob is not None else None

    def __len__(self) -> int:
        return self._rows

    # -- snapshots

    def snapshot(self, path: Path) -> int:
        """Write every row to ``path`` atomically; returns the rows written."""
        payload = _Snapshot(SNAPSHOT_FORMAT, {h: list(n) for h, n in self._names.items()}, self._data)
        _atomic_write(Path(path), msgspec.msgpack.encode(payload))
        return self._rows

    def restore(self, path: Path) -> int:
        """Load a snapshot (rows in the file replace the same rows in memory); returns the rows loaded.
        Reads the previous format (a list of ``[entity, key, row, ts]``) too."""
        path = Path(path)
        if not path.exists():
            return 0
        loaded = msgspec.msgpack.decode(path.read_bytes(), type=_Snapshot | list[Any])
        if isinstance(loaded, list):
            for entity, key, row, ts in loaded:
                for view, values in row.items():
                    self.put(entity, key, view, values, ts[view])
            return len(loaded)
        if loaded.format != SNAPSHOT_FORMAT:
            raise ValueError(f"{path}: unknown snapshot format {loaded.format!r}")
        self._drop_row_caches()
        for schema_hash, names in loaded.schemas.items():
            self._names.setdefault(schema_hash, tuple(names))
        if not self._data:
            self._data = loaded.data  # the usual start-up case: adopt the decoded columns as they are
        else:
            for entity, columns in loaded.data.items():
                mine = self._data.setdefault(entity, {})
                for view, col in columns.items():
                    mine.setdefault(view, {}).update(col)
        self._rows = _count_rows(self._data)
        return _count_rows(loaded.data)


def _count_rows(data: dict[str, Columns]) -> int:
    total = 0
    for columns in data.values():
        cols = [c for c in columns.values() if c]
        if len(cols) == 1:
            total += len(cols[0])
        elif cols:
            total += len(set().union(*cols))
    return total


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the directory entry is flushed too.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
