"""The stream processor (`StreamProcessor`): the worker that tails the durable event log, applies events to
a `StreamAggregator`, writes the changed rows to the online store and checkpoints its position and state.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import msgspec

from kassa import schemas
from kassa.degraded import RateLimitedWarning
from kassa.events.log import EventLog
from kassa.features.definitions import FeatureView
from kassa.features.online.base import OnlineStore, WriteItem
from kassa.features.streaming.aggregator import DEFAULT_RESOLUTION, StreamAggregator
from kassa.features.streaming.keys import event_time

log = logging.getLogger("kassa.streaming")

INF = math.inf


class StreamProcessor:
    """Applies events to a `StreamAggregator` and keeps the online store in step with it.

    Two ways in: `run` tails the durable event log from a checkpoint (the ``kassa stream`` worker and the
    embedded background task), and `process` takes the events of a batch right after the server appended
    them, so a decision 50 ms after an order already sees it. Both may run together: the log tail skips
    events `process` already took (by ``event_id``).

    The checkpoint file holds the log position *and* the aggregator state taken at that position: a
    30-day window cannot be rebuilt from a position alone without replaying 30 days of log. On restart
    the state is restored and the tail resumes after the saved position; a missing, unreadable or stale
    checkpoint (views changed) rebuilds everything from the start of the log. Events `process` took beyond
    the saved position are in the saved state *and* its remembered ids, so the replay does not count
    them twice. A checkpoint encodes the whole state on the event loop (~15 µs per row: 0.3 s for 20k
    rows), which is why it is taken once a minute by default, not per batch.

    Rows are written once per changed row per batch, with `OnlineStore.write_many` per view (one pipelined
    call on Redis) or `OnlineStore.write` for a lone row, values computed under a lock, so concurrent
    `process` and `run` never leave an older value last.
    The store must accept a write whose ``ts`` equals the stored one: a late event or a window expiring
    changes a row's values without changing its newest event time.
    """

    def __init__(
        self,
        views: Iterable[FeatureView],
        store: OnlineStore,
        event_log: EventLog | None = None,
        clock: Callable[[], float] = time.time,
        *,
        checkpoint_path: str | Path | None = None,
        checkpoint_interval: float = 60.0,
        batch_size: int = 1000,
        resolution: int = DEFAULT_RESOLUTION,
        max_future_skew: float | None = 300.0,
        dedupe_capacity: int = 100_000,
        advance_when_idle: bool = True,
    ) -> None:
        self.aggregator = StreamAggregator(
            views, resolution=resolution, max_future_skew=max_future_skew, dedupe_capacity=dedupe_capacity
        )
        self.views = {v.name: v for v in self.aggregator.views}
        self.store = store
        self.log = event_log
        self.clock = clock
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.checkpoint_interval = checkpoint_interval
        self.batch_size = batch_size
        self.advance_when_idle = advance_when_idle
        self.seq = 0  # last log position applied
        self.consumed = 0  # log rows read so far (for lag_events without a max-seq query)
        self.lag_events = 0
        self.writes = 0
        self.last_event_time: float | None = None
        self._caught_up = False
        self._newest_written: dict[str, float] = {}
        # Log positions `process` applied ahead of the tail (the ingest's own events, in a serving process):
        # the tail steps over them instead of reading and decoding each event again to find it a duplicate
        # (issue 13: ~20 us per event, a tenth of a decision's CPU with `examples/features.yaml`).
        self._taken: set[int] = set()
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._last_checkpoint = 0.0
        self.lag_check_interval = 1.0
        self.heap: HeapFreezer | None = None  # set by `run(own_process=True)`
        self.fork_checkpoints = False  # set by `run(own_process=True)`: `_checkpoint_in_child`
        self._child: int | None = None  # pid of a checkpoint child still writing
        self._lag_checked_at = -INF
        self._warn = RateLimitedWarning(log, "stream processor")
        self.restored = self._restore()

    # ------------------------------------------------------------------ metrics
    @property
    def processed(self) -> int:
        return self.aggregator.processed

    @property
    def late_dropped(self) -> int:
        return self.aggregator.late_dropped

    @property
    def duplicates(self) -> int:
        return self.aggregator.duplicates

    @property
    def pending_rows(self) -> int:
        """Changed rows not yet written to the online store (grows while it is down)."""
        return self.aggregator.pending

    @property
    def lag_seconds(self) -> float:
        """Clock minus the event time of the last processed event; 0 when caught up with the log."""
        if self.last_event_time is None or (self._caught_up and self.lag_events == 0):
            return 0.0
        return max(0.0, self.clock() - self.last_event_time)

    @property
    def freshness(self) -> dict[str, float | None]:
        """Per view: age of its newest written value (clock minus that value's event time)."""
        now = self.clock()
        return {name: (now - ts if (ts := self._newest_written.get(name)) is not None else None)
                for name in self.views}

    # ------------------------------------------------------------------ applying events
    async def process(self, events: Iterable[schemas.Event], received_at: float | None = None,
                      seqs: Iterable[int] | None = None) -> int:
        """Apply a batch and write each changed row once; returns the number of rows written. ``seqs``: the
        events' positions in the log `run` tails, which it then need not read again."""
        now = self.clock() if received_at is None else received_at
        update = self.aggregator.update
        ev = None
        for ev in events:
            update(ev, now)
        if ev is not None:
            self.last_event_time = event_time(ev, now)
        if seqs is not None and self.log is not None:
            floor = self.seq
            self._taken.update(s for s in seqs if s > floor)
        self.aggregator.expire()
        return await self._flush()

    def _skip_taken(self) -> None:
        """Move the tail past the positions right after it that `process` already applied: reading them
        would find every one a duplicate. Stops at the first position it did not apply."""
        taken = self._taken
        if not taken:
            return
        seq = self.seq
        while seq + 1 in taken:
            seq += 1
            taken.discard(seq)
        if seq != self.seq:
            self.consumed += seq - self.seq
            self.seq = seq

    async def apply(self, event: schemas.Event) -> int:
        """Apply one event and write its rows before returning (tests; the ingest hands `process` its batch)."""
        return await self.process((event,))

    async def _flush(self) -> int:
        agg = self.aggregator
        # Serialised so two flushes never interleave writes of one row; values are computed under the lock,
        # so the last write of a row always carries its latest state.
        async with self._lock:
            by_view: dict[str, list[WriteItem]] = {}
            for name, key in agg.drain_changed():
                out = agg.emit(name, key)
                if out is not None:
                    by_view.setdefault(name, []).append(WriteItem(key, *out))
            n = 0
            written: set[str] = set()
            try:
                for name, items in by_view.items():
                    view = self.views[name]
                    if len(items) == 1:
                        await self.store.write(view, *items[0])
                    else:
                        # One pipelined call per view and batch: a round trip per row held `kassa stream` on
                        # Redis to a few thousand rows a second (bench/topology_events.py).
                        await self.store.write_many(view, items)
                    written.add(name)
                    n += len(items)
                    ts = max(item.ts for item in items)
                    if ts > self._newest_written.get(name, -INF):
                        self._newest_written[name] = ts
            except BaseException:
                # Keep the rows not known to be written pending so the next flush writes them (a row written
                # twice is harmless: an equal event time is rewritten).
                for name, items in by_view.items():
                    if name not in written:
                        for item in items:
                            agg.mark_changed(name, item.key)
                self.writes += n
                raise
            self.writes += n
            return n

    async def resync(self) -> int:
        """Write every row again (after the online store lost its data)."""
        for view, key in self.aggregator.all_keys():
            self.aggregator.mark_changed(view, key)
        return await self._flush()

    # ------------------------------------------------------------------ tailing the log
    async def catch_up(self, max_batches: int | None = None) -> int:
        """Read and apply log events until none are left (or ``max_batches``); returns events read."""
        if self.log is None:
            raise RuntimeError("no event log to tail")
        total, batches = 0, 0
        # While a full batch is processed the next one is already being read (the log's round trips and
        # decoding overlap the aggregation): at most one read in flight, awaited before anything returns.
        ahead: asyncio.Future[list[tuple[int, schemas.Event]]] | None = None
        try:
            while max_batches is None or batches < max_batches:
                if ahead is not None:
                    rows, ahead = await ahead, None
                else:
                    self._skip_taken()
                    rows = await asyncio.to_thread(self.log.read, self.seq, self.batch_size)
                batches += 1
                if not rows:
                    self._caught_up, self.lag_events = True, 0
                    if self.advance_when_idle:
                        # Nothing is pending, so nothing older than now minus the lateness can still come.
                        self.aggregator.expire(self.clock())
                    if self.aggregator.pending:  # also rows a `process` of the ingest could not write (store was down)
                        await self._flush()
                    break
                full = len(rows) == self.batch_size
                if full and (max_batches is None or batches < max_batches):
                    ahead = asyncio.ensure_future(asyncio.to_thread(self.log.read, rows[-1][0], self.batch_size))
                await self.process([ev for _, ev in rows])
                self.seq = rows[-1][0]
                if self._taken:  # positions `process` took that the tail read anyway (a gap before them, a race)
                    self._taken = {s for s in self._taken if s > self.seq}
                self.consumed += len(rows)
                total += len(rows)
                self._caught_up = not full
                if self.heap is not None:
                    self.heap.after_batch()
                if not full:
                    self.lag_events = 0
                elif self.clock() - self._lag_checked_at >= self.lag_check_interval:
                    # A round trip to the log (JetStream: a stream info request): not per batch while
                    # catching up, where it held up every next batch.
                    self.lag_events = await asyncio.to_thread(self._lag)
                    self._lag_checked_at = self.clock()
                else:
                    self.lag_events = max(0, self.lag_events - len(rows))
                if (self.checkpoint_path is not None
                        and self.clock() - self._last_checkpoint >= self.checkpoint_interval):
                    if self.fork_checkpoints:
                        self._checkpoint_in_child()
                    else:
                        await self.save_checkpoint()
                if not full:
                    break
        finally:
            if ahead is not None:  # a failed batch: the read ahead is dropped (read again from `seq`)
                with contextlib.suppress(BaseException):
                    await ahead
        return total

    def _lag(self) -> int:
        assert self.log is not None
        max_seq = getattr(self.log, "max_seq", None)
        if callable(max_seq):
            return max(0, int(max_seq()) - self.seq)
        return max(0, self.log.count() - self.consumed)

    async def run(self, poll_interval: float = 0.05, *, own_process: bool = False) -> None:
        """Tail the log until `stop` (or cancellation); saves a checkpoint on the way out.

        A read starts at most every ``poll_interval`` seconds while events flow (at once when the last batches
        took longer), so an event waits at most one interval plus its batch before it is read. Not a fixed
        sleep after each batch: at 20,000 events/s a 1,000-event batch takes ~25 ms, and sleeping a whole
        interval after it left events waiting up to 75 ms before anyone looked (bench/topology_events.py).

        ``own_process``: the process runs nothing else (``kassa stream``), so the worker may manage it: the
        state is kept out of the cyclic collector's walks (`HeapFreezer`) and periodic checkpoints are saved
        by a forked child (`_checkpoint_in_child`). Never in a serving process: its heap and its forks are
        not the worker's to manage.
        """
        self._stop.clear()
        if own_process:
            # Linux: a forked copy of a threaded process may only run code that takes no lock another
            # thread could hold (what the child does); macOS's system libraries do not promise even that.
            self.fork_checkpoints = sys.platform.startswith("linux")
            if self.heap is None:
                self.heap = HeapFreezer()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                read = 0
                try:
                    read = await self.catch_up()
                except Exception as exc:
                    # A store or log hiccup must not kill the worker. The failed batch is read again; its
                    # events are already in the state (and skipped as duplicates), its rows still pending.
                    self._warn("batch failed; retrying from the log", exc)
                    self._caught_up = True  # back off for one poll interval
                wait = started + poll_interval - time.monotonic() if read else poll_interval
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), wait)
        finally:
            if own_process and self.heap is not None:
                self.heap.close()
                self.heap = None
            if self.checkpoint_path is not None:
                await self.save_checkpoint()

    def stop(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ checkpoints
    async def save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        if self._child is not None:  # a forked save still writing would replace this newer file when done
            await asyncio.to_thread(self._reap_child, True)
        # Encode on the loop (the state must not change underneath), write the file off it.
        payload = msgspec.msgpack.encode(
            {"seq": self.seq, "consumed": self.consumed, "state": self.aggregator.dump()}
        )
        await asyncio.to_thread(_atomic_write, self.checkpoint_path, payload)
        self._last_checkpoint = self.clock()

    def _checkpoint_in_child(self) -> None:
        """Save a checkpoint from a forked copy of this process, so the loop does not stop while it is encoded.

        Encoding the state on the loop took ~107 ms of CPU for 20,000 customer rows of the example views
        (0.2-0.3 s of wall time on the busy 2-core VM), once a minute: every event arriving meanwhile waited,
        a freshness P99 miss whenever it fell inside a measured window. ``fork`` copies the process (page
        tables only; pages are shared until written) at one instant between batches, so the child sees the
        state and position of exactly that instant, encodes and writes them while the parent goes on, and
        exits. The child touches nothing the parent's threads use (no loop, no logging, no sockets): it
        encodes, writes the file and leaves with ``os._exit``. One child at a time; a save due while one is
        still writing waits for the next batch.
        """
        assert self.checkpoint_path is not None
        if self._child is not None and not self._reap_child(False):
            return
        seq, consumed, aggregator, path = self.seq, self.consumed, self.aggregator, self.checkpoint_path
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (coverage does not follow it)
            _write_checkpoint_and_exit(path, seq, consumed, aggregator)
        self._child = pid
        self._last_checkpoint = self.clock()

    def _reap_child(self, block: bool) -> bool:
        """Whether the checkpoint child has exited (reaped; a failure is warned about)."""
        assert self._child is not None
        pid, status = os.waitpid(self._child, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self._child = None
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            self._warn("checkpoint not saved", RuntimeError(f"the checkpoint child exited with {code}"))
        return True

    def _restore(self) -> bool:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        try:
            # Millions of small containers: without the collector scanning them over and over as they
            # are created this is several times faster.
            with _gc_paused():
                saved = msgspec.msgpack.decode(path.read_bytes())
                self.aggregator.load(saved["state"])
        except Exception as exc:
            log.warning("stream checkpoint %s not usable (%s); rebuilding from the start of the log", path, exc)
            self.aggregator = StreamAggregator(
                self.aggregator.views,
                resolution=self.aggregator.resolution,
                max_future_skew=self.aggregator.max_future_skew,
                dedupe_capacity=self.aggregator.dedupe_capacity,
            )
            return False
        self.seq = int(saved["seq"])
        self.consumed = int(saved["consumed"])
        return True


class HeapFreezer:
    """Keeps the aggregator's state out of the cyclic garbage collector's walks, in a process that runs
    nothing but a `StreamProcessor` (``kassa stream``).

    The state is hundreds of thousands of small lists and dicts that live for minutes (20,000 customers of
    the example views: ~215,000 tracked objects). With the default thresholds every batch moves new rows and
    buckets into the old generation, and a full collection then walks all of it: 400,000 events of the
    topology bench's mix set off 23 full collections, up to 389 ms each and 5.8 s in all on the busy 2-core
    VM (load average 6), several times the aggregation's own CPU, and each one a freshness stall.

    After each batch everything alive is frozen (`gc.freeze`, O(1)), so collections see only what the next
    batch allocates. The state holds no reference cycles: a pruned row or bucket is freed by reference
    counting, frozen or not. What a freeze can hold back is cyclic garbage made of objects that were alive
    when it happened (an exception and its traceback, a future): measured, 8 objects after 400 batches of
    JetStream reads and Redis writes. A full collection every ``full_every`` seconds returns them (one stall
    an hour, 285 ms for 245,000 objects on the busy VM, instead of one every few seconds).
    """

    def __init__(self, full_every: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.full_every = full_every
        self.clock = clock
        self.full_collections = 0
        gc.collect()
        gc.freeze()
        self._last_full = clock()

    def after_batch(self) -> None:
        if self.clock() - self._last_full >= self.full_every:
            gc.unfreeze()
            gc.collect()
            self.full_collections += 1
            self._last_full = self.clock()
        gc.freeze()

    def close(self) -> None:
        gc.unfreeze()


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_TMP_IDS = itertools.count()


def _write_checkpoint_and_exit(path: Path, seq: int, consumed: int, aggregator: StreamAggregator) -> NoReturn:
    """The forked checkpoint child: encode, write, exit; never returns into the parent's code."""
    code = 1
    try:
        gc.disable()  # a collection would touch (and so copy) every page of the parent's heap
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C for the worker's process group is not ours
        _atomic_write(path, msgspec.msgpack.encode({"seq": seq, "consumed": consumed, "state": aggregator.dump()}))
        code = 0
    finally:
        os._exit(code)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name: a shutdown save may overlap the tail task's last periodic save.
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.{next(_TMP_IDS)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
