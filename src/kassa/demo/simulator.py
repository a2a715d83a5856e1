"""Simulated shoppers and the hidden ground truth of what they accept.

This module owns the world the demo measures Kassa against:

* `Checkout`: one simulated order (buyer, device, country, locale, basket, total, prior orders, the
  traffic slice it is assigned to, and its pre-drawn random numbers), generated from a seed;
* `World.p_accept`: the true probability that this buyer accepts this offer. It depends on context x
  offer the way real shops do (skincare buyers take the serum subscription, big electronics orders take
  the warranty, mobile buyers install the app, some partners only appeal in one country, first-time
  buyers like a next-order discount, complementary products sell), on top of a small base rate. Every
  dependency is visible to Kassa's learner through a context feature crossed with an offer feature;
* `World.best_static_order`: the fixed ranking of the listed offers with the highest expected accepts
  over the shopper population, computed from that ground truth (the static control's order);
* concept drift on request (``World(..., drift_at=N)``): from checkout ``N`` on, buyers accept offers
  by `DRIFTED_APPEAL` instead of `APPEAL` (the shoppers themselves do not change, only what they take),
  so the best offer changes for several large segments. Off by default;
* the wire payloads of one checkout: its order event, its decision request, its outcome events.

Kassa never sees `p_accept`; it only sees the events the simulated buyers produce.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import numpy as np

from kassa import schemas
from kassa.decide.rules import OrderFacts, eligible
from kassa.demo.store import CATEGORY_NAMES, COMPLEMENTS, PLACEMENTS, SLOTS, DemoStore, Product

SLICES = ("policy", "random", "static")
SLICE_PLACEMENT = dict(zip(SLICES, PLACEMENTS, strict=True))
DEFAULT_SHARES = (0.8, 0.1, 0.1)


@dataclass(frozen=True, slots=True)
class Market:
    country: str
    share: float
    currency: str
    locales: tuple[str, ...]
    timezone: str


MARKETS = (
    Market("US", 0.40, "USD", ("en-US",), "America/New_York"),
    Market("GB", 0.15, "GBP", ("en-GB",), "Europe/London"),
    Market("DE", 0.15, "EUR", ("de-DE",), "Europe/Berlin"),
    Market("CA", 0.10, "CAD", ("en-CA", "en-CA", "fr-CA"), "America/Toronto"),
    Market("FR", 0.10, "EUR", ("fr-FR",), "Europe/Paris"),
    Market("NL", 0.10, "EUR", ("nl-NL",), "Europe/Amsterdam"),
)
DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_WEIGHTS = (0.6, 0.32, 0.08)
# How often each category is a buyer's main interest.
_CATEGORY_WEIGHTS = (0.10, 0.07, 0.11, 0.08, 0.06, 0.12, 0.08, 0.07, 0.09, 0.08, 0.07, 0.07)
GUEST_SHARE = 0.15
T = TypeVar("T")


class Picker(Generic[T]):
    """Weighted choice with the cumulative table built once (``random.choices`` rebuilds it per call)."""

    def __init__(self, items: Sequence[T], weights: Sequence[float]) -> None:
        self.items = list(items)
        self.cum = list(itertools.accumulate(weights))

    def __call__(self, rng: random.Random) -> T:
        return self.items[bisect.bisect_right(self.cum, rng.random() * self.cum[-1])]


_PICK_MARKET = Picker(MARKETS, [m.share for m in MARKETS])
_PICK_DEVICE = Picker(DEVICES, _DEVICE_WEIGHTS)
_PICK_CATEGORY = Picker(CATEGORY_NAMES, _CATEGORY_WEIGHTS)
_PICK_ITEMS = Picker((1, 2, 3, 4), (0.4, 0.3, 0.18, 0.12))
_PICK_QTY = Picker((1, 2, 3), (0.85, 0.12, 0.03))


@dataclass(frozen=True, slots=True)
class Persona:
    """What stays the same across one buyer's orders."""

    market: Market
    locale: str
    device: str
    main: str  # main category of interest
    second: str


