"""Materialization: load a batch view's newest values from its source file into the online store.

`materialize` reads the view's ``source.path`` (Parquet or CSV file, or a glob; see `batch_source`) with
DuckDB, keeps the newest row per entity key whose ``source.timestamp_field`` lies in ``[start, end)``
(of rows sharing that time, the one created last), checks every field column against its dtype, then
writes the rows to the online store (``write_many``, in chunks) and logs them to the offline store.
Selection and validation are columnar (DuckDB, Arrow); Python objects are made only for the online
write, a chunk at a time. Validation covers the whole selection before anything is written, so a bad
source changes nothing. Null source values are written as nulls, not as the field's default (serving
defaults only a missing or stale row). Training sets do not depend on materialization: they read batch
sources' full history.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat

import pyarrow as pa

from kassa.features.batch_source import SourceError, check_column, describe, quote_ident
from kassa.features.definitions import FeatureRepo, FeatureView
from kassa.features.offline import TIMESTAMP, OfflineStore, Timestamp, to_epoch
from kassa.features.online.base import OnlineStore, WriteItem
from kassa.nativeimport import import_duckdb

Progress = Callable[[int, int], None]  # (rows written so far, rows to write)


# The source cannot be materialized; the message names the view and, where it applies, the field.
MaterializeError = SourceError


@dataclass(frozen=True, slots=True)
class MaterializeResult:
    view: str
    rows: int  # entity keys selected (newest row per key in the range)
    online_written: int
    offline_written: int
    seconds: float


async def materialize(
    repo: FeatureRepo,
    view: FeatureView | str,
    online_store: OnlineStore | None,
    offline_store: OfflineStore | None,
    start: Timestamp | None = None,
    end: Timestamp | None = None,
    progress: Progress | None = None,
    *,
    chunk_size: int = 10_000,
    clock: Callable[[], float] = time.time,
) -> MaterializeResult:
    """Materialize batch view ``view`` of ``repo`` for source rows with ``start <= ts < end``.

    ``start`` defaults to the beginning of the source, ``end`` to now. Online writes are skipped when
    ``online_store`` is None or the view has ``online: false``; offline logging likewise.
    """
    t0 = time.perf_counter()
    v = repo.view(view) if isinstance(view, str) else view
    if v is None:
        raise MaterializeError(f"unknown view {view!r}")
    end_s = to_epoch(end) if end is not None else clock()
    start_s = to_epoch(start) if start is not None else None
    # DuckDB and Arrow release the GIL: in threads they leave the event loop (and a server) responsive.
    table = await asyncio.to_thread(select_latest, repo, v, start_s, end_s)
    total = table.num_rows
    keys = table.column("entity_key")
    columns = table.columns[2:]

    offline_task: asyncio.Future[int] | None = None
    if offline_store is not None and v.offline and total:
        logged = table.rename_columns(["entity_key", "event_timestamp", *table.column_names[2:]])
        # Writing Parquet overlaps the online writes below, which are Python-bound.
        offline_task = asyncio.ensure_future(asyncio.to_thread(offline_store.append, v, logged))
    online_written = 0
    try:
        if online_store is not None and v.online:
            names = [f.name for f in v.fields]
            seconds = table.column("__ts").cast(pa.int64()).to_numpy() / 1e6
            for lo in range(0, total, chunk_size):
                n = min(chunk_size, total - lo)
                rows = zip(*[c.slice(lo, n).to_pylist() for c in columns], strict=True)
                # map/zip keep the per-row work in C: building these dicts is most of our side's time.
                items = list(map(WriteItem, keys.slice(lo, n).to_pylist(),
                                 map(dict, map(zip, repeat(names), rows)), seconds[lo : lo + n].tolist()))
                online_written += await online_store.write_many(v, items)
                if progress is not None:
                    progress(lo + n, total)
        elif progress is not None:
            progress(total, total)
    finally:
        offline_written = await offline_task if offline_task is not None else 0
    return MaterializeResult(v.name, total, online_written, offline_written, time.perf_counter() - t0)


def select_latest(repo: FeatureRepo, view: FeatureView, start: float | None, end: float) -> pa.Table:
    """The newest source row per entity key with ``start <= ts < end`` (unix seconds), validated:
    columns ``entity_key``, ``__ts`` (UTC timestamp) and one per field in the field's Arrow type. Rows
    sharing the newest event time are told apart by their created timestamp (the later write wins).
    Null values stay null: serving applies a field's default only to a missing or stale row."""
    duckdb = import_duckdb()  # offline only: keep DuckDB out of server start-up

    v = view
    if v.kind != "batch" or v.source is None or not v.source.path:
        raise MaterializeError(f"view {v.name!r}: only batch views (with source.path) can be materialized")
    con = duckdb.connect()
    try:
        src = describe(con, v, repo.entities)
        key = quote_ident(src.join_key)
        # Order by the raw column when it sorts like time (strings do not), and write the expression out
        # rather than computing it in a subquery: that made DuckDB several times slower here.
        order = ", ".join(filter(None, [f"{src.ts_order} DESC", src.created_order]))
        where = [f"{key} IS NOT NULL", f"{src.ts_us} < ?"]
        params: list[object] = [round(end * 1e6)]
        if start is not None:
            where.append(f"{src.ts_us} >= ?")
            params.append(round(start * 1e6))
        fields = ", ".join(quote_ident(f.name) for f in v.fields)
        sql = (f"SELECT CAST({key} AS VARCHAR) AS entity_key, {src.ts_us} AS __ts, {fields} "
               f"FROM {src.scan} WHERE {' AND '.join(where)} "
               f"QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY {order}) = 1")
        try:
            table = con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            raise MaterializeError(f"view {v.name!r}: reading source {src.path!r} failed: {exc}") from None
    finally:
        con.close()

    keys = table.column("entity_key")
    columns = [check_column(v, f, table.column(f.name), keys) for f in v.fields]
    return pa.table([keys, table.column("__ts").cast(TIMESTAMP), *columns],
                    names=["entity_key", "__ts", *(f.name for f in v.fields)])


def batch_views(repo: FeatureRepo, name: str | None = None) -> list[FeatureView]:
    """The views `materialize` can load: every batch view, or the one named (`MaterializeError` if it
    is unknown or not a batch view)."""
    if name is None:
        return [v for v in repo.views if v.kind == "batch"]
    v = repo.view(name)
    if v is None:  # a typo was "unknown view" with nothing to pick from
        known = ", ".join(x.name for x in repo.views if x.kind == "batch") or "none"
        raise MaterializeError(f"unknown view {name!r} (batch views: {known})")
    if v.kind != "batch":
        raise MaterializeError(f"view {name!r} is a {v.kind} view; only batch views are materialized")
    return [v]
