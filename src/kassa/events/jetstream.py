"""The production event bus: events and decision records on NATS JetStream, a local spool while it is away.

`JetStreamBus` owns one NATS connection, the streams and the spool, on one asyncio loop (`BusLoop`): in a
serving worker (`kassa serve --workers N`) the server's own loop (`AdoptedLoop`), so a request hands the bus its
rows without waking another thread; everywhere else (`kassa learn`, the one-process server, CLI tools) a loop on
a thread of its own beside the caller's (`LoopThread`). Code on the bus's loop awaits it; code on other threads
hands it coroutines (``submit``, or the blocking ``call``, which raises on the bus's loop itself instead of
waiting for itself). Both record kinds go through `JetStreamBus.append_rows`:

- while JetStream answers, rows are published in order with ``Nats-Msg-Id`` (the ``event_id`` or the
  ``decision_id``) and async acks, and the call returns only once every row has its publish ack, that is
  once JetStream has stored it (file storage, ``num_replicas`` copies);
- when a publish fails or times out (``ack_timeout_seconds``) or the connection is down, the bus switches
  to spooling: rows are committed to the local `Spool` (fsync) and acknowledged from there. Appends that
  started earlier settle first (ticket order), so the spool holds rows in arrival order;
- once NATS is back (nats-py's ``reconnected_cb``, or a retried first connect), the drain task republishes
  the spool head in order, forgets what was acked and only then lets new rows go to JetStream directly.
  Rows that reached JetStream before the failure was noticed come again with the same ``Nats-Msg-Id`` and
  JetStream drops them as duplicates, as long as they come back within the streams' duplicate window.

Dedupe window: ``events.dedupe_window_seconds`` (default 2 h) is the streams' ``duplicate_window``. Within it
a second publish of an ``event_id`` is acknowledged as a duplicate and not stored; after it, the same
``event_id`` is stored again (the SQLite log dedupes forever). JetStream keeps the ids of the window in
memory, so the window trades memory for how late a client retry or a spool replay can come. Consumers that
must count exactly once (the stream aggregator, the reward joiner) also dedupe by id.

Its users are `kassa.events.jetstream_log` (the `EventLog` and the decision publisher of a serving process).

Throughput (``bench/event_bus.py``, batches of 100, nats-server 2.9.10 on this busy 2-core VM): 26,100-26,800
events/s acknowledged by JetStream from one process, 22,164/s from two at once, 11.4-11.8 µs of client CPU
per event (48-55 µs with nats-py's ``publish_async``; see `JetStreamBus._publish`). Publish acks routed past
nats-py's per-message path (`kassa.events.nats_routes`), the bus on the caller's uvloop loop as in a serving worker
(``bench/event_bus.py --bus-only``, alternating pairs, medians): process CPU per acknowledged message 29.3 -> 24.6 µs
in appends of 5 rows one at a time, 21.1 -> 18.0 µs with 8 at once, 14.1 -> 11.2 µs in appends of 100.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from kassa.degraded import RateLimitedWarning
from kassa.events.nats_routes import subscribe_routed
from kassa.events.spool import Spool, SpoolRow

log = logging.getLogger("kassa.bus")

T = TypeVar("T")

MSG_ID = "Nats-Msg-Id"
_ENCODED_ID = "=?"  # starts a `msg_id_header` that is base64url; an id sent as it is never does


def msg_id_header(msg_id: str) -> str:
    """The ``Nats-Msg-Id`` value of a row's id, one to one. nats-py strips a header value and turns CR and LF
    into spaces, so the event ids ``" e1 "``, ``"e1\\n"`` and ``"e1"`` were one id to JetStream's dedupe (the
    later ones acked as duplicates and dropped; the SQLite log keeps all three) and a blank id was none (its
    retries were all stored). Such ids, and any starting with the marker, go as the marker and the base64url of
    their UTF-8; every other id (every decision id, ordinary event ids) goes as it is, as before."""
    if msg_id and msg_id == msg_id.strip() and "\r" not in msg_id and "\n" not in msg_id \
            and not msg_id.startswith(_ENCODED_ID):
        return msg_id
    return _ENCODED_ID + base64.urlsafe_b64encode(msg_id.encode()).decode()


_DRAIN_BATCH = 1000
_DRAIN_YIELD_EVERY = 100  # a replay lets requests run every 100 rows (~0.5 ms) rather than once per batch
_CATCH_UP_ROWS = 5000  # at most this many spooled rows left: new appends wait for the replay (~0.3 s)


@dataclass(frozen=True, slots=True)
class BusConfig:
    url: str = "nats://127.0.0.1:4222"
    prefix: str = "kassa"  # subjects <prefix>.events / <prefix>.decisions; streams <PREFIX>_EVENTS / _DECISIONS
    spool_dir: Path = Path(".kassa/spool")
    dedupe_window_seconds: float = 7200.0
    replicas: int = 1
    retention_seconds: float = 0.0  # 0: keep everything (like the SQLite log)
    ack_timeout_seconds: float = 2.0
    reconnect_wait_seconds: float = 0.5
    name: str = "kassa"
    # The join records stream (<prefix>.records, <PREFIX>_RECORDS): each served decision's `PendingDecision`,
    # what `kassa learn` joins events to (roles.learner_input: jetstream). Created only when asked for.
    join_records: bool = False

    @property
    def events_subject(self) -> str:
        return f"{self.prefix}.events"

    @property
    def decisions_subject(self) -> str:
        return f"{self.prefix}.decisions"

    @property
    def shadow_decisions_subject(self) -> str:
        """The shadow models' decision records: on the decisions stream beside the served ones, a subject of their
        own so that the writer files them apart (``<data_dir>/shadow/decisions``)."""
        return f"{self.prefix}.decisions.shadow"

    @property
    def records_subject(self) -> str:
        return f"{self.prefix}.records"

    @property
    def events_stream(self) -> str:
        return f"{_stream_token(self.prefix)}_EVENTS"

    @property
    def decisions_stream(self) -> str:
        return f"{_stream_token(self.prefix)}_DECISIONS"

    @property
    def records_stream(self) -> str:
        return f"{_stream_token(self.prefix)}_RECORDS"

    def streams(self) -> list[tuple[str, str]]:
        """(stream, subject) of every stream this configuration uses."""
        out = [(self.events_stream, self.events_subject), (self.decisions_stream, self.decisions_subject)]
        if self.join_records:
            out.append((self.records_stream, self.records_subject))
        return out

    def stream_subjects(self, subject: str) -> list[str]:
        """The subjects the stream of ``subject`` (one of `streams`) binds: the decisions stream also the shadow's."""
        return [subject, self.shadow_decisions_subject] if subject == self.decisions_subject else [subject]


