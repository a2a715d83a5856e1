"""`Kassa`: builds every service of one process from the settings and owns their lifecycle.

The API and the CLI call these services; nothing else wires them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

from kassa import schemas
from kassa.catalog import Catalog, SqlCatalogStore
from kassa.config import Settings
from kassa.db import make_engine
from kassa.decide.engine import DecisionEngine
from kassa.decide.retrieval import ProductRetriever
from kassa.events.decision_log import DecisionLogWriter, DecisionRecord, find_decision
from kassa.events.log import SqliteEventLog
from kassa.features.definitions import load_repo, parse_duration
from kassa.features.offer_features import OfferFeatureSource
from kassa.features.offline import OfflineStore
from kassa.features.online.factory import close_online_store, open_online_store
from kassa.features.online.memory import InMemoryOnlineStore
from kassa.features.registry import FeatureRegistry
from kassa.features.service import FeatureService
from kassa.features.streaming.processor import StreamProcessor
from kassa.ingest import EventIngest
from kassa.keys import KeyStore
from kassa.learn.online.loop import LearningLoop
from kassa.learn.registry import ModelRegistry, feature_schema_hash
from kassa.learn.serving.store import ModelStore
from kassa.learn.shadow import ShadowScorer
from kassa.monitor.drift.watch import DriftWatch
from kassa.monitor.metrics import FeatureFreshness, LiveState, Metrics
from kassa.state import StateBackend

log = logging.getLogger("kassa")


class Kassa:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time, seed: int | None = None) -> None:
        self.settings = settings
        self.clock = clock
        data = settings.data_path
        data.mkdir(parents=True, exist_ok=True)
        self.db = make_engine(data / "kassa.db")
        self.catalog = Catalog(SqlCatalogStore(self.db))
        if settings.catalog_file:
            self.catalog.load_file(settings.catalog_file, stamp_dir=data)
        self.keys = KeyStore(self.db)
        for kind, key in (("admin", settings.admin_key), ("publishable", settings.publishable_key),
                          ("secret", settings.secret_key)):
            if key:
                self.keys.add(key, kind, f"{kind} (from settings)")  # type: ignore[arg-type]
        self.metrics = Metrics()
        self.registry = FeatureRegistry(self.db)
        if settings.features.definitions_file:
            self.registry.apply(load_repo(settings.features.definitions_file))
        self.repo = self.registry.load()
        self.store = open_online_store(settings, self.repo.views, clock)
        # Per-buyer / per-request state (`state.backend`): profiles, caps, idempotency, pending decisions.
        self.state = StateBackend(settings, self._reward_definition, clock)
        self.profiles = self.state.profiles
        self.offline = OfflineStore(data / "offline")
        self.features = FeatureService(self.repo, self.store, self.offline, clock)
        self.retriever = ProductRetriever()
        self.ledger = self.state.ledger
        self.models = ModelStore()
        self.joiner = self.state.joiner
        self.drift = DriftWatch(self.metrics.registry, settings.learn.drift_webhook_url)
        self.decision_log = DecisionLogWriter(data, flush_seconds=settings.decision_log_flush_seconds,
                                              on_written=self.drift.observe_records)
        self.event_log = SqliteEventLog(data / "events.db")
        self.model_registry = ModelRegistry(self.db, data / "models", clock)
        self.shadow_log = DecisionLogWriter(data / "shadow", flush_seconds=settings.decision_log_flush_seconds)
        self.shadow = ShadowScorer(self.shadow_log, seed=seed,
                                   on_drop=lambda placement: self.metrics.shadow_dropped.labels(placement).inc())
        self.learning = LearningLoop(self.catalog, self.joiner, self.models, data / "models", settings.learn, clock,
                                     registry=self.model_registry, schema_hash=self.schema_hash, shadow=self.shadow,
                                     drift=self.drift, metrics=self.metrics,
                                     on_learned=self.metrics.observe_learned,
                                     on_joined=self.metrics.observe_joined)
        self.offer_cache = None
        offer_views = self.repo.offer_views()
        offer_source = None
        if offer_views:
            if isinstance(self.store, InMemoryOnlineStore):
                mem = self.store
                offer_source = OfferFeatureSource(offer_views, lambda key: mem.read_now("offer", key))
            else:
                from kassa.features.online.redis import OfferFeatureCache

                self.offer_cache = OfferFeatureCache(self.store, "offer", offer_views)  # type: ignore[arg-type]
                offer_source = OfferFeatureSource(offer_views, self.offer_cache.get)
        self.engine = DecisionEngine(
            self.catalog, self.store, self.profiles, self.retriever, self.ledger, self.models, self.joiner,
            self.decision_log, settings.store_timezone,
            self.state.idempotency,
            seed=seed, clock=clock, observe=self.metrics.observe_decision, repo=self.repo,
            on_default=self.metrics.observe_feature_default, offer_features=offer_source,
            on_served=self.learning.guard.served, shadow=self.shadow, on_shown=self.metrics.observe_shown,
            state=self.state.decision_state, state_timeout=self.state.timeout,
        )
        self.metrics.known_offers = lambda: self.catalog.snapshot.offers
        self.metrics.live = self.live_state
        self._freshness: list[FeatureFreshness] = []
        self._freshness_at = float("-inf")
        stream_views = [v for v in self.repo.views if v.kind == "stream"]
        self.stream = (
            StreamProcessor(stream_views, self.store, self.event_log, clock, checkpoint_path=data / "stream.checkpoint")
            if stream_views else None
        )
        self.events = EventIngest(self.event_log, self.catalog, self.joiner, self.profiles,
                                  self.state.retrieval_input(self.retriever), clock,
                                  on_event=self._count_event, stream=self.stream,
                                  after_apply=self.state.after_apply)
        self._tasks: list[asyncio.Task] = []
        self.ready = False
        self.started_at = 0.0

    def _reward_definition(self, placement_id: str) -> schemas.RewardDefinition | None:
        view = self.catalog.snapshot.placements.get(placement_id)
        return view.placement.reward if view else None

    def schema_hash(self, placement_id: str) -> str | None:
        """The feature-schema hash a model of ``placement_id`` must have to serve it now."""
        view = self.catalog.snapshot.placements.get(placement_id)
        return feature_schema_hash(view.placement, self.repo) if view is not None else None

    async def find_decision(self, decision_id: str) -> DecisionRecord | None:
        """A decision this process served, from the decision log: still in the writer's memory (it flushes
        every ``decision_log_flush_seconds``) or in its Parquet files (read on a worker thread)."""
        found = self.decision_log.find_unwritten(decision_id)
        if found is not None:
            return found
        found = await asyncio.to_thread(find_decision, self.settings.data_path, decision_id)
        # Written meanwhile (between the two looks): it is in the files now, or still in memory.
        return found if found is not None else self.decision_log.find_unwritten(decision_id)

    def _count_event(self, event: schemas.Event) -> None:
        self.metrics.observe_event(event.type, event.offer_id)

    def live_state(self) -> LiveState:
        """What `/metrics` reads from the services at scrape time."""
        serving: list[tuple[str, str, str]] = []
        for placement_id in sorted(self.catalog.snapshot.placements):
            s = self.models.serving(placement_id)
            if s is None:
                continue
            for stage, model in (("production", s.production), ("canary", s.canary), ("shadow", s.shadow)):
                if model is not None:
                    serving.append((placement_id, stage, model.version))
        rollbacks: dict[str, int] = {}
        for breach in self.learning.rollbacks:
            rollbacks[breach.placement] = rollbacks.get(breach.placement, 0) + 1
        return LiveState(model_swaps=self.models.swaps, pending_decisions=len(self.joiner),
                         join_lag_seconds=self.joiner.join_lag(self.clock()), serving=serving,
                         canary_rollbacks=rollbacks, freshness=self._freshness)

    def refresh_freshness(self, max_age: float = 15.0) -> None:
        """Recompute each stored view's age from the offline log (which holds every materialized, pushed
        and written value, also those of other processes) at most every ``max_age`` seconds. Blocking
        (DuckDB reads): `/metrics` calls it on a worker thread."""
        now = time.time()
        if now - self._freshness_at < max_age:
            return
        self._freshness_at = now
        rows = []
        for view in self.repo.views:
            if view.kind == "request":  # computed per request: always fresh, nothing stored
                continue
            try:
                newest = self.offline.newest(view.name)
            except Exception:  # a half-written file must not fail the scrape
                log.exception("feature freshness of %s could not be read", view.name)
                newest = None
            rows.append(FeatureFreshness(view.name, None if newest is None else max(0.0, now - newest),
                                         parse_duration(view.freshness_target)))
        self._freshness = rows

    def warm_up(self) -> None:
        """Synchronous start-up work: replay the event log, load the latest model snapshots."""
        t0 = time.perf_counter()
        restored = self.state.restore()
        with self.state.replaying():
            replayed = self.events.replay()
        self.learning.load_models()
        log.info("replayed %d events, restored %d pending decisions, loaded models %s in %.0f ms", replayed,
                 restored, self.models.versions(), (time.perf_counter() - t0) * 1000)

    async def start(self) -> None:
        self.warm_up()
        if self.offer_cache is not None:
            await self.offer_cache.start()
        # Everything loaded so far lives for the whole process: move it out of the cyclic GC's reach,
        # and collect the young generation less often. With the default thresholds a full collection
        # walked every catalog, model and profile object and stalled requests by 100+ ms under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        self._tasks.append(asyncio.create_task(self.learning.run(), name="kassa-learning"))
        self._tasks.extend(await self.state.start())
        if self.stream is not None:
            # Tails the log from the checkpoint (catching up on anything missed while down) and rewrites
            # rows as their windows empty; fresh events also arrive through `apply` at once.
            self._tasks.append(asyncio.create_task(self.stream.run(), name="kassa-stream"))
        self.started_at = time.time()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.stream is not None:
            self.stream.stop()
            await self.stream.save_checkpoint()
        self.learning.snapshot_due(force=True)
        await self.state.close()
        self.decision_log.close()
        self.shadow_log.close()
        self.drift.close()
        self.event_log.close()
        if self.offer_cache is not None:
            await self.offer_cache.close()
        await close_online_store(self.store, self.settings)
        self.db.dispose()
