"""`SharedRewardJoiner`: the reward joiner over the Redis join state, and `RedisProfiles`, the profile writer.

Split from ``kassa.state.redis`` (which owns the connection, the key layout and the scripts these use): this
module is the event side, applying outcome events and orders to Redis and closing due decisions for the
learner. The join rules are those of ``kassa.learn.online.rewards.RewardJoiner``, refunds included: an order's
conversions are kept per order (``join:o:{order}`` and ``c[...]`` fields, see ``kassa.state.redis``) and a
refund only decrements their amount and quantity, so the reward is worked out when the decision closes. A
refund that finds no conversion is held in Redis (``join:h:{order}``) as the embedded joiner holds it: an order of
that id applied by any process meanwhile has its conversion taken back in the same write.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import msgspec

from kassa import schemas
from kassa.degraded import RateLimitedWarning
from kassa.events.join import (
    MAX_HELD_REFUNDS,
    REFUND_HOLD_GRACE_SECONDS,
    JoinedExample,
    PendingDecision,
    order_buyer,
    order_totals,
)
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

# (decision id, offer id, reward, and for an order's conversion: (order id, amount bought, quantity bought))
_Credit = tuple[str, str, float, tuple[str, float, int] | None]
# an order's conversion of one offer while a batch is applied: (order, decision, offer) -> [amount, quantity]
_Conversions = dict[tuple[str, str, str], list[float]]
_decode_event = msgspec.json.Decoder(schemas.Event).decode


def _conversion_field(order_id: str, offer_id: str, part: str) -> str:
    """A reward-hash field of one order's conversion of one offer: ``r`` reward, ``a`` amount, ``q`` quantity."""
    return "c" + json.dumps([order_id, offer_id, part], separators=(",", ":"))


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
        self.refunds_taken_back = 0
        self.refunds_unmatched = 0
        self.refunds_taken_back_on_order = 0
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

    # `observe` queues; whether a refund found an open conversion is known at the next flush, not at once:
    # the events ack carries no `unmatched_refunds`, the counters below (`kassa_refunds_total`) have them.
    answers_refunds = False

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
        # Round trip 1: the decisions the events name, the open decisions of ordering buyers, the conversions
        # of refunded orders, the refunds held for the orders (they came first), and with a refund the latest
        # deadline of an open decision (how long to hold it if its order has not come).
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
        refunded = sorted({e.order.id for e in events if e.type == "refund" and e.order is not None})
        ordered = sorted({e.order.id for e in events if e.type == "order" and e.order is not None})
        commands: list[tuple] = [("GET", r.pend_prefix + i) for i in ids]
        commands += [("SMEMBERS", b) for b in buyers]
        commands += [("SMEMBERS", r.order_key(o)) for o in refunded]
        commands += [("LRANGE", r.held_key(o), 0, -1) for o in ordered]
        if refunded:
            commands.append(("ZRANGE", r.due_key, -1, -1, "WITHSCORES"))
        replies = await r.run(commands) if commands else []
        pending: dict[str, PendingDecision] = {}
        for i, blob in zip(ids, replies[: len(ids)], strict=True):
            if blob:
                pending[i] = _unpack_pending(blob)
        at = len(ids)
        by_buyer = {b: sorted(m.decode() for m in members)
                    for b, members in zip(buyers, replies[at:at + len(buyers)], strict=True)}
        at += len(buyers)
        converted = [(o, *json.loads(m)) for o, members in zip(refunded, replies[at:at + len(refunded)],
                                                               strict=True) for m in sorted(members)]
        at += len(refunded)
        # by event id: a batch applied again after a failed write holds its refunds again
        held: dict[str, list[schemas.Event]] = {
            o: list({e.event_id: e for e in map(_decode_event, blobs)}.values())
            for o, blobs in zip(ordered, replies[at:at + len(ordered)], strict=True) if blobs}
        latest = _pairs(replies[-1]) if refunded else []
        hold_until = max(self.clock(), float(latest[0][1]) if latest else 0.0) + REFUND_HOLD_GRACE_SECONDS
        holds: list[schemas.Event] = []
        extra = sorted(({d for ms in by_buyer.values() for d in ms} | {d for _, d, _ in converted}) - pending.keys())
        if extra:
            for d, blob in zip(extra, await r.run([("GET", r.pend_prefix + d) for d in extra]), strict=True):
                if blob:
                    pending[d] = _unpack_pending(blob)
        # What is left of each conversion a refund may take back (one more round trip, only for refunds).
        conversions: _Conversions = {}
        converted = [c for c in converted if c[1] in pending]
        if converted:
            left = await r.run([("HMGET", r.reward_prefix + d, _conversion_field(o, offer, "a"),
                                 _conversion_field(o, offer, "q")) for o, d, offer in converted])
            for (o, d, offer), (amount, qty) in zip(converted, left, strict=True):
                if qty is not None:
                    conversions[(o, d, offer)] = [float(amount or 0.0), float(qty)]
        # Round trip 2: the credits, and the refunds' decrements, in event order.
        credits: list[_Credit] = []
        taken: list[tuple[str, str, str, float, float]] = []  # (decision, order, offer, -amount, -quantity)
        for e in events:
            n = 0
            if e.type == "refund" and e.order is not None:
                if self._take_back(e.order, pending, conversions, taken):
                    self.refunds_taken_back += 1
                else:  # its order may not have come yet: held (for an order later in this batch too)
                    self.refunds_unmatched += 1
                    held.setdefault(e.order.id, []).append(e)
                    holds.append(e)
                continue
            if e.decision_id is not None:
                p = pending.get(e.decision_id)
                if p is None:
                    if e.type != "order":
                        self.late_events += 1
                elif e.offer_id is not None:
                    n += self._credit(credits, p, e.offer_id, e.type, e.value)
            if e.type == "order" and e.order is not None:
                bought = self._attribute(credits, e, pending, by_buyer, conversions)
                n += bought
                # its refund came first: taken back in the same write
                if bought and held.get(e.order.id) and sum([self._take_back(h.order, pending, conversions, taken)
                                                            for h in held[e.order.id] if h.order is not None]):
                    self.refunds_taken_back_on_order += 1
            self.matched_events += bool(n)
        commands = []
        ttl = int(_JOIN_GRACE_SECONDS * 1000)
        for decision_id, offer_id, amount, conversion in credits:
            key = r.reward_prefix + decision_id
            if conversion is None:
                commands.append(("HINCRBYFLOAT", key, offer_id, amount))
            else:
                order_id, value, qty = conversion
                commands += [("HINCRBYFLOAT", key, _conversion_field(order_id, offer_id, "r"), amount),
                             ("HINCRBYFLOAT", key, _conversion_field(order_id, offer_id, "a"), value),
                             ("HINCRBYFLOAT", key, _conversion_field(order_id, offer_id, "q"), qty),
                             ("SADD", r.order_key(order_id), json.dumps([decision_id, offer_id])),
                             ("PEXPIRE", r.order_key(order_id), ttl)]
            commands += [("HINCRBY", key, "#n", 1), ("PEXPIRE", key, ttl)]
        for decision_id, order_id, offer_id, amount, qty in taken:
            key = r.reward_prefix + decision_id
            commands += [("HINCRBYFLOAT", key, _conversion_field(order_id, offer_id, "a"), amount),
                         ("HINCRBYFLOAT", key, _conversion_field(order_id, offer_id, "q"), qty)]
        for e in holds:
            assert e.order is not None
            commands.append(("EVALSHA", r.hold_sha, 2, r.held_index_key, r.held_key(e.order.id),
                             msgspec.json.encode(e), int(hold_until * 1000), e.order.id, MAX_HELD_REFUNDS,
                             int(self.clock() * 1000), r.held_prefix))
        if commands:
            await r.run(commands)

    def _credit(self, credits: list[_Credit], p: PendingDecision, offer_id: str, kind: str,
                value: float | None, conversion: tuple[str, float, int] | None = None) -> int:
        definition = self._definition(p.placement)
        if definition is None or offer_id not in p.offers:
            return 0
        weight = definition.weights.get(kind)
        if weight is None:
            return 0
        credits.append((p.decision_id, offer_id, (value or 0.0) if weight == "value" else float(weight), conversion))
        return 1

    def _attribute(self, credits: list[_Credit], e: schemas.Event, pending: dict[str, PendingDecision],
                   by_buyer: dict[str, list[str]], conversions: _Conversions) -> int:
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
        bought, quantities = order_totals(order)
        n = 0
        for decision_id in dict.fromkeys(ids):
            p = pending.get(decision_id)
            if p is None or (order.created_at is not None and order.created_at < p.ts):
                continue
            for offer_id, key in zip(p.offers, p.product_keys, strict=False):
                if key is None or key not in bought:
                    continue
                if self._credit(credits, p, offer_id, "conversion", bought[key],
                                (order.id, bought[key], quantities[key])):
                    n += 1
                    # a refund later in the same batch sees it (it is not in Redis yet)
                    left = conversions.setdefault((order.id, decision_id, offer_id), [0.0, 0.0])
                    left[0] += bought[key]
                    left[1] += quantities[key]
        return n

    def _take_back(self, refund: schemas.Order, pending: dict[str, PendingDecision], conversions: _Conversions,
                   taken: list[tuple[str, str, str, float, float]]) -> int:
        """`RewardJoiner._take_back` over the conversions read for this batch: each one of the refunded order
        that still holds a unit of a refunded product (any product, for a refund of the whole order) loses the
        refunded amount and quantity. Returns how many decisions it changed."""
        amounts, quantities = order_totals(refund)
        changed: set[str] = set()
        for (order_id, decision_id, offer_id), left in conversions.items():
            p = pending.get(decision_id)
            if order_id != refund.id or p is None or left[1] <= 0:
                continue
            if refund.items:
                key = dict(zip(p.offers, p.product_keys, strict=False)).get(offer_id)
                if key is None or key not in quantities:
                    continue
                amount, qty = amounts[key], float(quantities[key])
            else:
                amount, qty = left[0], left[1]  # all of it
            left[0] -= amount
            left[1] -= qty
            taken.append((decision_id, order_id, offer_id, -amount, -qty))
            changed.add(decision_id)
        return len(changed)

    async def claim(self, now: float | None = None, limit: int = 10_000) -> int:
        """Close every decision whose wait ended (across all processes, each once) into the buffer
        ``expire`` hands to the learning loop; returns how many decisions were closed."""
        r = self.redis
        now = self.clock() if now is None else now
        (rows,) = await r.run([("EVALSHA", r.claim_sha, 1, r.due_key, now, limit, r.pend_prefix, r.reward_prefix)])
        forget: list[tuple] = []
        for decision_id, blob, flat in rows:
            p = _unpack_pending(blob)
            definition = self._definition(p.placement)
            rewards, orders = self._rewards(flat, definition)
            for order_id, offer_id in orders:
                forget.append(("SREM", r.order_key(order_id), json.dumps([p.decision_id, offer_id])))
            default = definition.default if definition else 0.0
            cap = definition.cap if definition else None
            self.closed += 1
            if rewards:
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

    @staticmethod
    def _rewards(flat: list, definition: schemas.RewardDefinition | None) -> tuple[dict[str, float],
                                                                                   list[tuple[str, str]]]:
        """A closed decision's reward hash as each offer's reward (what `RewardJoiner._summed` gives: an
        order's conversion counts while a unit of it is kept, a ``value`` reward with the amount not
        refunded), and the (order, offer) conversions it held."""
        rewards: dict[str, float] = {}
        parts: dict[tuple[str, str], dict[str, float]] = {}
        for k, v in _pairs(flat):
            field = k.decode()
            if field == "#n":
                continue
            if field.startswith("c["):
                order_id, offer_id, part = json.loads(field[1:])
                parts.setdefault((order_id, offer_id), {})[part] = float(v)
            else:
                rewards[field] = float(v)
        by_value = definition is not None and definition.weights.get("conversion") == "value"
        for (_, offer_id), c in parts.items():
            if c.get("q", 0.0) > 0:
                reward = max(0.0, c.get("a", 0.0)) if by_value else c.get("r", 0.0)
                rewards[offer_id] = rewards.get(offer_id, 0.0) + reward
        return rewards, list(parts)

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