def ack_delivery(reply: str) -> tuple[int, float, int]:
    """(stream sequence, stored at in unix seconds, messages left in the consumer) of a delivered message, from
    its reply subject ``$JS.ACK.[<domain>.<account>.]<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts ns>.
    <pending>[.<token>]``: a split instead of nats-py's ``msg.metadata`` (dataclasses and a datetime per message)."""
    t = reply.split(".")
    if len(t) == 9:
        return int(t[5]), int(t[7]) / 1e9, int(t[8])
    return int(t[7]), int(t[9]) / 1e9, int(t[10])


def _stream_token(prefix: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in prefix).upper()


def stream_config(name: str, subject: str, cfg: BusConfig) -> api.StreamConfig:
    return api.StreamConfig(
        name=name, subjects=cfg.stream_subjects(subject), storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS, num_replicas=cfg.replicas, duplicate_window=cfg.dedupe_window_seconds,
        max_age=cfg.retention_seconds or None,
    )


async def ensure_streams(js: JetStreamContext, cfg: BusConfig) -> None:
    """Create (or bring to ``cfg``) the events and decisions streams (and the join records stream if asked).

    An existing stream keeps every subject it binds and gains the ones ``cfg`` adds: a decisions stream made before
    the shadow subject (`BusConfig.shadow_decisions_subject`) takes it at the first start after an upgrade. A process
    of an older version that starts later in a rolling upgrade sets its own list again (it drops the shadow subject);
    the next shadow publish then finds no stream and the bus's spool replay calls this again (`_recreate_streams`)."""
    for name, subject in cfg.streams():
        sc = stream_config(name, subject, cfg)
        try:
            await js.add_stream(sc)
        except nats.js.errors.BadRequestError:  # exists with another configuration
            existing = (await js.stream_info(name)).config.subjects or []
            sc.subjects = list(sc.subjects or []) + [s for s in existing if s not in (sc.subjects or [])]
            await js.update_stream(sc)


