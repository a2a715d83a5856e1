"""`EventIngest`: validate, durably append, then apply outcome and order events.

Applying an event feeds the reward joiner (outcomes), the buyer's profile and product retrieval
(orders). Nothing is applied before the append is durable, and duplicates are applied once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from kassa import errors, schemas
from kassa.catalog import Catalog
from kassa.decide.retrieval import ProductRetriever
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
        after_apply: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.after_apply = after_apply  # shared state (kassa.state): awaited so the ack follows its writes
        self.stream = stream
        self.log = event_log
        self.catalog = catalog
        self.joiner = joiner
        self.profiles = profiles
        self.retriever = retriever
        self.clock = clock
        self.on_event = on_event

    def validate(self, batch: schemas.EventBatch) -> None:
        offers = self.catalog.snapshot.offers
        for i, event in enumerate(batch.events):
            if event.offer_id is not None and event.offer_id not in offers:
                raise errors.Invalid(f"unknown offer {event.offer_id!r}", f"events[{i}].offer_id")
            if event.type == "order" and event.order is None:
                raise errors.Invalid("an order event needs an `order`", f"events[{i}].order")
            if event.type in ("accept", "click", "dismiss", "impression") and event.decision_id is None:
                raise errors.Invalid(f"a {event.type} event needs a `decision_id`", f"events[{i}].decision_id")

    async def ingest(self, batch: schemas.EventBatch) -> schemas.EventAck:
        self.validate(batch)
        result = await self.log.append(batch.events, self.clock())
        for event in result.new:
            self.apply(event)
        if self.after_apply is not None and result.new:
            await self.after_apply()
        if self.stream is not None:
            # Read-after-write: streaming features see the events before the ack returns.
            for event in result.new:
                await self.stream.apply(event)
        return schemas.EventAck(len(result.new), result.duplicates)

    def apply(self, event: schemas.Event, learn: bool = True) -> None:
        """Apply one stored event. ``learn=False`` when replaying: old decisions are gone."""
        if learn:
            self.joiner.observe(event)
        if event.type == "order" and event.order is not None:
            order = event.order
            customer_id = (event.customer.id if event.customer else None) or order.customer_id
            ts = order.created_at or event.timestamp or self.clock()
            if customer_id is not None:
                self.profiles.observe_order(order, customer_id, ts)
            self.retriever.observe_order(order, customer_id, ts)
        if learn and self.on_event is not None:  # a replayed event was counted when it was accepted
            self.on_event(event)

    def replay(self, batch_size: int = 5000) -> int:
        """Rebuild in-memory state (profiles, retrieval) from the durable log at start."""
        after, n = 0, 0
        while True:
            rows = self.log.read(after, batch_size)
            if not rows:
                return n
            for seq, event in rows:
                if event.type == "order":
                    self.apply(event, learn=False)
                after = seq
                n += 1
