"""`LearningLoop`: close joined decisions, learn them, publish snapshots to the serving side.

In the embedded process this runs as a background task that works in small slices and yields to the
event loop between them, so learning never holds a decision up for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kassa.catalog import Catalog
from kassa.config import LearnSettings
from kassa.learn.models import ModelStore
from kassa.learn.rewards import RewardJoiner
from kassa.learn.vw import OnlineLearner, VWModel

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
    ) -> None:
        self.catalog = catalog
        self.joiner = joiner
        self.models = models
        self.model_dir = model_dir
        self.settings = settings
        self.clock = clock
        self.learners: dict[str, OnlineLearner] = {}
        self._last_snapshot: dict[str, float] = {}
        self.learned = 0
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
        return learner

    def load_models(self) -> None:
        for placement_id in self.catalog.snapshot.placements:
            self.models.load_latest(self.model_dir, placement_id)

    def step(self, now: float | None = None, limit: int = 10_000) -> int:
        """Learn every decision whose reward wait has ended (up to ``limit`` decisions)."""
        now = self.clock() if now is None else now
        examples = self.joiner.expire(now, limit)
        placements = self.catalog.snapshot.placements
        for ex in examples:
            view = placements.get(ex.placement)
            if view is None or view.placement.policy not in LEARNED_POLICIES:
                continue  # baseline and uniform placements serve no model; their log stays for training
            learner = self.learner(ex.placement)
            if learner is None:
                continue
            learner.learn(ex.shared, ex.action, ex.reward, ex.probability)
            if ex.slot == 0:
                learner.rewarded_decisions += 1
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
        path, version = learner.snapshot(self.settings.keep_snapshots)
        meta = {"learned": learner.learned, "rewarded_decisions": learner.rewarded_decisions}
        model = VWModel(path, version, meta)
        self.models.publish(placement_id, model)
        self._last_snapshot[placement_id] = self.clock()
        log.info("published %s (%d examples learned)", version, learner.learned)
        return model

    async def run(self, interval: float = 0.05, slice_size: int = 16) -> None:
        """Background task: learn in slices of ``slice_size`` decisions, yielding in between."""
        while True:
            await asyncio.sleep(interval)
            try:
                while self.step(limit=slice_size) >= slice_size:
                    await asyncio.sleep(0)
                self.snapshot_due()
            except Exception:
                log.exception("learning step failed")
