"""The two users of `JetStreamBus` in a serving process: the `EventLog` on JetStream and the decision publisher.

`JetStreamEventLog`: ``append`` publishes each event with ``Nats-Msg-Id = event_id`` and returns once JetStream
acked all of them (or the bus spooled them; see `kassa.events.jetstream`); duplicates are the ids JetStream or
the spool already had. ``read``/``count``/``max_seq`` go through an ephemeral pull consumer positioned by
stream sequence, the ``seq`` of the interface, so the stream processor and start-up replay work unchanged.
``scan_since`` (the dashboard's outcome reads) positions one by stored time instead and reads in bounded batches.

`DecisionPublisher` is the serving side of the decision log: the hot path appends a record to a deque, a task
on the bus loop publishes them every 20 ms with ``Nats-Msg-Id = decision_id`` (or spools them); the separate
writer process (`kassa.events.consumers.DecisionLogConsumer`) writes the Parquet files. A second one publishes the
shadow models' records (``shadow=True``), written apart to ``<data_dir>/shadow/decisions``.

`JoinRecordPublisher` is a serving worker's hand-over to `kassa learn` (``roles.learner_input: jetstream``):
each decision's `PendingDecision` (the exact learner lines and probabilities the join needs, which the
Parquet record does not carry) on the join records stream, read by `kassa.learn.online.inputs.JetStreamInput`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec
from nats.js import api

from kassa import schemas
from kassa.degraded import RateLimitedWarning
from kassa.events.decision_log import DecisionRecord
from kassa.events.jetstream import BusConfig, JetStreamBus, PublishFailed, ack_delivery
from kassa.events.join import PendingDecision
from kassa.events.log import AppendResult, EventLog
from kassa.events.nats_routes import subscribe_routed, unsubscribe_routed

log = logging.getLogger("kassa.bus")
R = TypeVar("R")
SHADOW_MSG_ID_PREFIX = "shadow:"  # a shadow record's Nats-Msg-Id: apart from its served record's (`DecisionPublisher`)
_Pending = tuple[list[tuple[str, str, bytes]], "asyncio.Future[list[bool]]"]  # an append's rows, its caller's future


# ---------------------------------------------------------------------------------------------- events
class JetStreamEventLog(EventLog):
    """`EventLog` on JetStream: ``seq`` is the events stream's sequence."""

    def __init__(self, bus: JetStreamBus, own_bus: bool = False) -> None:
        self.bus = bus
        self._own_bus = own_bus
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(schemas.Event)
        self._subject = bus.cfg.events_subject
        self._reader: _BatchReader | None = None
        self._reader_next = 0  # stream sequence the reader delivers next
        # a tailing reader (`kassa stream`, every 20 ms) asks again and again while NATS is away: one line per 10 s
        self._unreachable_warning = RateLimitedWarning(log, "event log read while NATS is unreachable")
        # appends of the running pass of each caller loop, not yet handed to the bus (`_gather`)
        self._groups: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        self._sending: set[asyncio.Task[list[bool]]] = set()  # groups appending on the caller's (the bus's) loop

    @classmethod
    def connect(cls, cfg: BusConfig) -> JetStreamEventLog:
        return cls(JetStreamBus(cfg), own_bus=True)

    async def append(self, events: list[schemas.Event], received_at: float) -> AppendResult:
        if not events:
            return AppendResult()
        stamped = [ev if ev.timestamp is not None else msgspec.structs.replace(ev, timestamp=received_at)
                   for ev in events]
        encode = self._encoder.encode
        rows = [(self._subject, ev.event_id, encode(ev)) for ev in stamped]
        added = await self._gather(rows)
        result = AppendResult()
        for ev, new in zip(stamped, added, strict=True):
            if new:
                result.new.append(ev)
            else:
                result.duplicates += 1
        return result

    def _gather(self, rows: list[tuple[str, str, bytes]]) -> asyncio.Future[list[bool]]:
        """Per row, False when a duplicate; resolved once the rows are stored (acked or spooled).

        Appends made in one pass of the caller's loop (the events POSTs of one pass of a serving worker's loop)
        go to the bus as one ``append_rows``, in call order. When the bus lives on the caller's loop (a serving
        worker's, `kassa.events.jetstream.AdoptedLoop`) the group is a task on that loop; else it is one
        hand-over to the bus thread and one back per group instead of per append, each waking the other thread,
        which then waits for the GIL. The caller's future is its own, so a cancelled request leaves the group's
        publish running (as the shielded future did). Measured: the two workers' bus threads took 23 % of the
        topology's CPU (~180 µs per decision with its events POST; per-thread schedstat, bench/topology.py
        --backends production, 1,000/s); on the server's loop there is no bus thread (ADR 0009, 2026-12-07: CPU
        per decision median 1,130 -> 1,008 µs in 11 alternating pairs)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[bool]] = loop.create_future()
        group = self._groups.get(loop)
        if group is None:
            group = self._groups[loop] = []
            loop.call_soon(self._send_group, loop)
        group.append((rows, fut))
        return fut

    def _send_group(self, loop: asyncio.AbstractEventLoop) -> None:
        group = self._groups.pop(loop, [])
        flat = [row for rows, _ in group for row in rows]
        coro = self.bus.append_rows(flat)
        if loop is self.bus.thread.loop:  # no hand-over: the bus lives on this loop
            task = loop.create_task(coro)
            self._sending.add(task)

            def settle_here(t: asyncio.Task[list[bool]]) -> None:
                self._sending.discard(t)
                _settle_group(group, t)

            task.add_done_callback(settle_here)
            return
        try:
            done = self.bus.thread.submit(coro)
        except Exception as exc:  # the bus loop is closed: fail the appends as a direct submit would
            coro.close()
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(exc)
            return

        def settle(f: concurrent.futures.Future[list[bool]]) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle_group, group, f)

        done.add_done_callback(settle)

    # ------------------------------------------------------------------ reads (blocking; never on the bus loop)
    def read(self, after_seq: int = 0, limit: int = 1000) -> list[tuple[int, schemas.Event]]:
        return self.bus.thread.call(self._read(after_seq, limit), timeout=30)

    def count(self) -> int:
        return self.bus.thread.call(self._state("messages"), timeout=10)

    def max_seq(self) -> int:
        return self.bus.thread.call(self._state("last_seq"), timeout=10)

    async def _state(self, field_name: str) -> int:
        js = self.bus.js
        if js is None:
            raise PublishFailed("not connected")
        info = await js.stream_info(self.bus.cfg.events_stream)
        return int(getattr(info.state, field_name) or 0)

    async def _read(self, after_seq: int, limit: int) -> list[tuple[int, schemas.Event]]:
        js = self.bus.js
        if js is None or not self.bus.connected:
            # A serving process must start and ack (into the spool) while NATS is away: a read then finds
            # nothing yet, and a tailing reader (the stream processor) asks again from the same position.
            self._unreachable_warning(f"nothing read after seq {after_seq}")
            return []
        if limit <= 0:
            return []
        if self._reader is None or self._reader_next != after_seq + 1:
            await self._close_reader()
            self._reader = await _BatchReader.open(self.bus, after_seq + 1)
            self._reader_next = after_seq + 1
        # No stream info first: a `no_wait` pull ends at once with what is there (a 404/408 status after
        # fewer than `limit`), and a tailing reader asks every few ms, mostly for a short batch.
        batch = await self._reader.fetch(limit, timeout=5.0)
        if self._reader.broken:
            await self._close_reader()  # the next read opens a consumer at the position it asks for
        decode = self._decoder.decode
        out = [(seq, decode(data)) for seq, _, data in batch]
        if out:
            self._reader_next = out[-1][0] + 1
        return out

    def scan_since(self, since: float, max_events: int, batch: int = 200) -> tuple[list[tuple[float, bytes]], bool]:
        """(stored at, body) of the events JetStream stored at or after ``since`` (unix seconds), oldest first, up
        to the stream's last message when the scan began; at most ``max_events`` of them. The flag is True when
        that end was reached, False when the cap, a timeout or an unreachable NATS stopped the scan short.

        For the dashboard (`kassa.api.dashboard.outcomes`): blocking, from a worker thread, never the bus loop.
        An ephemeral consumer starts at the first message stored at or after ``since`` (``DeliverPolicy.
        BY_START_TIME``: the server finds it, nothing before it is read) and is read ``batch`` messages per call
        onto the bus loop, so publishes go on between batches; bodies are returned undecoded (decoding and
        filtering are the caller's, on its own thread). The stored time is JetStream's, from each delivery's
        reply subject (`ack_delivery`). Measured on the shared 2-core VM (load average ~4, 100,000 events):
        1.8-3.6 s and 11-21 µs of client CPU per event; appends of 100 events made meanwhile took p50 7 ms
        (5 ms alone) with 200-message batches, p50 17-21 ms and up to 100 ms with 2,000-message batches."""
        rows, complete, _ = self.scan(max_events, start_time=since, batch=batch)
        return [(at, data) for _, at, data in rows], complete

    def scan(self, max_events: int, *, start_time: float | None = None, after_seq: int = 0, batch: int = 200
             ) -> tuple[list[tuple[int, float, bytes]], bool, tuple[int, int] | None]:
        """`scan_since` positioned by stored time (``start_time``) or after a stream sequence (``after_seq``),
        with each message's sequence: ((seq, stored at, body) rows, reached the end, the stream's (first, last)
        sequence when the scan began, None when NATS was unreachable). ``max_events`` 0 reads nothing: the
        bounds alone, one stream info request (the dashboard's incremental read, `kassa.api.dashboard.window`)."""
        state = self.bus.thread.call(self._bounds(), timeout=10)
        if state is None:
            return [], False, None
        last = state[1]
        nothing_after = last == 0 if start_time is not None else after_seq >= last
        if nothing_after:
            return [], True, state
        if max_events <= 0:
            return [], False, state
        reader = self.bus.thread.call(_BatchReader.open(self.bus, after_seq + 1, start_time), timeout=15)
        out: list[tuple[int, float, bytes]] = []
        complete = False
        try:
            while len(out) < max_events:
                rows = self.bus.thread.call(reader.fetch(min(batch, max_events - len(out)), timeout=5.0), timeout=30)
                out.extend(row for row in rows if row[0] <= last)
                if not rows or rows[-1][0] >= last:
                    complete = not reader.broken
                    break
                if reader.broken:
                    break
        finally:
            with contextlib.suppress(Exception):
                self.bus.thread.call(reader.close(), timeout=5)
        return out, complete, state

    async def _bounds(self) -> tuple[int, int] | None:
        if self.bus.js is None or not self.bus.connected:
            log.warning("event log scan while NATS is unreachable: nothing read")
            return None
        info = await self.bus.js.stream_info(self.bus.cfg.events_stream)
        return int(info.state.first_seq or 0), int(info.state.last_seq or 0)

    async def _close_reader(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader.close()
            self._reader = None

    def close(self) -> None:
        if self.bus.thread.here():
            raise RuntimeError("JetStreamEventLog.close() on the loop its bus runs on: await aclose() instead")
        with contextlib.suppress(Exception):
            self.bus.thread.call(self._close_reader(), timeout=5)
        if self._own_bus:
            self.bus.close()

    async def aclose(self) -> None:
        """`close` for a caller on the bus's loop (a serving worker's `Kassa.stop`); elsewhere the blocking one."""
        if not self.bus.thread.here():
            self.close()
            return
        await self._close_reader()
        if self._own_bus:
            await self.bus.aclose()


def _settle_group(group: list[_Pending],
                  done: asyncio.Future[list[bool]] | concurrent.futures.Future[list[bool]]) -> None:
    """Hand each append of a group its slice of the group's result (or the group's exception)."""
    exc = None if done.cancelled() else done.exception()
    added = done.result() if exc is None and not done.cancelled() else []
    i = 0
    for rows, fut in group:
        if not fut.done():
            if done.cancelled():
                fut.cancel()
            elif exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(added[i:i + len(rows)])
        i += len(rows)


class _BatchReader:
    """An ephemeral pull consumer read a batch at a time: one pull request (``no_wait``) and one callback per
    message that only appends the stream sequence and body.

    Not nats-py's ``PullSubscription.fetch``: it awaits ``next_msg`` (a ``wait_for`` on the queue) per message
    and parses each reply subject into a ``Metadata``; reading a stream that way took ~45 µs of CPU per event
    and held `kassa stream` on JetStream to ~3,700 events/s on the busy 2-core VM (bench/topology_events.py).
    Its deliveries are routed (`kassa.events.nats_routes`): no `Msg`, queue or task per message either.
    """

    def __init__(self, bus: JetStreamBus, consumer: str, inbox: str) -> None:
        self.bus = bus
        self.consumer = consumer
        self.inbox = inbox
        self.sub: Any = None
        self._rows: list[tuple[int, float, bytes]] = []  # (stream sequence, stored at, body)
        self._want = 0
        self._done: asyncio.Future[None] | None = None
        self.broken = False  # a fetch timed out: messages may still come for it, so the position is unknown

    @classmethod
    async def open(cls, bus: JetStreamBus, start_seq: int = 1, start_time: float | None = None) -> _BatchReader:
        """A reader from stream sequence ``start_seq``, or from the first message stored at or after
        ``start_time`` (unix seconds) when given."""
        js, nc = bus.js, bus.nc
        if js is None or nc is None:
            raise PublishFailed("not connected")
        position: dict[str, Any] = (
            {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start_seq}
            if start_time is None else
            {"deliver_policy": api.DeliverPolicy.BY_START_TIME,
             "opt_start_time": datetime.fromtimestamp(start_time, UTC)})
        cfg = api.ConsumerConfig(**position, ack_policy=api.AckPolicy.NONE, inactive_threshold=60.0,
                                 mem_storage=True, filter_subject=bus.cfg.events_subject)
        info = await js.add_consumer(bus.cfg.events_stream, config=cfg)
        assert info.name is not None
        reader = cls(bus, info.name, nc.new_inbox())
        reader.sub = await subscribe_routed(nc, reader.inbox, reader._on_delivery)
        return reader

    def _on_delivery(self, _subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        done = self._done
        if done is None or done.done():
            return  # a late message of an abandoned fetch: read again from its position by the caller
        if not data and headers is not None and headers.startswith(b"NATS/1.0 "):
            done.set_result(None)  # a status line (404 no messages / 408 expired): the batch ends short
            return
        seq, at, _ = ack_delivery(reply.decode())
        self._rows.append((seq, at, data))
        if len(self._rows) >= self._want:
            done.set_result(None)

    async def fetch(self, want: int, timeout: float) -> list[tuple[int, float, bytes]]:
        nc = self.bus.nc
        if nc is None:
            raise PublishFailed("not connected")
        self._rows, self._want = [], want
        self._done = asyncio.get_running_loop().create_future()
        api_prefix = "$JS.API"
        await nc.publish(f"{api_prefix}.CONSUMER.MSG.NEXT.{self.bus.cfg.events_stream}.{self.consumer}",
                         msgspec.json.encode({"batch": want, "no_wait": True}), reply=self.inbox)
        try:
            await asyncio.wait_for(asyncio.shield(self._done), timeout)
        except TimeoutError:  # e.g. messages aged out between info and fetch
            self.broken = True
        rows, self._rows, self._done = self._rows, [], None
        return rows

    async def close(self) -> None:
        if self.sub is not None:
            await unsubscribe_routed(self.bus.nc, self.sub)
        js = self.bus.js
        if js is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(self.bus.cfg.events_stream, self.consumer)


# ---------------------------------------------------------------------------------------------- decisions
class BufferedPublisher(Generic[R]):
    """Rows appended on the hot path (one deque append), published by a task on the bus loop every
    ``flush_seconds`` with ``Nats-Msg-Id`` (or spooled): never blocks, never raises. A subclass says how a
    record becomes a row (`_row`) and what happens once a batch is stored (`_written`).

    With nothing buffered the task sleeps until the next append wakes it (then lets ``flush_seconds`` of
    records gather, as before): ticking every 10-20 ms while idle cost each serving worker's bus thread
    ~12 ms of CPU a second with its two publishers, and `kassa learn`'s, whose decision publisher never
    publishes, ~7 ms a second (idle topology, per-thread /proc stat). Under load the buffer is never empty at
    a tick, so the hot path only reads a flag; the wake-up happens once per idle spell (a cross-thread call
    unless the bus lives on the appending loop, as a serving worker's does)."""

    def __init__(self, bus: JetStreamBus, flush_seconds: float = 0.02) -> None:
        self.bus = bus
        self.flush_seconds = flush_seconds
        self.written = 0
        self.failed_flushes = 0
        self._buffer: collections.deque[R] = collections.deque()
        self._writing: list[R] = []
        self._stop = False
        self._lock: asyncio.Lock | None = None  # created on the bus loop
        self._wake: asyncio.Event | None = None  # created on the bus loop; set to end an idle wait
        self._idle = False  # the task waits for an append (`_until_appended`)
        self._task = bus.thread.submit(self._run())

    @property
    def pending(self) -> int:
        return len(self._buffer) + len(self._writing)

    def _row(self, record: R) -> tuple[str, str, bytes]:
        raise NotImplementedError

    def _written(self, batch: list[R]) -> None:
        return None

    async def _run(self) -> None:
        self._wake = asyncio.Event()
        while True:
            stopping = self._stop
            try:
                await self._publish_buffered()
            except Exception:
                self.failed_flushes += 1
                log.exception("%s: publish and spool both failed; retrying", type(self).__name__)
                await asyncio.sleep(0.5)
            if stopping:
                return
            if not self._buffer:
                await self._until_appended()
            await asyncio.sleep(self.flush_seconds)

    async def _until_appended(self) -> None:
        assert self._wake is not None
        self._wake.clear()
        self._idle = True
        try:
            # Checked after `_idle` is set: an append (or close) before this is seen here, one after it wakes us.
            if not self._buffer and not self._stop:
                await self._wake.wait()
        finally:
            self._idle = False

    def _appended(self) -> None:
        """After an append or on close: wake the task if it sleeps for want of records."""
        if self._idle:
            self._idle = False
            if self.bus.thread.here():
                self._set_wake()
                return
            with contextlib.suppress(RuntimeError):  # the bus loop is closed: nothing left to wake
                self.bus.thread.loop.call_soon_threadsafe(self._set_wake)

    def _set_wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _publish_buffered(self) -> int:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one batch in flight: a flush waits for the pump's batch, then sends the rest
            return await self._publish_locked()

    async def _publish_locked(self) -> int:
        n = len(self._buffer)
        if n == 0:
            return 0
        batch = [self._buffer.popleft() for _ in range(n)]
        self._writing = batch
        try:
            await self.bus.append_rows([self._row(r) for r in batch])
        except BaseException:
            self._buffer.extendleft(reversed(batch))  # in front again, in order, for the next try
            self._writing = []
            raise
        self._writing = []
        self.written += n
        try:
            self._written(batch)
        except Exception:
            log.exception("%s: on_written callback failed", type(self).__name__)
        return n

    def flush(self) -> int:
        """Publish (or spool) every buffered record now, from a thread other than the bus loop."""
        return self.bus.thread.call(self._publish_buffered(), timeout=60)

    def close(self) -> None:
        if self.bus.thread.here():
            raise RuntimeError(f"{type(self).__name__}.close() on the loop its bus runs on: await aclose() instead")
        self._stop = True
        self._appended()
        with contextlib.suppress(Exception):
            self._task.result(timeout=30)
        self._check_closed()

    async def aclose(self) -> None:
        """`close` for a caller on the bus's loop (a serving worker's `Kassa.stop`): awaits the task's last
        publish; elsewhere the blocking `close`."""
        if not self.bus.thread.here():
            self.close()
            return
        self._stop = True
        self._appended()
        await asyncio.wait([asyncio.wrap_future(self._task)], timeout=30)
        self._check_closed()

    def _check_closed(self) -> None:
        if self._buffer:
            log.error("%s closed with %d unpublished records", type(self).__name__, len(self._buffer))


class DecisionPublisher(BufferedPublisher[DecisionRecord]):
    """The serving side of the decision log on JetStream: ``append`` never blocks and never raises.

    It has the surface of `DecisionLogWriter` the engine and the app use (``append``, ``pending``,
    ``find_unwritten``, ``flush``, ``close``); "written" here means acknowledged by JetStream or spooled.

    ``shadow``: the shadow models' records (`kassa.learn.shadow.ShadowScorer`) instead, on the shadow subject of the
    same stream (`BusConfig.shadow_decisions_subject`; the writer files them under ``<data_dir>/shadow/decisions``).
    A shadow record has the served decision's ``decision_id``, and the stream's duplicate window spans its subjects,
    so its ``Nats-Msg-Id`` is ``shadow:<decision_id>``: a decision id (hex digits) never holds a colon.
    """

    def __init__(self, bus: JetStreamBus, flush_seconds: float = 0.02,
                 on_written: Callable[[list[DecisionRecord]], None] | None = None, *, shadow: bool = False) -> None:
        self.on_written = on_written
        self._encode = msgspec.json.Encoder().encode
        self._subject = bus.cfg.shadow_decisions_subject if shadow else bus.cfg.decisions_subject
        self._id_prefix = SHADOW_MSG_ID_PREFIX if shadow else ""
        super().__init__(bus, flush_seconds)

    def append(self, record: DecisionRecord) -> None:
        self._buffer.append(record)
        if self._idle:
            self._appended()

    def find_unwritten(self, decision_id: str) -> DecisionRecord | None:
        for records in (list(self._buffer), list(self._writing)):
            for rec in reversed(records):
                if rec.decision_id == decision_id:
                    return rec
        return None

    def _row(self, record: DecisionRecord) -> tuple[str, str, bytes]:
        return self._subject, self._id_prefix + record.decision_id, self._encode(record)

    def _written(self, batch: list[DecisionRecord]) -> None:
        if self.on_written is not None:
            self.on_written(batch)


class JoinRecordPublisher(BufferedPublisher[PendingDecision]):
    """A serving worker's decisions for `kassa learn` on JetStream (``roles.learner_input: jetstream``).

    The bus twin of `kassa.events.records.DecisionRecordLog`, with the same reward-sink surface: ``register``
    queues the decision's `PendingDecision` (msgpack, ``Nats-Msg-Id = decision_id``) for the join records
    stream; events are the learner's to join, so ``observe`` does nothing and every decision counts as open.
    """

    def __init__(self, bus: JetStreamBus, flush_seconds: float = 0.01) -> None:
        self._encode = msgspec.msgpack.Encoder().encode
        self._subject = bus.cfg.records_subject
        super().__init__(bus, flush_seconds)

    def register(self, pending: PendingDecision) -> None:
        self._buffer.append(pending)
        if self._idle:
            self._appended()

    answers_refunds = False  # the learner applies refunds (as outcomes) from the stream

    def observe(self, _event: object) -> int:
        return 0

    def is_open(self, _decision_id: str) -> bool:
        return True

    def __len__(self) -> int:
        return self.pending

    def join_lag(self, _now: float) -> float:
        return 0.0

    def _row(self, record: PendingDecision) -> tuple[str, str, bytes]:
        return self._subject, record.decision_id, self._encode(record)
