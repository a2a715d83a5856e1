"""Eligibility rules: which candidate offers may be shown for this order, buyer and moment.

Each rule is a cheap check against precomputed request facts (`OrderFacts`); the ledger of what each
buyer was shown backs the per-customer frequency caps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from kassa import schemas


@dataclass(slots=True)
class OrderFacts:
    """What the rules need to know about the request, computed once per decision."""

    country: str | None
    total: float | None
    categories: frozenset[str]
    product_keys: frozenset[str]

    @classmethod
    def of(cls, req: schemas.DecisionRequest) -> OrderFacts:
        order = req.order
        if order is None:
            return cls(None, None, frozenset(), frozenset())
        cats = frozenset(i.category for i in order.items if i.category)
        keys = set()
        for item in order.items:
            keys.add(item.sku)
            if item.product_id:
                keys.add(item.product_id)
        return cls(order.ship_country, order.total, cats, frozenset(keys))


class CapCounts(Protocol):
    """How often an offer was shown to a buyer inside a window: what frequency caps check (the ledger
    below, or the buyer's show times a shared backend loaded with the request)."""

    def count(self, customer_id: str, offer_id: str, window: float, now: float) -> int: ...


class FrequencyLedger:
    """Times each offer was shown to each customer, kept as timestamps inside the largest cap window."""

    def __init__(self, max_window: float = 30 * 86_400.0, max_customers: int = 1_000_000) -> None:
        self._shown: dict[str, dict[str, deque[float]]] = {}
        self.max_window = max_window
        self.max_customers = max_customers

    def record(self, customer_id: str, offer_ids: Iterable[str], now: float) -> None:
        per = self._shown.get(customer_id)
        if per is None:
            if len(self._shown) >= self.max_customers:
                # Drop the oldest-inserted customer: dicts keep insertion order.
                self._shown.pop(next(iter(self._shown)))
            per = self._shown[customer_id] = {}
        for offer_id in offer_ids:
            times = per.get(offer_id)
            if times is None:
                times = per[offer_id] = deque()
            times.append(now)
            while times and times[0] < now - self.max_window:
                times.popleft()

    def count(self, customer_id: str, offer_id: str, window: float, now: float) -> int:
        per = self._shown.get(customer_id)
        if per is None:
            return 0
        times = per.get(offer_id)
        if not times:
            return 0
        since = now - window
        return sum(1 for t in times if t >= since)


def eligible(
    offer: schemas.Offer,
    facts: OrderFacts,
    now: float,
    customer_id: str | None,
    ledger: CapCounts | None,
) -> str | None:
    """None when the offer may be shown, else the name of the first rule it fails."""
    if not offer.active:
        return "inactive"
    if offer.stock is not None and offer.stock <= 0:
        return "stock"
    rules = offer.eligibility
    if rules.starts_at is not None and now < rules.starts_at:
        return "date_window"
    if rules.ends_at is not None and now >= rules.ends_at:
        return "date_window"
    if rules.countries is not None and facts.country not in rules.countries:
        return "country"
    if rules.exclude_countries is not None and facts.country in rules.exclude_countries:
        return "country"
    if rules.min_order_total is not None and (facts.total is None or facts.total < rules.min_order_total):
        return "order_total"
    if rules.max_order_total is not None and (facts.total is None or facts.total > rules.max_order_total):
        return "order_total"
    if rules.require_categories is not None and facts.categories.isdisjoint(rules.require_categories):
        return "required_category"
    if rules.exclude_categories is not None and not facts.categories.isdisjoint(rules.exclude_categories):
        return "excluded_category"
    if rules.exclude_if_in_order and (
        (offer.sku is not None and offer.sku in facts.product_keys)
        or (offer.product_id is not None and offer.product_id in facts.product_keys)
    ):
        return "in_order"
    if (
        rules.max_per_customer is not None
        and customer_id is not None
        and ledger is not None
        and ledger.count(customer_id, offer.id, rules.cap_window_seconds, now) >= rules.max_per_customer
    ):
        return "frequency_cap"
    return None
