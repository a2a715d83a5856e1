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
from typing import Any, Literal, cast

import msgspec

from kassa import schemas
from kassa.catalog import Catalog, SqlCatalogStore
from kassa.changes import ChangeFeed
from kassa.config import Settings
from kassa.db import CATALOG, FEATURES, KEYS, MODELS, start_writes_lock
from kassa.decide.engine import DecisionEngine
from kassa.decide.retrieval import ProductRetriever
from kassa.degraded import RateLimitedWarning
from kassa.events import replay_state
from kassa.events.compaction import LogCompactor
from kassa.events.decision_log import DecisionLogWriter, DecisionRecord, DecisionSink, find_decision
from kassa.events.factory import (
    open_bus,
    open_decision_publisher,
    open_event_log,
    open_join_records,
    open_shadow_log,
)
from kassa.events.log import SqliteEventLog
from kassa.features.definitions import load_repo, parse_duration
from kassa.features.offer_features import OfferFeatureSource
from kassa.features.offline import OfflineStore
from kassa.features.online.factory import (
    close_online_store,
    hold_embedded_store,
    open_online_store,
    release_embedded_store,
)
from kassa.features.online.memory import InMemoryOnlineStore
from kassa.features.registry import FeatureRegistry
from kassa.features.service import FeatureService
from kassa.features.streaming.processor import StreamProcessor
from kassa.ingest import EventIngest
from kassa.keys import KeyStore, RateLimiter
from kassa.learn.artifacts import artifact_store
from kassa.learn.online.handover import HandoverJoiner
from kassa.learn.online.loop import LearningLoop
from kassa.learn.online.rewards import RewardJoiner
from kassa.learn.registry import ModelRegistry, feature_schema_hash
from kassa.learn.serving.store import ModelStore
from kassa.learn.shadow import ShadowScorer
from kassa.monitor.drift.watch import DriftWatch
from kassa.monitor.metrics import FeatureFreshness, LiveState, Metrics
from kassa.startup import DamagedDataDir, UnusableStartFile, check_data_dir, metadata_engine
from kassa.state import StateBackend

log = logging.getLogger("kassa")
# "all": one process serves and learns (the embedded default). "serve": a stateless HTTP worker that hands
# its decisions to the learner through the decision-record log. "learn": `kassa learn` (kassa.roles.learner).
Role = Literal["all", "serve", "learn"]


