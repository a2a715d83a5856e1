"""The production per-buyer / per-request state: Redis, shared by every serving process and the learner.

Owns `RedisState` (connection, key layout, scripts, circuit breaker), `RedisDecisionState` (the
`kassa.decide.state.DecisionState` of the hot path), `RedisProfiles` (customer profiles, written from the
order stream) and `SharedRewardJoiner` (the reward join state of decisions awaiting their window).

Key layout, every key under ``{prefix}:`` (``state.key_prefix``, default ``kassa:state``); the braces are
Redis Cluster hash tags, though the scripts below assume one node (they derive keys from a prefix):

- ``idem:{request_id}``  8-byte fingerprint + response JSON; ``SET NX`` with the idempotency TTL, so the
  first process to answer a request_id wins and every other returns its response.
- ``shown:{customer}``   sorted set of ``offer|decision`` scored by show time; trimmed to the longest cap
  window and expiring after it (exact sliding windows, as the embedded ledger counts).
- ``profile:{customer}`` JSON of the built-in profile; ``seen:{customer}:{order}`` dedupes an order that
  arrives twice (webhook and event) for 7 days. Updated by one script per order (atomic).
- ``join:d:{decision}``  msgpack `PendingDecision`; ``join:r:{decision}`` hash offer -> summed reward plus
  ``#n`` outcomes; ``join:due`` sorted set of decision ids by deadline; ``join:c:{customer}`` /
  ``join:e:{email}`` the open decisions of a buyer (order attribution). Closing is one script that pops
  due ids and returns each record with its rewards, so two learners never close a decision twice.

Round trips: `RedisDecisionState.load` is ONE pipelined round trip (idempotency GET, profile GET, shows
ZRANGE), `commit` ONE script call (idempotency SET NX, shows ZADD, pending record); both are bounded by
``state.timeout_ms`` and the request's remaining budget. A failure or timeout answers ``fallback: true``
from defaults and opens a breaker for ``retry_seconds`` (1 s) during which requests do not wait on Redis
at all; the next request after it tries again (recovery within ~1 s of Redis answering). A refused connection
opens it at once, timeouts when three come in a row.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from hiredis import pack_command

from kassa import schemas
from kassa.decide.state import BuyerState, DecisionWrite, ShownTimes, decode_response, encode_response
from kassa.events.join import JoinedExample, PendingDecision
from kassa.state.conn import PipelinedConnection

log = logging.getLogger("kassa.state")

_pack = msgspec.msgpack.Encoder().encode
_unpack_pending = msgspec.msgpack.Decoder(PendingDecision).decode
_SEEN_ORDER_SECONDS = 7 * 86_400
_JOIN_GRACE_SECONDS = 86_400.0  # a pending record outlives its deadline by this much if no learner closes it

# KEYS: idem (or ""), shown (or ""), pend (or ""), due, index (or "").
# ARGV: idem blob, idem ttl ms, now, shown cutoff, shown ttl ms, pend blob, deadline, decision id,
#       pend expire-at ms, n shown, shown members...
# Returns the response stored first for the request_id, or 0 when this decision was stored.
_COMMIT_LUA = """
if KEYS[1] ~= '' then
  local old = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
  if old then return old end
end
local n = tonumber(ARGV[10])
if n > 0 then
  for i = 1, n do redis.call('ZADD', KEYS[2], ARGV[3], ARGV[10 + i]) end
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[6], 'PXAT', ARGV[9])
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8])
  if KEYS[5] ~= '' then
    redis.call('SADD', KEYS[5], ARGV[8])
    redis.call('PEXPIREAT', KEYS[5], ARGV[9], 'GT')
    redis.call('PEXPIREAT', KEYS[5], ARGV[9], 'NX')
  end
end
return 0
"""

# KEYS: profile, seen. ARGV: order total, ts, order id, categories JSON list (order item order), seen ttl s.
_PROFILE_LUA = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[5]) then return 0 end
local raw = redis.call('GET', KEYS[1])
local p = {}
if raw then p = cjson.decode(raw) end
p.orders_count = (p.orders_count or 0) + 1
p.spend_total = (p.spend_total or 0) + tonumber(ARGV[1])
local ts = tonumber(ARGV[2])
if (not p.last_order_ts) or p.last_order_ts < ts then p.last_order_ts = ts end
p.last_order_id = ARGV[3]
local recent = {}
if type(p.recent_categories) == 'table' then
  for _, c in ipairs(p.recent_categories) do table.insert(recent, c) end
end
for _, cat in ipairs(cjson.decode(ARGV[4])) do
  for i = #recent, 1, -1 do if recent[i] == cat then table.remove(recent, i) end end
  table.insert(recent, 1, cat)
end
local top = {}
for i = 1, math.min(5, #recent) do top[i] = recent[i] end
p.recent_categories = top
redis.call('SET', KEYS[1], cjson.encode(p))
return 1
"""

