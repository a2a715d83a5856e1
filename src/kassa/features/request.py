"""Request-time features: pure functions of the decision request, the clock and the buyer's profile.

They are computed once per decision, logged with it, and handed to the policy as the shared context.
"""

from __future__ import annotations

import math
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from kassa import schemas

_TOTAL_EDGES = (25.0, 50.0, 100.0, 200.0, 500.0)
_TOTAL_NAMES = ("lt25", "25-50", "50-100", "100-200", "200-500", "500+")
_DAYPART = ("night",) * 6 + ("morning",) * 6 + ("afternoon",) * 6 + ("evening",) * 6


def total_bucket(total: float) -> str:
    for edge, name in zip(_TOTAL_EDGES, _TOTAL_NAMES, strict=False):
        if total < edge:
            return name
    return _TOTAL_NAMES[-1]


def count_bucket(n: int) -> str:
    return str(n) if n < 4 else ("4-6" if n < 7 else "7+")


@lru_cache(maxsize=256)
def zone(name: str) -> ZoneInfo:
    """The zone named ``name``, or UTC when it is not one.

    Any exception counts as "not a zone": besides `ZoneInfoNotFoundError` and `ValueError`, a key
    that names a directory of the tz database (``"Europe"``) raises `IsADirectoryError`, an
    over-long one `OSError` (name too long), a malformed file other errors. A request-supplied
    ``context.timezone`` reaches this, so it must never raise.
    """
    try:
        return ZoneInfo(name)
    except Exception:
        return ZoneInfo("UTC")


def request_features(
    req: schemas.DecisionRequest,
    now: float,
    tz: str = "UTC",
    profile: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Features of one decision request; ``profile`` is the buyer's online-store row, if any."""
    f: dict[str, Any] = {}
    order = req.order
    if order is not None:
        items = order.items
        f["total"] = math.log1p(order.total)
        f["total_b"] = total_bucket(order.total)
        f["items_b"] = count_bucket(len(items))
        f["qty_b"] = count_bucket(sum(i.qty for i in items))
        f["currency"] = order.currency
        if order.ship_country:
            f["country"] = order.ship_country
        if order.platform:
            f["platform"] = order.platform
        cats = sorted({i.category for i in items if i.category})
        if cats:
            f["cat"] = cats
        if items:
            f["max_price_b"] = total_bucket(max(i.price for i in items))
    ctx = req.context
    if ctx is not None:
        if ctx.device:
            f["device"] = ctx.device
        if ctx.locale:
            f["lang"] = ctx.locale.split("-", 1)[0].lower()
    local = datetime.fromtimestamp(now, zone((ctx.timezone if ctx and ctx.timezone else None) or tz))
    f["hour"] = str(local.hour)
    f["daypart"] = _DAYPART[local.hour]
    f["dow"] = str(local.weekday())
    f["weekend"] = local.weekday() >= 5
    customer = req.customer
    f["guest"] = customer is None or customer.id is None
    if profile:
        orders = int(profile.get("orders_count", 0))
        # The profile may already hold the order being confirmed (webhook before the decision).
        if order is not None and profile.get("last_order_id") == order.id:
            orders -= 1
        f["first_order"] = orders <= 0
        f["orders_b"] = count_bucket(max(orders, 0))
        spend = float(profile.get("spend_total", 0.0))
        f["spend_b"] = total_bucket(spend)
        last = profile.get("last_order_ts")
        if last and orders > 0:
            days = max(0.0, (now - float(last)) / 86_400.0)
            f["recency_b"] = "d1" if days < 1 else "d7" if days < 7 else "d30" if days < 30 else "old"
        recent = profile.get("recent_categories")
        if recent:
            f["prev_cat"] = list(recent)
    else:
        f["first_order"] = True
        f["orders_b"] = "0"
    return f

