"""The offline feature store: every value Kassa wrote online, kept as date-partitioned Parquet, and
point-in-time-correct training sets built from it and from batch views' sources.

This module owns ``<root>/<view>/date=YYYY-MM-DD/part-*.parquet`` (``root`` is ``<data_dir>/offline``):
columns ``entity_key``, ``event_timestamp``, ``created_timestamp`` (UTC microsecond timestamps) and one
column per field of the view, partitioned by the UTC date of ``event_timestamp``. Materialization and
the injection API append to it. `OfflineStore.training_set` joins a list of (entity key, timestamp)
rows with the value each feature had *as of* each timestamp (DuckDB ``ASOF LEFT JOIN``), never a later
one: a batch view's values come from its source's full history (``source.path``, see `batch_source`),
so no materialization is needed; push and stream views' from this log. Versions sharing an event time
are ordered by ``created_timestamp``; optionally versions created after a row's time are ignored. A value
older than the view's TTL counts as missing (the field's default, or null), as it would have been when
serving. `entities_from_decisions` turns the decision log into such rows, so a training set can be made
from exactly what Kassa served.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kassa.events.decision_log import serving_duckdb
from kassa.features.batch_source import ARROW_TYPES, check_column, describe, quote_ident
from kassa.features.definitions import Entity, FeatureRepo, FeatureView
from kassa.features.online.base import WriteItem
from kassa.nativeimport import import_duckdb

TIMESTAMP = pa.timestamp("us", tz="UTC")

Timestamp = float | int | datetime | str


class EntityRowsError(ValueError):
    """Entity rows `OfflineStore.training_set` cannot join: a file it cannot read, a timestamp or join key column
    missing, timestamps it cannot read. The message names the file when the rows came from one."""


def to_epoch(value: Timestamp) -> float:
    """Unix seconds from seconds, a datetime or an ISO-8601 string (naive means UTC)."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.strip())
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def _utc_date(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def view_schema(view: FeatureView) -> pa.Schema:
    """The Arrow schema of ``view``'s offline files."""
    return pa.schema(
        [pa.field("entity_key", pa.string(), nullable=False), pa.field("event_timestamp", TIMESTAMP, nullable=False),
         pa.field("created_timestamp", TIMESTAMP, nullable=False)]
        + [pa.field(f.name, ARROW_TYPES[f.dtype]) for f in view.fields]
    )


def timestamp_micros(column: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
    """A timestamp-like column as int64 UTC microseconds: Arrow timestamps/dates (naive means UTC),
    numbers (unix seconds) or ISO-8601 strings."""
    t = column.type
    if pa.types.is_timestamp(t):
        return column.cast(pa.timestamp("us", tz=t.tz)).cast(pa.int64())
    if pa.types.is_date(t):
        return column.cast(pa.timestamp("us")).cast(pa.int64())
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pc.round(pc.multiply(column.cast(pa.float64()), 1e6)).cast(pa.int64())
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        for typ in (TIMESTAMP, pa.timestamp("us")):  # with a zone; without one (UTC by convention)
            try:
                return column.cast(typ).cast(pa.int64())
            except pa.ArrowInvalid:
                pass
        # Mixed forms in one column: parse each value.
        return pa.array([None if s is None else round(to_epoch(s) * 1e6) for s in column.to_pylist()], pa.int64())
    raise ValueError(f"cannot read timestamps from a column of type {t}")


class OfflineStore:
    """Date-partitioned Parquet per view under ``root``; read and joined with DuckDB."""

    def __init__(self, root: str | Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock

    def _files(self, view: str) -> list[Path]:
        return sorted((self.root / view).glob("date=*/*.parquet"))

    def _scan(self, view: str) -> str:
        glob = str(self.root / view / "*" / "*.parquet").replace("'", "''")
        # union_by_name: files written before a field was added simply lack its column (NULL there).
        return (f"read_parquet('{glob}', hive_partitioning = true, hive_types = {{'date': DATE}}, "
                "union_by_name = true)")

    # -- writing ---------------------------------------------------------------------------------------

    def append(self, view: FeatureView, rows: pa.Table | Iterable[WriteItem]) -> int:
        """Log values of ``view``: an Arrow table with ``entity_key``, ``event_timestamp`` (unix seconds or
        a timestamp) and field columns (``created_timestamp`` optional, default now), or `WriteItem`s as
        written to the online store. Returns rows written. One file per UTC date touched, each made
        visible atomically, so batch the calls: every call writes at least one file."""
        table = rows if isinstance(rows, pa.Table) else self._items_table(view, rows)
        if table.num_rows == 0:
            return 0
        table = self._conform(view, table)
        micros = table.column("event_timestamp").cast(pa.int64())
        day = 86_400 * 1_000_000
        days = pc.divide(micros, day)  # integer division: micros are never negative for real events
        unique_days = pc.unique(days).to_pylist()
        for d in unique_days:
            part = table.filter(pc.equal(days, d)) if len(unique_days) > 1 else table
            self._write_file(view.name, _utc_date(d * 86_400), part)
        return table.num_rows

    def _items_table(self, view: FeatureView, items: Iterable[WriteItem]) -> pa.Table:
        items = list(items)
        columns: dict[str, Any] = {
            "entity_key": [i.key for i in items],
            "event_timestamp": pa.array([i.ts for i in items], pa.float64()),
        }
        for f in view.fields:
            columns[f.name] = pa.array([i.values.get(f.name) for i in items], ARROW_TYPES[f.dtype])
        return pa.table(columns)

    def _conform(self, view: FeatureView, table: pa.Table) -> pa.Table:
        n = table.num_rows
        names = set(table.column_names)
        for needed in ("entity_key", "event_timestamp"):
            if needed not in names:
                raise ValueError(f"view {view.name!r}: offline rows need a {needed!r} column")
        created = (timestamp_micros(table.column("created_timestamp")) if "created_timestamp" in names
                   else pa.repeat(pa.scalar(round(self.clock() * 1e6), pa.int64()), n))
        columns = [
            table.column("entity_key").cast(pa.string()),
            timestamp_micros(table.column("event_timestamp")).cast(TIMESTAMP),
            created.cast(TIMESTAMP),
        ]
        for f in view.fields:
            typ = ARROW_TYPES[f.dtype]
            columns.append(table.column(f.name).cast(typ) if f.name in names else pa.nulls(n, typ))
        return pa.Table.from_arrays(columns, schema=view_schema(view))

    def _write_file(self, view: str, date: str, table: pa.Table) -> Path:
        part_dir = self.root / view / f"date={date}"
        part_dir.mkdir(parents=True, exist_ok=True)
        path = part_dir / f"part-{int(time.time() * 1000)}-{uuid.uuid4().hex[:12]}.parquet"
        # Readers glob *.parquet: write under a name they skip, then rename, so nobody reads half a file.
        tmp = part_dir / f".{path.name}.tmp"
        try:
            pq.write_table(table, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    # -- reading ---------------------------------------------------------------------------------------

    def read(self, view: FeatureView, start: Timestamp | None = None, end: Timestamp | None = None) -> pa.Table:
        """Every logged row of ``view`` with ``start <= event_timestamp < end``, oldest first, in the
        view's current schema (fields added since a file was written are null there)."""
        duckdb = import_duckdb()  # offline only: keep DuckDB out of server start-up

        if not self._files(view.name):
            return view_schema(view).empty_table()
        where, params = self._time_filter(start, end)
        sql = (f"SELECT * EXCLUDE (date) FROM {self._scan(view.name)}"
               + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY event_timestamp, entity_key")
        with duckdb.connect() as con:
            table = con.sql(sql, params=params).to_arrow_table()
        return self._conform(view, table)

    @staticmethod
    def _time_filter(start: Timestamp | None, end: Timestamp | None) -> tuple[list[str], list[object]]:
        where: list[str] = []
        params: list[object] = []
        if start is not None:
            s = to_epoch(start)
            # The partition predicate lets DuckDB skip whole days without opening their files.
            where += ["date >= CAST(? AS DATE)", "epoch_us(event_timestamp) >= ?"]
            params += [_utc_date(s), round(s * 1e6)]
        if end is not None:
            e = to_epoch(end)
            where += ["date <= CAST(? AS DATE)", "epoch_us(event_timestamp) < ?"]
            params += [_utc_date(e), round(e * 1e6)]
        return where, params

    def newest(self, view: str) -> float | None:
        """Event time (unix seconds) of the newest logged value of ``view``; None when there is none."""
        files = self._files(view)
        if not files:
            return None
        # Files are partitioned by event date, so the newest value is in the newest date's files.
        newest_dir = max(f.parent for f in files)
        glob = str(newest_dir / "*.parquet").replace("'", "''")
        with serving_duckdb() as con:  # /metrics runs it in the serving process
            row = con.execute(f"SELECT max(epoch_us(event_timestamp)) FROM read_parquet('{glob}')").fetchone()
        return None if row is None or row[0] is None else row[0] / 1e6

    # -- training sets ---------------------------------------------------------------------------------

    def training_set(
        self,
        entity_rows: pa.Table | Sequence[Mapping[str, Any]] | str | Path,
        features: Sequence[tuple[FeatureView, Sequence[str]]],
        *,
        entities: Iterable[Entity] = (),
        timestamp_field: str = "event_timestamp",
        full_names: bool = False,
        defaults: bool = True,
        filter_by_created_timestamp: bool = False,
    ) -> pa.Table:
        """``entity_rows`` with one column per requested feature holding its value as of each row's
        ``timestamp_field``.

        ``entity_rows`` is an Arrow table, a list of dicts or a Parquet/CSV path; it needs the join key
        of each view's entity (from ``entities``; ``<entity>_id`` otherwise, e.g. ``customer_id``) and
        the timestamp. A batch view's values come from its source's full history (``source.path``), any
        other view's from this store's log. For every row and view the newest version with
        ``event_timestamp <=`` the row's timestamp is taken (of versions sharing an event time, the one
        created last); with ``filter_by_created_timestamp`` only versions created at or before the row's
        timestamp count, so a late correction cannot leak into an earlier row. When there is no such
        version, or it is older than the view's TTL, the field's default is used (null with
        ``defaults=False``). A null in a batch source stays null; a null in the log (a field a push did
        not give, or added since) counts as missing. Feature columns are named by field
        (``view__field`` with ``full_names``). Rows keep their order and all their columns: one output
        row per input row, duplicates included.
        """
        duckdb = import_duckdb()

        table = load_entity_rows(entity_rows)
        rows_are = str(entity_rows) if isinstance(entity_rows, (str, Path)) else "the entity table"
        columns = ", ".join(table.column_names) or "none"
        if timestamp_field not in table.column_names:
            raise EntityRowsError(f"{rows_are} has no timestamp column {timestamp_field!r} (columns: {columns})")
        entities = list(entities)
        join_keys = {e.name: e.join_key for e in entities}

        def key_of(view: FeatureView) -> str:
            return join_keys.get(view.entity, f"{view.entity}_id")

        out_names: list[str] = []
        for view, fields in features:
            key = key_of(view)
            if key not in table.column_names:
                raise EntityRowsError(f"{rows_are} has no join key column {key!r} for view {view.name!r} "
                                      f"(entity {view.entity!r}; columns: {columns})")
            for name in fields:
                if view.field(name) is None:
                    raise ValueError(f"view {view.name!r} has no field {name!r}")
                out_names.append(f"{view.name}__{name}" if full_names else name)
        clashes = {n for n in out_names if out_names.count(n) > 1 or n in table.column_names}
        if clashes:
            raise ValueError(f"feature column names clash: {', '.join(sorted(clashes))} (use full names)")
        if not features:
            return table

        try:
            ts = timestamp_micros(table.column(timestamp_field))
        except (ValueError, pa.ArrowException) as exc:  # pyarrow's "Invalid isoformat string: 'x'" named neither
            raise EntityRowsError(f"{rows_are}: cannot read column {timestamp_field!r} as times: {exc}") from None
        left: dict[str, Any] = {"__row": pa.array(range(table.num_rows), pa.int64()), "__ts": ts}
        keys: dict[str, str] = {}  # join key column -> its __k alias in the left table
        for view, _ in features:
            key = key_of(view)
            if key not in keys:
                keys[key] = f"__k{len(keys)}"
                try:
                    left[keys[key]] = table.column(key).cast(pa.string())
                except pa.ArrowException as exc:  # a list or struct column
                    raise EntityRowsError(f"{rows_are}: join key column {key!r} is not text or numbers "
                                          f"({table.schema.field(key).type}): {exc}") from None
        left_table = pa.table(left)
        valid = pc.drop_null(ts)
        lo, hi = (pc.min(valid).as_py(), pc.max(valid).as_py()) if len(valid) else (0, 0)

        selects: list[str] = []
        joins: list[str] = []
        params: list[object] = []
        out_fields: list[tuple[str, int, FeatureView, str]] = []  # (column, view index, view, field)
        con = duckdb.connect()
        try:
            con.register("__entities", left_table)
            for i, (view, fields) in enumerate(features):
                alias = f"f{i}"
                sub, sub_params = self._history(con, view, fields, entities, lo, hi, filter_by_created_timestamp)
                params += sub_params
                kcol = keys[key_of(view)]
                joins.append(f"ASOF LEFT JOIN ({sub}) AS {alias} "
                             f"ON e.{kcol} = {alias}.entity_key AND {alias}.__at <= e.__ts")
                # A version counts when there is one and, if the view has a TTL, it is no older than the
                # TTL at the row's time (exactly the TTL still counts, as when serving); if even the newest
                # one is too old, the serving path would have ignored it.
                fresh = f"{alias}.__ts IS NOT NULL"
                if view.ttl_seconds is not None:
                    fresh += f" AND {alias}.__ts >= e.__ts - {round(view.ttl_seconds * 1e6)}"
                selects.append(f"({fresh}) AS __ok{i}")
                for name in fields:
                    col = f"__out{len(out_fields)}"
                    selects.append(f"{alias}.{quote_ident(name)} AS {col}")
                    out_fields.append((col, i, view, name))
            sql = f"SELECT {', '.join(selects)} FROM __entities AS e {' '.join(joins)} ORDER BY e.__row"
            try:
                joined = con.sql(sql, params=params).to_arrow_table()
            except duckdb.Error as exc:
                raise ValueError(f"training set join failed: {exc}") from None
        finally:
            con.close()

        for (col, i, view, name), out_name in zip(out_fields, out_names, strict=True):
            f = view.field(name)
            assert f is not None
            typ = ARROW_TYPES[f.dtype]
            values = joined.column(col)
            if view.kind == "batch":  # a user's file: check it as materialization would
                values = check_column(view, f, values, table.column(key_of(view)).cast(pa.string()))
            else:
                values = values.cast(typ)
            ok = joined.column(f"__ok{i}")
            if view.kind != "batch":  # the log cannot tell a value not given from a null
                ok = pc.and_(ok, pc.is_valid(values))
            missing = pa.scalar(f.default if defaults else None, typ)
            table = table.append_column(pa.field(out_name, typ), pc.if_else(ok, values, missing))
        return table

    def _history(self, con: Any, view: FeatureView, fields: Sequence[str], entities: Iterable[Entity], lo_us: int,
                 hi_us: int, filter_by_created: bool) -> tuple[str, list[object]]:
        """SQL for the versions of ``view`` an ASOF join can match, and its parameters: columns
        ``entity_key``, ``__at`` (the time from which the version is the answer), ``__ts`` (its event
        time, for the TTL) and the fields.

        Without ``filter_by_created`` that is one row per key and event time, the last created (``__at``
        is the event time). With it, a version is known from ``max(event, created)``; each row carries
        the newest version (by event time, then created time) known by its ``__at``, computed by a window
        over the key's versions in ``__at`` order, so the ASOF match on ``__at`` finds it."""
        rows, params = self._versions(con, view, fields, entities, lo_us, hi_us)
        names = [quote_ident(n) for n in fields]
        if not filter_by_created:
            return (f"SELECT entity_key, __ts AS __at, __ts, {', '.join(names)} FROM ({rows}) "
                    "QUALIFY row_number() OVER (PARTITION BY entity_key, __ts "
                    "ORDER BY __created DESC NULLS LAST) = 1"), params
        at = "greatest(__ts, coalesce(__created, __ts))"
        packed = ", ".join(["__ts := __ts", *(f"v{j} := {n}" for j, n in enumerate(names))])
        best = (f"arg_max(struct_pack({packed}), struct_pack(t := __ts, c := coalesce(__created, -1))) "
                f"OVER (PARTITION BY entity_key ORDER BY {at} RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)")
        cols = ", ".join(f"__best.v{j} AS {n}" for j, n in enumerate(names))
        return (f"SELECT entity_key, __at, __best.__ts AS __ts, {cols} FROM "
                f"(SELECT entity_key, {at} AS __at, {best} AS __best FROM ({rows})) "
                "QUALIFY row_number() OVER (PARTITION BY entity_key, __at) = 1"), params

    def _versions(self, con: Any, view: FeatureView, fields: Sequence[str], entities: Iterable[Entity], lo_us: int,
                  hi_us: int) -> tuple[str, list[object]]:
        """SQL for every stored version of ``view`` that can match rows timed ``lo_us..hi_us``: columns
        ``entity_key``, ``__ts``, ``__created`` (UTC microseconds; created may be null) and the fields.
        A batch view's come from its source, any other's from the log."""
        ttl = view.ttl_seconds
        # Only what can match: up to the newest row time, and back to the oldest minus the TTL (anything
        # older would be stale for every row).
        first_us = lo_us - round(ttl * 1e6) if ttl is not None else None
        if view.kind == "batch":
            src = describe(con, view, entities)
            key = quote_ident(src.join_key)
            created = src.created_us or "CAST(NULL AS BIGINT)"
            where = [f"{key} IS NOT NULL", f"{src.ts_us} <= ?"]
            params: list[object] = [hi_us]
            if first_us is not None:
                where.append(f"{src.ts_us} >= ?")
                params.append(first_us)
            cols = ", ".join(quote_ident(n) for n in fields)
            return (f"SELECT CAST({key} AS VARCHAR) AS entity_key, {src.ts_us} AS __ts, {created} AS __created, "
                    f"{cols} FROM {src.scan} WHERE {' AND '.join(where)}"), params
        if not self._files(view.name):
            casts = ", ".join(f"CAST(NULL AS {_duck_type(view, n)}) AS {quote_ident(n)}" for n in fields)
            return (f"SELECT NULL::VARCHAR AS entity_key, NULL::BIGINT AS __ts, NULL::BIGINT AS __created, {casts} "
                    "WHERE false"), []
        scan = self._scan(view.name)
        present = {r[0] for r in con.sql(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
        cols = ", ".join(quote_ident(n) if n in present else f"CAST(NULL AS {_duck_type(view, n)}) AS {quote_ident(n)}"
                         for n in fields)
        # The partition predicate lets DuckDB skip whole days without opening their files.
        where = ["date <= CAST(? AS DATE)"]
        params = [_utc_date(hi_us / 1e6)]
        if first_us is not None:
            where.append("date >= CAST(? AS DATE)")
            params.append(_utc_date(first_us / 1e6))
        return (f"SELECT entity_key, epoch_us(event_timestamp) AS __ts, epoch_us(created_timestamp) AS __created, "
                f"{cols} FROM {scan} WHERE {' AND '.join(where)}"), params


_DUCK_TYPES = {"int": "BIGINT", "float": "DOUBLE", "str": "VARCHAR", "bool": "BOOLEAN",
               "list[str]": "VARCHAR[]", "list[float]": "DOUBLE[]", "list[int]": "BIGINT[]"}


def _duck_type(view: FeatureView, name: str) -> str:
    f = view.field(name)
    assert f is not None
    return _DUCK_TYPES[f.dtype]


def load_entity_rows(rows: pa.Table | Sequence[Mapping[str, Any]] | str | Path) -> pa.Table:
    """Entity rows for `OfflineStore.training_set` from a table, a list of dicts or a Parquet/CSV file (a file named
    ``.csv`` is read as CSV, any other file or a folder of them as Parquet). `EntityRowsError` names a file it cannot
    read and why."""
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, (str, Path)):
        path = Path(rows)
        csv = path.suffix.lower() == ".csv"
        if csv and path.is_dir():
            raise EntityRowsError(f"{path} is a folder, not a CSV file")
        try:
            return pacsv.read_csv(path) if csv else pq.read_table(path)
        except FileNotFoundError:
            raise EntityRowsError(f"no such file: {path}") from None
        except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
            reason = getattr(exc, "strerror", None) or str(exc)
            # pyarrow repeats the path: "Could not open Parquet input source '<path>': Parquet magic bytes ..."
            reason = reason.replace(f"Could not open Parquet input source '{path}': ", "")
            kind = "a readable CSV file" if csv else "a readable Parquet file (a .csv name reads it as CSV)"
            raise EntityRowsError(f"{path} is not {kind}: {reason.splitlines()[0] if reason else type(exc).__name__}"
                                  ) from None
    return pa.Table.from_pylist([dict(r) for r in rows])


def resolve_features(repo: FeatureRepo, refs: Iterable[str]) -> list[tuple[FeatureView, list[str]]]:
    """``["view:field", "view:*", ...]`` as (view, fields) pairs in first-mention order."""
    chosen: dict[str, tuple[FeatureView, list[str]]] = {}
    for ref in refs:
        ref = ref.strip()
        if not ref:
            continue
        name, _, field_name = ref.partition(":")
        view = repo.view(name)
        if view is None:
            raise ValueError(f"unknown feature view {name!r} (in {ref!r})")
        _, fields = chosen.setdefault(name, (view, []))
        wanted = [f.name for f in view.fields] if field_name in ("", "*") else [field_name]
        for w in wanted:
            if view.field(w) is None:
                raise ValueError(f"view {name!r} has no field {w!r}")
            if w not in fields:
                fields.append(w)
    return list(chosen.values())


def entities_from_decisions(
    root: str | Path,
    placement: str | None = None,
    since: Timestamp | None = None,
    until: Timestamp | None = None,
) -> pa.Table:
    """Entity rows from the decision log under ``root`` (the data dir): every logged decision's columns
    (``customer_id``, ``features_json`` — the exact features served —, ``chosen``, probabilities, ...)
    plus ``event_timestamp``, the decision time, for `OfflineStore.training_set`."""
    from kassa.events.decision_log import read_decisions

    table = read_decisions(Path(root), placement=placement,
                           since=None if since is None else to_epoch(since),
                           until=None if until is None else to_epoch(until))
    return table.append_column(pa.field("event_timestamp", TIMESTAMP),
                               timestamp_micros(table.column("ts")).cast(TIMESTAMP))
