"""Embedded durability of the per-request state: a SQLite (WAL) journal beside the data, ``state.db``.

The embedded backend keeps serving from its in-process objects (`IdempotencyCache`, `FrequencyLedger`, the
`RewardJoiner`'s pending decisions): the hot path never waits on a disk. Every change is also handed to
`SqliteStateJournal`, which appends it to an in-memory batch; a writer thread commits the batch every
``flush_seconds`` (default 20 ms) in one transaction. At start `load` returns what was pending, answered and
shown, and ``kassa.app`` puts it back. Profiles and retrieval counts need no journal: they are rebuilt from
the (durable) event log at start, as before.

What a ``kill -9`` can lose: the changes of the last ``flush_seconds`` (plus the commit in flight). WAL with
``synchronous=NORMAL`` survives the process dying (the pages are in the OS cache); a power loss can lose the
last commits, like the event log. A synchronous commit per decision was the alternative: measured on this
2-core machine, one transaction of a decision's rows (pending record, three shows, idempotent response) took a
median 26 µs but a P99 of 4.0 ms (WAL checkpoints land on the caller), against 3.7 µs per decision for the
five appends here.

Rows: ``pending`` (decision id -> msgpack `PendingDecision` with its rewards so far, deleted when closed),
``held`` (refund event id -> held until, msgpack `Event`: a refund that came before its order, deleted when let go),
``idem`` (request id -> fingerprint + response JSON, pruned after the idempotency TTL), ``shown`` (customer,
offer, time; pruned after the longest cap window).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from kassa import schemas
from kassa.events.join import PendingDecision

log = logging.getLogger("kassa.state")

FILE = "state.db"
_PRUNE_EVERY = 60.0

_encoder = msgspec.msgpack.Encoder()
_pending_decoder = msgspec.msgpack.Decoder(PendingDecision)
_event_decoder = msgspec.msgpack.Decoder(schemas.Event)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (id TEXT PRIMARY KEY, deadline REAL NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS idem (key TEXT PRIMARY KEY, ts REAL NOT NULL, fp INTEGER NOT NULL, blob BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS shown (customer TEXT NOT NULL, offer TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS shown_ts ON shown (ts);
CREATE INDEX IF NOT EXISTS idem_ts ON idem (ts);
CREATE TABLE IF NOT EXISTS held (id TEXT PRIMARY KEY, until REAL NOT NULL, blob BLOB NOT NULL);
"""


@dataclass(slots=True)
class Restored:
    """What was durable when the process last stopped."""

    pending: list[PendingDecision] = field(default_factory=list)
    idempotent: list[tuple[str, float, int, bytes]] = field(default_factory=list)  # key, ts, fp, response JSON
    shown: list[tuple[str, str, float]] = field(default_factory=list)  # customer, offer, ts (oldest first)
    held_refunds: list[tuple[float, schemas.Event]] = field(default_factory=list)  # until, refund (oldest first)