async def connect(cfg: BusConfig, timeout: float = 2.0, name: str | None = None, **callbacks: Any) -> NATS:
    """A NATS connection that fails fast when the server is not there at first, then reconnects forever.

    nats-py either retries a failed first connect forever (``max_reconnect_attempts=-1``) or gives up on later
    disconnects too; the bus wants neither, so it connects without reconnects and switches them on after."""
    nc = await nats.connect(cfg.url, name=name or cfg.name, connect_timeout=timeout, allow_reconnect=True,
                            max_reconnect_attempts=1, reconnect_time_wait=cfg.reconnect_wait_seconds, **callbacks)
    nc.options["max_reconnect_attempts"] = -1  # read again on every reconnect
    return nc


def take_queued_first(sub: Any) -> None:
    """Make ``sub.next_msg`` hand over a message already queued on the subscription without a task, a
    ``wait_for`` and a uuid4 task name each (nats-py's ``next_msg``); an empty queue (or ``timeout <= 0``,
    where nats-py times out even with a message there) still goes the nats-py way.

    For a pull subscription read with nats-py's ``fetch``: it awaits ``next_msg`` once per message of the
    batch, though the read loop has usually queued the whole batch already. `JetStreamInput` polled every
    50 ms under 1,000 decisions/s (a join record and 3 events each): 57 µs of CPU per decision instead of
    103 (medians of 5 alternating 10 s runs, load average 15-18 on the shared 2-core VM)."""
    slow = sub.next_msg
    queue: asyncio.Queue[Msg] = sub._pending_queue

    async def next_msg(timeout: float | None = 1.0) -> Msg:
        if queue.empty() or (timeout is not None and timeout <= 0) or sub._cb or sub._conn.is_closed:
            return await slow(timeout)
        msg = queue.get_nowait()
        sub._pending_size -= len(msg.data)
        queue.task_done()
        return msg

    sub.next_msg = next_msg


async def close_connection(nc: NATS) -> None:
    """Flush what was published (acks included) and close. Not ``drain()``: with a pull subscription open it
    waits out its whole drain timeout (30 s by default) for fetch requests that never complete."""
    with contextlib.suppress(Exception):
        await nc.flush(timeout=2)
    await nc.close()


