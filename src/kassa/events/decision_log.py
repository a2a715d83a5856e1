"""The decision log: one record per decision served, written as date-partitioned Parquet.

This module owns ``<root>/decisions/date=YYYY-MM-DD/part-<unixms>-<seq>.parquet``: its schema, the
buffered writer the decide path appends to, and ``read_decisions`` for offline evaluation and
training. Each record carries exactly what off-policy evaluation needs: the feature vector used,
every candidate with its policy probability, and the probability of each shown offer.

The hot path only appends to an in-memory deque; a daemon thread does all file I/O, so neither the
event loop nor a request ever waits for the disk.

A closed hour's small files are merged into one ``part-<start ms>-c<end ms>[-s<first>-<last>].parquet``
(`kassa.events.compaction`), which covers every small file whose name's write time is in ``[start, end)``.
Until those are removed, both are in the directory: every reader lists the files with `decision_files`, which
leaves out the small files a merged file covers, and reads again when a listed file was removed meanwhile
(`read_log`), so a read sees every decision once.

A decision id starts with the second the decision was made (`decision_id_base`), so a lookup by id
(`find_decision`, the dashboard's explorer) reads only that date's partition (`lookup_partitions`).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from kassa import errors
from kassa.nativeimport import import_duckdb
from kassa.schemas import StoredValue

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class DecisionRecord(msgspec.Struct):
    decision_id: str
    ts: float  # unix seconds
    placement: str
    model_version: str
    request_id: str | None
    customer_id: str | None
    features: dict[str, StoredValue]  # the exact feature vector the policy scored
    candidates: list[str]  # offer ids scored, in order
    probabilities: list[float]  # the policy's probability for each candidate, same order
    chosen: list[str]  # offer ids shown, in rank order
    chosen_probabilities: list[float]  # probability with which each slot's offer was chosen
    explored: bool
    fallback: bool
    took_ms: float
    # per candidate (same order), the retrieval signals appended to its learner line (`kassa.decide.retrieval.signals`);
    # None for placements without retrieval and for records written before issue 14
    candidate_signals: list[str] | None = None
    # per candidate (same order), the offer feature views' namespace appended to its catalog line before the
    # retrieval signals (`kassa.features.offer_features`, "" where nothing was stored); None without offer views
    candidate_offer_features: list[str] | None = None


SCHEMA = pa.schema(
    [
        pa.field("decision_id", pa.string(), nullable=False),
        pa.field("ts", pa.float64(), nullable=False),
        pa.field("placement", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("request_id", pa.string()),
        pa.field("customer_id", pa.string()),
        pa.field("features_json", pa.string(), nullable=False),
        pa.field("candidates", pa.list_(pa.string())),
        pa.field("probabilities", pa.list_(pa.float64())),
        pa.field("chosen", pa.list_(pa.string())),
        pa.field("chosen_probabilities", pa.list_(pa.float64())),
        pa.field("explored", pa.bool_(), nullable=False),
        pa.field("fallback", pa.bool_(), nullable=False),
        pa.field("took_ms", pa.float64(), nullable=False),
        pa.field("candidate_signals", pa.list_(pa.string())),
        pa.field("candidate_offer_features", pa.list_(pa.string())),
    ]
)


class EncodedDecisionRecord(msgspec.Struct):
    """A `DecisionRecord` as the JetStream writer (`kassa.events.consumers.DecisionLogConsumer`) decodes it from the
    decisions stream: the same fields, ``features`` kept as the JSON its publisher encoded (`msgspec.Raw`), which
    is the ``features_json`` `records_to_table` writes. Decoding the features into a dict to encode them again made
    the same string (msgspec's own output decodes and encodes to itself) at ~25 µs more CPU a record of 50 candidates
    and ~25 features (bench/writer_cpu.py's records: decoding 36-50 -> 25-31 µs, `records_to_table` 24-32 -> 13-19)."""

    decision_id: str
    ts: float
    placement: str
    model_version: str
    request_id: str | None
    customer_id: str | None
    features: msgspec.Raw
    candidates: list[str]
    probabilities: list[float]
    chosen: list[str]
    chosen_probabilities: list[float]
    explored: bool
    fallback: bool
    took_ms: float
    candidate_signals: list[str] | None = None
    candidate_offer_features: list[str] | None = None


# Columns added after the first files were written (issue 14), all lists of strings: older files read them as null.
LATER_COLUMNS = ("candidate_signals", "candidate_offer_features")

_json = msgspec.json.Encoder()


def loggable_features(features: dict[str, Any]) -> dict[str, Any]:
    """Features as logged: lists (categories) become one joined string so each column stays scalar."""
    return {k: ("|".join(map(str, v)) if isinstance(v, list) else v) for k, v in features.items()}


def records_to_table(records: Iterable[DecisionRecord | EncodedDecisionRecord]) -> pa.Table:
    """Decision records as an Arrow table with ``SCHEMA`` (features as a JSON string; an `EncodedDecisionRecord`'s
    as they came)."""
    rows = list(records)
    columns = {
        "decision_id": [r.decision_id for r in rows],
        "ts": [r.ts for r in rows],
        "placement": [r.placement for r in rows],
        "model_version": [r.model_version for r in rows],
        "request_id": [r.request_id for r in rows],
        "customer_id": [r.customer_id for r in rows],
        "features_json": [_json.encode(r.features).decode() for r in rows],
        "candidates": [r.candidates for r in rows],
        "probabilities": [r.probabilities for r in rows],
        "chosen": [r.chosen for r in rows],
        "chosen_probabilities": [r.chosen_probabilities for r in rows],
        "explored": [r.explored for r in rows],
        "fallback": [r.fallback for r in rows],
        "took_ms": [r.took_ms for r in rows],
        "candidate_signals": [r.candidate_signals for r in rows],
        "candidate_offer_features": [r.candidate_offer_features for r in rows],
    }
    return pa.table(columns, schema=SCHEMA)


class DecisionSink(Protocol):
    """Where the decide path sends its records: `DecisionLogWriter` (Parquet in-process, embedded) or
    `kassa.events.jetstream.DecisionPublisher` (the decisions stream; a writer process makes the Parquet)."""

    def append(self, record: DecisionRecord) -> None:
        """Never blocks, never raises."""
        ...

    def find_unwritten(self, decision_id: str) -> DecisionRecord | None: ...

    def flush(self) -> int:
        """Write (or publish) everything buffered now; blocking."""
        ...

    def close(self) -> None: ...


_DATES: dict[int, str] = {}


def _utc_date(ts: float) -> str:
    """The UTC date of ``ts`` (``YYYY-MM-DD``), as ``datetime.fromtimestamp(ts, UTC)`` has it. Memoised by day
    number (a record's formatting was ~4 µs, a file's records mostly share one day), except in a day's last
    microsecond, which `datetime` rounds into the next day."""
    day, into = divmod(ts, 86_400.0)
    if into >= 86_399.999999 or day != day:  # rounded into the next day by datetime; NaN (raises there)
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")
    date = _DATES.get(int(day))
    if date is None:
        if len(_DATES) > 10_000:
            _DATES.clear()
        date = _DATES[int(day)] = datetime.fromtimestamp(day * 86_400.0, UTC).strftime("%Y-%m-%d")
    return date


class DecisionLogWriter:
    """Buffers decision records and writes them to Parquet every ``flush_seconds`` from a thread.

    ``append`` never blocks and never raises. A failed write keeps its records in the buffer (in
    order) for the next attempt and is logged; nothing is dropped. ``max_buffer`` is not a cap: it
    wakes the flusher early so a burst produces several moderate files instead of one huge one.
    """

    def __init__(self, root: Path, flush_seconds: float = 0.5, max_buffer: int = 5000,
                 on_written: Callable[[list[DecisionRecord]], None] | None = None) -> None:
        self.on_written = on_written  # called on the writer's thread with each batch written (drift)
        self.root = Path(root)
        self.dir = self.root / "decisions"
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self.written = 0  # records durably written to Parquet
        self.files_written = 0
        self.failed_flushes = 0
        # deque.append/popleft are atomic under the GIL: no lock on the hot path, and a record
        # appended while a flush runs is never swept into a batch that was already taken.
        self._buffer: collections.deque[DecisionRecord] = collections.deque()
        self._writing: list[DecisionRecord] = []  # the batch a flush took, until it is in its files
        self._flush_lock = threading.Lock()  # serialises the thread's flush and explicit flush()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._seq = 0
        self._thread = threading.Thread(target=self._run, name="kassa-decision-log", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Records appended but not yet written."""
        return len(self._buffer)

    def find_unwritten(self, decision_id: str) -> DecisionRecord | None:
        """A record still in memory (appended, or taken by a flush that has not finished), newest first."""
        for records in (list(self._buffer), list(self._writing)):  # list(): one atomic copy under the GIL
            for rec in reversed(records):
                if rec.decision_id == decision_id:
                    return rec
        return None

    def append(self, record: DecisionRecord) -> None:
        self._buffer.append(record)
        if len(self._buffer) >= self.max_buffer and not self._wake.is_set():
            self._wake.set()

    def flush(self) -> int:
        """Write every buffered record now; return how many were written (failures are logged)."""
        with self._flush_lock:
            n = len(self._buffer)
            if n == 0:
                return 0
            batch = [self._buffer.popleft() for _ in range(n)]
            self._writing = batch
            by_date: dict[str, list[DecisionRecord]] = {}
            for rec in batch:
                by_date.setdefault(_utc_date(rec.ts), []).append(rec)
            done = 0
            failed_dates: set[str] = set()
            for date, recs in by_date.items():
                try:
                    self._write_file(date, recs)
                except Exception:
                    self.failed_flushes += 1
                    log.exception("decision log: writing %d records for %s failed", len(recs), date)
                    failed_dates.add(date)
                else:
                    done += len(recs)
                    if self.on_written is not None:
                        try:
                            self.on_written(recs)
                        except Exception:
                            log.exception("decision log: on_written callback failed")
            if failed_dates:
                # Back in front of anything appended meanwhile, in append order, for the next try.
                failed = [r for r in batch if _utc_date(r.ts) in failed_dates]
                self._buffer.extendleft(reversed(failed))
            self.written += done
            self._writing = []
            return done

    def _write_file(self, date: str, records: list[DecisionRecord]) -> Path:
        part_dir = self.dir / f"date={date}"
        part_dir.mkdir(parents=True, exist_ok=True)
        unixms = int(time.time() * 1000)
        # Readers glob *.parquet: write under a name they skip, fsync, then give it its name, so a reader never
        # sees a half-written file and a crash never leaves a corrupt one. Other processes may share the
        # directory (`kassa serve --workers N` on the embedded backend): the temporary name is this writer's
        # own, and the final name is taken with a hard link, which fails rather than replace a file another
        # writer named the same in the same millisecond (then the next sequence number is tried). Before, two
        # such flushes wrote one temporary file together (a damaged Parquet file) or one renamed over the other.
        tmp = part_dir / f".part-{unixms}-{os.getpid()}-{id(self):x}.parquet.tmp"
        try:
            pq.write_table(records_to_table(records), tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            while True:
                self._seq += 1
                path = part_dir / f"part-{unixms}-{self._seq}.parquet"
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    continue
                except OSError:  # a file system without hard links: the name check, then a rename
                    if path.exists():
                        continue
                    os.replace(tmp, path)
                break
        finally:
            tmp.unlink(missing_ok=True)
        self.files_written += 1
        return path

    def _run(self) -> None:
        # Flushes start every ``flush_seconds`` (not ``flush_seconds`` after the last one ended), so a record
        # waits at most one period plus one write: what a `kill -9` can lose (tests/test_topology_faults.py).
        next_at = time.monotonic() + self.flush_seconds
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            self._wake.clear()
            next_at = time.monotonic() + self.flush_seconds
            try:
                self.flush()
            except Exception:  # flush() already logs write errors; this is a last resort
                log.exception("decision log flusher error")

    def close(self) -> None:
        """Stop the flusher and write whatever is buffered."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.flush()
        if self._buffer:
            log.error("decision log closed with %d unwritten records", len(self._buffer))


# ------------------------------------------------------------------ the files and the reader rule
# part-<unixms>-<seq> (DecisionLogWriter), part-<unixms>-s<first>-<last> (the JetStream writer),
# part-<start ms>-c<end ms>[-s<first>-<last>] (a compacted hour)
_NAME = re.compile(r"^part-(\d+)-(?:c(\d+)(?:-s\d+-\d+)?|s\d+-\d+|\d+)\.parquet$")


def file_span(name: str) -> tuple[int, int | None] | None:
    """``(write ms, None)`` for a small file, ``(start ms, end ms)`` for a compacted one, None for any other name."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def decision_files(partition: Path | str) -> list[str]:
    """The Parquet files of one date partition a reader reads: a small file covered by a compacted file (its write
    time in the compacted file's span) is left out, its rows being in the compacted file. Sorted by name."""
    names: list[str] = []
    spans: list[tuple[int, int]] = []
    try:
        with os.scandir(partition) as entries:
            for e in entries:
                if e.name.endswith(".parquet") and not e.name.startswith("."):  # not a writer's temp file
                    names.append(e.name)
                    span = file_span(e.name)
                    if span is not None and span[1] is not None:
                        spans.append((span[0], span[1]))
    except FileNotFoundError:
        return []
    if spans:
        def covered(name: str) -> bool:
            span = file_span(name)
            return span is not None and span[1] is None and any(a <= span[0] < b for a, b in spans)
        names = [n for n in names if not covered(n)]
    base = os.fspath(partition)
    return [os.path.join(base, n) for n in sorted(names)]


def log_files(directory: Path, from_date: str | None = None) -> list[str]:
    """`decision_files` of every date partition of ``directory`` (``<root>/decisions``), from ``from_date`` on."""
    try:
        parts = sorted(e.path for e in os.scandir(directory) if e.is_dir() and e.name.startswith("date=")
                       and (from_date is None or e.name[5:] >= from_date))
    except FileNotFoundError:
        return []
    return [f for part in parts for f in decision_files(part)]


def parquet_list(files: list[str]) -> str:
    """``files`` as a DuckDB list literal for ``read_parquet``."""
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


# DuckDB starts a thread per core for every connection. Inside a serving process (the dashboard's reads of this log,
# `GET /v1/decisions/{id}`, /metrics' feature freshness) those threads compete with the decisions for the cores: on
# 2 cores with a million logged decisions, decision P99 under a dashboard page loop was lower in 3 of 3 pairs with
# one thread (median 47 -> 18 ms; 200,000 decisions: within the VM's noise), page times unchanged
# (bench/dashboard_contention.py, docs/benchmarks.md). Offline commands (train, evaluate, materialize) keep the default.
SERVING_DUCKDB_THREADS = 1


def serving_duckdb() -> Any:
    """A DuckDB connection for a read inside a serving process: ``SERVING_DUCKDB_THREADS`` threads."""
    duckdb = import_duckdb()

    return duckdb.connect(config={"threads": SERVING_DUCKDB_THREADS})


def read_log(read: Callable[[], _T], attempts: int = 5, base: Path | None = None) -> _T:
    """``read()`` (which lists the files, then reads them), again when a file it listed was removed before DuckDB
    opened it: compaction removes the small files it merged, and a new listing has the merged file instead. A file
    that is not readable Parquet is `UnreadableDecisionLog` naming it (``base``: the folder read)."""
    duckdb = import_duckdb()

    for attempt in range(attempts):
        try:
            return read()
        except duckdb.IOException as exc:
            gone = "No such file" in str(exc) or "No files found" in str(exc)
            if attempt == attempts - 1 and gone:
                raise
            if not gone:
                raise _unreadable(base, exc) from None
        except duckdb.InvalidInputException as exc:  # empty, cut short: was a traceback (a 500 on the API)
            raise _unreadable(base, exc) from None
    raise AssertionError("unreachable")


# ------------------------------------------------------------------ decision ids and the lookup by id
# A decision id is 24 hex digits: the unix second the decision was made (its record's ``ts``, so the date partition
# it is written to), 8 digits big-endian, then 64 random bits: `kassa.decide.engine` makes it from `decision_id_base`
# (once a second) and 64 random bits; the lookup reads the time back and opens that date's partition only.
ID_LENGTH = 24
# No id made by a Kassa that put the time in it is older than this (2026-12-01 UTC): a smaller prefix is an id of the
# random form made before, whose first 8 digits mean nothing.
ID_TIME_FROM = 1_796_083_200
# An id of the random form is looked for in the date partitions of this many days before now, newest first
# (``decision_lookup_days``): what bounds the cost of any lookup.
LOOKUP_DAYS = 30.0
# The partitions either side of an id's time that are read too, should a writer have dated its record differently.
_ID_SKEW_SECONDS = 3600.0
_HEX_ID = re.compile(r"[0-9a-f]{24}")


def decision_id_base(now: float) -> int:
    """The part of the ids made in ``now``'s second: ``hex(base | 64 random bits)[3:]`` is the id (the 1 above the
    second's 32 bits keeps hex() from dropping leading zeros, and ``[3:]`` drops it with the ``0x``)."""
    return 1 << 96 | (int(now) & 0xFFFFFFFF) << 64


def decision_id_time(decision_id: str) -> int | None:
    """The unix second a decision id says it was made; None for an id that is not 24 lowercase hex digits, or whose
    first 8 are before `ID_TIME_FROM` (the random ids made before ids carried their time)."""
    if len(decision_id) != ID_LENGTH or _HEX_ID.fullmatch(decision_id) is None:
        return None
    t = int(decision_id[:8], 16)
    return t if t >= ID_TIME_FROM else None


def lookup_partitions(directory: Path, decision_id: str, now: float | None = None,
                      lookback_days: float = LOOKUP_DAYS) -> list[Path]:
    """The date partitions of ``directory`` (``<root>/decisions``) a decision with this id can be in, in the order to
    read them: an id whose time is at most `_ID_SKEW_SECONDS` after ``now``, the partition of that time and its
    neighbours that exist (at most two); any other id (the random form, or a time whose partitions do not exist),
    the partitions from ``lookback_days`` before ``now`` on, newest first. An id of the random form whose first 8
    digits happen to read as a time since `ID_TIME_FROM` with a partition is looked for there only (about 1 in
    50,000 such ids per day of log since then)."""
    now = time.time() if now is None else now
    directory = Path(directory)
    t = decision_id_time(decision_id)
    if t is not None and t <= now + _ID_SKEW_SECONDS:
        dates = dict.fromkeys(_utc_date(s) for s in (t, t - _ID_SKEW_SECONDS, t + _ID_SKEW_SECONDS))
        own = [p for d in dates if (p := directory / f"date={d}").is_dir()]
        if own:
            return own
    first = _utc_date(now - lookback_days * 86400.0)
    try:
        names = [e.name for e in os.scandir(directory) if e.is_dir() and e.name.startswith("date=")]
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(names, reverse=True) if n[5:] >= first]


def find_decision(root: Path, decision_id: str, now: float | None = None,
                  lookback_days: float = LOOKUP_DAYS) -> DecisionRecord | None:
    """One logged decision by id, read from the partitions `lookup_partitions` names: the one of the id's time, or
    for an id without one the last ``lookback_days`` (from ``now``) newest first, so no lookup reads the whole
    history (DuckDB reads only the ``decision_id`` column until it finds it). ``None`` when it is not there."""
    with serving_duckdb() as con:  # `GET /v1/decisions/{id}` runs it in the serving process
        for date_dir in lookup_partitions(Path(root) / "decisions", decision_id, now, lookback_days):
            def find(date_dir: Path = date_dir) -> pa.Table | None:
                files = decision_files(date_dir)
                if not files:
                    return None
                return con.sql(f"SELECT * FROM read_parquet({parquet_list(files)}, union_by_name = true) "
                               "WHERE decision_id = ? LIMIT 1", params=[decision_id]).to_arrow_table()
            table = read_log(find, base=date_dir)
            if table is not None and table.num_rows:
                row = table.to_pylist()[0]
                features = msgspec.json.decode(row.pop("features_json"))
                return msgspec.convert({**row, "features": features}, DecisionRecord)
    return None


class UnreadableDecisionLog(errors.KassaError, ValueError):
    """A file of the decision log that is not readable Parquet. Kassa writes each file whole and renames it into
    place, so such a file was cut short or changed by something else (a full disk during a copy, an editor, a
    sync tool); the message names it and says to move it aside. On the API a 500 problem of its own type, on the
    dashboard its error page: no answer is better than tallies that leave a file's decisions out unsaid."""

    title, slug = "Decision log unreadable", "decision-log-unreadable"


def _unreadable(base: Path | None, exc: Exception) -> UnreadableDecisionLog:
    where = f" in {base}" if base is not None else ""
    return UnreadableDecisionLog(
        f"cannot read the decision log{where}: {str(exc).removeprefix('Invalid Input Error: ')}. Kassa writes "
        "each file whole, so this one was damaged outside Kassa: move it out of the folder (its decisions are "
        "then left out) and run again")


def read_decisions(
    root: Path,
    placement: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> pa.Table:
    """Logged decisions under ``root`` ordered by time, optionally for one placement and in
    ``[since, until)`` (unix seconds). Columns are ``SCHEMA``; empty table when nothing is logged.
    `UnreadableDecisionLog` names a file that is not readable Parquet."""
    duckdb = import_duckdb()  # imported here: DuckDB is only needed offline, not at server start

    base = Path(root) / "decisions"
    where: list[str] = []
    params: list[object] = []
    if placement is not None:
        where.append("placement = ?")
        params.append(placement)
    if since is not None:
        # The partition predicate lets DuckDB skip whole days without opening their files.
        where += ["date >= CAST(? AS DATE)", "ts >= ?"]
        params += [_utc_date(since), since]
    if until is not None:
        where += ["date <= CAST(? AS DATE)", "ts < ?"]
        params += [_utc_date(until), until]
    cols = ", ".join(f'"{name}"' for name in SCHEMA.names)

    def read() -> pa.Table | None:
        # the files listed here, not a glob: a small file a compacted one covers is left out (`decision_files`)
        files = log_files(base, _utc_date(since) if since is not None else None)
        if not files:
            return None
        source = (f"read_parquet({parquet_list(files)}, hive_partitioning = true, hive_types = {{'date': DATE}}, "
                  "union_by_name = true)")
        tail = (f"FROM {source}" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY ts, decision_id")
        con = duckdb.connect()
        try:
            try:
                return con.sql(f"SELECT {cols} {tail}", params=params).to_arrow_table()
            except duckdb.BinderException:
                # Only files written before a column was added (`LATER_COLUMNS`): read it as null.
                have = {row[0] for row in con.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()}
                sel = ", ".join(f'"{n}"' if n in have or n not in LATER_COLUMNS else f'NULL::VARCHAR[] AS "{n}"'
                                for n in SCHEMA.names)
                return con.sql(f"SELECT {sel} {tail}", params=params).to_arrow_table()
        finally:
            con.close()

    table = read_log(read, base=base)  # a damaged file: UnreadableDecisionLog, was a traceback in train/evaluate
    if table is None:  # nothing logged
        return SCHEMA.empty_table()
    return table.cast(SCHEMA)
