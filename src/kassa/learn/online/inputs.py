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
serving process within a few tens of milliseconds of the answer, and an event can be faster than that.

`JetStreamInput` is the production backend (``roles.learner_input: jetstream``): two ephemeral pull consumers
(no acks, in memory on the server), one on the join records stream (each served decision's `PendingDecision`,
published by the serving workers' `kassa.events.jetstream_log.JoinRecordPublisher`) and one on the events
stream, both started at ``now - lookback_seconds``. It keeps the tail's rule with the stores' clock: an event
is handed over once every decision stored up to ``settle_seconds`` after it has been (see `JetStreamInput`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from kassa import schemas
from kassa.events.jetstream import (
    BusConfig,
    ack_delivery,
    close_connection,
    connect,
    ensure_streams,
    take_queued_first,
)
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

    async def close(self) -> None: ...


log = logging.getLogger("kassa.learn")


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

    async def close(self) -> None:
        self.records.close()
        self._events.close()


class _Tail:
    """One ephemeral pull consumer from a start time; re-created after its last sequence if it goes away
    (NATS restarted, or the consumer was reaped while the learner stalled)."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str, since: float) -> None:
        self.js, self.stream, self.subject, self.since = js, stream, subject, since
        self.last_seq = 0
        self.sub: JetStreamContext.PullSubscription | None = None
        self.failing = False
        self._checked_at = 0.0

    async def open(self) -> None:
        if self.last_seq:
            last = (await self.js.stream_info(self.stream)).state.last_seq
            if last < self.last_seq:  # after last_seq it would skip the new stream's first last_seq messages
                log.warning("learner input: %s ends at seq %d, before the %d read here: it was created again (NATS "
                            "lost its store?); reading it from its start", self.stream, last, self.last_seq)
                self.last_seq = 0
                self.since = 0.0
        if self.last_seq:
            cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                     opt_start_seq=self.last_seq + 1)
        else:
            cfg = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_TIME,
                                     opt_start_time=datetime.fromtimestamp(self.since, UTC))
        cfg.ack_policy = api.AckPolicy.NONE
        cfg.inactive_threshold = 60.0
        cfg.mem_storage = True
        cfg.max_waiting = 8
        self.sub = await self.js.pull_subscribe(self.subject, stream=self.stream, config=cfg)
        take_queued_first(self.sub._sub)  # `fetch` takes what is already here without a task per message

    async def fetch(self, limit: int, timeout: float, drained: bool = True) -> tuple[list[Msg], bool]:
        """Up to ``limit`` messages in stream order, and whether the consumer had none left to deliver at the
        time of the fetch (every message stored before it began is in this batch or an earlier one; asked
        of the server after an empty fetch only if ``drained``)."""
        try:
            if self.sub is None:
                await self.open()
                assert self.sub is not None
                if self.failing:
                    log.info("learner input: %s consumer back after seq %d", self.stream, self.last_seq)
                    self.failing = False
            msgs = await self.sub.fetch(limit, timeout=timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        except (nats.errors.Error, OSError) as exc:
            # consumer gone, connection lost: start it again after last_seq (once the server answers)
            if not self.failing:
                log.warning("learner input: %s consumer failed (%s); re-creating it after seq %d", self.stream,
                            exc, self.last_seq)
                self.failing = True
            if self.sub is not None:
                with contextlib.suppress(Exception):
                    await self.sub.unsubscribe()
                self.sub = None
            return [], False
        # a re-created consumer's repeats are left out
        fresh = [m for m in msgs if m.reply and ack_delivery(m.reply)[0] > self.last_seq]
        if fresh:
            seq, _, pending = ack_delivery(fresh[-1].reply)
            self.last_seq = seq
            return fresh, pending == 0
        # Nothing came. Ask the server about the consumer (for the decisions on every empty fetch, for the events
        # once a second): it may be gone (NATS restarted: ephemeral consumers live in memory), and a fetch on
        # a consumer that no longer exists only times out.
        if not drained and time.monotonic() - self._checked_at < 1.0:
            return [], False
        self._checked_at = time.monotonic()
        if self.sub is None:
            return [], False
        try:
            info = await self.js.consumer_info(self.stream, self.sub._consumer, timeout=1.0)
        except nats.js.errors.NotFoundError:
            log.warning("learner input: %s consumer is gone (NATS restarted?); re-creating it after seq %d",
                        self.stream, self.last_seq)
            self.sub = None
            return [], False
        except (nats.errors.Error, OSError, TimeoutError):
            return [], False
        if not drained:
            return [], False
        # Drained only if the server has nothing pending and nothing delivered that is still on its way here
        # (a fetch that timed out on a busy host leaves those for the next one).
        delivered = info.delivered.stream_seq if info.delivered is not None else 0
        return [], not info.num_pending and (delivered or 0) <= self.last_seq

    async def close(self) -> None:
        if self.sub is not None:
            with contextlib.suppress(Exception):
                await self.sub.unsubscribe()
            self.sub = None


class JetStreamInput:
    """`LearnerInput` over the join records and events streams (``roles.learner_input: jetstream``).

    Order: each ``poll`` first fetches decisions until their consumer reports none left (the ``pending`` count
    every message carries) or ``limit``, then events into a holding queue. An event leaves the queue once
    every decision stored up to ``settle_seconds`` after it has been handed over: a decision's record is
    published by its serving worker within ~10 ms of the answer, so it can be stored after an event that
    answers it, but not ``settle_seconds`` after. "Handed over up to" is the start of a decisions fetch that
    drained the consumer, else the stored time of the last decision read (catching up, bounded by
    ``limit``). Times are JetStream's (the message's stored time) against this host's clock for "now"; keep
    them in sync (NTP), well within ``settle_seconds``.

    Messages are fetched in batches (``limit``) with one decode each; nothing is acknowledged (``commit`` is
    a no-op): a restarted learner reads back ``lookback_seconds`` like the SQLite tail.
    """

    def __init__(self, cfg: BusConfig, lookback_seconds: float, settle_seconds: float = 0.5,
                 clock: Callable[[], float] = time.time, fetch_timeout: float = 0.05) -> None:
        self.cfg = cfg
        self.settle = settle_seconds
        self.clock = clock
        self.since = clock() - lookback_seconds
        self.fetch_timeout = fetch_timeout
        self.nc: NATS | None = None
        self._decisions: _Tail | None = None
        self._events: _Tail | None = None
        self._held: collections.deque[tuple[float, bytes]] = collections.deque()  # (stored at, body)
        self._covered = 0.0  # every decision stored before this has been handed over
        self._events_to = self.since  # every event stored before this has been read (into the holding queue)
        self._caught_up_to = self.since
        self._late: list[tuple[float, float]] = []  # (deadline, handed over once caught up to) of late records
        self._pending_decoder = msgspec.msgpack.Decoder(PendingDecision)
        self._event_decoder = msgspec.json.Decoder(schemas.Event)
        self.decisions_read = 0
        self.events_read = 0
        self._closing = False

    async def start(self) -> JetStreamInput:
        self.nc = await connect(self.cfg, name=f"{self.cfg.name}-learner-input", error_cb=self._on_error,
                                disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected)
        js = self.nc.jetstream()
        await ensure_streams(js, self.cfg)
        self._decisions = _Tail(js, self.cfg.records_stream, self.cfg.records_subject, self.since)
        self._events = _Tail(js, self.cfg.events_stream, self.cfg.events_subject, self.since)
        await self._decisions.open()
        await self._events.open()
        return self

    async def _on_error(self, exc: Exception) -> None:
        log.debug("learner input: NATS client error: %s", exc)

    async def _on_disconnected(self) -> None:
        if self._closing:  # our own close: not an outage
            return
        log.warning("learner input: NATS disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("learner input: NATS reconnected")

    async def poll(self, limit: int = 5000) -> LearnerBatch:
        assert self._decisions is not None and self._events is not None, "start() first"
        batch = LearnerBatch()
        if self.nc is None or not self.nc.is_connected:  # reconnecting: a request now only waits out its timeout
            await asyncio.sleep(self.fetch_timeout)
            return batch
        began = self.clock()
        msgs, drained = await self._decisions.fetch(limit, self.fetch_timeout)
        if msgs:
            decode = self._pending_decoder.decode
            batch.decisions = [decode(m.data) for m in msgs]
            last_stored = ack_delivery(msgs[-1].reply)[1]
            self._covered = began if drained else max(self._covered, last_stored)
            settle = self.settle
            if min(p.deadline for p in batch.decisions) < last_stored + settle:  # rare: replayed from a spool
                for m, p in zip(msgs, batch.decisions, strict=True):
                    stored = ack_delivery(m.reply)[1]
                    if p.deadline < stored + settle:
                        self._late.append((p.deadline, stored + settle))
        elif drained:
            self._covered = began
        covered = self._covered
        if len(self._held) < limit:
            ev_began = self.clock()
            ev_msgs, ev_drained = await self._events.fetch(limit, self.fetch_timeout, drained=False)
            for m in ev_msgs:
                self._held.append((ack_delivery(m.reply)[1], m.data))
            if ev_msgs and not ev_drained:
                self._events_to = max(self._events_to, self._held[-1][0])  # a backlog: read up to its last
            elif self._events.sub is not None and not self._events.failing:
                self._events_to = ev_began  # nothing (more) was waiting when the fetch began
        horizon = covered - self.settle
        held, decode_event, events = self._held, self._event_decoder.decode, batch.events
        while held and held[0][0] <= horizon and len(events) < limit:
            events.append(decode_event(held.popleft()[1]))
        caught = min(horizon, self._events_to, held[0][0] if held else horizon)
        self._caught_up_to = max(self._caught_up_to, caught)
        self.decisions_read += len(batch.decisions)
        self.events_read += len(events)
        return batch

    @property
    def caught_up_to(self) -> float:
        """Also held just below the deadline of a record stored too late for it (a serving worker's spool
        replayed after a NATS outage) until the events stored up to ``settle`` after the record have been
        handed over: they were replayed with it, and were each closed past before (every event of every
        decision made during an outage counted late, its reward lost)."""
        caught = self._caught_up_to
        if self._late:
            self._late = [(deadline, ready) for deadline, ready in self._late if ready > caught]
            if self._late:
                return min(caught, math.nextafter(min(d for d, _ in self._late), -math.inf))
        return caught

    @property
    def held(self) -> int:
        """Events read but not handed over yet (settling)."""
        return len(self._held)

    async def commit(self) -> None:
        return None  # ephemeral consumers without acks; a restart goes back `lookback_seconds`

    async def close(self) -> None:
        self._closing = True
        for tail in (self._decisions, self._events):
            if tail is not None:
                await tail.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await close_connection(self.nc)
            self.nc = None