class BusLoop:
    """The loop `JetStreamBus` and its users run on, and how other code hands it work.

    ``submit`` schedules a coroutine from any thread; ``call`` waits for one from a thread that is not the
    loop's own (from the loop itself it raises: it would wait for the loop it blocks); ``here`` says whether
    the caller already runs on the loop, where it awaits the bus directly instead."""

    loop: asyncio.AbstractEventLoop

    def here(self) -> bool:
        """Whether the caller runs on this loop (then it awaits, never ``call``s)."""
        return asyncio._get_running_loop() is self.loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class LoopThread(BusLoop):
    """An asyncio loop on a daemon thread, for clients that must not share the server's loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking call from the bus thread itself")
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()


class AdoptedLoop(BusLoop):
    """A loop the bus lives on but does not run: a serving worker's server loop (`kassa.roles.workers`), so
    the requests hand rows to the bus without waking a thread of its own (no GIL hand-over per hand-over).

    The thread that adopts it is the loop's: a ``call`` from it runs the coroutine to completion while the
    loop is not running yet (the bus's start, built before the server runs) and raises while it runs; from
    any other thread (an ``asyncio.to_thread`` reader) it waits as with `LoopThread`. ``stop`` leaves the
    loop to its owner."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._owner = threading.current_thread()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if threading.current_thread() is self._owner:
            if self.loop.is_running() or self.loop.is_closed():
                coro.close()
                raise RuntimeError("blocking call to the JetStream bus from the loop it runs on: await it instead")
            return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))
        return self.submit(coro).result(timeout)

    def stop(self) -> None:
        return None