class SqliteStateJournal:
    """`StateJournal` and `JoinJournal` on SQLite, written behind by one thread."""

    def __init__(self, path: Path, flush_seconds: float = 0.02, idempotency_ttl: float = 600.0,
                 cap_window: float = 30 * 86_400.0) -> None:
        self.path = path
        self.flush_seconds = flush_seconds
        self.idempotency_ttl = idempotency_ttl
        self.cap_window = cap_window
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._ops: list[tuple] = []
        self._lock = threading.Lock()  # guards _ops (appended on the event loop, taken by the writer)
        self._write_lock = threading.Lock()  # one writer at a time (the thread, or flush() at stop)
        self._latest = 0.0  # newest change time seen: the clock pruning goes by (tests use fake clocks)
        self._pruned = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0

    # -- the journal protocols (called on the event loop; O(1), no I/O)
    def registered(self, pending: PendingDecision) -> None:
        self._append(("P", pending.decision_id, pending.deadline, _encoder.encode(pending)))

    def credited(self, pending: PendingDecision) -> None:
        self._append(("P", pending.decision_id, pending.deadline, _encoder.encode(pending)))

    def closed(self, decision_id: str) -> None:
        self._append(("C", decision_id))

    def held_refund(self, event: schemas.Event, until: float) -> None:
        self._append(("H", event.event_id, until, _encoder.encode(event)))

    def released_refund(self, event_id: str) -> None:
        self._append(("R", event_id))

    def idempotent(self, key: str, fp: int, blob: bytes, now: float) -> None:
        self._latest = max(self._latest, now)
        self._append(("I", key, now, fp, blob))

    def shown(self, customer_id: str, offer_ids: Iterable[str], now: float) -> None:
        self._latest = max(self._latest, now)
        for offer_id in offer_ids:
            self._append(("S", customer_id, offer_id, now))

    def _append(self, op: tuple) -> None:
        with self._lock:
            self._ops.append(op)

    # -- lifecycle
    def load(self, now: float) -> Restored:
        """Everything still live at ``now``: pending decisions, idempotent responses inside their TTL, and
        shows inside the cap window."""
        db = self._db
        out = Restored()
        for (blob,) in db.execute("SELECT blob FROM pending ORDER BY deadline"):
            try:
                out.pending.append(_pending_decoder.decode(blob))
            except msgspec.DecodeError:  # written by an incompatible version: skip, never fail the start
                log.warning("skipping an unreadable pending decision in %s", self.path)
        out.idempotent = [(k, ts, fp, blob) for k, ts, fp, blob in db.execute(
            "SELECT key, ts, fp, blob FROM idem WHERE ts >= ? ORDER BY ts", (now - self.idempotency_ttl,))]
        out.shown = list(db.execute("SELECT customer, offer, ts FROM shown WHERE ts >= ? ORDER BY ts",
                                    (now - self.cap_window,)))
        for until, blob in db.execute("SELECT until, blob FROM held WHERE until > ? ORDER BY until, rowid",
                                      (now,)):
            try:
                out.held_refunds.append((until, _event_decoder.decode(blob)))
            except msgspec.DecodeError:
                log.warning("skipping an unreadable held refund in %s", self.path)
        self._latest = max(self._latest, now)
        return out

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="kassa-state-journal", daemon=True)
            self._thread.start()

    def flush(self) -> int:
        """Commit everything appended so far; returns how many changes were written."""
        with self._lock:
            ops, self._ops = self._ops, []
        if not ops:
            return 0
        with self._write_lock:
            db = self._db
            db.execute("BEGIN")
            try:
                for op in ops:
                    kind = op[0]
                    if kind == "P":
                        db.execute("INSERT OR REPLACE INTO pending (id, deadline, blob) VALUES (?, ?, ?)", op[1:])
                    elif kind == "C":
                        db.execute("DELETE FROM pending WHERE id = ?", op[1:])
                    elif kind == "I":
                        db.execute("INSERT OR REPLACE INTO idem (key, ts, fp, blob) VALUES (?, ?, ?, ?)", op[1:])
                    elif kind == "H":
                        db.execute("INSERT OR REPLACE INTO held (id, until, blob) VALUES (?, ?, ?)", op[1:])
                    elif kind == "R":
                        db.execute("DELETE FROM held WHERE id = ?", op[1:])
                    else:
                        db.execute("INSERT INTO shown (customer, offer, ts) VALUES (?, ?, ?)", op[1:])
                if time.monotonic() - self._pruned >= _PRUNE_EVERY:
                    self._pruned = time.monotonic()
                    db.execute("DELETE FROM idem WHERE ts < ?", (self._latest - self.idempotency_ttl,))
                    db.execute("DELETE FROM shown WHERE ts < ?", (self._latest - self.cap_window,))
                    db.execute("DELETE FROM held WHERE until < ?", (self._latest,))  # let go before a stop
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self.written += len(ops)
        return len(ops)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:  # a full disk must not kill the thread: the batch is retried never, logged
                log.exception("state journal flush to %s failed", self.path)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.flush()
        self._db.close()
