"""The decision-log writer on JetStream: one process per deployment writes ``<data_dir>/decisions``.

With ``events.backend: jetstream`` serving workers publish each decision's record to the decisions stream
(`DecisionPublisher`) instead of writing Parquet, and `DecisionLogConsumer` writes the stream, exactly once, into the
data dir of the process that runs it: `kassa learn` (``roles.decision_log_writer: learner``, the default, so the
deployment needs nothing new) or `kassa log write` (the role alone). One writer per deployment, by a lease of its own
(`kassa.roles.leases.decision_log_lease`; two writers would each re-create the durable consumer from their own files
and write records twice), on the learner's discipline (ADR 0009):

- A standby tries the lease every ``ttl / 3``. On taking it, it starts the durable consumer, which resumes after the
  highest sequence the directory's files cover: a holder killed with ``kill -9`` loses and repeats nothing, as long
  as its successor writes the same directory (a shared volume; docs/deploy.md).
- A `LeaseKeeper` thread renews the lease. A heartbeat task on the event loop the consumer runs on beats it; a loop
  stuck ``roles.learner_stall_seconds`` stops the renewal and the process exits 75.
- Each file is fenced: the keeper's check runs right before the file is renamed into place, so a writer that lost
  its lease, or was paused past its safe hold (``0.8 × ttl`` after the renewal was sent), writes no more (`Fenced`)
  and its process exits 75, to start again as a standby. Left open, as for the learner before its registry fence: a
  pause of more than ``0.2 × ttl`` between that check and the rename, just long enough for a successor to have
  taken over and written the same records.
- A clean stop (SIGTERM) ends the consumer after its batch, then releases the lease: the standby takes over at its
  next try. A writer that cannot start (JetStream unreachable) releases it too and tries again after 1, 2, 4, 8,
  then every 10 s, so that a writer that can reach it takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from kassa.config import Settings
from kassa.degraded import RateLimitedWarning
from kassa.events.consumers import Fenced
from kassa.events.factory import bus_config, run_decision_log_writer
from kassa.learn.online.lease import Lease, LeaseKeeper, LeaseLost
from kassa.roles.leases import LEASE_LOST_EXIT, decision_log_lease, exit_stalled

log = logging.getLogger("kassa.decision_log")
_HELD = "decision-log writer"  # its lease's name in its own `LeaseKeeper` (no placement's lease is kept there)


def writes_decision_log(settings: Settings) -> bool:
    """Whether `kassa learn` runs the decision-log writer too: on JetStream, unless ``roles.decision_log_writer`` is
    off. (On SQLite each serving process writes its own decisions' Parquet files; there is nothing to consume.)"""
    return settings.events.backend == "jetstream" and settings.roles.decision_log_writer == "learner"


class DecisionLogWriterRole:
    """The writer and its lease, driven by the host process's loop: `start` once, `round` and `check` every pass,
    `close` at the end; see the module doc."""

    def __init__(self, settings: Settings, lease: Lease | None = None, *, compact: bool = True,
                 on_stall: Callable[[str], None] | None = exit_stalled) -> None:
        self.settings = settings
        self.lease = lease or decision_log_lease(settings)
        self.compact = compact  # `kassa learn`'s `Kassa` already compacts <data_dir>/decisions
        ttl = settings.roles.lease_ttl_seconds
        self.every = max(0.1, ttl / 3)
        self.keeper = LeaseKeeper(ttl, settings.roles.learner_stall_seconds, on_stall)
        self.written = 0  # decisions written to Parquet by this process
        self.took_over: float | None = None  # when this process became the writer (wall clock)
        self._task: asyncio.Task[None] | None = None
        self._heart: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._next_try = 0.0
        self._backoff = 0.0
        self._warn = RateLimitedWarning(log, "decision-log writer")

    @property
    def active(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start the lease keeper and the heartbeat (on the running loop); the lease is tried by `round`."""
        self.keeper.beat()
        self.keeper.start()
        self._heart = asyncio.create_task(self._heartbeat(), name="kassa-decision-log-heartbeat")

    async def _heartbeat(self) -> None:
        while True:
            self.keeper.beat()
            await asyncio.sleep(min(1.0, self.every))

    def check(self) -> None:
        """Raises `LeaseLost` once the writer's lease can no longer be shown to be this process's."""
        self.keeper.check()

    def _fence(self) -> None:
        try:
            self.keeper.check()
        except LeaseLost as exc:
            raise Fenced(str(exc)) from exc

    def _count(self, n: int) -> None:
        self.written += n
        self._backoff = 0.0

    async def round(self) -> None:
        """Take the lease when it is free (at most every ``ttl / 3``) and start writing; a writer that stopped is
        looked at (a lost lease raises `LeaseLost`)."""
        if self._task is not None:
            if self._task.done():
                await self._stopped(self._task)
            return
        now = time.monotonic()
        if now < self._next_try:
            return
        self._next_try = now + self.every
        sent = time.monotonic()
        try:
            acquired = await asyncio.to_thread(self.lease.acquire)
        except Exception as exc:  # Redis away: stay a standby, and say so once per 10 s
            self._warn(f"could not take its lease ({self.lease.name}; {type(exc).__name__}: {exc}); standby until it "
                       "answers")
            return
        if not acquired:
            return
        self.keeper.hold(_HELD, self.lease, sent)  # renewed from now on
        self._stop.clear()
        self._task = asyncio.create_task(
            run_decision_log_writer(self.settings, self._stop, on_written=self._count, fence=self._fence,
                                    compact=self.compact), name="kassa-decision-log-writer")
        self.took_over = time.time()
        data, cfg = self.settings.data_path, bus_config(self.settings)
        log.info("decision-log writer active (lease %s): stream %s to %s (shadow decisions to %s), stream %s to %s",
                 self.lease.name, cfg.decisions_stream, data / "decisions", data / "shadow" / "decisions",
                 cfg.events_stream, data / "events.db")

    async def _stopped(self, task: asyncio.Task[None]) -> None:
        self._task = None
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, Fenced):
            raise LeaseLost(str(exc))
        # It could not start (JetStream unreachable) or failed: let the lease go, so that a writer that can reach
        # JetStream takes over, and try again after a back-off.
        self._backoff = min(max(1.0, 2 * self._backoff), 10.0)
        self._next_try = time.monotonic() + self._backoff
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "stopped"
        self._warn(f"stopped ({reason}); released its lease ({self.lease.name}), trying again in {self._backoff:g} s")
        await self._let_go()

    async def _let_go(self) -> None:
        self.took_over = None
        if not self.keeper.drop(_HELD):
            return
        try:
            await asyncio.to_thread(self.lease.release)
        except Exception as exc:  # it lapses after its TTL instead
            self._warn(f"could not release its lease ({self.lease.name}; {type(exc).__name__}: {exc}); it lapses "
                       "after its TTL")

    def status(self) -> str:
        state = "active" if self.active else "standby"
        return f"decision-log writer: {state}; {self.written:,} decisions written by this process"

    async def close(self, timeout: float = 30.0) -> None:
        """Stop writing (after the batch in hand), then release the lease."""
        task, self._task = self._task, None
        if task is not None:
            self._stop.set()
            try:
                await asyncio.wait_for(task, timeout)
            except (Exception, asyncio.CancelledError) as exc:  # Fenced, a start that failed, a hung write
                if not isinstance(exc, Fenced | asyncio.CancelledError):
                    log.warning("decision-log writer: %s at stop", f"{type(exc).__name__}: {exc}")
        if self._heart is not None:
            self._heart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heart
            self._heart = None
        self.keeper.stop()
        await self._let_go()


def run_writer(settings: Settings) -> int:
    """`kassa log write` in the foreground: 0 after SIGTERM, 130 after SIGINT (Ctrl-C), 75 on a lost lease."""
    import signal

    import uvloop

    async def main() -> int:
        stop = asyncio.Event()
        code = 0
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            nonlocal code
            code = 130 if signum == signal.SIGINT else 0
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        writer = DecisionLogWriterRole(settings)
        writer.start()
        log.info("decision-log writer started as standby (lease %s)", writer.lease.name)
        last_status = time.monotonic()
        try:
            while not stop.is_set():
                writer.check()
                await writer.round()
                if time.monotonic() - last_status >= 10.0:
                    last_status = time.monotonic()
                    log.info("%s", writer.status())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), writer.every)
        except LeaseLost as exc:
            log.error("%s: exiting so that I start again as a standby", exc)
            return LEASE_LOST_EXIT
        finally:
            await writer.close()
        log.info("%s; stopped", writer.status())
        return code

    return uvloop.run(main())
