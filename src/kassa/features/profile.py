"""Customer profiles built from the order stream: the buyer-side entity row a decision reads.

Per customer, in process memory (rebuilt from the event log at start, via `kassa.events.replay_state`):
orders_count, spend_total, last_order_ts, last_order_id, recent_categories (the last five distinct
categories bought). Feature views (streaming, pushed, materialized) generalise this.
"""

from __future__ import annotations

from kassa import schemas


class CustomerProfiles:
    def __init__(self) -> None:
        self._profiles: dict[str, dict] = {}
        # Recent (customer, order) pairs, bounded: the same order may arrive by webhook and by event.
        self._seen_orders: dict[tuple[str, str], None] = {}

    def observe_order(self, order: schemas.Order, customer_id: str, ts: float) -> None:
        if (customer_id, order.id) in self._seen_orders:  # the same order via webhook and event
            return
        self._seen_orders[(customer_id, order.id)] = None
        if len(self._seen_orders) > 200_000:
            self._seen_orders.pop(next(iter(self._seen_orders)))
        prof = dict(self._profiles.get(customer_id, {}))
        prof["orders_count"] = int(prof.get("orders_count", 0)) + 1
        prof["spend_total"] = float(prof.get("spend_total", 0.0)) + order.total
        prof["last_order_ts"] = max(ts, float(prof.get("last_order_ts", 0.0)))
        prof["last_order_id"] = order.id
        recent = [c for c in prof.get("recent_categories", [])]
        for item in order.items:
            if item.category:
                if item.category in recent:
                    recent.remove(item.category)
                recent.insert(0, item.category)
        prof["recent_categories"] = recent[:5]
        self._profiles[customer_id] = prof

    def get(self, customer_id: str) -> dict | None:
        return self._profiles.get(customer_id)

    def dump(self) -> dict:
        """The whole state, for `kassa.events.replay_state` (shares the live objects: encode it at once)."""
        return {"profiles": self._profiles, "seen": list(self._seen_orders)}

    def load(self, state: dict) -> None:
        self._profiles = state["profiles"]
        self._seen_orders = {(c, o): None for c, o in state["seen"]}
