"""Per-buyer and per-request state behind the protocols of ``kassa.decide.state`` and
``kassa.events.join``: the embedded backend (in process, journaled to SQLite: `local`) and the shared one
(Redis: `redis`). `StateBackend` builds the one ``state.backend`` names and owns its lifecycle; ``kassa.app``
is its only user.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from kassa import schemas
from kassa.config import Settings
from kassa.decide.retrieval import ProductRetriever
from kassa.decide.rules import FrequencyLedger
from kassa.decide.sinks import RewardSink
from kassa.decide.state import DecisionState, IdempotencyCache, LocalDecisionState, decode_response
from kassa.features.online.base import OnlineStore
from kassa.features.profile import CustomerProfiles
from kassa.learn.online.rewards import RewardJoiner

if TYPE_CHECKING:  # the backends import their client libraries only when configured
    from kassa.state.local import SqliteStateJournal
    from kassa.state.redis import RedisState
    from kassa.state.redis_join import SharedRewardJoiner
    from kassa.state.retrieval import OrderFeed


class StateBackend:
    """The configured state: ``decision_state`` for the engine, ``joiner`` for the learning loop and the
    ingest, ``profiles`` for the ingest, and the in-process ``ledger`` / ``idempotency`` of the embedded
    backend (None on Redis)."""

    def __init__(self, settings: Settings, definition: Callable[[str], schemas.RewardDefinition | None],
                 clock: Callable[[], float] = time.time, closes: bool = True, sink: RewardSink | None = None,
                 learner: bool = False, store: OnlineStore | None = None) -> None:
        """``closes=False`` (Redis): this process never closes due decisions; a serving-only role leaves
        closing and learning to the learner role. Embedded roles (kassa.roles): a serving worker registers its
        decisions with ``sink`` (the decision-record log `kassa learn` tails) and ``learner`` builds the
        learner's hand-over joiner; only the single process (neither) journals to the data dir, which
        several workers and a learner would otherwise write and restore at once. On Redis too, `kassa learn`
        keeps its join in memory, rebuilt from its input (`kassa.learn.online.inputs`), and a serving worker
        hands its decisions to ``sink`` instead of the Redis join. ``store``: the online store; on Redis, when
        it is on the same server (one node), the state shares its connection and reads a decision's feature
        rows in the state's round trip."""
        st = settings.state
        self.settings = settings
        self.clock = clock
        self.ledger = FrequencyLedger()
        self.idempotency = IdempotencyCache(settings.server.idempotency_ttl_seconds,
                                            settings.server.idempotency_max_entries)
        self.journal: SqliteStateJournal | None = None
        self.redis: RedisState | None = None
        self.shared: SharedRewardJoiner | None = None
        self.feed: OrderFeed | None = None
        self.decision_state: DecisionState
        if st.backend == "redis" and not learner:
            from kassa.features.online.redis import RedisOnlineStore
            from kassa.redisconn import address
            from kassa.state.redis import RedisDecisionState, RedisState
            from kassa.state.redis_join import RedisProfiles, SharedRewardJoiner

            features = store if isinstance(store, RedisOnlineStore) and store.conn is not None else None
            if features is not None and features.conn.address != address(st.redis_url):  # type: ignore[union-attr]
                features = None  # on another server: the decision reads it in a round trip of its own
            self.redis = RedisState(st.redis_url, st.key_prefix,
                                    idempotency_ttl=settings.server.idempotency_ttl_seconds,
                                    cap_window=self.ledger.max_window, retry_seconds=st.retry_seconds,
                                    conn=features.conn if features is not None else None)
            self.shared = SharedRewardJoiner(self.redis, definition, clock, closes=closes)
            self.joiner: RewardJoiner = self.shared  # type: ignore[assignment]  # the same surface
            self.profiles: CustomerProfiles = RedisProfiles(self.shared)  # type: ignore[assignment]
            # a serving worker with a `sink`: `kassa learn` joins its decisions, not Redis
            self.decision_state = RedisDecisionState(self.redis, st.await_commit, hand_over=sink, features=features)
        else:
            from kassa.state.local import FILE, SqliteStateJournal

            if sink is None and not learner:
                self.journal = SqliteStateJournal(settings.data_path / FILE, st.flush_ms / 1000.0,
                                                  settings.server.idempotency_ttl_seconds, self.ledger.max_window)
            if learner:
                from kassa.learn.online.handover import HandoverJoiner

                self.joiner = HandoverJoiner(definition)
            else:
                self.joiner = RewardJoiner(definition, self.journal)
            self.profiles = CustomerProfiles()
            self.decision_state = LocalDecisionState(self.idempotency, self.ledger, self.profiles,
                                                     sink if sink is not None else self.joiner, self.journal)

    def retrieval_input(self, retriever: ProductRetriever) -> ProductRetriever:
        """What the ingest feeds orders to: the retriever itself (embedded: rebuilt from the event log at
        start), or the shared order stream every process's retriever folds (Redis, see `state.retrieval`)."""
        if self.redis is None:
            return retriever
        from kassa.state.retrieval import OrderFeed

        self.feed = OrderFeed(self.redis, retriever)
        return self.feed  # type: ignore[return-value]  # the observe_order surface the ingest uses

    @property
    def timeout(self) -> float:
        return self.settings.state.timeout_ms / 1000.0

    @property
    def after_apply(self) -> Callable[[], Awaitable[None]] | None:
        """What the ingest awaits before acknowledging events: Redis has their credits and profile updates."""
        return self._flush if self.shared is not None else None

    async def _flush(self) -> None:
        from kassa.state.redis import StateUnavailable

        assert self.shared is not None
        with contextlib.suppress(StateUnavailable):  # kept queued and retried: the events are in the log
            await self.shared.flush()
            if self.feed is not None:
                await self.feed.flush(pull=False)

    def restore(self) -> int:
        """Embedded: put back what the journal holds (pending decisions, held refunds, idempotent responses, shows) and
        start its writer. Returns how many pending decisions came back."""
        if self.journal is None:
            return 0
        restored = self.journal.load(self.clock())
        self.joiner.restore(restored.pending, restored.held_refunds)
        for customer, offer, ts in restored.shown:
            self.ledger.record(customer, (offer,), ts)
        for key, ts, fp, blob in restored.idempotent:
            self.idempotency.put(key, fp, decode_response(blob), ts)
        self.journal.start()
        return len(restored.pending)

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Around the event-log replay at start: Redis already holds the profiles it would rebuild."""
        if self.shared is None:
            yield
            return
        self.shared.replaying = True
        if self.feed is not None:
            self.feed.replaying = True
        try:
            yield
        finally:
            self.shared.replaying = False
            if self.feed is not None:
                self.feed.replaying = False

    async def start(self) -> list[asyncio.Task]:
        """Redis: rebuild retrieval from the shared order stream (before the process reports ready), then
        the background tasks that apply queued writes, close due decisions and follow the stream."""
        if self.shared is None:
            return []
        from kassa.state.redis import StateUnavailable

        tasks = [asyncio.create_task(self.shared.run(), name="kassa-shared-state")]
        if self.feed is not None:
            with contextlib.suppress(StateUnavailable):  # Redis down at start: the feed catches up later
                await self.feed.pull()
            tasks.append(asyncio.create_task(self.feed.run(), name="kassa-retrieval-feed"))
        return tasks

    async def drain(self, timeout: float | None = None) -> None:
        """Redis: wait for the decisions' queued writes (tests; at shutdown at most ``timeout``)."""
        from kassa.state.redis import RedisDecisionState

        if isinstance(self.decision_state, RedisDecisionState):
            await self.decision_state.drain(timeout)

    async def close(self) -> None:
        await self.drain(timeout=10.0)
        if self.journal is not None:
            self.journal.close()
        if self.shared is not None and self.redis is not None:
            with contextlib.suppress(Exception):
                await self._flush()
            await self.redis.close()

