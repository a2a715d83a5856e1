"""What feeds `kassa learn`: decision records and outcome events, behind one small interface.

`LearnerInput` is all the learner role knows of the event bus. ``poll`` hands over the next decisions and
events in an order the join can use (a decision before the events that answer it); ``commit`` says
everything handed over so far has been applied (a bus acknowledges its messages then). Every learner,
active or standby, reads the whole input: a standby keeps its join state warm, so a takeover loses no
decision still inside its reward window (`kassa.learn.online.role`).

`SqliteTailInput` is the embedded/one-machine backend: it tails ``decision_records.db`` and ``events.db`` of
one data directory. At start it goes back ``lookback_seconds`` (the longest reward window plus a margin),
so a restarted or newly active learner rebuilds every open decision from the logs. Events are handed over
only ``settle_seconds`` after they were stored, because a decision's record is written on a thread of its
serving process a few milliseconds after the answer, and an event can be faster than that.

A JetStream backend (the event-bus part) implements the same two methods with two ordered consumers
(decision records, events) started at ``now - lookback_seconds``; see docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import msgspec

from kassa import schemas
from kassa.events.join import PendingDecision
from kassa.events.log import SqliteEventLog
from kassa.events.records import DecisionRecordLog


@dataclass(slots=True)
class LearnerBatch:
    decisions: list[PendingDecision] = field(default_factory=list)
    events: list[schemas.Event] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.decisions) + len(self.events)


class LearnerInput(Protocol):
    async def poll(self, limit: int = 5000) -> LearnerBatch:
        """The next decisions (served order) and events (stored order), at most ``limit`` of each."""
        ...

    async def commit(self) -> None:
        """Everything handed over so far has been applied."""
        ...

    @property
    def caught_up_to(self) -> float:
        """Every event stored before this time (unix seconds) has been handed over. The learner closes no
        decision past it: a tail still reading its backlog (a restarted learner goes back a minute and more)
        would otherwise close decisions before it has read their outcomes, and learn them with no reward."""
        ...

    def close(self) -> None: ...


class SqliteTailInput:
    """`LearnerInput` over the event log and the decision-record log of one data directory."""

    def __init__(self, data_path: Path, lookback_seconds: float, settle_seconds: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.records = DecisionRecordLog(data_path / "decision_records.db", writer=False)
        SqliteEventLog(data_path / "events.db").close()  # creates the file and table if serving has not yet
        self._events = sqlite3.connect(data_path / "events.db", check_same_thread=False)
        self._events.execute("PRAGMA busy_timeout=10000")
        self._event_decoder = msgspec.json.Decoder(schemas.Event)
        self.settle = settle_seconds
        self.clock = clock
        since = clock() - lookback_seconds
        self._decision_seq = self.records.seq_before(since)
        self._event_seq = self._event_seq_before(since)
        self.decisions_read = 0
        self.events_read = 0
        self._caught_up_to = since

    def _event_seq_before(self, ts: float) -> int:
        row = self._events.execute("SELECT max(seq) FROM events WHERE received_at < ?", (ts,)).fetchone()
        return int(row[0] or 0) if row else 0

    def _poll(self, limit: int) -> LearnerBatch:
        batch = LearnerBatch()
        # Decisions first, up to now: an event read below was stored after `horizon`, before this read.
        horizon = self.clock() - self.settle
        records = self.records.read(self._decision_seq, limit)
        for seq, pending in records:
            batch.decisions.append(pending)
            self._decision_seq = seq
        if len(records) == limit:  # more decisions to read: no event of a decision not registered yet
            horizon = min(horizon, records[-1][1].ts)
        rows = self._events.execute("SELECT seq, received_at, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                                    (self._event_seq, limit)).fetchall()
        caught_up = horizon
        for seq, received_at, body in rows:
            if received_at > horizon:  # stop at the first unsettled one: the cursor never skips an event
                break
            batch.events.append(self._event_decoder.decode(body))
            self._event_seq = seq
        else:
            if len(rows) == limit:  # a full page, all settled: the backlog goes on past the last one read
                caught_up = min(horizon, rows[-1][1])
        self._caught_up_to = max(self._caught_up_to, caught_up)
        self.decisions_read += len(batch.decisions)
        self.events_read += len(batch.events)
        return batch

    async def poll(self, limit: int = 5000) -> LearnerBatch:
        return await asyncio.to_thread(self._poll, limit)

    async def commit(self) -> None:
        return None  # a tail keeps its cursor in memory; a restart goes back `lookback_seconds`

    @property
    def caught_up_to(self) -> float:
        return self._caught_up_to

    def close(self) -> None:
        self.records.close()
        self._events.close()