@dataclass(frozen=True, slots=True)
class Checkout:
    """One simulated order. There is no simulated hour: Kassa takes the hour from its own clock in the
    buyer's timezone (sent with the request), so time of day is not part of the ground truth."""

    index: int
    order_id: str
    customer_id: str | None  # None: guest checkout
    device: str
    market: Market
    locale: str
    items: tuple[tuple[Product, int], ...]  # (product, qty)
    total: float
    categories: frozenset[str]
    prior_orders: int  # this buyer's orders before this one (0 for guests)
    slice: str
    draws: tuple[float, ...]  # one uniform per slot: accept the offer shown there iff draw < p

    @property
    def country(self) -> str:
        return self.market.country

    @property
    def lang(self) -> str:
        return self.locale.split("-", 1)[0]


# --------------------------------------------------------------------------- ground truth
Rule = Callable[[Checkout], float]


def _when(test: Callable[[Checkout], bool], delta: float) -> Rule:
    return lambda c: delta if test(c) else 0.0


def _bought(*cats: str) -> Callable[[Checkout], bool]:
    wanted = frozenset(cats)
    return lambda c: not c.categories.isdisjoint(wanted)


def _ramp(lo: float, hi: float, delta: float) -> Rule:
    # Willingness to insure grows with what is at stake.
    return lambda c: delta * min(1.0, max(0.0, (c.total - lo) / (hi - lo)))


# offer id -> (base rate, context effects added to it). The base rates are what a buyer with no
# particular reason to care accepts; the effects are the reasons.
APPEAL: dict[str, tuple[float, tuple[Rule, ...]]] = {
    "sub-serum": (0.004, (_when(_bought("skincare"), 0.20), _when(_bought("makeup"), 0.04))),
    "sub-coffee": (0.004, (_when(_bought("kitchen"), 0.16),)),
    "sub-petfood": (0.003, (_when(_bought("pet"), 0.22),)),
    "sub-haircare": (0.003, (_when(_bought("haircare"), 0.15),)),
    "sub-plus": (0.006, (_when(lambda c: c.prior_orders >= 2, 0.09),)),
    "sub-streaming": (0.035, (_when(lambda c: c.device == "desktop", 0.02),)),
    "war-electronics-2y": (0.02, (_ramp(100.0, 600.0, 0.22),)),
    "war-phone-accident": (0.01, (_when(lambda c: c.device == "mobile", 0.05),)),
    "war-home-2y": (0.015, (_ramp(80.0, 400.0, 0.14),)),
    "partner-app": (0.008, (_when(lambda c: c.device == "mobile", 0.13),
                            _when(lambda c: c.device == "tablet", 0.05))),
    "partner-magazine": (0.012, (_when(_bought("skincare", "makeup", "haircare"), 0.06),)),
    "partner-paylater-de": (0.003, (_when(lambda c: c.country == "DE", 0.14),)),
    "partner-energy-gb": (0.002, (_when(lambda c: c.country == "GB", 0.12),)),
    "partner-cinema-fr": (0.002, (_when(lambda c: c.lang == "fr", 0.13),)),
    "partner-fitness-app": (0.004, (_when(_bought("fitness"), 0.13),
                                    _when(lambda c: c.device == "mobile", 0.015))),
    "partner-kids-club": (0.003, (_when(_bought("toys"), 0.16),)),
    "partner-charity": (0.03, ()),
    "disc-next-10": (0.025, (_when(lambda c: c.prior_orders == 0, 0.07),)),
    "disc-free-ship": (0.01, (_when(lambda c: c.total < 50.0, 0.08),)),
    "disc-vip": (0.004, (_when(lambda c: c.prior_orders >= 3, 0.11),)),
    "disc-beauty-bundle": (0.004, (_when(_bought("makeup"), 0.13),)),
    "disc-activewear": (0.005, (_when(_bought("apparel", "shoes", "fitness"), 0.08),)),
}
# What buyers accept after the drift (`World(drift_at=...)`): the same shoppers a season and a competitor
# later. Most phone buyers already have the app (its promotion ran out); a rival launched a cheaper serum
# subscription, so skincare buyers now take the beauty bundle and the magazine instead; January puts the
# fitness app in front of every mobile buyer; carriers raised prices, so free shipping matters up to 80;
# first-order discounts lost their pull while the relaunched Plus membership wins regulars over. Offers
# not named keep their appeal. The best offer changes for mobile, skincare, first-time and regular
# buyers, while the best achievable rate stays about where it was (a shift of taste, not of demand).
DRIFTED_APPEAL: dict[str, tuple[float, tuple[Rule, ...]]] = {
    **APPEAL,
    "partner-app": (0.008, (_when(lambda c: c.device == "mobile", 0.015),
                            _when(lambda c: c.device == "tablet", 0.01))),
    "sub-serum": (0.004, (_when(_bought("skincare"), 0.04), _when(_bought("makeup"), 0.02))),
    "disc-beauty-bundle": (0.004, (_when(_bought("makeup"), 0.13), _when(_bought("skincare"), 0.14))),
    "partner-magazine": (0.012, (_when(_bought("skincare", "makeup", "haircare"), 0.10),)),
    "partner-fitness-app": (0.004, (_when(_bought("fitness"), 0.13),
                                    _when(lambda c: c.device == "mobile", 0.11))),
    "disc-free-ship": (0.01, (_when(lambda c: c.total < 80.0, 0.10),)),
    "disc-next-10": (0.025, (_when(lambda c: c.prior_orders == 0, 0.02),)),
    "sub-plus": (0.006, (_when(lambda c: c.prior_orders >= 2, 0.16),)),
}
# Cross-sell products: a product that complements the basket sells; one like it sells a little.
PRODUCT_BASE = 0.004
PRODUCT_COMPLEMENT = 0.07
PRODUCT_SAME_CATEGORY = 0.02
P_MAX = 0.95


