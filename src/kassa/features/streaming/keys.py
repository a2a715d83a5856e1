"""Entity keys and event time: which rows an event updates (`extract_keys`) and when it happened
(`event_time`).

An event updates one row per entity key it names (`extract_keys`): ``customer`` ← ``customer.id`` or
``order.customer_id``; ``offer`` ← ``offer_id``; ``order`` ← ``order.id``; ``product`` ← each distinct
``product_id or sku`` among the order's items (an order fans out to one update per product; several lines
of the same product are one update whose item values are summed). Events carry no session id, so a
``session`` stream view is rejected when the engine is built.

Event time is ``order.created_at`` when set (the business time of a delayed webhook), else
``event.timestamp``, else the receive time; a time more than ``max_future_skew`` ahead of the receive time
is clamped to it (by `kassa.features.streaming.aggregator.StreamAggregator.update`), so one client with a
wrong clock cannot push the watermark forward and drop everybody else's events as late.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kassa import schemas
from kassa.features.streaming.paths import Items


def _customer_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    order = ev.order
    cid = ev.customer.id if ev.customer is not None else None
    if cid is None and order is not None:
        cid = order.customer_id
    if cid is None:
        return []
    return [(cid, order.items if order is not None else None)]


def _offer_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    if ev.offer_id is None:
        return []
    return [(ev.offer_id, ev.order.items if ev.order is not None else None)]


def _order_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    if ev.order is None:
        return []
    return [(ev.order.id, ev.order.items)]


def _product_keys(ev: schemas.Event) -> list[tuple[str, Items | None]]:
    if ev.order is None or not ev.order.items:
        return []
    groups: dict[str, list[schemas.OrderItem]] = {}
    for it in ev.order.items:
        groups.setdefault(it.product_id or it.sku, []).append(it)
    return list(groups.items())


KEY_EXTRACTORS: dict[str, Callable[[schemas.Event], list[tuple[str, Items | None]]]] = {
    "customer": _customer_keys,
    "offer": _offer_keys,
    "order": _order_keys,
    "product": _product_keys,
}


def extract_keys(entity: str, event: schemas.Event) -> list[tuple[str, Items | None]]:
    """The entity keys ``event`` updates, each with the order items in its context."""
    return KEY_EXTRACTORS[entity](event)


def event_time(event: schemas.Event, received_at: float | None = None) -> float:
    if event.order is not None and event.order.created_at is not None:
        return event.order.created_at
    if event.timestamp is not None:
        return event.timestamp
    return received_at if received_at is not None else time.time()