class _Ack(msgspec.Struct):
    """JetStream's publish ack (the fields the bus reads)."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: Any = None


_ack_decoder = msgspec.json.Decoder(_Ack)
_NO_RESPONDERS = b"NATS/1.0 503"  # the status line nats-py reads as ``Status: 503`` (no responders)


class _AckBatch:
    __slots__ = ("acks", "future", "remaining")

    def __init__(self, n: int, future: asyncio.Future[list[_Ack]]) -> None:
        self.remaining = n
        self.future = future
        self.acks: list[_Ack | None] = [None] * n


class PublishFailed(Exception):
    """JetStream did not acknowledge a publish (down, timed out, or refused)."""


class JetStreamBus:
    """Publishes rows to JetStream with acks, spooling them locally while it cannot; see the module doc."""

    def __init__(self, cfg: BusConfig, connect_timeout: float = 2.0,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        """On ``loop`` when given (`AdoptedLoop`: built before that loop runs), else on a thread of its own."""
        self.cfg = cfg
        self.thread: BusLoop = LoopThread("kassa-bus") if loop is None else AdoptedLoop(loop)
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.spool = Spool.claim(cfg.spool_dir)
        self.spool_depth = 0
        self.spooled_total = 0  # rows ever acknowledged from the spool
        self.published_total = 0  # rows acknowledged by JetStream (directly or drained)
        self.disconnects = 0
        self._orphans: list[Spool] = []
        self._ack_sub: Any = None  # one wildcard subscription for every publish ack of this process
        self._ack_prefix = ""
        self._ack_counter = 0
        self._ack_waiting: dict[int, tuple[_AckBatch, int]] = {}  # by the token ending the ack's subject
        self._spooling = True  # until connected and the spool is empty
        self._ticket = 0
        self._unsettled: dict[int, asyncio.Future[None]] = {}
        self._spool_queue: list[tuple[list[tuple[str, str, bytes]], asyncio.Future[list[bool]]]] = []
        self._spool_flushing = False
        self._drain_failing = False  # NATS answers but JetStream refuses the replay (e.g. no JetStream)
        self._replay_warn = RateLimitedWarning(log, "JetStream")
        self._wake: asyncio.Event | None = None
        self._drained: asyncio.Event  # set while publishing directly; created on the bus loop
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.thread.call(self._start(connect_timeout))

    # ------------------------------------------------------------------ lifecycle (bus loop)
    async def _start(self, connect_timeout: float) -> None:
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self.spool_depth = await asyncio.to_thread(self.spool.depth)
        self._orphans = await asyncio.to_thread(Spool.orphans, self.cfg.spool_dir, self.spool)
        self.spool_depth += sum([await asyncio.to_thread(o.depth) for o in self._orphans])
        try:
            await self._connect(connect_timeout)
        except Exception as exc:  # unreachable at start: spool and keep trying
            log.warning("NATS at %s unreachable at start (%s); spooling events until it answers", self.cfg.url, exc)
            self._tasks.append(asyncio.create_task(self._connect_forever(), name="kassa-bus-connect"))
        self._tasks.append(asyncio.create_task(self._drain_forever(), name="kassa-bus-drain"))

    async def _connect(self, timeout: float) -> None:
        adopted = False

        async def on_disconnected() -> None:
            # Not the close of a connection whose streams NATS refused: every retry of such a NATS wrote "NATS
            # disconnected" (twice a second) while the reason was at DEBUG (`_connect_forever` names it).
            if adopted:
                await self._on_disconnected()

        nc = await connect(self.cfg, timeout, disconnected_cb=on_disconnected,
                           reconnected_cb=self._on_reconnected, error_cb=self._on_error, closed_cb=self._on_closed)
        js = nc.jetstream(timeout=self.cfg.ack_timeout_seconds, publish_async_max_pending=50_000)
        try:
            await ensure_streams(js, self.cfg)
        except BaseException:
            await nc.close()
            raise
        self.nc, self.js = nc, js
        adopted = True
        self._kick()

    async def _connect_forever(self) -> None:
        warn = RateLimitedWarning(log, f"NATS at {self.cfg.url}")
        warn.said()  # the start's WARNING said why; the retries' again at most once per 10 s
        while not self._closed:
            await asyncio.sleep(self.cfg.reconnect_wait_seconds)
            try:
                await self._connect(self.cfg.ack_timeout_seconds)
            except Exception as exc:
                log.debug("NATS connect retry failed: %s", exc)
                warn(f"still not usable ({exc}); spooling events until it is")
                continue
            log.info("NATS at %s reachable; replaying %d spooled messages", self.cfg.url, self.spool_depth)
            return

    async def _on_disconnected(self) -> None:
        self.disconnects += 1
        if not self._closed:
            log.warning("NATS disconnected; spooling until it is back")
            self._set_spooling(True)

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected; replaying %d spooled messages", self.spool_depth)
        self._kick()

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    async def _on_closed(self) -> None:
        log.debug("NATS connection closed")

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def spooling(self) -> bool:
        return self._spooling

    def close(self, drain_timeout: float = 5.0) -> None:
        """Flush what is queued for the spool, give the spool ``drain_timeout`` s to reach JetStream, stop."""
        if self._closed:
            return
        if self.thread.here():
            raise RuntimeError("JetStreamBus.close() on the loop the bus runs on: await aclose() instead")
        with contextlib.suppress(Exception):
            self.thread.call(self._close(drain_timeout), timeout=drain_timeout + 10)
        self._release()

    async def aclose(self, drain_timeout: float = 5.0) -> None:
        """`close` for a caller on any loop: awaited where the bus lives on the caller's loop (a serving
        worker's `Kassa.stop`), else the blocking `close`, as before."""
        if not self.thread.here():
            self.close(drain_timeout)
            return
        if self._closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._close(drain_timeout), drain_timeout + 10)
        self._release()

    def _release(self) -> None:
        self.thread.stop()
        self.spool.close()
        for orphan in self._orphans:
            orphan.close()

    async def _close(self, drain_timeout: float) -> None:
        deadline = time.monotonic() + drain_timeout
        while (self._spool_queue or self._spool_flushing or self._unsettled) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        while self.spool_depth and self.connected and time.monotonic() < deadline:
            self._kick()
            await asyncio.sleep(0.02)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await close_connection(self.nc)

    # ------------------------------------------------------------------ appending (bus loop)
    async def append_rows(self, rows: list[tuple[str, str, bytes]]) -> list[bool]:
        """Store ``(subject, msg_id, body)`` rows in order; per row, False when it was a duplicate.

        Returns once each row is acknowledged by JetStream or committed to the spool."""
        self._ticket += 1
        ticket = self._ticket
        settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsettled[ticket] = settled
        try:
            while True:
                if (self._spooling and self.connected and not self._drain_failing
                        and self.spool_depth <= _CATCH_UP_ROWS):
                    # Replaying the last few spooled rows: wait for it rather than add to the spool, or under
                    # sustained load the replay never catches up with the rows spooled behind it.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._drained.wait(), self.cfg.ack_timeout_seconds)
                if not self._spooling and self.connected:
                    try:
                        acks = await self._publish(rows)
                    except PublishFailed as exc:
                        if not self._spooling:
                            log.warning("JetStream publish failed (%s); spooling until it is back", exc)
                        self._set_spooling(True)
                    else:
                        self.published_total += len(rows)
                        self._settle(ticket)
                        return [not ack.duplicate for ack in acks]
                # Spool in arrival order: every earlier append must have settled (stored or queued) first.
                earlier = [f for t, f in self._unsettled.items() if t < ticket]
                if earlier:
                    await asyncio.gather(*earlier)
                if self._spooling or not self.connected:
                    break  # the spool is not drained meanwhile: queue behind it
            done: asyncio.Future[list[bool]] = asyncio.get_running_loop().create_future()
            self._spool_queue.append((rows, done))
            self._settle(ticket)
            if not self._spool_flushing:
                task = asyncio.create_task(self._flush_spool_queue())
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return await done
        finally:
            self._settle(ticket)

    def _set_spooling(self, on: bool) -> None:
        self._spooling = on
        if on:
            self._drained.clear()
        else:
            self._drained.set()

    def _settle(self, ticket: int) -> None:
        fut = self._unsettled.pop(ticket, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _flush_spool_queue(self) -> None:
        """Group commit: everything queued since the last commit goes to the spool in one transaction."""
        if self._spool_flushing:
            return
        self._spool_flushing = True
        try:
            while self._spool_queue:
                group, self._spool_queue = self._spool_queue, []
                flat = [row for rows, _ in group for row in rows]
                try:
                    added = await asyncio.to_thread(self.spool.append, flat)
                except Exception as exc:
                    log.exception("spool commit failed for %d rows", len(flat))
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                n_added = sum(added)
                self.spool_depth += n_added
                self.spooled_total += n_added
                i = 0
                for rows, fut in group:
                    if not fut.done():
                        fut.set_result(added[i:i + len(rows)])
                    i += len(rows)
                self._kick()
        finally:
            self._spool_flushing = False

    async def _publish(self, rows: list[tuple[str, str, bytes]] | list[SpoolRow], yield_every: int = 0) -> list[_Ack]:
        """Publish ``rows`` in order and wait for every publish ack (``PublishFailed`` otherwise).

        Not nats-py's ``publish_async``: its future, token and done-callback per message cost ~2x the client
        CPU per event of this one future per batch on one wildcard reply subscription (bench/event_bus.py).
        That subscription is routed (`kassa.events.nats_routes`): each ack goes from nats-py's parser to
        `_on_ack`, a plain function, instead of a `Msg`, the subscription's queue, a task wake-up and a
        coroutine per ack on the loop the bus runs on (a serving worker's server loop): 3-5 µs less process
        CPU per acknowledged message (``bench/event_bus.py --bus-only``; module doc). The route is keyed by the
        subscription id, which nats-py keeps when it resubscribes after a reconnect or a server restart.

        ``yield_every`` > 0 lets the loop run other tasks after every that many publishes: only for a spool replay
        (`_drain_once`), during which no append publishes directly, so nothing can slip between its rows. On a
        serving worker's loop a replay batch of 1,000 rows otherwise holds requests for ~4.5 ms (~8 ms at first)."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise PublishFailed("not connected")
        if self._ack_sub is None:
            self._ack_prefix = nc.new_inbox()
            self._ack_sub = await subscribe_routed(nc, self._ack_prefix + ".*", self._on_ack)
        batch = _AckBatch(len(rows), asyncio.get_running_loop().create_future())
        tokens: list[int] = []
        prefix, waiting = self._ack_prefix, self._ack_waiting
        try:
            for i, row in enumerate(rows):
                subject, msg_id, body = row[-3], row[-2], row[-1]
                assert isinstance(subject, str) and isinstance(msg_id, str) and isinstance(body, bytes)
                self._ack_counter += 1
                token = self._ack_counter
                waiting[token] = (batch, i)
                tokens.append(token)
                await nc.publish(subject, body, reply=f"{prefix}.{token}", headers={MSG_ID: msg_id_header(msg_id)})
                if yield_every and i % yield_every == yield_every - 1:
                    await asyncio.sleep(0)
            if not rows:
                return []
            return await asyncio.wait_for(asyncio.shield(batch.future), self.cfg.ack_timeout_seconds)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise PublishFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            for token in tokens:
                waiting.pop(token, None)

    def _on_ack(self, subject: bytes, _reply: bytes, data: bytes, headers: bytes | None) -> None:
        """One publish ack, routed from nats-py's parser (`_publish`): settles its row of the waiting batch."""
        try:
            token = int(subject[subject.rfind(b".") + 1:])
        except ValueError:
            return  # not a token of ours
        entry = self._ack_waiting.pop(token, None)
        if entry is None:
            return  # its batch gave up (timed out, failed) already
        batch, i = entry
        if batch.future.done():
            return
        if headers is not None and headers.startswith(_NO_RESPONDERS):  # no stream takes the subject
            batch.future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = _ack_decoder.decode(data)
        except msgspec.DecodeError as exc:
            batch.future.set_exception(exc)
            return
        if resp.error is not None:
            batch.future.set_exception(nats.js.errors.APIError(description=str(resp.error)))
            return
        batch.acks[i] = resp
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.future.set_result(batch.acks)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ draining the spool (bus loop)
    async def _drain_forever(self) -> None:
        assert self._wake is not None
        backoff = 0.05
        while not self._closed:
            if self._spooling and self.connected:
                try:
                    more = await self._drain_once()
                    self._drain_failing = False
                    if more:
                        backoff = 0.05
                        continue
                except PublishFailed as exc:
                    self._drain_failing = True  # appends spool at once instead of waiting for this replay
                    self._replay_warn(f"spool replay failed ({exc}); {self.spool_depth:,} acknowledged messages "
                                      "wait in the spool; retrying")
                    if isinstance(exc.__cause__, nats.js.errors.NoStreamResponseError):
                        await self._recreate_streams()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
            self._wake.clear()
            # Not wait_for(wake.wait()): that makes a task per wait, and one the loop stops before it starts
            # (a process dying with its bus) is finalized as "coroutine 'Event.wait' was never awaited".
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()

    async def _recreate_streams(self) -> None:
        """No stream takes our subjects (NATS restarted with its store wiped, or a stream deleted): create them
        again, as at start. The replay failed for ever without this, every event acknowledged from the spool."""
        if self.js is None:
            return
        try:
            await ensure_streams(self.js, self.cfg)
        except Exception as exc:
            log.debug("creating the streams again failed: %s", exc)
            return
        log.warning("JetStream had no stream for the %s.* subjects (NATS restarted without its store?); created "
                    "them again", self.cfg.prefix)

    async def _drain_once(self) -> bool:
        """Publish the spool head in order; True while there is more to do."""
        for spool in (*self._orphans, self.spool):
            rows = await asyncio.to_thread(spool.head, _DRAIN_BATCH)
            if rows:
                await self._publish(rows, yield_every=_DRAIN_YIELD_EVERY)
                await asyncio.to_thread(spool.remove_through, rows[-1][0])
                self.spool_depth -= len(rows)
                self.published_total += len(rows)
                return True
        # Empty: direct publishing may resume, unless an append is about to spool (checked without awaiting).
        if not self._spool_queue and not self._spool_flushing:
            self.spool_depth = 0
            self._set_spooling(False)
            log.info("spool empty; publishing to JetStream directly")
            return False
        return True
