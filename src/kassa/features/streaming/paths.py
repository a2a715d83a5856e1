"""Value paths of stream fields: what a field's ``of`` reads from an event (`compile_path`).

A field's ``of`` path is read from the event *in the context of the key*: item paths see only the key's
items on product views and every item elsewhere. Paths: ``value``, ``type``, ``offer_id``,
``decision_id``, ``event_id``, ``customer.id``, ``order.{id,platform,currency,ship_country,customer_id,
total}``, ``order.items.{qty,price}`` (numbers, summed over the items in context),
``order.items.{sku,product_id,category}`` (a list of strings, one per item), and the indicator
``<string path>=<literal>`` (1.0 when equal, else 0.0), e.g. ``type=accept``, whose mean over impressions
and accepts is an accept rate. ``count`` without ``of`` counts events; with ``of`` it counts present values
(a list counts its elements). ``last`` of a list is its last element; ``last_n_distinct`` takes every element.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kassa import schemas

Items = Sequence[schemas.OrderItem]
PathFn = Callable[[schemas.Event, Items | None], Any]


_EVENT_STR = ("type", "offer_id", "decision_id", "event_id")
_ORDER_STR = ("id", "platform", "currency", "ship_country", "customer_id")
_ITEM_NUM = ("qty", "price")
_ITEM_STR = ("sku", "product_id", "category")


def _event_attr(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        return getattr(ev, name)

    return get


def _order_attr(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        return getattr(ev.order, name) if ev.order is not None else None

    return get


def _item_sum(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        if not items:
            return None
        return sum(getattr(it, name) for it in items)

    return get


def _item_list(name: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        if not items:
            return None
        out = [v for it in items if (v := getattr(it, name)) is not None]
        return out or None

    return get


def _customer_id(ev: schemas.Event, items: Items | None) -> Any:
    return ev.customer.id if ev.customer is not None else None


def _indicator(base: PathFn, literal: str) -> PathFn:
    def get(ev: schemas.Event, items: Items | None) -> Any:
        return 1.0 if base(ev, items) == literal else 0.0

    return get


def compile_path(path: str) -> tuple[PathFn, str]:
    """The extractor of one ``of`` path and its kind: ``num``, ``str`` or ``list`` (of strings)."""
    if "=" in path:
        base, literal = path.split("=", 1)
        fn, kind = compile_path(base.strip())
        if kind != "str":
            raise ValueError(f"indicator {path!r}: {base!r} is not a string path")
        return _indicator(fn, literal.strip()), "num"
    if path == "value":
        return _event_attr("value"), "num"
    if path in _EVENT_STR:
        return _event_attr(path), "str"
    if path == "customer.id":
        return _customer_id, "str"
    if path == "order.total":
        return _order_attr("total"), "num"
    if path.startswith("order.items."):
        name = path.removeprefix("order.items.")
        if name in _ITEM_NUM:
            return _item_sum(name), "num"
        if name in _ITEM_STR:
            return _item_list(name), "list"
    elif path.startswith("order."):
        name = path.removeprefix("order.")
        if name in _ORDER_STR:
            return _order_attr(name), "str"
    raise ValueError(f"unknown event path {path!r}")
