"""`LearningLoop`: close joined decisions, learn them, register snapshots, keep serving in sync.

In the embedded process this runs as a background task that works in small slices and yields to the
event loop between them, so learning never holds a decision up for long. Each round it also scores
queued shadow requests, enforces canary guardrails and, every ``registry_poll_seconds``, loads whatever
the registry says should serve (a promotion or rollback made by the CLI or another process).

Lineage: the online learner continues the production model. Whenever production changes to a version
other than the learner's own last snapshot (a batch-trained model was promoted, or a rollback), the learner
restarts from that version's weights before its next snapshot, so that snapshot descends from what actually
serves; a pending restart is replaced, never kept, so a rollback is obeyed even when it lands before the
restart from the version it undid (issue 17). The restart is deferred to the snapshot (on the worker
thread) rather than done at the swap: reloading a VW workspace holds the GIL for several milliseconds, and
a burst of swaps then costs one reload, not one each. What the new weights have not seen is learned again
on top of them, a slice per tick: for a snapshot of this learner, every example learned after that
snapshot was taken (from a bounded history, ``_HISTORY``), so a restored version also learns what was
learned on the lineage rolled back; for any other model, what was learned since the change.

Auto-publishing goes through ``ModelRegistry.register(auto=True)``, which keeps a snapshot descending
from a rolled-back version a candidate: a snapshot taken in the instant between a rollback's commit and
this process noticing it never serves.

Canary guardrails (`CanaryGuard`) follow the serving set: the comparison opens with the canary and stays
open across the learner's production snapshots, which keep publishing meanwhile (ADR 0004).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import sqlalchemy.exc

from kassa import policies
from kassa.catalog import Catalog
from kassa.config import LearnSettings
from kassa.degraded import RateLimitedWarning
from kassa.events.join import JoinedExample
from kassa.features.featurize import slot_suffix
from kassa.learn.canary import Breach, CanaryGuard
from kassa.learn.online.guard import PublishGuard, Verdict
from kassa.learn.online.learner import OnlineLearner, latest_snapshot
from kassa.learn.online.rewards import RewardJoiner
from kassa.learn.registry import ModelRegistry, Stage, StaleFence
from kassa.learn.serving.loader import ServingModel, load_serving
from kassa.learn.serving.store import ModelStore
from kassa.learn.shadow import ShadowScorer
from kassa.learn.sync import ModelSync
from kassa.monitor.drift.watch import DriftWatch
from kassa.monitor.metrics import Metrics

log = logging.getLogger("kassa.learn")
_MAX_REPLAY = 100_000  # a learner restarts early rather than keep more examples to learn again
_HISTORY = 50_000  # examples remembered per placement with when they were learned (for restores)
Example = tuple[str, str, float, float, bool]  # shared, action, reward, probability, top slot


class LearningLoop:
    def __init__(
        self,
        catalog: Catalog,
        joiner: RewardJoiner,
        models: ModelStore,
        model_dir: Path,
        settings: LearnSettings,
        clock: Callable[[], float] = time.time,
        registry: ModelRegistry | None = None,
        schema_hash: Callable[[str], str | None] | None = None,
        shadow: ShadowScorer | None = None,
        drift: DriftWatch | None = None,
        on_learned: Callable[[str, int], None] | None = None,
        on_joined: Callable[[list[JoinedExample]], None] | None = None,
        metrics: Metrics | None = None,
        snapshot_meta: Callable[[str], dict[str, object]] | None = None,
    ) -> None:
        self.drift = drift
        self.snapshot_meta = snapshot_meta  # extra metadata of each snapshot (`kassa learn`'s watermark)
        self.metrics = metrics
        # Metrics hooks: examples learned per placement (once each: relearning after a restart is not
        # counted again), and every joined example (learned or not) with its reward.
        self.on_learned = on_learned
        self.on_joined = on_joined
        self._last_drift_check = clock()
        self.catalog = catalog
        self.joiner = joiner
        self.models = models
        self.model_dir = model_dir
        self.settings = settings
        self.clock = clock
        self.registry = registry
        self.schema_hash = schema_hash or (lambda _p: None)
        self.shadow = shadow
        self.sync = ModelSync(registry, models, self.schema_hash) if registry is not None else None
        self.guard = CanaryGuard(settings.canary)
        g = settings.guard
        self.publish_guard = PublishGuard(g.window, g.min_ess, g.z, g.tolerance) if g.enabled else None
        self.verdicts: dict[str, Verdict] = {}  # placement -> the publish guard's last verdict
        self.learners: dict[str, OnlineLearner] = {}
        self._last_snapshot: dict[str, float] = {}
        self._published: dict[str, str] = {}  # placement -> last version the learner registered
        # placement -> the lease epoch `kassa learn` took it over with (`ModelRegistry.take_fence`): its snapshots
        # carry it and the registry refuses them once a successor took a newer one (`StaleFence` is raised out)
        self.fences: dict[str, int] = {}
        self._production: dict[str, str | None] = {}  # placement -> production version last seen
        # placement -> the production model the learner must restart from before its next snapshot, and the
        # examples learned since that change (learned again after the restart)
        self._pending_base: dict[str, ServingModel] = {}
        self._replay: dict[str, list[Example]] = {}
        self._backlog: dict[str, list[Example]] = {}  # to learn again, in slices
        self._history: dict[str, deque[tuple[float, Example]]] = {}  # what was learned when (bounded)
        self.restarts = 0
        self._last_poll = 0.0
        self._db_warn = RateLimitedWarning(log, "learner metadata")
        self.learned = 0
        self.failed_examples = 0  # examples a learner raised on, skipped (logged once a minute per placement)
        self._failure_logged_at: dict[str, float] = {}
        self.rollbacks: list[Breach] = []
        self.on_learn: Callable[[str, int], None] | None = None

    def learner(self, placement_id: str) -> OnlineLearner | None:
        learner = self.learners.get(placement_id)
        if learner is None:
            view = self.catalog.snapshot.placements.get(placement_id)
            if view is None:
                return None
            learner = OnlineLearner(view.placement, self.model_dir, self.settings.learning_rate,
                                    self.settings.vw_extra_args)
            self.learners[placement_id] = learner
            self._last_snapshot[placement_id] = self.clock()
            production = self.models.get(placement_id)
            if production is not None and self.registry is not None:
                # continue what serves, not an old checkpoint (at once: there is nothing to learn again yet)
                self._continue_from(placement_id, production)
                self.catch_up(placement_id)
        return learner

    def load_models(self) -> None:
        """At start: serve what the registry says (registering pre-registry snapshots once)."""
        if self.registry is None or self.sync is None:
            return
        serving = self.registry.serving()
        for placement_id, view in self.catalog.snapshot.placements.items():
            if placement_id in serving or self.registry.versions(placement_id, limit=1):
                continue
            latest = latest_snapshot(self.model_dir / placement_id)
            if latest is not None:
                _, path, meta = latest
                from kassa.learn.online.learner import vw_args

                self.registry.register(
                    placement_id, path, schema_hash=self.schema_hash(placement_id) or "",
                    learner_args=meta.get("args", vw_args(view.placement)), source="online", stage="production",
                    rows=int(meta.get("learned", 0)),
                    metrics={k: meta[k] for k in ("learned", "rewarded_decisions", "reward_sum") if k in meta},
                    reason="registered the online learner's snapshot found at start")
        self.poll()

    def poll_soon(self) -> None:
        """Make the next tick poll the registry (the ``models`` change counter moved; any thread)."""
        self._last_poll = float("-inf")

    def poll(self) -> list[str]:
        """Load registry changes into the serving store; restart learners whose production changed."""
        if self.sync is None:
            return []
        return self._apply(self.sync.sync())

    async def poll_async(self) -> list[str]:
        """`poll` with the loading (SQL, checksum, model file) on a worker thread, so the event loop keeps
        answering meanwhile; only the learner bookkeeping runs on the loop."""
        if self.sync is None:
            return []
        return self._apply(await asyncio.to_thread(self.sync.sync))

    def _apply(self, changed: list[str]) -> list[str]:
        for placement_id in changed:
            serving = self.models.serving(placement_id)
            production = serving.production if serving is not None else None
            version = production.version if production is not None else None
            before = self._production.get(placement_id)
            self._production[placement_id] = version
            canary = serving.canary.version if serving is not None and serving.canary is not None else None
            self.guard.track(placement_id, version, canary)
            if production is not None and version != before:
                # Also when production returns to the learner's own last snapshot (a rollback): that clears
                # a restart still pending from the version rolled back.
                self._continue_from(placement_id, production)
                if version is not None and version != self._published.get(placement_id) and before is not None:
                    self._count_manual_rollback(placement_id, version)
                if self.drift is not None and before is not None and version != self._published.get(placement_id):
                    self.drift.rebase(placement_id)  # a promoted or restored model: judge it afresh
        return changed

    def _count_manual_rollback(self, placement_id: str, version: str) -> None:
        if self.metrics is None or self.registry is None:
            return
        last = self.registry.history(version=version, limit=1)  # one indexed query, on a rare change
        if last and last[0].to_stage == "production" and last[0].reason.startswith("restored by rollback"):
            self.metrics.rollbacks.labels(placement_id, "manual").inc()

    def _continue_from(self, placement_id: str, model: ServingModel) -> None:
        """Production of ``placement_id`` is now ``model``: the learner restarts from it at its next snapshot
        (`catch_up`), unless ``model`` is what the learner published itself."""
        learner = self.learners.get(placement_id)
        if learner is None:
            return
        if model.version == self._published.get(placement_id):
            self._pending_base.pop(placement_id, None)
            self._replay.pop(placement_id, None)
            return
        if placement_id not in self._pending_base:
            self._replay[placement_id] = []
        self._pending_base[placement_id] = model

    def restart_pending(self, placement_id: str) -> bool:
        return placement_id in self._pending_base

    def catch_up(self, placement_id: str) -> bool:
        """Restart a learner whose production changed from the new production's weights; what it learned
        since the change is learned again on top, in slices by `learn_backlog`. Returns whether it restarted."""
        model = self._pending_base.pop(placement_id, None)
        replay = self._replay.pop(placement_id, [])
        learner = self.learners.get(placement_id)
        if model is None or learner is None:
            return False
        try:
            learner.restart_from(model.path, model.meta)
        except Exception:
            log.exception("the online learner of %s could not continue from %s; it keeps its own weights",
                          placement_id, model.version)
            return False
        # Still waiting from an earlier restart: those were never learned on these weights either.
        backlog = self._backlog.pop(placement_id, []) + replay
        since = model.meta.get("snapshot_at") if model.meta else None
        history = self._history.get(placement_id)
        if isinstance(since, (int, float)) and history is not None:
            # A snapshot of this learner (restored by a rollback, say): everything learned after it was taken
            # is missing from its weights, whichever lineage learned it meanwhile.
            backlog = [ex for at, ex in history if at > since]
        if len(backlog) > _MAX_REPLAY:
            log.warning("online learner of %s: %d examples learned before %s will not be learned again on it "
                        "(production changes faster than they can be replayed)", placement_id,
                        len(backlog) - _MAX_REPLAY, model.version)
            backlog = backlog[-_MAX_REPLAY:]
        if backlog:
            self._backlog[placement_id] = backlog
        self._published[placement_id] = model.version
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.learner_restarts.labels(placement_id).inc()
        log.info("online learner of %s continues from %s (%d examples to learn again)", placement_id,
                 model.version, len(backlog))
        return True

    def learn_backlog(self, limit: int) -> int:
        """Learn up to ``limit`` examples waiting to be learned again after a restart (`catch_up`). The run
        loop does one slice per tick, so replaying never crowds out requests (~320 examples/s)."""
        done = 0
        for placement_id in list(self._backlog):
            backlog = self._backlog[placement_id]
            learner = self.learners.get(placement_id)
            take = min(limit - done, len(backlog))
            if learner is not None:
                replay = self._replay.get(placement_id)  # production changed again meanwhile: these count too
                for shared, action, reward, probability, top in backlog[:take]:
                    learner.learn(shared, action, reward, probability)
                    if top:
                        learner.rewarded_decisions += 1
                if replay is not None:
                    replay.extend(backlog[:take])
            del backlog[:take]
            if not backlog or learner is None:
                del self._backlog[placement_id]
            done += take
            if done >= limit:
                break
        return done

    def step(self, now: float | None = None, limit: int = 10_000) -> int:
        """Learn every decision whose reward wait has ended (up to ``limit`` decisions)."""
        now = self.clock() if now is None else now
        examples = self.joiner.expire(now, limit)
        placements = self.catalog.snapshot.placements
        guard = self.guard
        learned: dict[str, int] = {}
        for ex in examples:
            if ex.slot == 0 and ex.version:
                guard.rewarded(ex.placement, ex.version, ex.reward)
            if ex.slot == 0 and self.publish_guard is not None:
                self.publish_guard.observe(ex)
            view = placements.get(ex.placement)
            if view is None or not policies.learns(view.placement.policy):
                continue  # baseline and uniform placements serve no model; their log stays for training
            learner = self.learner(ex.placement)
            if learner is None:
                continue
            action = ex.action + slot_suffix(ex.slot) if ex.slot else ex.action
            try:
                learner.learn(ex.shared, action, ex.reward, ex.probability)
            except Exception:  # one bad example (or learner) must not cost the batch's others: they are expired
                self.failed_examples += 1
                if now - self._failure_logged_at.get(ex.placement, float("-inf")) >= 60.0:
                    self._failure_logged_at[ex.placement] = now
                    log.exception("learning an example of %s failed; it is skipped (%d skipped so far)",
                                  ex.placement, self.failed_examples)
                continue
            learned[ex.placement] = learned.get(ex.placement, 0) + 1
            if ex.slot == 0:
                learner.rewarded_decisions += 1
            example = (ex.shared, action, ex.reward, ex.probability, ex.slot == 0)
            history = self._history.get(ex.placement)
            if history is None:
                history = self._history[ex.placement] = deque(maxlen=_HISTORY)
            history.append((now, example))
            replay = self._replay.get(ex.placement)
            if replay is not None:
                replay.append(example)
                if len(replay) >= _MAX_REPLAY:
                    self.catch_up(ex.placement)  # rather than keep more: one VW load on the event loop
        if examples and self.drift is not None:
            self.drift.observe_joined(examples)
        if examples and self.on_joined is not None:
            self.on_joined(examples)
        if self.on_learned is not None:
            for placement_id, n in learned.items():
                self.on_learned(placement_id, n)
        self.learned += len(examples)
        return len(examples)

    def snapshot_due(self, now: float | None = None, force: bool = False) -> list[str]:
        """Snapshot and publish every learner that has learned enough since its last snapshot."""
        now = self.clock() if now is None else now
        published = []
        for placement_id, learner in self.learners.items():
            due = now - self._last_snapshot.get(placement_id, 0.0) >= self.settings.snapshot_every_seconds
            if placement_id in self._pending_base and (due or force):
                self.catch_up(placement_id)
            if learner.learned_since_snapshot == 0:
                continue
            if force or (due and learner.learned_since_snapshot >= self.settings.snapshot_min_learns):
                try:
                    self.publish(placement_id, learner)
                except StaleFence:  # another learner holds the placement now: this one must stop, not retry
                    raise
                except sqlalchemy.exc.DBAPIError as exc:  # the metadata database away: see `_metadata_away`
                    self._last_snapshot[placement_id] = now
                    self._metadata_away(f"snapshot of {placement_id}", exc)
                    continue
                except Exception:
                    # One placement's failure (a model whose weights cannot be exported) must not stop the
                    # others' snapshots, nor the guardrails and registry poll after this in `tick`; it is
                    # tried again at the snapshot cadence, not on every 50 ms tick (which flooded the log).
                    self._last_snapshot[placement_id] = now
                    log.exception("snapshot of %s failed; what it served before keeps serving", placement_id)
                    continue
                published.append(placement_id)
        return published

    def publish(self, placement_id: str, learner: OnlineLearner) -> ServingModel:
        if placement_id in self._pending_base:
            self.catch_up(placement_id)
        path, own_version = learner.snapshot(self.settings.keep_snapshots)
        now = self.clock()
        meta: dict[str, object] = {"learned": learner.learned, "rewarded_decisions": learner.rewarded_decisions,
                                   "reward_sum": learner.reward_sum, "snapshot_at": now}
        if self.snapshot_meta is not None:
            meta.update(self.snapshot_meta(placement_id))
        self._last_snapshot[placement_id] = now
        verdict = self._guard(placement_id, path, own_version, meta)
        reason = "online learner snapshot" + (f"; {verdict.reason}" if verdict is not None else "")
        held = verdict is not None and not verdict.publish
        if self.registry is None or self.sync is None:
            model = load_serving(path, own_version, meta)
            if not held:
                self.models.publish(placement_id, model)
            return model
        stage: Stage = "production" if self.settings.auto_publish and not held else "candidate"
        mv = self.registry.register(
            placement_id, path, schema_hash=self.schema_hash(placement_id) or "", learner_args=learner.args,
            source="online", stage=stage, parent=self._published.get(placement_id), rows=learner.learned,
            metrics=meta, reason=reason, actor="learner", link=True, auto=True, fence=self.fences.get(placement_id),
        )
        self._published[placement_id] = mv.version
        model = load_serving(self.registry.path(mv), mv.version, meta, mv.sha256)
        self.sync.adopt(model)
        stage = mv.stage  # a snapshot descending from a rolled-back version stays a candidate
        if stage == "production":
            self.models.publish(placement_id, model)
            self._production[placement_id] = mv.version
        self.registry.prune(placement_id, self.settings.keep_online_artifacts)
        log.info("registered %s as %s (%d examples learned)", mv.version, stage, learner.learned)
        return model

    def _guard(self, placement_id: str, path: Path, version: str, meta: dict) -> Verdict | None:
        """The publish guard's verdict on a new snapshot (None: no guard, or nothing to judge it on yet)."""
        g = self.publish_guard
        if g is None or not self.settings.auto_publish or g.rows(placement_id) == 0:
            return None
        try:
            candidate = load_serving(path, version, meta)
            verdict = g.check(placement_id, candidate, self.models.get(placement_id))
        except Exception:
            log.exception("publish guard failed on %s; holding it", version)
            verdict = Verdict(False, "held: the publish guard failed (see the log)", 0, 0.0, None, None, "error")
        self.verdicts[placement_id] = verdict
        meta.update(verdict.metrics())
        if not verdict.publish:
            log.warning("%s not published: %s", version, verdict.reason)
            if self.metrics is not None:
                self.metrics.snapshots_held.labels(placement_id, verdict.kind).inc()
        return verdict

    def enforce_guardrails(self) -> list[Breach]:
        if self.registry is None:
            return []
        registry, metrics = self.registry, self.metrics

        def rollback(breach: Breach) -> None:
            registry.promote(breach.version, "archived", reason=f"guardrail: {breach.reason}", actor="guardrail",
                             rolled_back=True)
            if metrics is not None:
                metrics.rollbacks.labels(breach.placement, breach.guardrail).inc()

        def evaluated(placement_id: str, outcome: str) -> None:
            if metrics is not None:
                metrics.guardrail_evaluations.labels(placement_id, outcome).inc()

        breaches = self.guard.enforce(rollback, evaluated)
        if breaches:
            self.rollbacks.extend(breaches)
            self.poll()
        return breaches

    def tick(self, now: float | None = None, slice_size: int = 16) -> None:
        """One round of the periodic work besides learning, done inline: shadow scoring, snapshots,
        guardrails, the registry poll and the drift check (`run` does the same with the slow parts on a
        worker thread)."""
        now = self.clock() if now is None else now
        self.snapshot_due(now)
        if now - self._last_poll >= self.settings.registry_poll_seconds:
            self._last_poll = now
            self.enforce_guardrails()
            self.poll()
        self._light_tick(now, slice_size)

    async def tick_async(self, slice_size: int = 16) -> None:
        now = self.clock()
        # Snapshots (VW save + register + load) and registry polls run on a worker thread; the learner
        # is not touched by anything else meanwhile, because only this task learns.
        await asyncio.to_thread(self.snapshot_due, now)
        if now - self._last_poll >= self.settings.registry_poll_seconds:
            self._last_poll = now
            self.enforce_guardrails()
            await self.poll_async()
        self._light_tick(now, slice_size)

    def _light_tick(self, now: float, slice_size: int) -> None:
        now = self.clock() if now is None else now
        if self._backlog:
            self.learn_backlog(slice_size)
        if self.shadow is not None:
            self.shadow.drain(slice_size * 4)
        every = self.settings.drift_check_seconds
        if self.drift is not None and every > 0 and now - self._last_drift_check >= every:
            self._last_drift_check = now
            self.drift.check(now)

    async def run(self, interval: float = 0.05, slice_size: int = 16) -> None:
        """Background task: learn in slices of ``slice_size`` decisions, yielding in between."""
        while True:
            await asyncio.sleep(interval)
            try:
                while self.step(limit=slice_size) >= slice_size:
                    await asyncio.sleep(0)
                while self.shadow is not None and self.shadow.drain(slice_size) >= slice_size:
                    await asyncio.sleep(0)
                await self.tick_async(slice_size)
            except sqlalchemy.exc.DBAPIError as exc:
                self._metadata_away("registry poll", exc)
            except Exception:
                log.exception("learning step failed")

    def _metadata_away(self, what: str, exc: sqlalchemy.exc.DBAPIError) -> None:
        """The metadata database down or hung: a WARNING per 10 s, and learning goes on in memory (the next snapshot
        and poll try again). `kassa serve`'s in-process learner logged an ERROR with a traceback for every poll (one
        a second) and every snapshot while PostgreSQL was away; `kassa learn` says the same in its own words."""
        first = str(exc.orig or exc).strip().splitlines()[0]
        self._db_warn(f"{what} failed ({type(exc).__name__}: {first}); learning on in memory and retrying")