class Kassa:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time, seed: int | None = None,
                 role: Role = "all", bus_loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``bus_loop``: the loop the JetStream bus lives on, the server's own, not running yet (a serving
        worker's, `kassa.roles.workers`); None puts the bus on a thread of its own."""
        self.settings = settings
        self.role = role
        self.clock = clock
        data = settings.data_path
        try:
            data.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file of that name, or a parent Kassa may not write
            raise DamagedDataDir(data, f"cannot be used as the data dir ({exc.strerror or exc})",
                                 "point data_dir (--data-dir, KASSA_DATA_DIR) at a folder Kassa may write") from None
        check_data_dir(settings)  # a damaged file stops the start here, named, with what to do
        self.db = metadata_engine(settings)  # migrated to the newest schema (Alembic)
        # Primed before anything loads, so a change committed by another process meanwhile is not missed.
        self.changes = ChangeFeed(self.db, settings.metadata.poll_seconds, settings.metadata.recheck_seconds)
        self.changes.prime()
        self.catalog = Catalog(SqlCatalogStore(self.db))
        self.keys = KeyStore(self.db)
        self.registry = FeatureRegistry(self.db)
        with start_writes_lock(self.db):  # pods and learners that waited for one database start at one moment
            self._write_start_files(settings)
        self.keys.limiter = RateLimiter(msgspec.structs.asdict(settings.server.rate_limits))
        self.metrics = Metrics()
        self.repo = self.registry.load()
        self.store = open_online_store(settings, self.repo.views, clock)
        self._store_hold = hold_embedded_store(settings)  # `kassa features materialize` refuses while held
        # events.backend: sqlite (embedded: events.db + Parquet written here) or jetstream (streams + local spool;
        # the decision-log writer is a separate consumer, kassa.events.consumers.DecisionLogConsumer).
        self.bus = open_bus(settings, loop=bus_loop)
        # Per-buyer / per-request state (`state.backend`): profiles, caps, idempotency, pending decisions. A
        # serving worker hands its decisions to `kassa learn` through the decision-record log or, with
        # `roles.learner_input: jetstream`, the join records stream (kassa.roles, kassa.events.factory).
        self.records = open_join_records(settings, self.bus) if role == "serve" else None
        self.state = StateBackend(settings, self._reward_definition, clock, closes=role != "serve",
                                  sink=self.records, learner=role == "learn", store=self.store)
        self.profiles = self.state.profiles
        self.offline = OfflineStore(data / "offline")
        self.features = FeatureService(self.repo, self.store, self.offline, clock,
                                       timestamp_window=settings.server.timestamp_window_seconds)
        self.retriever = ProductRetriever(clock=clock)  # cache refreshes on Kassa's clock: seeded runs repeat
        self.ledger = self.state.ledger
        decision_state = self.state.decision_state
        self.metrics.dropped_state_writes = lambda: getattr(decision_state, "dropped", 0)
        self.models = ModelStore()
        self.joiner = self.state.joiner
        joiner = self.joiner
        self.metrics.refunds = lambda: ({"taken_back": getattr(joiner, "refunds_taken_back", 0),
                                         "unmatched": getattr(joiner, "refunds_unmatched", 0),
                                         "taken_back_on_order": getattr(joiner, "refunds_taken_back_on_order", 0)}
                                        if hasattr(joiner, "refunds_unmatched") else {})
        self.drift = DriftWatch(self.metrics.registry, settings.learn.drift_webhook_url)
        self.decision_log: DecisionSink = (
            DecisionLogWriter(data, flush_seconds=settings.decision_log_flush_seconds,
                              on_written=self.drift.observe_records)
            if self.bus is None else open_decision_publisher(self.bus, on_written=self.drift.observe_records))
        self.event_log = open_event_log(settings, self.bus)
        if self.bus is not None:
            bus = self.bus
            self.metrics.spool_depth.set_function(lambda: bus.spool_depth)
        self.model_registry = ModelRegistry(self.db, data / "models", clock, store=artifact_store(settings, self.db))
        # The shadow models' records: <data_dir>/shadow here, or (JetStream) to the decision-log writer's data dir.
        self.shadow_log = open_shadow_log(settings, self.bus)
        # Each closed hour's small decision-log files merged into one, in a niced child of the process that learns,
        # never of a serving worker (`kassa.events.compaction`); a flock keeps it to one process per directory.
        self.compactor = (LogCompactor([data / "decisions", data / "shadow" / "decisions"]).start()
                          if role != "serve" else None)
        self.shadow = ShadowScorer(self.shadow_log, seed=seed,
                                   on_drop=lambda placement: self.metrics.shadow_dropped.labels(placement).inc())
        self.learning = LearningLoop(self.catalog, self.joiner, self.models, data / "models", settings.learn, clock,
                                     registry=self.model_registry, schema_hash=self.schema_hash, shadow=self.shadow,
                                     drift=self.drift, metrics=self.metrics,
                                     on_learned=self.metrics.observe_learned,
                                     on_joined=self.metrics.observe_joined,
                                     snapshot_meta=self.joiner.snapshot_meta
                                     if isinstance(self.joiner, HandoverJoiner) else None)
        self.offer_cache = None
        offer_views = self.repo.offer_views()
        offer_source = None
        if offer_views:
            if isinstance(self.store, InMemoryOnlineStore):
                offer_source = OfferFeatureSource(offer_views, self.store.row_reader("offer"),
                                                  self.store.rows_reader("offer"))
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
            keep_candidates=settings.learn.guard.enabled,
        )
        self.metrics.known_offers = lambda: self.catalog.snapshot.offers
        self.metrics.live = self.live_state
        self._freshness: list[FeatureFreshness] = []
        self._freshness_at = float("-inf")
        stream_views = [v for v in self.repo.views if v.kind == "stream"]
        self.stream = (
            StreamProcessor(stream_views, self.store, self.event_log, clock, checkpoint_path=data / "stream.checkpoint")
            if stream_views and self.streams_in_process() else None
        )
        if stream_views and self.stream is None and role != "learn":  # they stayed stale, silently, without it
            log.warning("stream views %s are computed by `kassa stream` (features.streaming: %s, %s online store): "
                        "run it beside this process, or set features.streaming: inprocess",
                        ", ".join(v.name for v in stream_views), settings.features.streaming,
                        settings.features.online_store)
        # A serving worker joins nothing itself: `kassa learn` reads the events from the log.
        ingest_joiner = cast(RewardJoiner, self.records) if self.records is not None else self.joiner
        self.events = EventIngest(self.event_log, self.catalog, ingest_joiner, self.profiles,
                                  self.state.retrieval_input(self.retriever), clock,
                                  on_event=self._count_event, stream=self.stream,
                                  timestamp_window=settings.server.timestamp_window_seconds,
                                  after_apply=self.state.after_apply)
        breaker = getattr(self.store, "breaker", None)
        if breaker is not None:
            self.metrics.watch_breaker(breaker, "redis")
        redis_state = self.state.redis
        if redis_state is not None:
            # With state and online store on one Redis a decision reads both in one round trip through the state
            # backend, so the store's breaker above never sees an outage: this one is what opens (read at scrape).
            self.metrics.circuit_open.labels("redis_state").set_function(lambda: 0.0 if redis_state.available
                                                                         else 1.0)
        if self.stream is not None:
            stream = self.stream
            self.metrics.stream_backlog.set_function(lambda: stream.pending_rows)
            self.metrics.stream_lag_events.set_function(lambda: stream.lag_events)
        # Changes made by any process (this one included) reach this one within a second (kassa.changes).
        self.changes.on(CATALOG, self.catalog.reload)
        self.changes.on(KEYS, self.keys.reload)
        self.changes.on(FEATURES, self.reload_features)
        self.changes.on(MODELS, self._models_changed)
        self._tasks: list[asyncio.Task] = []
        self._polled_at = 0.0
        self._registry_warn = RateLimitedWarning(log, "model registry")
        self.ready = False
        self.started_at = 0.0

    def reload_features(self) -> None:
        """Serve the feature definitions applied elsewhere (`kassa features apply`, another process): views
        read and written through the API and the buyer views of decisions. An online store, stream processor
        or offer-feature source opened for the old definitions keeps them until a restart (logged)."""
        repo = self.registry.load()
        if repo == self.repo:
            return
        before = {v.name for v in self.repo.views}
        self.repo = repo
        self.features.repo, self.features.views = repo, {v.name: v for v in repo.views}
        self.engine.repo = repo
        added = sorted({v.name for v in repo.views} - before)
        log.info("feature definitions reloaded: %d views%s", len(repo.views),
                 f" (new: {', '.join(added)})" if added else "")
        if any(v.kind == "stream" or v.entity == "offer" for v in repo.views if v.name in added):
            log.warning("new stream or offer views take effect in this process after a restart")

    def _write_start_files(self, settings: Settings) -> None:
        """Store what the settings bring: the catalog file, the bootstrap keys, the feature definitions."""
        if settings.catalog_file:
            try:
                self.catalog.load_file(settings.catalog_file, stamp_dir=settings.data_path)
            except (OSError, ValueError) as exc:
                raise UnusableStartFile("catalog file", "--catalog / catalog_file", settings.catalog_file,
                                        exc) from None
        for kind, key in (("admin", settings.admin_key), ("publishable", settings.publishable_key),
                          ("secret", settings.secret_key)):
            if key:  # a revoked one stays revoked: refused, with a warning naming the setting
                self.keys.add(key, kind, f"{kind} (from settings)",  # type: ignore[arg-type]
                              setting=f"{kind}_key (KASSA_{kind.upper()}_KEY)")
        if settings.features.definitions_file:
            try:
                definitions = load_repo(settings.features.definitions_file)
                self.registry.plan(definitions)  # what only the stream processor checked (a traceback there)
            except (OSError, ValueError) as exc:
                raise UnusableStartFile("feature definitions file", "features.definitions_file",
                                        settings.features.definitions_file, exc) from None
            self.registry.apply(definitions)

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
        found = await asyncio.to_thread(find_decision, self.settings.data_path, decision_id, self.clock(),
                                        self.settings.decision_lookup_days)
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
        return LiveState(model_swaps=self.models.swaps, pending_decisions=len(self.joiner),
                         join_lag_seconds=self.joiner.join_lag(self.clock()), serving=serving,
                         freshness=self._freshness)

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

    def streams_in_process(self) -> bool:
        """Whether this process computes the stream views (``features.streaming``; `kassa stream` otherwise)."""
        mode = self.settings.features.streaming
        if mode == "auto":
            return not (self.role == "serve" and not isinstance(self.store, InMemoryOnlineStore))
        return mode == "inprocess"

    def _replay_state_kept(self) -> bool:
        """Whether the profiles and retrieval counts rebuilt from the (SQLite) event log are saved at a clean stop
        and restored at start. Not on `state.backend: redis`: Redis holds the profiles and its order feed
        rebuilds the retrieval counts, so a restored file would count those orders twice."""
        return self.role != "learn" and self.state.shared is None

    def warm_up(self) -> None:
        """Synchronous start-up work: replay the event log, load the latest model snapshots."""
        t0 = time.perf_counter()
        restored = self.state.restore()
        after = 0
        if self._replay_state_kept() and isinstance(self.event_log, SqliteEventLog):
            after = replay_state.load(self.settings.data_path / replay_state.FILE, self.event_log.max_seq(),
                                      self.profiles, self.retriever)
        with self.state.replaying():
            replayed = self.events.replay(after=after) if self.role != "learn" else 0
        self.learning.load_models()
        log.info("restored the state at log position %d, replayed %d order events after it, restored %d pending "
                 "decisions, loaded models %s in %.0f ms", after, replayed, restored, self.models.versions(),
                 (time.perf_counter() - t0) * 1000)

    def _bus_here(self) -> bool:
        """Whether the JetStream bus lives on the running loop: its blocking calls would wait for themselves."""
        return self.bus is not None and self.bus.thread.here()

    async def start(self) -> None:
        if self._bus_here():
            await asyncio.to_thread(self.warm_up)  # its event-log replay reads through the bus on this loop
        else:
            self.warm_up()
        if self.offer_cache is not None:
            await self.offer_cache.start()
        # Everything loaded so far lives for the whole process: move it out of the cyclic GC's reach,
        # and collect the young generation less often. With the default thresholds a full collection
        # walked every catalog, model and profile object and stalled requests by 100+ ms under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
        if self.role == "all":
            self._tasks.append(asyncio.create_task(self.learning.run(), name="kassa-learning"))
        elif self.role == "serve":
            self._tasks.append(asyncio.create_task(self._follow_registry(), name="kassa-registry"))
        self._tasks.append(asyncio.create_task(self.changes.run(), name="kassa-changes"))
        self._tasks.extend(await self.state.start())
        if self.stream is not None and self.role != "learn":
            # Tails the log from the checkpoint (catching up on anything missed while down) and rewrites
            # rows as their windows empty; fresh events also arrive through `apply` at once.
            self._tasks.append(asyncio.create_task(self.stream.run(), name="kassa-stream"))
        self.started_at = time.time()
        self.ready = True

    def _models_changed(self) -> None:
        """A model was registered, promoted or rolled back by some process: poll the registry now."""
        self.learning.poll_soon()
        self._polled_at = 0.0  # a serving worker's registry follower polls at its next tick

    async def _follow_registry(self) -> None:
        """A serving worker's share of the learning loop: load what the registry says should serve (the
        learner's snapshots, promotions, rollbacks) and score queued shadow requests."""
        while True:
            await asyncio.sleep(min(0.05, self.settings.learn.registry_poll_seconds))
            try:
                if self.shadow is not None:
                    self.shadow.drain(64)
                if time.monotonic() - self._polled_at >= self.settings.learn.registry_poll_seconds:
                    self._polled_at = time.monotonic()
                    await self.learning.poll_async()
            except Exception as exc:  # the metadata database away: one line per 10 s, not a traceback per poll
                self._registry_warn("poll failed (serving the models loaded); retrying", exc)

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.changes.stop()
        if self.stream is not None:
            self.stream.stop()
            await self.stream.save_checkpoint()
        if self.role == "all":  # `kassa learn` snapshots on its own stop, only while it holds the lease
            self.learning.snapshot_due(force=True)
        if self.records is not None:
            await self._close(self.records)
        await self.state.close()
        await self._close(self.decision_log)
        await self._close(self.shadow_log)
        if self.compactor is not None:
            await asyncio.to_thread(self.compactor.close)  # kills a merge running: the next one finishes it
        self.drift.close()
        if self.role == "all" and self._replay_state_kept() and isinstance(self.event_log, SqliteEventLog):
            # Single process: every event up to the log's end has been applied here, so the state is as of it.
            # (A serving worker saw only its share of the events, and a learner none: they save nothing.)
            replay_state.save(self.settings.data_path / replay_state.FILE, self.event_log.max_seq(), self.profiles,
                              self.retriever)
        await self._close(self.event_log)
        if self.bus is not None:
            await self.bus.aclose()
        if self.offer_cache is not None:
            await self.offer_cache.close()
        await close_online_store(self.store, self.settings)
        release_embedded_store(self._store_hold)
        self._store_hold = None
        self.db.dispose()

    async def _close(self, service: Any) -> None:
        """Close a service, awaiting the JetStream ones (``aclose``): with the bus on this loop a blocking close
        would wait for the loop it blocks; elsewhere their ``aclose`` is their blocking ``close``."""
        aclose = getattr(service, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            service.close()