# KEYS: due. ARGV: now, limit, pend key prefix, reward key prefix.
# Returns {id, pending blob, {offer, reward, ...}} per closed decision.
_CLAIM_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(ids) do
  if redis.call('ZREM', KEYS[1], id) == 1 then
    local blob = redis.call('GET', ARGV[3] .. id)
    local rw = redis.call('HGETALL', ARGV[4] .. id)
    redis.call('DEL', ARGV[3] .. id, ARGV[4] .. id)
    if blob then table.insert(out, {id, blob, rw}) end
  end
end
return out
"""


def _sha1(script: str) -> str:
    import hashlib

    return hashlib.sha1(script.encode()).hexdigest()


class StateUnavailable(Exception):
    """Redis did not answer (or the breaker is open)."""


class StateError(Exception):
    """Redis answered with an error (a bug or a misconfigured server, not an outage)."""


class RedisState:
    """One Redis connection pool, the key layout and the scripts, shared by the classes below."""

    def __init__(self, url: str, prefix: str = "kassa:state", *, idempotency_ttl: float = 600.0,
                 cap_window: float = 30 * 86_400.0, retry_seconds: float = 1.0) -> None:
        self.prefix = prefix
        self.idempotency_ttl = idempotency_ttl
        self.cap_window = cap_window
        self.retry_seconds = retry_seconds
        self.conn = PipelinedConnection(url)
        self._scripts = {_sha1(s): s for s in (_COMMIT_LUA, _PROFILE_LUA, _CLAIM_LUA)}
        self.commit_sha, self.profile_sha, self.claim_sha = list(self._scripts)
        self._down_until = 0.0
        self.failures = 0
        self._timeouts = 0  # in a row
        self.timeouts_to_open = 3

    # -- keys
    def idem_key(self, request_id: str) -> str:
        return f"{self.prefix}:idem:{{{request_id}}}"

    def shown_key(self, customer_id: str) -> str:
        return f"{self.prefix}:shown:{{{customer_id}}}"

    def profile_key(self, customer_id: str) -> str:
        return f"{self.prefix}:profile:{{{customer_id}}}"

    def seen_key(self, customer_id: str, order_id: str) -> str:
        return f"{self.prefix}:seen:{{{customer_id}}}:{order_id}"

    @property
    def pend_prefix(self) -> str:
        return f"{self.prefix}:join:d:"

    @property
    def reward_prefix(self) -> str:
        return f"{self.prefix}:join:r:"

    @property
    def due_key(self) -> str:
        return f"{self.prefix}:join:due"

    def index_key(self, customer_id: str | None, email: str | None) -> str:
        if customer_id is not None:
            return f"{self.prefix}:join:c:{{{customer_id}}}"
        return f"{self.prefix}:join:e:{{{email}}}"

    # -- breaker
    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException) -> None:
        """A refused or broken connection opens the breaker at once; timeouts only when ``timeouts_to_open``
        come in a row (one slow reply on a busy host should cost one fallback, not a second of them)."""
        self.failures += 1
        if isinstance(exc, TimeoutError):
            self._timeouts += 1
            if self._timeouts < self.timeouts_to_open:
                return
        if self.available:
            log.warning("Redis state unavailable (%s: %s); serving without it for %.1f s", type(exc).__name__,
                        exc, self.retry_seconds)
        self._down_until = time.monotonic() + self.retry_seconds

    async def run(self, commands: list[tuple], timeout: float | None = None) -> list[Any]:
        """Send ``commands`` in one round trip within ``timeout``; scripts unknown to the server are loaded
        and the batch re-sent. Raises `StateUnavailable` (and opens the breaker) on any failure."""
        if not self.available:
            raise StateUnavailable("breaker open")
        try:
            replies = await asyncio.wait_for(self._execute(commands), timeout or 5.0)
            if any(isinstance(r, Exception) and str(r).startswith("NOSCRIPT") for r in replies):
                await self._execute([("SCRIPT", "LOAD", script) for script in self._scripts.values()])
                replies = await asyncio.wait_for(self._execute(commands), timeout or 5.0)
        except (TimeoutError, OSError) as exc:  # ConnectionLost is an OSError
            self.failed(exc)
            raise StateUnavailable(str(exc)) from exc
        self._timeouts = 0
        for reply in replies:
            if isinstance(reply, Exception):
                raise StateError(str(reply))
        return replies

    async def _execute(self, commands: list[tuple]) -> list[Any]:
        return await self.conn.execute(b"".join([pack_command(c) for c in commands]), len(commands))

    async def close(self) -> None:
        await self.conn.close()


class RedisDecisionState:
    """`DecisionState` on Redis: one round trip to read, one script call to write.

    With ``await_commit`` (``state.await_commit``) the decision waits for its write: a request_id answered
    concurrently by two processes then gets one decision. Without it (the default) writes are queued and sent
    by one writer task, all writes queued meanwhile in one round trip (group commit), so a decision waits on
    Redis once; the write reaches Redis within the same event-loop turn or the next, before a buyer's next
    click can, and only a truly simultaneous duplicate request_id on two processes can get two decisions.
    """

    def __init__(self, redis: RedisState, await_commit: bool = False) -> None:
        self.redis = redis
        self.await_commit = await_commit
        self._queued: list[tuple] = []
        self._writer: asyncio.Task | None = None
        self.dropped = 0  # writes lost to an outage (their decisions were served, not registered)

    async def load(self, request_id: str | None, customer_id: str | None, now: float,
                   timeout: float) -> BuyerState:
        r = self.redis
        commands: list[tuple] = []
        if request_id is not None:
            commands.append(("GET", r.idem_key(request_id)))
        if customer_id is not None:
            commands.append(("GET", r.profile_key(customer_id)))
            commands.append(("ZRANGE", r.shown_key(customer_id), now - r.cap_window, "+inf", "BYSCORE",
                             "WITHSCORES"))
        if not commands:
            return BuyerState()
        try:
            replies = await r.run(commands, timeout)
        except StateUnavailable:
            return BuyerState(fallback=True)
        state = BuyerState()
        i = 0
        if request_id is not None:
            blob = replies[0]
            if blob:
                state.cached = (int.from_bytes(blob[:8], "big"), decode_response(blob[8:]))
            i = 1
        if customer_id is not None:
            raw = replies[i]
            state.profile = _profile(raw) if raw else None
            times: dict[str, list[float]] = {}
            for member, score in _pairs(replies[i + 1]):
                times.setdefault(member.split(b"|", 1)[0].decode(), []).append(float(score))
            state.caps = ShownTimes(customer_id, times)
        return state

    async def commit(self, write: DecisionWrite, timeout: float) -> schemas.DecisionResponse | None:
        r = self.redis
        now = write.now
        idem = r.idem_key(write.request_id) if write.request_id is not None else ""
        shown = r.shown_key(write.customer_id) if write.customer_id is not None and write.shown else ""
        p = write.pending
        members: list[str] = []
        if shown:
            members = [f"{o}|{write.response.decision_id}" for o in write.shown]
        pend = index = ""
        pend_blob: bytes = b""
        deadline: float = 0.0
        expire_at = 0
        if p is not None:
            pend = r.pend_prefix + p.decision_id
            pend_blob = _pack(p)
            deadline = p.deadline
            expire_at = int((p.deadline + _JOIN_GRACE_SECONDS) * 1000)
            if p.customer_id is not None or p.email_sha256 is not None:
                index = r.index_key(p.customer_id, p.email_sha256)
        idem_blob = (write.fingerprint.to_bytes(8, "big") + encode_response(write.response)) if idem else b""
        command = ("EVALSHA", r.commit_sha, 5, idem, shown, pend, r.due_key, index,
                   idem_blob, int(r.idempotency_ttl * 1000), now, now - r.cap_window, int(r.cap_window * 1000),
                   pend_blob, deadline, p.decision_id if p is not None else "", expire_at, len(members), *members)
        if not self.await_commit:
            self._queued.append(command)
            if self._writer is None or self._writer.done():
                self._writer = asyncio.create_task(self._write())
            return write.response
        try:
            (reply,) = await r.run([command], timeout)
        except StateUnavailable:
            return None
        if reply == 0:
            return write.response
        return decode_response(reply[8:])  # another process answered this request_id first

    async def _write(self) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                await self.redis.run(batch)
            except StateUnavailable:
                self.dropped += len(batch)
            except Exception:
                self.dropped += len(batch)
                log.exception("state writes failed")

    async def drain(self) -> None:
        """Wait until every queued write was sent and answered."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)


