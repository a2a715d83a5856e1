"""Materialization: load a batch view's newest values from its source file into the online store.

`materialize` reads the view's ``source.path`` (Parquet or CSV file, or a glob) with DuckDB, keeps the
newest row per entity key whose ``source.timestamp_field`` lies in ``[start, end)``, checks every field
column against its dtype, then writes the rows to the online store (``write_many``, in chunks) and logs
them to the offline store. Selection and validation are columnar (DuckDB, Arrow); Python objects are made
only for the online write, a chunk at a time. Validation covers the whole selection before anything is
written, so a bad source changes nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from kassa.features.definitions import FeatureRepo, FeatureView, Field
from kassa.features.offline import ARROW_TYPES, TIMESTAMP, OfflineStore, Timestamp, quote_ident, to_epoch
from kassa.features.online.base import OnlineStore, WriteItem

Progress = Callable[[int, int], None]  # (rows written so far, rows to write)


class MaterializeError(ValueError):
    """The source cannot be materialized; the message names the view and, where it applies, the field."""


@dataclass(frozen=True, slots=True)
class MaterializeResult:
    view: str
    rows: int  # entity keys selected (newest row per key in the range)
    online_written: int
    offline_written: int
    seconds: float


def _source_scan(path: str) -> str:
    quoted = path.replace("'", "''")
    if path.lower().endswith((".csv", ".csv.gz", ".tsv")):
        return f"read_csv('{quoted}', auto_detect = true, union_by_name = true)"
    return f"read_parquet('{quoted}', union_by_name = true)"


def _micros_expr(column: str, duck_type: str) -> str:
    """SQL turning the source's timestamp column into UTC microseconds (naive timestamps are UTC)."""
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
    columns ``entity_key``, ``__ts`` (UTC timestamp) and one per field in the field's Arrow type, nulls
    replaced by the field's default."""
    import duckdb  # offline only: keep DuckDB out of server start-up

    v = view
    if v.kind != "batch" or v.source is None or not v.source.path:
        raise MaterializeError(f"view {v.name!r}: only batch views (with source.path) can be materialized")
    entity = next((e for e in repo.entities if e.name == v.entity), None)
    join_key = entity.join_key if entity else f"{v.entity}_id"
    ts_field = v.source.timestamp_field
    path = v.source.path
    scan = _source_scan(path)

    con = duckdb.connect()
    try:
        try:
            described = con.sql(f"DESCRIBE SELECT * FROM {scan}").fetchall()
        except duckdb.Error as exc:
            raise MaterializeError(f"view {v.name!r}: cannot read source {path!r}: {exc}") from None
        types = {row[0]: str(row[1]) for row in described}
        for column, what in ((join_key, f"join key of entity {v.entity!r}"), (ts_field, "source.timestamp_field")):
            if column not in types:
                raise MaterializeError(f"view {v.name!r}: source {path!r} has no column {column!r} ({what})")
        for f in v.fields:
            if f.name not in types:
                raise MaterializeError(f"view {v.name!r} field {f.name!r}: source {path!r} has no such column")
        ts_us = _micros_expr(ts_field, types[ts_field])
        # Order by the raw column when it sorts like time (strings do not), and write the expression out
        # rather than computing it in a subquery: that made DuckDB several times slower here.
        order = quote_ident(ts_field) if types[ts_field].upper() not in ("VARCHAR", "TEXT", "STRING") else ts_us
        where = [f"{quote_ident(join_key)} IS NOT NULL", f"{ts_us} < ?"]
        params: list[object] = [round(end * 1e6)]
        if start is not None:
            where.append(f"{ts_us} >= ?")
            params.append(round(start * 1e6))
        fields = ", ".join(quote_ident(f.name) for f in v.fields)
        sql = (f"SELECT CAST({quote_ident(join_key)} AS VARCHAR) AS entity_key, {ts_us} AS __ts, {fields} "
               f"FROM {scan} WHERE {' AND '.join(where)} "
               f"QUALIFY row_number() OVER (PARTITION BY {quote_ident(join_key)} ORDER BY {order} DESC) = 1")
        try:
            table = con.sql(sql, params=params).to_arrow_table()
        except duckdb.Error as exc:
            raise MaterializeError(f"view {v.name!r}: reading source {path!r} failed: {exc}") from None
    finally:
        con.close()

    keys = table.column("entity_key")
    columns = [check_column(v, f, table.column(f.name), keys) for f in v.fields]
    # A missing source value is served as the field's default; filling it here keeps the online row and
    # the offline log the same as what serving and training sets would make of a null.
    columns = [c if f.default is None else pc.fill_null(c, pa.scalar(f.default, c.type))
               for f, c in zip(v.fields, columns, strict=True)]
    return pa.table([keys, table.column("__ts").cast(TIMESTAMP), *columns],
                    names=["entity_key", "__ts", *(f.name for f in v.fields)])


def check_column(view: FeatureView, f: Field, column: pa.ChunkedArray, keys: pa.ChunkedArray) -> pa.ChunkedArray:
    """``column`` as ``f``'s Arrow type, or `MaterializeError` naming the view, the field and, for a bad
    value, the first entity key holding one. The columnar equivalent of ``check_value``."""
    where = f"view {view.name!r} field {f.name!r}"
    dtype = f.dtype
    t = column.type
    if dtype.startswith("list["):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
            raise MaterializeError(f"{where}: expected {dtype}, source column has type {_shown(t)}")
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
        raise MaterializeError(f"{where}: cannot convert to {dtype}: {exc}") from None


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
        raise MaterializeError(f"{where}: expected {mismatch}")
    if dtype == "int" and pa.types.is_floating(t):
        fractional = pc.fill_null(pc.not_equal(values, pc.floor(values)), False)
        if pc.any(fractional).as_py():
            raise MaterializeError(f"{where}: expected int, found a fractional value "
                                   f"(entity key {_first(keys, fractional)!r})")
    if dtype == "str" and not pa.types.is_null(t):
        _check_max(where, pc.utf8_length(values), max_length, keys, "string of {} characters exceeds max_length {}")


def _check_max(where: str, lengths: Any, limit: int, keys: Any, message: str) -> None:
    longest = pc.max(lengths).as_py()
    if longest is not None and longest > limit:
        too_long = pc.fill_null(pc.greater(lengths, limit), False)
        raise MaterializeError(f"{where}: {message.format(longest, limit)} (entity key {_first(keys, too_long)!r})")


def _first(keys: Any, mask: Any) -> Any:
    return keys.filter(mask)[0].as_py()


def batch_views(repo: FeatureRepo, name: str | None = None) -> list[FeatureView]:
    """The views `materialize` can load: every batch view, or the one named (`MaterializeError` if it
    is unknown or not a batch view)."""
    if name is None:
        return [v for v in repo.views if v.kind == "batch"]
    v = repo.view(name)
    if v is None:
        raise MaterializeError(f"unknown view {name!r}")
    if v.kind != "batch":
        raise MaterializeError(f"view {name!r} is a {v.kind} view; only batch views are materialized")
    return [v]
