"""Wire types: every JSON body Kassa accepts or returns, as msgspec Structs.

These are the contracts of ``shared/ARCHITECTURE.md``. Decoding a request is one
``msgspec.json.decode`` call that validates types and bounds; no dict walking on the hot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from kassa import policies

Id = Annotated[str, Meta(min_length=1, max_length=128)]
ShortStr = Annotated[str, Meta(max_length=256)]
Money = Annotated[float, Meta(ge=0, le=1e9)]
Amount = Annotated[float, Meta(ge=-1e9, le=1e9)]  # a signed value: an event's, a reward weight
Qty = Annotated[int, Meta(ge=0, le=100_000)]
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$")]
LocaleTag = Annotated[str, Meta(pattern="^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$")]  # nl, nl-NL, zh-Hant-TW
# A number the learner takes as a feature value: VW reads it as a 32-bit float and squares it (its adaptive
# update, the UCB bonus). An offer's `features` or a feature view's value of 1e30 left VW's weight for it
# infinite, and UCB's probabilities for that buyer summed to 0.02 (NaN scores); 1e15 squared still fits.
FEATURE_VALUE_MAX = 1e15
FeatureValue = (Annotated[float, Meta(ge=-FEATURE_VALUE_MAX, le=FEATURE_VALUE_MAX)]
                | Annotated[int, Meta(ge=-int(FEATURE_VALUE_MAX), le=int(FEATURE_VALUE_MAX))] | str | bool | None)
# A feature value as served or stored (a decision record, a stored view's row read back): not bounded on reading,
# so a record is never refused for a value that came from elsewhere (a batch source is not checked on write).
StoredValue = float | int | str | bool | None
Probability = Annotated[float, Meta(ge=0, le=1)]
NonNegative = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=0)]
# Time zone names are checked against the tz database where placements are written
# (kassa.catalog.store.check_placement); the wire type bounds only the length.
TimeZone = Annotated[str, Meta(min_length=1, max_length=64)]

OfferKind = Literal["product", "partner", "subscription", "warranty", "discount"]
EventType = Literal["impression", "click", "accept", "dismiss", "conversion", "order", "refund"]


# --------------------------------------------------------------------------- decisions
class Customer(Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: Id | None = None
    email_sha256: Annotated[str, Meta(pattern="^[0-9a-f]{64}$")] | None = None


class OrderItem(Struct, forbid_unknown_fields=True, omit_defaults=True):
    sku: Id
    product_id: Id | None = None
    category: ShortStr | None = None
    qty: Qty = 1
    price: Money = 0.0


class Order(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A placed order in the canonical shape shared by decisions, events and platform connectors."""

    id: Id
    platform: ShortStr | None = None
    currency: Annotated[str, Meta(pattern="^[A-Z]{3}$")] = "USD"
    total: Money = 0.0
    ship_country: Annotated[str, Meta(pattern="^[A-Z]{2}$")] | None = None
    items: Annotated[list[OrderItem], Meta(max_length=500)] = []
    created_at: float | None = None  # unix seconds; defaults to the time Kassa saw it
    customer_id: Id | None = None


class Context(Struct, forbid_unknown_fields=False, omit_defaults=True):
    device: ShortStr | None = None
    locale: ShortStr | None = None
    timezone: ShortStr | None = None
    referrer: ShortStr | None = None


class DecisionRequest(Struct, forbid_unknown_fields=True, omit_defaults=True):
    placement: Id
    request_id: Id | None = None
    customer: Customer | None = None
    session_id: Id | None = None
    order: Order | None = None
    context: Context | None = None
    candidates: Annotated[list[Id], Meta(max_length=1000)] | None = None
    limit: Annotated[int, Meta(ge=1, le=50)] | None = None


class OfferOut(Struct):
    offer_id: str
    rank: int
    score: float
    probability: float
    content: dict[str, Any]


class DecisionResponse(Struct):
    decision_id: str
    placement: str
    model_version: str
    offers: list[OfferOut]
    explored: bool
    fallback: bool
    took_ms: float


