"""`kassa learn`: the reward joiner, the online learner and snapshot publishing as a process of their own.

Every learner reads the whole input (`kassa.learn.online.inputs.LearnerInput`: decision records and
events) and joins every decision, so a standby's join state is as warm as the active one's. A lease per
placement (`kassa.learn.online.lease`) says which learner learns and publishes it; the others keep what
closes (`HandoverJoiner`) and try the lease every ``ttl / 3`` seconds. Taking a lease over: load the
registry's newest production, read the watermark in its metadata, learn the kept examples above it, go on; the
metadata database not answering, hold the lease and try that again with backoff (`_take_over`).
Held leases are renewed by a `LeaseKeeper` thread, not by the learning loop (a loop blocked ~13 s on a hung
metadata database lost its 5 s lease), while the loop beats within ``roles.learner_stall_seconds``; the loop
checks its leases before each round and before anything it publishes. A learner that fails to renew a lease it
held, or whose loop stalled, exits (code 75) rather than learn on with two writers: its supervisor (systemd,
Kubernetes, `kassa serve`) starts it again, as a standby. A takeover first takes the placement's next lease epoch
in the registry, which refuses snapshots carrying an older one: a learner paused between its check and its write
finds its snapshot refused (`StaleFence`) and exits 75 the same way.

Decisions close on a clock ``settle_seconds`` behind the wall clock, the delay with which the input hands
over events (`SqliteTailInput`, `JetStreamInput`), so an event stored just before a decision's deadline still
counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

import sqlalchemy.exc
from sqlalchemy.engine import make_url

from kassa.app import Kassa
from kassa.config import Settings
from kassa.db import wait_for_database
from kassa.degraded import RateLimitedWarning
from kassa.events.factory import bus_config
from kassa.learn.online.handover import HandoverJoiner, Mark, watermark_of
from kassa.learn.online.inputs import JetStreamInput, LearnerInput, SqliteTailInput
from kassa.learn.online.lease import Lease, LeaseKeeper, LeaseLost
from kassa.learn.registry import StaleFence
from kassa.roles.decision_log import DecisionLogWriterRole, writes_decision_log
from kassa.roles.leases import LEASE_LOST_EXIT, lease_factory
from kassa.roles.leases import exit_stalled as _exit_stalled

log = logging.getLogger("kassa.learn")
_SLICE = 1000  # decisions closed per step; the learner process has no request to yield to but its own I/O


__all__ = ["LEASE_LOST_EXIT", "LearnerRole", "LeaseLost", "lease_factory", "run_learner"]


class LearnerRole:
    def __init__(self, settings: Settings, placements: list[str] | None = None,
                 source: LearnerInput | None = None, leases: Callable[[str], Lease] | None = None,
                 clock: Callable[[], float] = time.time,
                 on_stall: Callable[[str], None] | None = _exit_stalled) -> None:
        self.settings = settings
        self.only = set(placements or [])
        self.clock = clock
        self.kassa = Kassa(settings, clock=clock, role="learn")
        unknown = sorted(self.only - set(self.kassa.catalog.snapshot.placements))
        if unknown:  # a typo idled silently ("active for none" every 10 s); a placement may still be created
            log.warning("--placement %s: not in the catalog (known: %s); this learner waits until it is created",
                        ", ".join(unknown), ", ".join(sorted(self.kassa.catalog.snapshot.placements)) or "none")
        assert isinstance(self.kassa.joiner, HandoverJoiner)
        self.joiner: HandoverJoiner = self.kassa.joiner
        self.loop = self.kassa.learning
        self.settle = settings.roles.input_settle_seconds
        self._source = source
        self.new_lease = leases or lease_factory(settings)
        self._lease_warn = RateLimitedWarning(log, "learner lease")
        self._db_warn = RateLimitedWarning(log, "learner metadata")
        self.leases: dict[str, Lease] = {}
        self.lease_every = max(0.1, settings.roles.lease_ttl_seconds / 3)
        self.keeper = LeaseKeeper(settings.roles.lease_ttl_seconds, settings.roles.learner_stall_seconds, on_stall)
        self.took_over: dict[str, float] = {}  # placement -> when this learner became active
        # placement -> (next try, backoff) while its lease is held but the metadata database did not answer
        self._taking_over: dict[str, tuple[float, float]] = {}
        url = settings.metadata_url
        shown = make_url(url).render_as_string(hide_password=True) if "://" in url else url
        self._takeover_warn = RateLimitedWarning(log, f"metadata database {shown}")
        self.input: LearnerInput | None = None
        # On JetStream the decision log's writer too, under a lease of its own (`kassa.roles.decision_log`); this
        # process's `Kassa` already compacts <data_dir>/decisions
        self.writer = (DecisionLogWriterRole(settings, compact=False, on_stall=on_stall)
                       if writes_decision_log(settings) else None)

    def lookback(self) -> float:
        """How far back a starting learner reads: the longest reward window, plus a margin."""
        waits = [v.placement.reward.wait_seconds for v in self.kassa.catalog.snapshot.placements.values()]
        return max(waits, default=600.0) + 60.0

    def placements(self) -> list[str]:
        names = sorted(self.kassa.catalog.snapshot.placements)
        return [p for p in names if not self.only or p in self.only]

    def _watermark(self, placement: str) -> Mark | None:
        """The highest watermark among production and the newest snapshots: what was learned already."""
        marks: list[Mark] = []
        serving = self.kassa.models.serving(placement)
        if serving is not None and serving.production is not None:
            mark = watermark_of(serving.production.meta)
            if mark is not None:
                marks.append(mark)
        for mv in self.kassa.model_registry.versions(placement, limit=5):
            mark = watermark_of(mv.metrics)
            if mark is not None:
                marks.append(mark)
        return max(marks) if marks else None

    async def open_input(self, stop: asyncio.Event | None = None, retry_seconds: float = 1.0) -> LearnerInput | None:
        """The input ``roles.learner_input`` names, reading back `lookback` seconds. JetStream unreachable: wait
        for it (a line every 10 s, holding no lease, so a learner that reaches it takes over) until ``stop``
        (then None); it exited with a traceback, restarted by its supervisor every few seconds."""
        if self.settings.roles.learner_input == "jetstream":
            if self.settings.events.backend != "jetstream":
                raise SystemExit("roles.learner_input: jetstream needs events.backend: jetstream (the serving "
                                 "processes publish decisions and events there); docs/deploy.md")
            import nats.errors

            cfg = bus_config(self.settings, "kassa-learn")
            warn = RateLimitedWarning(log, "learner input")
            while True:
                source = JetStreamInput(cfg, self.lookback(), self.settle, self.clock)
                try:
                    return await source.start()
                except (OSError, TimeoutError, nats.errors.Error) as exc:
                    await source.close()
                    warn(f"JetStream at {cfg.url} unreachable ({type(exc).__name__}: {exc}); waiting for it, "
                         "holding no lease")
                if stop is None:
                    await asyncio.sleep(retry_seconds)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), retry_seconds)
                    if stop.is_set():
                        return None
        return SqliteTailInput(self.settings.data_path, self.lookback(), self.settle, self.clock)

    async def leases_round(self) -> None:
        names = self.placements()
        for placement in [p for p in self.leases if p not in names]:
            await self._let_go(placement)
        for placement in names:
            lease = self.leases.get(placement)
            if lease is None:
                lease = self.leases[placement] = self.new_lease(placement)
            if placement in self.joiner.active:
                continue  # the keeper's thread renews it
            retry = self._taking_over.get(placement)
            if retry is None:
                sent = time.monotonic()
                try:
                    acquired = await asyncio.to_thread(lease.acquire)
                except Exception as exc:  # stay a standby (it raised and exited 1: a crash loop while Redis was away)
                    self._lease_warn(f"could not take the lease of {placement} ({lease.name}; {type(exc).__name__}: "
                                     f"{exc}); standby until it answers")
                    continue
                if not acquired:
                    continue
                self.keeper.hold(placement, lease, sent)  # renewed from now on, while this takes the model over
            elif time.monotonic() < retry[0]:
                continue
            await self._take_over(placement, lease)

    async def _let_go(self, placement: str) -> None:
        """``placement`` left the catalog: stop learning it and release its lease. The keeper renewed it until the
        process stopped, so a learner started for it again (a placement of that name re-created) waited on it."""
        lease = self.leases.pop(placement)
        held = self.keeper.drop(placement)
        self._taking_over.pop(placement, None)
        self.took_over.pop(placement, None)
        self.joiner.active.discard(placement)
        self.loop.fences.pop(placement, None)
        if not held:
            return
        try:
            await asyncio.to_thread(lease.release)
        except Exception as exc:  # it lapses after its TTL instead
            self._lease_warn(f"could not release the lease of {placement} ({lease.name}; {type(exc).__name__}: "
                             f"{exc}); it lapses after its TTL")
            return
        log.info("%s is no longer in the catalog: released its lease (%s)", placement, lease.name)

    async def _take_over(self, placement: str, lease: Lease) -> None:
        """Continue from the predecessor's last snapshot and become active. The metadata database down or hung: keep
        the lease (the keeper renews it), keep what closes as a standby does, and try again after 1, 2, 4, 8, then
        every 10 s. It raised out of `run`: exit 1 with a traceback, the lease left to lapse, and the next standby
        met the same database."""
        try:
            # The fence first: what the predecessor registered before it is read next; after it, refused
            epoch = await asyncio.to_thread(self.kassa.model_registry.take_fence, placement)
            await self.loop.poll_async()  # the newest production: the predecessor's last snapshot
            mark = await asyncio.to_thread(self._watermark, placement)
        except sqlalchemy.exc.DBAPIError as exc:
            delay = min(2 * self._taking_over[placement][1], 10.0) if placement in self._taking_over else 1.0
            self._taking_over[placement] = (time.monotonic() + delay, delay)
            first = str(exc.orig or exc).strip().splitlines()[0]
            self._takeover_warn(f"taking over {placement} failed ({type(exc).__name__}: {first}); holding its lease "
                                f"({lease.name}) as a standby and trying again in {delay:g} s")
            return
        self._taking_over.pop(placement, None)
        kept = self.joiner.activate(placement, mark)
        self.loop.fences[placement] = epoch
        self.took_over[placement] = self.clock()
        log.info("learner active for %s (lease %s, epoch %d; %d kept examples to learn, watermark %s)",
                 placement, lease.name, epoch, kept, mark)

    async def round(self) -> int:
        """Read, join and learn what is due; returns how many decisions and events were read."""
        assert self.input is not None
        batch = await self.input.poll()
        guard = self.loop.guard
        for pending in batch.decisions:
            self.joiner.register(pending)
            if pending.served is not None:  # a canary served: its guardrails run here, not in the worker
                guard.served(pending.placement, *pending.served)
        for event in batch.events:
            self.joiner.observe(event)
        await self.input.commit()
        # Not past what the input has read: after a restart it is still reading back its look-back
        # (tests/test_topology_faults.py: a learner killed twice learned 117 of 599 rewards without this).
        closed_by = min(self.clock() - self.settle, self.input.caught_up_to)
        while True:
            before = self.joiner.closed
            self.loop.step(now=closed_by, limit=_SLICE)
            if self.joiner.closed - before < _SLICE:
                break
            self.keeper.beat()
            await asyncio.sleep(0)
        try:
            if self.joiner.active:
                self.keeper.check()  # nothing published on a lease that may have lapsed (a pause, a failed renew)
                await self.publish()  # snapshots, guardrails, registry
            elif self.clock() - self.loop._last_poll >= self.settings.learn.registry_poll_seconds:
                self.loop._last_poll = self.clock()
                await self.loop.poll_async()
        except sqlalchemy.exc.DBAPIError as exc:
            # The metadata database away: keep learning in memory and try again at the next round. It exited
            # with a traceback, and its restarts exited again at start until the database was back.
            first = str(exc.orig or exc).splitlines()[0]
            self._db_warn(f"snapshot or registry poll failed ({type(exc).__name__}: {first}); learning on in memory "
                          "and retrying")
        return len(batch)

    async def publish(self, force: bool = False) -> None:
        """Snapshots, guardrails and the registry poll (``force``: a snapshot of every learner, as at stop). A snapshot
        the registry refused for a stale lease epoch (this process paused past its lease between `check` and the
        write, and a successor took the placement over) is `LeaseLost`: counted, and `kassa learn` exits 75."""
        try:
            if force:
                await asyncio.to_thread(self.loop.snapshot_due, None, True)
            else:
                await self.loop.tick_async(64)
        except StaleFence as exc:
            self.kassa.metrics.learner_fenced.labels(exc.placement).inc()
            raise LeaseLost(exc.detail) from exc

    async def run(self, stop: asyncio.Event | None = None, interval: float = 0.05, idle_interval: float = 0.25) -> None:
        """Rounds every ``interval`` seconds while the input has something, every ``idle_interval`` after one that
        read nothing: an idle learner's rounds (two reads of its input each) cost ~1 % of a core at
        20 a second. Decisions close at most ``idle_interval`` later than their deadline, within the settle delay's
        order of magnitude."""
        stop = stop or asyncio.Event()
        self.kassa.warm_up()
        self.input = self._source or await self.open_input(stop)
        if self.input is None:  # stopped while waiting for its input
            await self.kassa.stop()
            return
        last_lease = last_status = last_prune = 0.0
        self.keeper.beat()
        self.keeper.start()
        if self.writer is not None:
            self.writer.start()
        log.info("learner started as standby for %s (reading back %.0f s)", ", ".join(self.placements()) or "-",
                 self.lookback())
        try:
            while not stop.is_set():
                self.keeper.beat()
                self.keeper.check()
                now = time.monotonic()
                if now - last_lease >= self.lease_every:
                    last_lease = now
                    await self.leases_round()
                if self.writer is not None:
                    self.writer.check()  # a lost writer's lease: exit 75 as for a placement's
                    await self.writer.round()
                wait = interval if await self.round() else idle_interval
                if now - last_status >= 10.0:
                    last_status = now
                    log.info("learner: active for %s; %d open decisions, %d closed, %d learned, %d skipped, "
                             "%d late events, refunds %d taken back and %d unmatched (%d orders taken back by one "
                             "that came first)", sorted(self.joiner.active)
                             or "none", len(self.joiner), self.joiner.closed, self.loop.learned, self.joiner.skipped,
                             self.joiner.late_events, self.joiner.refunds_taken_back, self.joiner.refunds_unmatched,
                             self.joiner.refunds_taken_back_on_order)
                    if self.writer is not None:
                        log.info("%s", self.writer.status())
                if self.joiner.active and now - last_prune >= 60.0 and isinstance(self.input, SqliteTailInput):
                    last_prune = now
                    await asyncio.to_thread(self.input.records.prune, self.clock() - 2 * self.lookback())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await self.close(lost=not stop.is_set())

    async def close(self, lost: bool = False) -> None:
        if self.writer is not None:
            await self.writer.close()  # its last batch written, then its lease released
        if self.joiner.active and not lost:
            try:
                self.keeper.check()
                await self.publish(force=True)  # then the successor starts from here
            except LeaseLost as exc:
                log.warning("no snapshot at stop: %s", exc)
        self.keeper.stop()
        for lease in self.leases.values():
            with contextlib.suppress(Exception):
                await asyncio.to_thread(lease.release)
        if self.input is not None:
            await self.input.close()
        await self.kassa.stop()


def run_learner(settings: Settings, placements: list[str] | None = None) -> int:
    """`kassa learn` in the foreground until SIGTERM (exit 0: a supervisor's normal stop) or SIGINT (130, as every
    Ctrl-C of `kassa`); returns the exit code. Both stop it gracefully."""
    import signal

    import uvloop

    async def main() -> int:
        stop, halt = asyncio.Event(), threading.Event()  # halt: the same signal, for the start-up wait's thread
        loop = asyncio.get_running_loop()
        stopped_by: list[int] = []

        def on_signal(sig: int) -> None:
            stopped_by.append(sig)
            stop.set()
            halt.set()

        def status() -> int:
            return 130 if stopped_by and stopped_by[0] == signal.SIGINT else 0

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        # The metadata database unreachable at start: wait for it (a line per 10 s) rather than exit with a
        # traceback, as the learner already waits for JetStream (`open_input`) and for the database later on.
        if not await asyncio.to_thread(wait_for_database, settings.metadata_url, halt):
            return status()
        role = LearnerRole(settings, placements)
        try:
            await role.run(stop)
        except LeaseLost as exc:
            log.error("%s: exiting so that I start again as a standby", exc)
            return LEASE_LOST_EXIT
        return status()

    lower_priority(settings.roles.learner_nice)
    return uvloop.run(main())


def lower_priority(nice: int) -> None:
    """Lower this process's CPU priority by ``nice`` (`roles.learner_nice`): a learner beside serving workers
    should not take a core from a request. Raising priority is not attempted (it needs privileges)."""
    if nice <= 0:
        return
    try:
        now = os.nice(nice)
    except OSError as exc:  # e.g. a seccomp profile that refuses it: run at the priority given
        log.warning("could not lower the learner's priority by %d: %s", nice, exc)
        return
    log.info("learner running at niceness %d (roles.learner_nice)", now)