class World:
    """The demo's ground truth and shopper generator for one seed."""

    def __init__(self, store: DemoStore, seed: int, drift_at: int | None = None) -> None:
        missing = set(store.offer_ids) ^ set(APPEAL)
        if missing:
            raise ValueError(f"ground truth and catalog disagree on offers: {sorted(missing)}")
        if drift_at is not None and drift_at < 0:
            raise ValueError(f"drift_at must be a checkout index >= 0, got {drift_at}")
        self.store = store
        self.seed = seed
        self.drift_at = drift_at
        rng = random.Random(f"kassa-demo-world:{seed}")
        self.offers = {o.id: o for o in (*store.offers, *store.product_offers())}
        self.product_by_offer = {p.offer_id: p for p in store.products}
        # Per product: how well it sells (popularity inside its category) and how appealing it is
        # as a cross-sell. Hidden, like everything in this class.
        self.appeal = {p.offer_id: math.exp(rng.gauss(0.0, 0.35)) for p in store.products}
        self.by_category: dict[str, list[Product]] = {c: [] for c in CATEGORY_NAMES}
        for p in store.products:
            self.by_category[p.category].append(p)
        self.popularity: dict[str, Picker[Product]] = {}
        for cat, products in self.by_category.items():
            ranks = list(range(len(products)))
            rng.shuffle(ranks)
            # Zipf-like: a few bestsellers per category, a long tail.
            self.popularity[cat] = Picker(products, [1.0 / (r + 1) ** 0.8 for r in ranks])
        self._personas: dict[int, Persona] = {}

    # ------------------------------------------------------------------ truth
    def drifted(self, c: Checkout) -> bool:
        """Whether ``c`` comes after the injected drift (never without ``drift_at``)."""
        return self.drift_at is not None and c.index >= self.drift_at

    def p_accept(self, c: Checkout, offer_id: str, drifted: bool | None = None) -> float:
        """True probability that the buyer of ``c`` accepts ``offer_id`` if shown it.

        ``drifted`` forces the truth before (False) or after (True) the drift; by default it follows
        the checkout's index and ``drift_at``.
        """
        after = self.drifted(c) if drifted is None else drifted
        spec = (DRIFTED_APPEAL if after else APPEAL).get(offer_id)
        if spec is not None:
            base, rules = spec
            p = base + sum(rule(c) for rule in rules)
        else:
            product = self.product_by_offer[offer_id]
            p = PRODUCT_BASE
            if product.category in c.categories:
                p += PRODUCT_SAME_CATEGORY
            if any(product.category in COMPLEMENTS[cat] for cat in c.categories):
                p += PRODUCT_COMPLEMENT
            p *= self.appeal[offer_id]
        return min(P_MAX, p)

    def accepts(self, c: Checkout, shown: Sequence[str]) -> list[bool]:
        """The buyer's answer to each shown offer, from the checkout's pre-drawn numbers."""
        return [c.draws[i] < self.p_accept(c, offer_id) for i, offer_id in enumerate(shown[: len(c.draws)])]

    # ------------------------------------------------------------------ shoppers
    def _persona(self, rng: random.Random) -> Persona:
        market = _PICK_MARKET(rng)
        main, second = _PICK_CATEGORY(rng), _PICK_CATEGORY(rng)
        return Persona(market, rng.choice(market.locales), _PICK_DEVICE(rng), main, second)

    def persona(self, customer: int) -> Persona:
        persona = self._personas.get(customer)
        if persona is None:
            persona = self._personas[customer] = self._persona(
                random.Random(f"kassa-demo-customer:{self.seed}:{customer}"))
        return persona

    def _product(self, rng: random.Random, category: str) -> Product:
        return self.popularity[category](rng)

    def _basket(self, rng: random.Random, persona: Persona) -> dict[Product, int]:
        n = _PICK_ITEMS(rng)
        u = rng.random()
        first = persona.main if u < 0.7 else persona.second if u < 0.85 else rng.choice(CATEGORY_NAMES)
        basket: dict[Product, int] = {}
        cats = [first]
        for i in range(n):
            if i == 0:
                cat = first
            else:
                u = rng.random()
                if u < 0.45:
                    cat = rng.choice(COMPLEMENTS[rng.choice(cats)])
                elif u < 0.8:
                    cat = first
                else:
                    cat = rng.choice(CATEGORY_NAMES)
            cats.append(cat)
            product = self._product(rng, cat)
            basket[product] = basket.get(product, 0) + _PICK_QTY(rng)
        return basket

    def checkouts(self, n: int, shares: Sequence[float] = DEFAULT_SHARES, stream: str = "run",
                  run_id: str = "") -> list[Checkout]:
        """``n`` checkouts in order, deterministic in (seed, stream); ``run_id`` only prefixes ids."""
        rng = random.Random(f"kassa-demo-shoppers:{self.seed}:{stream}")
        # Slices come from their own generator so the shoppers do not depend on the split.
        slicer = random.Random(f"kassa-demo-slices:{self.seed}:{stream}")
        pool = max(50, n // 4)  # ~3 orders per registered buyer over a run: plenty of repeat buyers
        pick_customer = Picker(range(pool), [1.0 / (k + 1) ** 0.5 for k in range(pool)])
        pick_slice = Picker(SLICES, shares)
        orders_by: dict[int, int] = {}
        out: list[Checkout] = []
        for i in range(n):
            if rng.random() < GUEST_SHARE:
                customer = None
                persona = self._persona(rng)
                prior = 0
            else:
                customer = pick_customer(rng)
                persona = self.persona(customer)
                prior = orders_by.get(customer, 0)
                orders_by[customer] = prior + 1
            device = persona.device if rng.random() < 0.8 else _PICK_DEVICE(rng)
            basket = self._basket(rng, persona)
            items = tuple(basket.items())
            total = round(sum(p.price * q for p, q in items), 2)
            out.append(Checkout(
                index=i, order_id=f"{run_id}{self.seed}-{i:06d}",
                customer_id=None if customer is None else f"cust-{customer:05d}",
                device=device, market=persona.market, locale=persona.locale, items=items, total=total,
                categories=frozenset(p.category for p, _ in items), prior_orders=prior,
                slice=pick_slice(slicer),
                draws=tuple(rng.random() for _ in range(SLOTS)),
            ))
        return out

    # ------------------------------------------------------------------ the best static ranking
    def static_matrices(self, checkouts: Sequence[Checkout],
                        drifted: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(true acceptance, eligibility) of every listed offer (rows) for every checkout (columns);
        ``drifted`` as in `p_accept`."""
        ids = self.store.offer_ids
        # float32 and an int8 running count: the local search evaluates ~1,000 orders, keep each ~1 ms.
        p = np.zeros((len(ids), len(checkouts)), dtype=np.float32)
        ok = np.zeros((len(ids), len(checkouts)), dtype=bool)
        offers = [self.offers[o] for o in ids]
        placement = SLICE_PLACEMENT["static"]
        for col, c in enumerate(checkouts):
            # The engine's own rules decide eligibility, so the control is judged on what it may show.
            facts = OrderFacts.of(decision_request(c, placement))
            for row, offer in enumerate(offers):
                p[row, col] = self.p_accept(c, offer.id, drifted)
                # Frequency caps need the show history: assume a static list shows a capped offer every
                # time it may (true for offers it ranks high), so a buyer's later orders lose it.
                cap = offer.eligibility.max_per_customer
                ok[row, col] = eligible(offer, facts, 0.0, None, None) is None and (
                    cap is None or c.prior_orders < cap)
        return p, ok

    @staticmethod
    def static_value(order: Sequence[int], p: np.ndarray, ok: np.ndarray, slots: int = SLOTS) -> float:
        """Expected accepts per checkout when each is shown the first ``slots`` eligible offers of ``order``."""
        idx = list(order)
        okp = ok[idx]
        take = okp & (np.cumsum(okp, axis=0, dtype=np.int8) <= slots)
        return float((p[idx] * take).sum() / max(1, p.shape[1]))

    def best_static_order(self, sample: int = 10_000, drifted: bool = False) -> list[str]:
        """The listed offers in the order a fixed list earns the most expected accepts.

        Starts from the mean acceptance where eligible and moves single offers while any move helps:
        local search over the exact expectation on a shopper sample drawn like the real traffic. The
        truth is the one before any drift (what a merchant would have set up), unless ``drifted``.
        """
        ids = self.store.offer_ids
        p, ok = self.static_matrices(self.checkouts(sample, stream="population"), drifted)
        mean = (p * ok).sum(axis=1) / np.maximum(ok.sum(axis=1), 1)
        order = sorted(range(len(ids)), key=lambda j: (-mean[j], ids[j]))
        best = self.static_value(order, p, ok)
        improved = True
        while improved:
            improved = False
            for j in range(len(order)):
                for k in range(len(order)):
                    if j == k:
                        continue
                    cand = order.copy()
                    cand.insert(k, cand.pop(j))
                    value = self.static_value(cand, p, ok)
                    if value > best + 1e-12:
                        order, best, improved = cand, value, True
        return [ids[j] for j in order]


# --------------------------------------------------------------------------- wire payloads
def _order(c: Checkout) -> dict[str, Any]:
    order: dict[str, Any] = {
        "id": c.order_id, "platform": "demo", "currency": c.market.currency, "total": c.total,
        "ship_country": c.country,
        "items": [{"sku": p.sku, "product_id": p.product_id, "category": p.category, "qty": q, "price": p.price}
                  for p, q in c.items],
    }
    if c.customer_id is not None:
        order["customer_id"] = c.customer_id
    return order


def order_event(c: Checkout) -> dict[str, Any]:
    """The placed order, as the store's backend would report it (feeds profiles and retrieval)."""
    event: dict[str, Any] = {"event_id": f"order-{c.order_id}", "type": "order", "order": _order(c)}
    if c.customer_id is not None:
        event["customer"] = {"id": c.customer_id}
    return event


def decision_request_body(c: Checkout, placement: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "placement": placement, "order": _order(c),
        "context": {"device": c.device, "locale": c.locale, "timezone": c.market.timezone},
    }
    if c.customer_id is not None:
        body["customer"] = {"id": c.customer_id}
    return body


def decision_request(c: Checkout, placement: str) -> schemas.DecisionRequest:
    return msgspec.convert(decision_request_body(c, placement), schemas.DecisionRequest)


def outcome_events(decision_id: str, shown: Sequence[str], accepted: Sequence[bool]) -> list[dict[str, Any]]:
    """What the confirmation-page snippet beacons: an impression per shown offer, an accept per yes."""
    events: list[dict[str, Any]] = []
    for offer_id, yes in zip(shown, accepted, strict=False):
        events.append({"event_id": f"imp-{decision_id}-{offer_id}", "type": "impression",
                       "decision_id": decision_id, "offer_id": offer_id})
        if yes:
            events.append({"event_id": f"acc-{decision_id}-{offer_id}", "type": "accept",
                           "decision_id": decision_id, "offer_id": offer_id})
    return events

