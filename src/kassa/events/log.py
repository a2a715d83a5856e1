"""The durable event log: every accepted outcome event, deduplicated by ``event_id``, in order.

This module owns the ``events`` table and the guarantee behind ``POST /v1/events``: ``append``
returns only after the new events are committed with ``synchronous=FULL`` in WAL mode, so an
acknowledged event survives a crash. Learners and stream workers replay it with ``read``.

Latency: SQLite calls block, so the asyncio loop never touches the write connection. A single
writer thread drains every append queued since its last commit and writes them in one transaction
(group commit): one fsync is shared by all concurrent requests instead of one per request. After the first
append of a group it waits up to ``gather_seconds`` (2 ms) for more: at a few hundred posts a second per
process the previous commit rarely overlapped the next post, so nearly every post paid a commit and its fsync
alone (~130-180 µs of CPU, against ~20 µs per post in groups; measured on the 2-core machine, docs/adr/0009
addendum). An event's ack waits that much longer; a decision never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from kassa import schemas

log = logging.getLogger(__name__)

metadata = sa.MetaData()
events_table = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.Text, unique=True, nullable=False),
    sa.Column("type", sa.Text),
    sa.Column("decision_id", sa.Text, index=True),
    sa.Column("received_at", sa.Float),
    sa.Column("body", sa.LargeBinary),
    # AUTOINCREMENT: a seq is never reused, even after the highest row is deleted, so a reader's
    # "after_seq" cursor can never skip or re-read an event.
    sqlite_autoincrement=True,
)

# Upper bound of events per group commit, so one huge backlog doesn't hold the write lock forever.
_MAX_GROUP_EVENTS = 20_000


@dataclass(slots=True)
class AppendResult:
    new: list[schemas.Event] = field(default_factory=list)
    duplicates: int = 0
    seqs: list[int] | None = None  # the log positions of ``new``, when the log knows them (SQLite)


class EventLog(Protocol):
    async def append(self, events: list[schemas.Event], received_at: float) -> AppendResult:
        """Store the events not seen before; return once they are durably committed."""
        ...

    def read(self, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, schemas.Event]]:
        """Events with ``seq > after_seq`` in append order, at most ``limit``."""
        ...

    def count(self) -> int: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Pending:
    events: list[schemas.Event]
    received_at: float
    future: asyncio.Future[AppendResult]
    loop: asyncio.AbstractEventLoop


_STOP = object()
_EXISTS = "SELECT 1 FROM events WHERE event_id = ?"
_INSERT = "INSERT INTO events (event_id, type, decision_id, received_at, body) VALUES (?, ?, ?, ?, ?)"


def set_pragmas(dbapi_conn: Any, _record: Any = None) -> None:
    """The event log's connection settings (WAL, synchronous=FULL, a busy timeout), for every connection to it."""
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        # Readers and the writer use different connections; wait out brief locks (checkpoints)
        # instead of failing with "database is locked".
        cur.execute("PRAGMA busy_timeout=10000")
    finally:
        cur.close()


def _resolve(
    fut: asyncio.Future[AppendResult], result: AppendResult | None, exc: BaseException | None
) -> None:
    if fut.done():  # the awaiting request was cancelled; its events are committed regardless
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result if result is not None else AppendResult())


def _resolve_all(answers: list[tuple[asyncio.Future[AppendResult], AppendResult | None]],
                 exc: BaseException | None) -> None:
    for fut, result in answers:
        _resolve(fut, result, exc)


