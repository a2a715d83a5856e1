"""`LearningLoop`: close joined decisions, learn them, register snapshots, keep serving in sync.

In the embedded process this runs as a background task that works in small slices and yields to the
event loop between them, so learning never holds a decision up for long. Each round it also scores
queued shadow requests, enforces canary guardrails and, every ``registry_poll_seconds``, loads whatever
the registry says should serve (a promotion or rollback made by the CLI or another process).

Lineage: the online learner continues the production model. When production changes to a version the
learner did not publish itself (a batch-trained model was promoted, or a rollback), the learner restarts
from that version's weights, so its next snapshot descends from what actually serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kassa.catalog import Catalog
from kassa.config import LearnSettings
from kassa.learn.canary import Breach, CanaryGuard
from kassa.learn.models import ModelStore, ModelSync
from kassa.learn.registry import ModelRegistry, Stage
from kassa.learn.rewards import RewardJoiner
from kassa.learn.shadow import ShadowScorer
from kassa.learn.vw import OnlineLearner, VWModel, latest_snapshot
from kassa.monitor.drift import DriftWatch

log = logging.getLogger("kassa.learn")
LEARNED_POLICIES = ("squarecb", "epsilon", "softmax")


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
    ) -> None:
        self.drift = drift
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
        self.learners: dict[str, OnlineLearner] = {}
        self._last_snapshot: dict[str, float] = {}
        self._published: dict[str, str] = {}  # placement -> last version the learner registered
        self._production: dict[str, str | None] = {}  # placement -> production version last seen
        self._last_poll = 0.0
        self.learned = 0
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
                self._continue_from(placement_id, production)  # continue what serves, not an old checkpoint
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
                from kassa.learn.vw import vw_args

                self.registry.register(
                    placement_id, path, schema_hash=self.schema_hash(placement_id) or "",
                    learner_args=meta.get("args", vw_args(view.placement)), source="online", stage="production",
                    rows=int(meta.get("learned", 0)), metrics={k: meta[k] for k in ("learned", "rewarded_decisions")
                                                              if k in meta},
                    reason="registered the online learner's snapshot found at start")
        self.poll()

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
            keep = {m.version for m in (serving.production, serving.canary) if m is not None} if serving else set()
            self.guard.forget(placement_id, keep)
            if production is not None and version != before and version != self._published.get(placement_id):
                self._continue_from(placement_id, production)
                if self.drift is not None and before is not None:
                    self.drift.rebase(placement_id)  # a promoted or restored model: judge it afresh
        return changed

    def _continue_from(self, placement_id: str, model: VWModel) -> None:
        learner = self.learners.get(placement_id)
        if learner is None or model.version == self._published.get(placement_id):
            return
        try:
            learner.restart_from(model.path, model.meta)
        except Exception:
            log.exception("the online learner of %s could not continue from %s; it keeps its own weights",
                          placement_id, model.version)
            return
        self._published[placement_id] = model.version
        log.info("online learner of %s continues from %s", placement_id, model.version)

    def step(self, now: float | None = None, limit: int = 10_000) -> int:
        """Learn every decision whose reward wait has ended (up to ``limit`` decisions)."""
        now = self.clock() if now is None else now
        examples = self.joiner.expire(now, limit)
        placements = self.catalog.snapshot.placements
        guard = self.guard
        for ex in examples:
            if ex.slot == 0 and ex.version:
                guard.rewarded(ex.placement, ex.version, ex.reward)
            view = placements.get(ex.placement)
            if view is None or view.placement.policy not in LEARNED_POLICIES:
                continue  # baseline and uniform placements serve no model; their log stays for training
            learner = self.learner(ex.placement)
            if learner is None:
                continue
            learner.learn(ex.shared, ex.action, ex.reward, ex.probability)
            if ex.slot == 0:
                learner.rewarded_decisions += 1
        if examples and self.drift is not None:
            self.drift.observe_joined(examples)
        self.learned += len(examples)
        return len(examples)

    def snapshot_due(self, now: float | None = None, force: bool = False) -> list[str]:
        """Snapshot and publish every learner that has learned enough since its last snapshot."""
        now = self.clock() if now is None else now
        published = []
        for placement_id, learner in self.learners.items():
            if learner.learned_since_snapshot == 0:
                continue
            due = now - self._last_snapshot.get(placement_id, 0.0) >= self.settings.snapshot_every_seconds
            if force or (due and learner.learned_since_snapshot >= self.settings.snapshot_min_learns):
                self.publish(placement_id, learner)
                published.append(placement_id)
        return published

    def publish(self, placement_id: str, learner: OnlineLearner) -> VWModel:
        path, own_version = learner.snapshot(self.settings.keep_snapshots)
        meta = {"learned": learner.learned, "rewarded_decisions": learner.rewarded_decisions}
        self._last_snapshot[placement_id] = self.clock()
        if self.registry is None or self.sync is None:
            model = VWModel(path, own_version, meta)
            self.models.publish(placement_id, model)
            return model
        stage: Stage = "production" if self.settings.auto_publish else "candidate"
        mv = self.registry.register(
            placement_id, path, schema_hash=self.schema_hash(placement_id) or "", learner_args=learner.args,
            source="online", stage=stage, parent=self._published.get(placement_id), rows=learner.learned,
            metrics=meta, reason="online learner snapshot", actor="learner", link=True,
        )
        self._published[placement_id] = mv.version
        model = VWModel(self.registry.path(mv), mv.version, meta)
        self.sync.adopt(model)
        if stage == "production":
            self.models.publish(placement_id, model)
            self._production[placement_id] = mv.version
        self.registry.prune(placement_id, self.settings.keep_online_artifacts)
        log.info("registered %s as %s (%d examples learned)", mv.version, stage, learner.learned)
        return model

    def enforce_guardrails(self) -> list[Breach]:
        if self.registry is None:
            return []
        pairs = {}
        for placement_id in self.catalog.snapshot.placements:
            s = self.models.serving(placement_id)
            if s is not None and s.canary is not None:
                pairs[placement_id] = (s.production.version if s.production else None, s.canary.version)
        if not pairs:
            return []
        registry = self.registry

        def rollback(breach: Breach) -> None:
            registry.promote(breach.version, "archived", reason=f"guardrail: {breach.reason}", actor="guardrail")

        breaches = self.guard.enforce(pairs, rollback)
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
            except Exception:
                log.exception("learning step failed")
