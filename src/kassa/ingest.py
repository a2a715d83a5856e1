"""`EventIngest`: validate, durably append, then apply outcome and order events.

Applying an event feeds the reward joiner (outcomes), the buyer's profile and product retrieval
(orders). Nothing is applied before the append is durable, and duplicates are applied once.

The ack depends on the append only. The streaming-feature update after it is best effort: when the
online store is down the aggregator keeps the changed rows pending and the stream's log tail writes them
once it is back (`StreamProcessor.pending_rows`, ``kassa_stream_backlog_rows``). Failing the request
there would have the client resend an event that is already stored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from kassa import errors, schemas
from kassa.catalog import Catalog
from kassa.decide.retrieval import ProductRetriever
from kassa.degraded import RateLimitedWarning
from kassa.events.log import EventLog
from kassa.features.profile import CustomerProfiles
from kassa.features.streaming.processor import StreamProcessor
from kassa.learn.online.rewards import RewardJoiner

log = logging.getLogger("kassa.events")


class EventIngest:
    def __init__(
        self,
        event_log: EventLog,
        catalog: Catalog,
        joiner: RewardJoiner,
        profiles: CustomerProfiles,
        retriever: ProductRetriever,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[schemas.Event], None] | None = None,
        stream: StreamProcessor | None = None,
        timestamp_window: float = 7 * 86_400.0,
        after_apply: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.after_apply = after_apply  # shared state (kassa.state): awaited so the ack follows its writes
        self.stream = stream
        self.timestamp_window = timestamp_window
        self.log = event_log
        self.catalog = catalog
        self.joiner = joiner
        self.profiles = profiles
        self.retriever = retriever
        self.clock = clock
        self.on_event = on_event
        self.stream_failures = 0
        self._warn_stream = RateLimitedWarning(log, "streaming features")

    def validate(self, batch: schemas.EventBatch, bound_times: bool = True) -> None:
        """Refuse the whole batch, naming the field, before anything of it is appended.

        ``bound_times``: event and order timestamps must lie within `timestamp_window` of now. Signed
        platform webhooks skip it (a refund may carry an order placed months ago; the connector has
        already parsed the time into a real date, and ``WebhookReceiver`` keeps one past its clock-skew
        allowance as the time it arrived).
        """
        offers = self.catalog.snapshot.offers
        now = self.clock()
        low, high = now - self.timestamp_window, now + self.timestamp_window
        for i, event in enumerate(batch.events):
            if bound_times:
                if event.timestamp is not None and not low <= event.timestamp <= high:
                    raise errors.Invalid(self._out_of_window(event.timestamp), f"events[{i}].timestamp")
                created = event.order.created_at if event.order is not None else None
                if created is not None and not low <= created <= high:
                    raise errors.Invalid(self._out_of_window(created), f"events[{i}].order.created_at")
            if event.offer_id is not None and event.offer_id not in offers:
                raise errors.Invalid(f"unknown offer {event.offer_id!r}", f"events[{i}].offer_id")
            if event.type == "order" and event.order is None:
                raise errors.Invalid("an order event needs an `order`", f"events[{i}].order")
            if event.type == "refund" and event.order is None and event.decision_id is None:
                raise errors.Invalid("a refund event needs an `order`: the refunded order's `id`, and its "
                                     "refunded `items` (none for the whole order, a cancellation)",
                                     f"events[{i}].order")
            if event.type in ("accept", "click", "dismiss", "impression") and event.decision_id is None:
                raise errors.Invalid(f"{errors.with_article(event.type)} event needs a `decision_id`",
                                     f"events[{i}].decision_id")

    def _out_of_window(self, ts: float) -> str:
        return (f"timestamp {ts!r} is more than {self.timestamp_window:.0f} s from now; send unix seconds "
                "(server.timestamp_window_seconds sets the window)")

    async def ingest(self, batch: schemas.EventBatch, bound_times: bool = True) -> schemas.EventAck:
        self.validate(batch, bound_times)
        result = await self.log.append(batch.events, self.clock())
        unknown = sum(1 for e in result.new
                      if e.decision_id is not None and e.type != "order" and not (e.type == "refund" and e.order)
                      and not self.joiner.is_open(e.decision_id))
        unmatched = 0
        for event in result.new:
            changed = self.apply(event)
            if event.type == "refund" and event.order is not None and not changed:
                unmatched += 1
        if self.after_apply is not None and result.new:
            await self.after_apply()
        if self.stream is not None and result.new:
            # Read-after-write: streaming features see the events before the ack returns, when they can. The
            # batch is applied at once: each changed row written once, one pipelined round trip per view on
            # Redis (per event, a batch of 3 impressions cost 3 writes and 3 change messages in sequence).
            try:
                await self.stream.process(result.new, seqs=result.seqs)
            except Exception as exc:
                self.stream_failures += 1
                self._warn_stream("online store write failed after the durable append; the events are "
                                  "acknowledged and their rows are written from the log tail", exc)
        ack = schemas.EventAck(len(result.new), result.duplicates, unknown)
        # A joiner that applies events later (Redis state, `kassa learn`) cannot say at once: it counts them.
        if unmatched and getattr(self.joiner, "answers_refunds", True):
            # Stored for OPE and reports that read events, but no open decision's reward changed: its order
            # converted nothing still open (past the reward window, never a conversion, or not seen yet).
            ack.unmatched_refunds = unmatched
        return ack

    def apply(self, event: schemas.Event, learn: bool = True) -> int:
        """Apply one stored event; returns how many open decisions' rewards it changed. ``learn=False`` when
        replaying: old decisions are gone."""
        changed = 0
        if learn:
            changed = self.joiner.observe(event)
        if event.type == "order" and event.order is not None:
            order = event.order
            customer_id = (event.customer.id if event.customer else None) or order.customer_id
            ts = order.created_at or event.timestamp or self.clock()
            if customer_id is not None:
                self.profiles.observe_order(order, customer_id, ts)
            self.retriever.observe_order(order, customer_id, ts)
        if learn and self.on_event is not None:  # a replayed event was counted when it was accepted
            self.on_event(event)
        return changed

    def replay(self, batch_size: int = 5000, after: int = 0) -> int:
        """Rebuild in-memory state (profiles, retrieval) from the durable log at start: the order events
        after ``after`` (the position of a saved `kassa.events.replay_state`); returns how many."""
        n = 0
        read_type = getattr(self.log, "read_type", None)
        while True:
            rows = read_type("order", after, batch_size) if read_type else self.log.read(after, batch_size)
            if not rows:
                return n
            for seq, event in rows:
                if event.type == "order":
                    self.apply(event, learn=False)
                    n += 1
                after = seq