class SqliteEventLog(EventLog):
    """``EventLog`` on one SQLite file, written by a single group-commit thread."""

    def __init__(self, path: str | Path, gather_seconds: float = 0.002) -> None:
        self.path = Path(path)
        self.gather_seconds = gather_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._engine: Engine = sa.create_engine(f"sqlite:///{self.path}")
        sa.event.listen(self._engine, "connect", set_pragmas)
        for attempt in range(3):
            try:
                metadata.create_all(self._engine)
                break
            except sa.exc.OperationalError as exc:
                # Another process (`kassa learn` beside `kassa serve`, both started the moment their metadata
                # database came up) created a table between the check and the CREATE: check again.
                if "already exists" not in str(exc) or attempt == 2:
                    raise
        self._encoder = msgspec.json.Encoder()
        self._write_conn: sqlite3.Connection | None = None  # opened and used by the writer thread only
        self._decoder = msgspec.json.Decoder(schemas.Event)
        # queue.Queue, not SimpleQueue: on CPython 3.11 ``SimpleQueue.get(timeout=t)`` with a small t can block
        # until the next put (seen after a put/get pair: 3 of ~7,300 gets with t of 0-49 µs; queue.Queue 0 of
        # 6,000; ADR 0010). Here that stalled the writer's gather loop, and with it every append awaiting its
        # commit, whenever no further append came (one caller awaiting each append: bench/quality.py stalled in
        # 3 of 12 single-seed product runs).
        self._queue: queue.Queue[_Pending | object] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="kassa-event-log-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ write path
    async def append(self, events: list[schemas.Event], received_at: float) -> AppendResult:
        if not events:
            return AppendResult()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AppendResult] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("event log is closed")
            self._queue.put(_Pending(events, received_at, fut, loop))
        # shield: a cancelled request must not cancel the shared future; the write still happens.
        return await asyncio.shield(fut)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            assert isinstance(first, _Pending)
            group = [first]
            size = len(first.events)
            # Drain whatever queued up while the previous commit was fsyncing, and what arrives within
            # `gather_seconds` of the first: that is the group.
            deadline = time.monotonic() + self.gather_seconds
            while size < _MAX_GROUP_EVENTS:
                try:
                    wait = deadline - time.monotonic()
                    item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True  # close() queued the stop after every accepted append
                    break
                assert isinstance(item, _Pending)
                group.append(item)
                size += len(item.events)
            self._commit_group(group)

    def _commit_group(self, group: list[_Pending]) -> None:
        try:
            results: list[AppendResult | None] = list(self._write(group))
            exc: BaseException | None = None
        except Exception as failed:
            log.exception("event log commit failed for %d appends", len(group))
            results, exc = [None] * len(group), failed
        # One wake-up of each waiting loop per group, not one per append (each is a write to the loop's pipe).
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[AppendResult], AppendResult | None]]] = {}
        for item, result in zip(group, results, strict=True):
            by_loop.setdefault(item.loop, []).append((item.future, result))
        for loop, answers in by_loop.items():
            # RuntimeError: the caller's loop is closed, so nobody is waiting for this answer.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_all, answers, exc)

    def _write(self, group: list[_Pending]) -> list[AppendResult]:
        # The write path uses the stdlib driver directly: per group it is one BEGIN, a lookup and an
        # INSERT per event, and one COMMIT; through SQLAlchemy the same work cost several times the
        # CPU, taken from the decision loop via the GIL (measured with py-spy under bench load).
        conn = self._write_conn
        if conn is None:
            conn = self._write_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            set_pragmas(conn, None)
        cur = conn.cursor()
        encode = self._encoder.encode
        results: list[AppendResult] = []
        cur.execute("BEGIN IMMEDIATE")
        try:
            for item in group:
                seqs: list[int] = []
                result = AppendResult(seqs=seqs)
                for ev in item.events:
                    # Look before inserting: an ignored INSERT would still consume an AUTOINCREMENT seq.
                    if cur.execute(_EXISTS, (ev.event_id,)).fetchone() is not None:
                        result.duplicates += 1
                        continue
                    if ev.timestamp is None:
                        ev = msgspec.structs.replace(ev, timestamp=item.received_at)
                    cur.execute(_INSERT, (ev.event_id, ev.type, ev.decision_id, item.received_at, encode(ev)))
                    result.new.append(ev)
                    seqs.append(cur.lastrowid or 0)  # never 0 after an INSERT into a rowid table
                results.append(result)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return results

    # ------------------------------------------------------------------ read path
    def read(self, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, schemas.Event]]:
        t = events_table
        stmt = sa.select(t.c.seq, t.c.body).where(t.c.seq > after_seq).order_by(t.c.seq).limit(limit)
        with self._engine.connect() as conn:
            return [(seq, self._decoder.decode(body)) for seq, body in conn.execute(stmt)]

    def count(self) -> int:
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar_one())

    def max_seq(self) -> int:
        """The position of the newest event (0 when empty): one index lookup."""
        with self._engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.max(events_table.c.seq))).scalar_one() or 0)

    def read_type(self, event_type: str, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, schemas.Event]]:
        """Like `read`, only events of ``event_type`` (what a start-up replay needs: orders)."""
        t = events_table
        stmt = (sa.select(t.c.seq, t.c.body).where(t.c.seq > after_seq).where(t.c.type == event_type)
                .order_by(t.c.seq).limit(limit))
        with self._engine.connect() as conn:
            return [(seq, self._decoder.decode(body)) for seq, body in conn.execute(stmt)]

    def close(self) -> None:
        """Commit every append already accepted, stop the writer and release the file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join()
        if self._write_conn is not None:
            self._write_conn.close()
        self._engine.dispose()
