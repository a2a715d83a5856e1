"""The decision-record log: every answered decision's join record, for a learner in another process.

This module owns ``<data_dir>/decision_records.db``: serving processes append each `PendingDecision` (the
exact learner lines, slot probabilities, reward deadline) and `kassa learn` tails it by ``seq`` (with the
event log) to rebuild the reward join. It is the embedded transport of the split roles; in production the
event bus's decision-records stream plays the same part behind `kassa.learn.online.inputs.LearnerInput`.

Cost on the hot path: ``append`` is one deque append. A daemon thread, woken by the first record after a
flush, lets ``flush_seconds`` (20 ms) of records gather and writes them in one transaction (WAL,
``synchronous=NORMAL``: a process crash loses nothing that was flushed; a power loss can lose the last
transaction); an idle worker's thread sleeps instead of waking every few milliseconds. Records are msgpack,
~1 KB each on the bench catalog (~10 KB with its 50 candidate lines when the publish guard is on). Measured:
~38 µs of CPU per 4.4 KB record written alone, ~8 µs per 0.5 KB record in batches of ten; at 500
decisions/s per worker a 5 ms period wrote batches of 2-3 (docs/adr/0009 addendum).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import sqlite3
import threading
from pathlib import Path

import msgspec

from kassa.events.join import PendingDecision

log = logging.getLogger(__name__)

_SCHEMA = """CREATE TABLE IF NOT EXISTS decision_records (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, decision_id TEXT NOT NULL, placement TEXT NOT NULL,
    ts REAL NOT NULL, body BLOB NOT NULL)"""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute(_SCHEMA)
    conn.execute("CREATE INDEX IF NOT EXISTS decision_records_ts ON decision_records (ts)")
    return conn


class DecisionRecordLog:
    """Append (serving processes) and tail (the learner) the decision records of one data directory.

    Also a `kassa.decide.sinks.RewardSink`: the engine's ``register`` appends, so a serving process that
    learns nothing itself hands its decisions to the learner through this log.
    """

    def __init__(self, path: str | Path, flush_seconds: float = 0.02, writer: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = _connect(self.path)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(PendingDecision)
        self._buffer: collections.deque[PendingDecision] = collections.deque()
        self._flush_seconds = flush_seconds
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by the first record after a flush
        self._lock = threading.Lock()
        self.written = 0
        self._thread: threading.Thread | None = None
        if writer:
            self._thread = threading.Thread(target=self._run, name="kassa-decision-records", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ write path (serving processes)
    def register(self, pending: PendingDecision) -> None:
        self._buffer.append(pending)
        if not self._wake.is_set():  # an attribute read; set() (a lock and a notify) once per flush
            self._wake.set()

    # Refunds are the learner's to apply too: `observe` cannot say whether one found an open conversion.
    answers_refunds = False

    def observe(self, _event: object) -> int:
        """Outcome events are the learner's to join (it tails the event log): nothing to do here."""
        return 0

    def is_open(self, _decision_id: str) -> bool:
        """A serving worker cannot tell whether a decision still waits for its reward (the learner holds the
        join), so its events ack counts no unknown decisions."""
        return True

    def __len__(self) -> int:
        return len(self._buffer)

    def join_lag(self, _now: float) -> float:
        return 0.0

    def flush(self) -> int:
        with self._lock:
            n = len(self._buffer)
            if n == 0:
                return 0
            batch = [self._buffer.popleft() for _ in range(n)]
            rows = [(p.decision_id, p.placement, p.ts, self._encoder.encode(p)) for p in batch]
            try:
                self._conn.execute("BEGIN")
                self._conn.executemany(
                    "INSERT INTO decision_records (decision_id, placement, ts, body) VALUES (?, ?, ?, ?)", rows)
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                self._buffer.extendleft(reversed(batch))
                log.exception("decision records: writing %d records failed; retrying", n)
                return 0
            self.written += n
            return n

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            if self._stop.wait(self._flush_seconds):  # let a batch gather (or stop: close() flushes)
                break
            self._wake.clear()  # before the flush takes the buffer: a record appended after it wakes us again
            self.flush()

    # ------------------------------------------------------------------ read path (the learner)
    def read(self, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, PendingDecision]]:
        rows = self._conn.execute(
            "SELECT seq, body FROM decision_records WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)
        ).fetchall()
        return [(seq, self._decoder.decode(body)) for seq, body in rows]

    def seq_before(self, ts: float) -> int:
        """The highest ``seq`` of a record served before ``ts`` (0 when none): a tail from there replays
        every decision served since ``ts``."""
        row = self._conn.execute("SELECT max(seq) FROM decision_records WHERE ts < ?", (ts,)).fetchone()
        return int(row[0] or 0)

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM decision_records").fetchone()[0])

    def prune(self, before_ts: float) -> int:
        """Delete records served before ``before_ts`` (older than every reward window): the learner's job."""
        cur = self._conn.execute("DELETE FROM decision_records WHERE ts < ?", (before_ts,))
        return cur.rowcount

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        self._conn.close()