def _pairs(reply: list) -> list[tuple[Any, Any]]:
    """``WITHSCORES`` / ``HGETALL`` replies as (member, value) pairs: flat under RESP2, nested under RESP3."""
    if reply and isinstance(reply[0], list):
        return [(m, v) for m, v in reply]
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))


def _profile(raw: bytes) -> dict:
    prof = json.loads(raw)
    if not isinstance(prof.get("recent_categories"), list):  # cjson writes an empty list as {}
        prof["recent_categories"] = []
    return prof


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

    # -- the RewardJoiner surface
    def __len__(self) -> int:
        return self._size

    def join_lag(self, now: float) -> float:
        return max(0.0, now - self._oldest) if self._oldest is not None else 0.0

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
        customer = (e.customer.id if e.customer else None) or order.customer_id
        email = e.customer.email_sha256 if e.customer else None
        ids: list[str] = []
        if customer is not None:
            ids += by_buyer.get(r.index_key(customer, None), [])
        if email is not None:
            ids += by_buyer.get(r.index_key(None, email), [])
        bought: dict[str, float] = {}
        for item in order.items:
            amount = item.price * item.qty
            bought[item.sku] = amount
            if item.product_id:
                bought[item.product_id] = amount
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
            except Exception:
                log.warning("shared reward joiner step failed; retrying", exc_info=True)
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
