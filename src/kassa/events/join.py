"""The reward join's records: a decision awaiting its outcomes (`PendingDecision`, registered by the decision
engine) and one slot's learning example once its reward is known (`JoinedExample`, for the learner, the
canary guard and drift monitors). Plain data, below everything that produces or consumes it; the joiner
itself is `kassa.learn.online.rewards.RewardJoiner`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kassa import schemas

# A refund that finds no conversion of its order (the platform delivered it before the order: webhooks are not
# ordered) is held until every decision open when it came has closed, plus this, so that an order arriving
# after it is taken back at once; the joiners hold at most `MAX_HELD_REFUNDS` (the oldest let go first).
REFUND_HOLD_GRACE_SECONDS = 60.0
MAX_HELD_REFUNDS = 100_000


@dataclass(slots=True)
class PendingDecision:
    decision_id: str
    placement: str
    ts: float
    deadline: float
    shared: str  # learner context line
    offers: list[str]  # shown offer ids, slot order
    actions: list[str]  # learner action line of each shown offer
    probabilities: list[float]  # each slot's probability
    customer_id: str | None = None
    product_keys: list[str | None] = field(default_factory=list)  # per shown offer, for order attribution
    rewards: dict[str, float] | None = None
    outcomes: int = 0
    version: str = ""  # the model version that served it (canary guardrails compare versions)
    email_sha256: str | None = None  # a guest buyer's identity for order attribution (no customer id)
    # learning placements: every candidate's learner line and the index of slot 1's (the publish guard's OPE)
    candidates: list[str] | None = None
    top_index: int = -1
    # while a canary serves: (version meant to serve, took_ms, model failed), for the guardrails of a learner
    # in another process (`kassa learn` reports it to its CanaryGuard as the in-process engine does directly)
    served: tuple[str, float, bool] | None = None
    # what each order converted, kept apart from `rewards` so a refund can take it back while the decision is
    # open: order id -> offer id -> [reward credited, amount bought, quantity bought] (`refund_conversion`)
    conversions: dict[str, dict[str, list[float]]] | None = None


@dataclass(slots=True)
class JoinedExample:
    placement: str
    decision_id: str
    shared: str
    action: str
    offer_id: str
    reward: float
    probability: float
    slot: int
    version: str = ""
    candidates: list[str] | None = None  # slot 0 only, when the decision carried them
    top_index: int = -1


class JoinJournal(Protocol):
    """Told every change of the embedded joiner's pending decisions, so a restart restores them
    (``kassa.state.local``); a shared backend keeps the join state itself (``kassa.state.redis``)."""

    def registered(self, pending: PendingDecision) -> None: ...

    def credited(self, pending: PendingDecision) -> None: ...

    def closed(self, decision_id: str) -> None: ...

    def held_refund(self, event: schemas.Event, until: float) -> None: ...

    def released_refund(self, event_id: str) -> None: ...


def order_buyer(event: schemas.Event) -> tuple[str | None, str | None]:
    """Who placed an ``order`` event: (customer id, e-mail SHA-256). An order converts decisions made for the
    same customer id and, for a guest (platform webhooks often carry no customer id), the same e-mail hash."""
    order = event.order
    customer = (event.customer.id if event.customer else None) or (order.customer_id if order else None)
    return customer, event.customer.email_sha256 if event.customer else None


def refund_conversion(credit: list[float], refunded: tuple[float, int] | None, by_value: bool) -> float | None:
    """What is left of one order's conversion of one offer, ``credit`` = [reward, amount, quantity], after a
    refund that took back ``refunded`` = (amount, quantity) of its product (None: the whole order, a
    cancellation). Returns the reward left, or None when nothing of the product is kept (the conversion is
    gone: the offer's reward falls back to its other outcomes, or the placement's default). A ``value`` reward
    keeps the amount not refunded; a fixed weight stays whole while one unit is kept."""
    if refunded is None:
        return None
    amount, qty = credit[1] - refunded[0], credit[2] - refunded[1]
    credit[1], credit[2] = max(0.0, amount), max(0, qty)
    if qty <= 0:
        return None
    return credit[1] if by_value else credit[0]


def order_totals(order: schemas.Order) -> tuple[dict[str, float], dict[str, int]]:
    """Each bought (or refunded) product's amount (price x quantity) and quantity, by SKU and by product id:
    what an order credits to the decisions that showed those products (a refund: takes back). Lines sharing a
    key add up: two sizes of one product (one product id) or one SKU on two lines was credited only its last
    line's amount."""
    amounts: dict[str, float] = {}
    quantities: dict[str, int] = {}
    for item in order.items:
        amount = item.price * item.qty
        for key in {item.sku, item.product_id or item.sku}:  # a line whose product id is its SKU counts once
            amounts[key] = amounts.get(key, 0.0) + amount
            quantities[key] = quantities.get(key, 0) + item.qty
    return amounts, quantities


def order_amounts(order: schemas.Order) -> dict[str, float]:
    """Each bought product's amount, as `order_totals` counts it."""
    return order_totals(order)[0]
