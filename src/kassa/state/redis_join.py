"""`SharedRewardJoiner`: the reward joiner over the Redis join state, and `RedisProfiles`, the profile writer.

Split from ``kassa.state.redis`` (which owns the connection, the key layout and the scripts these use): this
module is the event side, applying outcome events and orders to Redis and closing due decisions for the
learner. The join rules are those of ``kassa.learn.online.rewards.RewardJoiner``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from kassa import schemas
from kassa.degraded import RateLimitedWarning
from kassa.events.join import JoinedExample, PendingDecision, order_amounts, order_buyer
from kassa.state.redis import (
    _JOIN_GRACE_SECONDS,
    _SEEN_ORDER_SECONDS,
    RedisState,
    StateUnavailable,
    _pack,
    _pairs,
    _unpack_pending,
)

log = logging.getLogger("kassa.state")


class SharedRewardJoiner:
    """The reward joiner over Redis join state, with the `RewardJoiner` surface the learning loop and the
    event ingest use. ``observe`` and ``observe_order`` queue; `flush` applies the queue (awaited by the
    ingest before it acknowledges, so the credit is in Redis when the client hears back); `claim` closes due
    decisions (atomically: a decision is closed by exactly one process) into a buffer that the learning
    loop's synchronous ``expire`` drains. `run` does both in the background."""

    def __init__(self, redis: RedisState, definition: Callable[[str], schemas.RewardDefinition | None],
                 clock: Callable[[], float] = time.time, interval: float = 0.1, closes: bool = True) -> None:
        self.redis = redis
        # Whether `run` closes due decisions here: every process by default (each decision is closed once, by
        # whichever claims it first); a serving-only role leaves closing and learning to `kassa learn`.
        self.closes = closes
        self._definition = definition
        self.clock = clock
        self.interval = interval
        self._events: list[schemas.Event] = []
        self._orders: list[tuple[schemas.Order, str, float]] = []
        self._registered: list[PendingDecision] = []
        self._closed: list[JoinedExample] = []
        self._size = 0
        self._oldest: float | None = None
        self.replaying = False  # set while the event log is replayed at start: Redis already has it all
        self.matched_events = 0
        self.late_events = 0
        self.closed = 0
        self.closed_with_outcome = 0
        # a step every `interval` (0.1 s): one line per 10 s while it fails, a traceback only with the first
        self._warn = RateLimitedWarning(log, "shared reward joiner")

    # -- the RewardJoiner surface
    def __len__(self) -> int:
        return self._size

    def join_lag(self, now: float) -> float:
        return max(0.0, now - self._oldest) if self._oldest is not None else 0.0

    def is_open(self, _decision_id: str) -> bool:
        """Whether a decision still waits for its reward: the join state is in Redis and telling would cost a
        round trip per event, so a shared joiner answers yes and the events ack counts no unknown decisions
        (a documented limit of ``state.backend: redis``)."""
        return True

    # Refund events are stored but take no conversion back over the Redis join state yet (its credits are
    # summed per offer, not kept per order): docs/learning.md says so.
    takes_back_refunds = False

    def register(self, pending: PendingDecision) -> None:
        self._registered.append(pending)

    def observe(self, event: schemas.Event) -> int:
        self._events.append(event)
        return 0

    def observe_order(self, order: schemas.Order, customer_id: str, ts: float) -> None:
        """`CustomerProfiles.observe_order` for the shared profiles (the engine reads them in `load`)."""
        if not self.replaying:
            self._orders.append((order, customer_id, ts))

    def expire(self, now: float, limit: int = 10_000) -> list[JoinedExample]:
        out, self._closed = self._closed[:limit], self._closed[limit:]
        return out

    # -- Redis work
    async def flush(self) -> None:
        """Apply the queued registrations, profile updates and outcome events."""
        registered, self._registered = self._registered, []
        orders, self._orders = self._orders, []
        events, self._events = self._events, []
        try:
            await self._flush(registered, orders, events)
        except StateUnavailable:
            # Keep the work, in order, for the next try (the breaker is open; the events are in the log).
            self._registered[:0] = registered
            self._orders[:0] = orders
            self._events[:0] = events
            raise

    async def _flush(self, registered: list[PendingDecision], orders: list[tuple[schemas.Order, str, float]],
                     events: list[schemas.Event]) -> None:
        r = self.redis
        commands: list[tuple] = []
        for p in registered:
            index = r.index_key(p.customer_id, p.email_sha256) if (p.customer_id or p.email_sha256) else ""
            commands.append(("EVALSHA", r.commit_sha, 5, "", "", r.pend_prefix + p.decision_id, r.due_key, index,
                             "", 0, 0, 0, 0, _pack(p), p.deadline, p.decision_id,
                             int((p.deadline + _JOIN_GRACE_SECONDS) * 1000), 0))
        for order, customer_id, ts in orders:
            cats = [i.category for i in order.items if i.category]
            commands.append(("EVALSHA", r.profile_sha, 2, r.profile_key(customer_id),
                             r.seen_key(customer_id, order.id), order.total, ts, order.id, json.dumps(cats),
                             _SEEN_ORDER_SECONDS))
        if commands:
            await r.run(commands)  # re-sent if the events fail below: registrations and orders are idempotent
        if events:
            await self._apply(events)

    async def _apply(self, events: list[schemas.Event]) -> None:
        r = self.redis
        # Round trip 1: the decisions the events name, and the open decisions of ordering buyers.
        ids = sorted({e.decision_id for e in events if e.decision_id is not None})
        buyers: list[str] = []
        for e in events:
            if e.type == "order" and e.order is not None:
                customer = (e.customer.id if e.customer else None) or e.order.customer_id
                email = e.customer.email_sha256 if e.customer else None
                if customer is not None:
                    buyers.append(r.index_key(customer, None))
                if email is not None:
                    buyers.append(r.index_key(None, email))
        buyers = list(dict.fromkeys(buyers))
        commands: list[tuple] = [("GET", r.pend_prefix + i) for i in ids]
        commands += [("SMEMBERS", b) for b in buyers]
        replies = await r.run(commands) if commands else []
        pending: dict[str, PendingDecision] = {}
        for i, blob in zip(ids, replies[: len(ids)], strict=True):
            if blob:
                pending[i] = _unpack_pending(blob)
        by_buyer = {b: sorted(m.decode() for m in members)
                    for b, members in zip(buyers, replies[len(ids):], strict=True)}
        extra = sorted({d for ms in by_buyer.values() for d in ms} - pending.keys())
        if extra:
            for d, blob in zip(extra, await r.run([("GET", r.pend_prefix + d) for d in extra]), strict=True):
                if blob:
                    pending[d] = _unpack_pending(blob)
        # Round trip 2: the credits.
        credits: list[tuple[str, str, float]] = []
        for e in events:
            n = 0
            if e.decision_id is not None:
                p = pending.get(e.decision_id)
                if p is None:
                    if e.type != "order":
                        self.late_events += 1
                elif e.offer_id is not None:
                    n += self._credit(credits, p, e.offer_id, e.type, e.value)
            if e.type == "order" and e.order is not None:
                n += self._attribute(credits, e, pending, by_buyer)
            self.matched_events += bool(n)
        commands = []
        ttl = int(_JOIN_GRACE_SECONDS * 1000)
        for decision_id, offer_id, amount in credits:
            key = r.reward_prefix + decision_id
            commands += [("HINCRBYFLOAT", key, offer_id, amount), ("HINCRBY", key, "#n", 1), ("PEXPIRE", key, ttl)]
        if commands:
            await r.run(commands)

    def _credit(self, credits: list[tuple[str, str, float]], p: PendingDecision, offer_id: str, kind: str,
                value: float | None) -> int:
        definition = self._definition(p.placement)
        if definition is None or offer_id not in p.offers:
            return 0
        weight = definition.weights.get(kind)
        if weight is None:
            return 0
        credits.append((p.decision_id, offer_id, (value or 0.0) if weight == "value" else float(weight)))
        return 1

    def _attribute(self, credits: list[tuple[str, str, float]], e: schemas.Event,
                   pending: dict[str, PendingDecision], by_buyer: dict[str, list[str]]) -> int:
        # The same rules as `RewardJoiner._attribute_order`.
        r = self.redis
        order = e.order
        assert order is not None
        customer, email = order_buyer(e)
        ids: list[str] = []
        if customer is not None:
            ids += by_buyer.get(r.index_key(customer, None), [])
        if email is not None:
            ids += by_buyer.get(r.index_key(None, email), [])
        bought = order_amounts(order)
        n = 0
        for decision_id in dict.fromkeys(ids):
            p = pending.get(decision_id)
            if p is None or (order.created_at is not None and order.created_at < p.ts):
                continue
            for offer_id, key in zip(p.offers, p.product_keys, strict=False):
                if key is not None and key in bought:
                    n += self._credit(credits, p, offer_id, "conversion", bought[key])
        return n

    async def claim(self, now: float | None = None, limit: int = 10_000) -> int:
        """Close every decision whose wait ended (across all processes, each once) into the buffer
        ``expire`` hands to the learning loop; returns how many decisions were closed."""
        r = self.redis
        now = self.clock() if now is None else now
        (rows,) = await r.run([("EVALSHA", r.claim_sha, 1, r.due_key, now, limit, r.pend_prefix, r.reward_prefix)])
        forget: list[tuple] = []
        for decision_id, blob, flat in rows:
            p = _unpack_pending(blob)
            rewards = {k.decode(): float(v) for k, v in _pairs(flat)}
            outcomes = int(rewards.pop("#n", 0))
            definition = self._definition(p.placement)
            default = definition.default if definition else 0.0
            cap = definition.cap if definition else None
            self.closed += 1
            if outcomes:
                self.closed_with_outcome += 1
            for slot, offer_id in enumerate(p.offers):
                reward = default
                if offer_id in rewards:
                    reward = rewards[offer_id] if cap is None else min(rewards[offer_id], cap)
                self._closed.append(JoinedExample(p.placement, decision_id.decode(), p.shared, p.actions[slot],
                                                  offer_id, reward, p.probabilities[slot], slot, p.version))
            if p.customer_id is not None or p.email_sha256 is not None:
                forget.append(("SREM", r.index_key(p.customer_id, p.email_sha256), p.decision_id))
        if forget:
            await r.run(forget)
        return len(rows)

    async def refresh_size(self) -> None:
        r = self.redis
        size, oldest = await r.run([("ZCARD", r.due_key), ("ZRANGE", r.due_key, 0, 0, "WITHSCORES")])
        self._size = int(size)
        pairs = _pairs(oldest)
        self._oldest = float(pairs[0][1]) if pairs else None

    async def run(self) -> None:
        """Apply queued work and close due decisions every ``interval`` seconds, for ever."""
        while True:
            try:
                await self.flush()
                if self.closes:
                    await self.claim()
                await self.refresh_size()
            except asyncio.CancelledError:
                raise
            except StateUnavailable as exc:  # the breaker has said so (rate-limited): no traceback per step
                self._warn(f"step skipped while Redis is unavailable ({exc}); retrying")
            except Exception as exc:
                self._warn("step failed; retrying", exc)
            await asyncio.sleep(self.interval)



class RedisProfiles:
    """The `CustomerProfiles` surface the ingest writes through: orders go to Redis with the joiner's next
    flush; decisions read profiles in `RedisDecisionState.load`."""

    def __init__(self, shared: SharedRewardJoiner) -> None:
        self.shared = shared

    def observe_order(self, order: schemas.Order, customer_id: str, ts: float) -> None:
        self.shared.observe_order(order, customer_id, ts)

    def get(self, customer_id: str) -> dict | None:
        return None