# --------------------------------------------------------------------------- events
class Event(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """An outcome of a decision (``impression``, ``click``, ``accept``, ``dismiss``, ``conversion``, naming its
    ``decision_id`` and ``offer_id``), a placed ``order``, or a ``refund``: an order cancelled or refunded,
    given as ``order`` with the order's ``id`` and the refunded ``items`` (none: the whole order). A refund
    takes back the conversion that order credited while the decision's reward window is open (for a
    ``value`` reward, by the refunded amount); later it is stored and counted, and the learner keeps it."""

    event_id: Id
    type: EventType
    decision_id: Id | None = None
    offer_id: Id | None = None
    value: Amount | None = None
    timestamp: float | None = None  # unix seconds; defaults to receive time
    customer: Customer | None = None
    order: Order | None = None


class EventBatch(Struct, forbid_unknown_fields=True):
    events: Annotated[list[Event], Meta(min_length=1, max_length=1000)]


class EventAck(Struct):
    accepted: int
    duplicates: int
    # Accepted outcome events whose `decision_id` this process does not hold open: unknown, or past its
    # reward window (or made before a restart). They are stored, but no reward will join them.
    unknown_decisions: int = 0
    # Accepted refund events whose order holds no conversion of a decision still open: past the reward window,
    # an order that converted nothing, or one not seen yet (held: its order, if it comes while a decision open
    # now still is, is taken back at once). Stored; no reward changed yet. Absent when 0.
    unmatched_refunds: int | msgspec.UnsetType = msgspec.UNSET


class WebhookAck(Struct):
    """The 200 of ``POST /v1/webhooks/{platform}``: an ``EventAck`` for an order, a cancellation or a refund,
    or ``ignored: 1`` (and no ``unknown_decisions``) for a verified delivery that is nothing to count: another
    topic, an order not placed yet, a test notification, a refund of money only (no line), a ping."""

    accepted: int
    duplicates: int
    unknown_decisions: int | msgspec.UnsetType = msgspec.UNSET
    unmatched_refunds: int | msgspec.UnsetType = msgspec.UNSET  # as in EventAck
    ignored: int | msgspec.UnsetType = msgspec.UNSET
    lines_dropped: int | msgspec.UnsetType = msgspec.UNSET  # an order or refund past 500 lines: how many left out


# --------------------------------------------------------------------------- catalog
class Eligibility(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Rules an offer must pass to be shown. Every field is optional; unset means no constraint."""

    countries: list[str] | None = None  # ship country allow-list
    exclude_countries: list[str] | None = None
    min_order_total: NonNegative | None = None
    max_order_total: NonNegative | None = None
    require_categories: list[str] | None = None  # at least one item in one of these
    exclude_categories: list[str] | None = None  # no item in any of these
    exclude_if_in_order: bool = True  # drop when the offer's sku/product is already in the order
    starts_at: float | None = None  # unix seconds
    ends_at: float | None = None
    max_per_customer: Count | None = None  # frequency cap: times shown to one customer...
    cap_window_seconds: NonNegative = 86_400.0  # ...within this window

    def __post_init__(self) -> None:
        # An order's ship_country is upper-case (its wire type says so): `countries: [us]` matched no order, so
        # the offer was never shown, and `exclude_countries: [us]` excluded nothing. Kept upper-case.
        for name in ("countries", "exclude_countries"):
            codes = getattr(self, name)
            if codes is not None and any(c != c.strip().upper() for c in codes):
                setattr(self, name, [c.strip().upper() for c in codes])


class Offer(Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: Id
    kind: OfferKind
    title: ShortStr
    content: dict[str, Any] = {}
    value: Annotated[float, Meta(ge=0)] = 0.0  # value of one accept, in the store currency
    sku: Id | None = None  # for product offers: the product it sells
    product_id: Id | None = None
    category: ShortStr | None = None
    stock: Count | None = None  # None: not stock-tracked
    features: dict[str, FeatureValue] = {}
    eligibility: Eligibility = field(default_factory=Eligibility)
    active: bool = True
    # Localised content (`kassa.catalog.content`): fields per locale over `content`, the price per currency
    # (the order's, else the first listed; `{price}` in a text field is formatted for the buyer's locale),
    # and a disclosure label shown with the offer ("Sponsored").
    content_by_locale: dict[LocaleTag, dict[str, Any]] = {}
    prices: dict[Currency, Money] = {}
    disclosure: ShortStr | None = None


class Retrieval(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """How product cross-sell candidates are retrieved for a placement (0 disables a source)."""

    co_purchase: Count = 20
    history: Count = 10
    popular: Count = 20
    max_candidates: Count = 50  # merged and scored
    # The policy (a learned model, or the baseline with its exploration) chooses among the best this many by
    # retrieval score (0: all of them). Exploration spread over 150 products explores ones that almost never
    # convert: in bench/quality.py's product world the retrieval-score ranking lost 8 % to its ε over 150.
    policy_candidates: Count = 20


class RewardDefinition(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Reward of one shown offer: the sum of the weights of its outcome events in the wait window.

    ``conversion`` and ``order`` may use the event's value instead of a fixed weight (``"value"``).
    """

    # Weights and the default are bounded like an event's value: 1e308 became inf in VW's 32-bit floats and
    # every snapshot of the placement failed to export (its weights were NaN), blocking the others' as well.
    weights: dict[str, Amount | Literal["value"]] = field(
        default_factory=lambda: {"click": 0.1, "accept": 1.0, "dismiss": 0.0}
    )
    wait_seconds: NonNegative = 600.0
    default: Amount = 0.0
    cap: NonNegative | None = None  # clip a single reward (order values can be huge)


# Every context feature `kassa.features.request.request_features` derives from a request and the buyer's profile
# (tests/test_decision_quality.py checks the two agree): what a placement's `context_features` may name besides
# feature-view fields ("view.field").
REQUEST_FEATURES = ("total", "total_b", "items_b", "qty_b", "currency", "country", "platform", "cat", "max_price_b",
                    "device", "lang", "hour", "daypart", "dow", "weekend", "guest", "first_order", "orders_b",
                    "spend_b", "recency_b", "prev_cat")


class Placement(Struct, forbid_unknown_fields=True, omit_defaults=True):
    id: Id
    slots: Annotated[int, Meta(ge=1, le=20)] = 3
    offers: list[str] | None = None  # explicit offer ids; None = every active offer of `kinds`
    kinds: list[OfferKind] | None = None
    retrieval: Retrieval | None = None  # set for product cross-sell placements
    policy: str = "squarecb"  # a name in the policy table (`kassa.policies`), checked in __post_init__
    exploration: Probability = 0.1  # epsilon for "epsilon" and for the baseline's own exploration
    # Bounded: VW reads them as 32-bit floats, and one it cannot (1e39) stopped the placement's learner
    gamma_scale: Annotated[float, Meta(ge=0, le=1e6)] = 50.0  # squarecb: higher exploits sooner
    softmax_lambda: Annotated[float, Meta(ge=0, le=1e6)] = 10.0  # softmax: higher exploits more
    # ucb: the uncertainty bonus's weight (on rewards normalised to about 1, `RewardScale`) and the uniform
    # floor that keeps a propensity for every candidate (ADR 0010's UCB addendum measured both)
    ucb_alpha: Annotated[float, Meta(ge=0, le=1e6)] = 0.1
    ucb_epsilon: Probability = 0.02
    ucb_half_life: Count = 0  # ucb: learned examples after which a count weighs half (0: never forgotten)
    # the online learner's regression: VW's online steps, or solved exactly at each snapshot over the same
    # features (`kassa.learn.online.ridge`; for small feature spaces: tens of offers, a few context features)
    regression: Literal["online", "ridge"] = "online"
    ridge_half_life: Count = 0  # ridge: learned examples after which an example weighs half (0: never forgotten)
    # "value" ranks product placements (those with `retrieval`) by retrieval score, as "retrieval" does
    baseline: Literal["value", "popularity", "listed", "retrieval"] = "value"
    min_learned_decisions: Count = 200  # cold start: baseline until this many rewarded decisions
    reward: RewardDefinition = field(default_factory=RewardDefinition)
    latency_budget_ms: Annotated[float, Meta(gt=0, le=60_000)] = 50.0
    timezone: TimeZone = "UTC"
    features: list[str] | None = None  # feature views to read for this placement (None = all)
    # The context features the placement's learner sees and its decisions log (request features such as
    # "device", "country", "cat", and feature-view fields as "view.field"); None = every one. Features that do
    # not move acceptance still get a weight per offer each: ADR 0010's offer-world addendum (late night).
    context_features: list[str] | None = None

    def __post_init__(self) -> None:
        if self.policy not in policies.names():
            raise ValueError(f"unknown policy {self.policy!r} (known: {', '.join(policies.names())})")
        for name in self.context_features or ():
            if "." not in name and name not in REQUEST_FEATURES:  # a typo here left the learner blind, silently
                raise ValueError(f"context_features: unknown feature {name!r}; the request features are "
                                 f"{', '.join(REQUEST_FEATURES)}, and a feature view's fields are 'view.field'")


class CatalogFile(Struct, forbid_unknown_fields=True):
    offers: list[Offer] = []
    placements: list[Placement] = []


# --------------------------------------------------------------------------- errors
class Problem(Struct, omit_defaults=True):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    field: str | None = None
    instance: str | None = None


def encode(obj: Any) -> bytes:
    return _encoder.encode(obj)


_encoder = msgspec.json.Encoder()


# --------------------------------------------------------------------------- feature injection
class FeatureWrite(Struct, forbid_unknown_fields=True):
    """Body of ``PUT /v1/features/{view}/{entity_key}``: values of the view's fields."""

    values: dict[str, Any]
    timestamp: float | None = None  # event time (unix seconds); defaults to receive time


class FeatureRow(Struct, forbid_unknown_fields=True):
    key: Id
    values: dict[str, Any]
    timestamp: float | None = None


class FeaturePush(Struct, forbid_unknown_fields=True):
    """Body of ``POST /v1/features/push``: many rows of one view, validated all-or-nothing."""

    view: Id
    rows: Annotated[list[FeatureRow], Meta(min_length=1, max_length=1000)]


class FeatureAck(Struct):
    view: str
    written: int
