"""The demo store: what Kassa is told about the shop (products, offers, placements), built from a seed.

This module owns the catalog side of the demo: a few hundred products over twelve categories (each a
``kind: product`` offer whose ``value`` is its margin), about twenty hand-written non-product offers
with rendering content and eligibility rules, and the three placements the traffic is split over:

* ``order_confirmation``: the learned policy over the listed offers plus product retrieval;
* ``order_confirmation_random``: the same candidates, shown uniformly at random (control);
* ``order_confirmation_static``: the same candidates in one fixed order, the best static ranking the
  simulator's ground truth allows (control; the order is passed in, see `simulator.World`).

Nothing here knows what shoppers accept: that hidden truth lives in `kassa.demo.simulator`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kassa import schemas

POLICY = "order_confirmation"
RANDOM = "order_confirmation_random"
STATIC = "order_confirmation_static"
PLACEMENTS = (POLICY, RANDOM, STATIC)
SLOTS = 3

# The learned placement's policy: squareCB, Kassa's default. Its pmf is a distribution for one slot;
# `PmfPolicy` fills later slots greedily from the remaining candidates with the same exploration tail
# (renormalising the tail alone would make slots 2 and 3 nearly uniform). Softmax also works here.
LEARNED_POLICY = "squarecb"  # the policy slice's default (`kassa demo --policy` picks another learning policy)
SOFTMAX_LAMBDA = 30.0  # costs are in accepts (0..1): 30 separates a 0.15 offer from a 0.02 one ~50:1
GAMMA_SCALE = 10.0


@dataclass(frozen=True, slots=True)
class Category:
    name: str
    code: str
    price_range: tuple[float, float]
    margin: float  # typical margin share of the price
    nouns: tuple[str, ...]


CATEGORIES: tuple[Category, ...] = (
    Category("electronics", "ELE", (60, 900), 0.18,
             ("Headphones", "Speaker", "Tablet", "Smartwatch", "Camera", "E-reader", "Monitor", "Router")),
    Category("phone_accessories", "ACC", (8, 60), 0.55,
             ("Phone case", "Charger", "USB-C cable", "Screen protector", "Power bank", "Car mount")),
    Category("skincare", "SKN", (12, 90), 0.6,
             ("Serum", "Moisturiser", "Cleanser", "Sunscreen", "Toner", "Eye cream")),
    Category("makeup", "MUP", (8, 55), 0.6, ("Lipstick", "Mascara", "Foundation", "Palette", "Blush", "Liner")),
    Category("haircare", "HAI", (8, 45), 0.5, ("Shampoo", "Conditioner", "Hair oil", "Styling cream", "Brush")),
    Category("apparel", "APP", (15, 140), 0.45, ("T-shirt", "Hoodie", "Jeans", "Jacket", "Dress", "Leggings")),
    Category("shoes", "SHO", (35, 190), 0.4, ("Sneakers", "Boots", "Sandals", "Runners", "Loafers")),
    Category("fitness", "FIT", (10, 160), 0.35,
             ("Yoga mat", "Dumbbells", "Resistance bands", "Foam roller", "Bottle", "Kettlebell")),
    Category("home", "HOM", (12, 220), 0.45, ("Lamp", "Cushion", "Throw", "Vase", "Candle", "Rug")),
    Category("kitchen", "KIT", (10, 180), 0.4, ("Pan", "Knife", "Kettle", "Grinder", "Mug set", "Blender")),
    Category("toys", "TOY", (8, 90), 0.4, ("Puzzle", "Building set", "Plush", "Board game", "RC car")),
    Category("pet", "PET", (6, 70), 0.45, ("Dog bed", "Leash", "Cat tree", "Treats", "Bowl")),
)
CATEGORY_NAMES = tuple(c.name for c in CATEGORIES)

# What a merchandiser knows sells together. The simulator's shoppers fill baskets along these edges
# and accept cross-sells along them, which is what co-purchase retrieval and the learner pick up.
COMPLEMENTS: dict[str, tuple[str, ...]] = {
    "electronics": ("phone_accessories",),
    "phone_accessories": ("electronics",),
    "skincare": ("makeup", "haircare"),
    "makeup": ("skincare",),
    "haircare": ("skincare",),
    "apparel": ("shoes", "fitness"),
    "shoes": ("apparel",),
    "fitness": ("apparel", "shoes"),
    "home": ("kitchen", "pet"),
    "kitchen": ("home",),
    "toys": ("home",),
    "pet": ("home",),
}

_ADJECTIVES = ("Classic", "Pro", "Eco", "Studio", "Urban", "Nordic", "Everyday", "Premium", "Compact", "Deluxe")
PRODUCTS_PER_CATEGORY = 25


@dataclass(frozen=True, slots=True)
class Product:
    sku: str
    product_id: str
    offer_id: str
    name: str
    category: str
    price: float
    value: float  # margin of one unit, the offer's value


def _image(key: str) -> str:
    return f"https://placehold.co/160x160?text={key}"


def _products(seed: int) -> tuple[Product, ...]:
    rng = random.Random(f"kassa-demo-catalog:{seed}")
    out: list[Product] = []
    for cat in CATEGORIES:
        lo, hi = cat.price_range
        for i in range(PRODUCTS_PER_CATEGORY):
            # Log-uniform prices: most of a category is cheap, a few items are expensive.
            price = round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) - 0.01
            price = max(price, 4.99)
            margin = cat.margin * rng.uniform(0.8, 1.2)
            name = f"{rng.choice(_ADJECTIVES)} {rng.choice(cat.nouns)}"
            sku = f"{cat.code}-{i + 1:03d}"
            out.append(Product(sku, f"p-{sku.lower()}", f"prod-{sku.lower()}", name, cat.name, price,
                               round(price * margin, 2)))
    return tuple(out)


# Fixed demo exchange rates from the store's dollars; prices end in .99 as a merchandiser would set them.
_RATES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "CAD": 1.37}
# Cross-sell wording per language; `{price}` is the price in the order's currency, formatted for the locale.
_COMPLETE = {
    "nl": ("Maak je bestelling compleet: {name}", "Toevoegen voor {price}"),
    "de": ("Vervollständige deine Bestellung: {name}", "Für {price} hinzufügen"),
    "fr": ("Complétez votre commande : {name}", "Ajouter pour {price}"),
}
# Partner offers say that they are paid placements, in the buyer's language where the demo has it.
_SPONSORED = {"nl": "Gesponsord", "de": "Gesponsert", "fr": "Sponsorisé"}


def _prices(usd: float) -> dict[str, float]:
    return {code: usd if code == "USD" else max(0.99, round(usd * rate) - 0.01) for code, rate in _RATES.items()}


def _product_offer(p: Product) -> schemas.Offer:
    return schemas.Offer(
        id=p.offer_id, kind="product", title=p.name, value=p.value, sku=p.sku, product_id=p.product_id,
        category=p.category,
        content={"headline": f"Complete your order: {p.name}", "cta": "Add for {price}",
                 "image_url": _image(p.sku)},
        content_by_locale={lang: {"headline": headline.format(name=p.name), "cta": cta}
                           for lang, (headline, cta) in _COMPLETE.items()},
        prices=_prices(p.price),
        features={"price_tier": "low" if p.price < 30 else "mid" if p.price < 120 else "high"},
    )


def _offer(id: str, kind: schemas.OfferKind, title: str, value: float, category: str, headline: str,
           cta: str, nl: tuple[str, str] | None = None, **eligibility: object) -> schemas.Offer:
    """A listed offer; ``nl`` is its Dutch (headline, cta); partner offers carry a "Sponsored" label."""
    by_locale: dict[str, dict[str, str]] = {}
    if kind == "partner":
        by_locale = {lang: {"disclosure": label} for lang, label in _SPONSORED.items()}
    if nl is not None:
        by_locale["nl"] = {**by_locale.get("nl", {}), "headline": nl[0], "cta": nl[1]}
    return schemas.Offer(
        id=id, kind=kind, title=title, value=value, category=category,
        content={"headline": headline, "cta": cta, "image_url": _image(id)},
        content_by_locale=by_locale, disclosure="Sponsored" if kind == "partner" else None,
        eligibility=schemas.Eligibility(**eligibility),  # type: ignore[arg-type]
    )


_WEEK = 7 * 86_400.0


def _non_product_offers() -> tuple[schemas.Offer, ...]:
    # Values are the store's take per accept (commission, margin of the plan, expected order value).
    return (
        _offer("sub-serum", "subscription", "Serum refills, save 15%", 18.0, "skincare",
               "Never run out: vitamin C serum every 6 weeks, 15% off", "Subscribe",
               nl=("Nooit meer zonder: elke 6 weken vitamine C-serum, 15% korting", "Abonneren")),
        _offer("sub-coffee", "subscription", "Coffee club", 9.0, "kitchen",
               "Fresh beans every month, the first bag is free", "Join the club",
               nl=("Elke maand verse bonen, de eerste zak is gratis", "Word lid")),
        _offer("sub-petfood", "subscription", "Pet food autoship", 11.0, "pet",
               "Their favourite food, delivered before it runs out", "Start autoship",
               nl=("Hun favoriete voer, bezorgd voordat het op is", "Start automatisch bezorgen")),
        _offer("sub-haircare", "subscription", "Shampoo refills", 8.0, "haircare",
               "Shampoo and conditioner refills, 10% off every time", "Subscribe"),
        _offer("sub-plus", "subscription", "Kassa Plus membership", 15.0, "membership",
               "Free shipping all year for regulars", "Try Plus free",
               nl=("Het hele jaar gratis verzending voor vaste klanten", "Probeer Plus gratis")),
        _offer("sub-streaming", "subscription", "3 months of streaming", 4.0, "media",
               "Three months of music streaming, on us", "Claim"),
        _offer("war-electronics-2y", "warranty", "2-year electronics protection", 25.0, "electronics",
               "Protect your new device for 2 years", "Add protection",
               nl=("Bescherm je nieuwe apparaat 2 jaar lang", "Bescherming toevoegen"),
               require_categories=["electronics"], min_order_total=100.0),
        _offer("war-phone-accident", "warranty", "Accidental damage cover", 8.0, "phone_accessories",
               "Drops and spills covered for 12 months", "Add cover",
               require_categories=["electronics", "phone_accessories"], min_order_total=30.0),
        _offer("war-home-2y", "warranty", "2-year home appliance cover", 12.0, "home",
               "Two years of repairs or replacement", "Add cover",
               require_categories=["kitchen", "home"], min_order_total=80.0),
        _offer("partner-app", "partner", "Get the app", 3.0, "app",
               "Track this order in the app and get 15% off the next one", "Install",
               nl=("Volg deze bestelling in de app en krijg 15% korting op de volgende", "Installeren")),
        _offer("partner-magazine", "partner", "3 free magazine issues", 2.5, "media",
               "Three free issues of Glow Magazine", "Claim", countries=["US", "CA"]),
        _offer("partner-paylater-de", "partner", "Ratenkauf", 5.0, "finance",
               "Jetzt kaufen, in 30 Tagen bezahlen", "Mehr erfahren"),
        _offer("partner-energy-gb", "partner", "Switch & save on energy", 6.0, "utilities",
               "Switch your energy supplier and get £50 credit", "Get a quote"),
        _offer("partner-cinema-fr", "partner", "Pass cinéma", 4.0, "media",
               "Deux places de cinéma offertes", "J'en profite"),
        _offer("partner-fitness-app", "partner", "Fitness app trial", 4.0, "fitness",
               "Two months of guided workouts, free", "Start training",
               nl=("Twee maanden begeleide trainingen, gratis", "Begin met trainen")),
        _offer("partner-kids-club", "partner", "Kids club", 3.0, "toys",
               "Join the kids club: a surprise gift on their birthday", "Join"),
        _offer("partner-charity", "partner", "Round up for trees", 1.0, "charity",
               "Round up your order and plant a tree", "Plant a tree",
               nl=("Rond je bestelling af en plant een boom", "Plant een boom")),
        _offer("disc-next-10", "discount", "10% off your next order", 4.0, "loyalty",
               "Thanks! Here is 10% off your next order", "Get my code",
               nl=("Bedankt! Hier is 10% korting op je volgende bestelling", "Geef mijn code"),
               max_per_customer=3, cap_window_seconds=_WEEK),
        _offer("disc-free-ship", "discount", "Free shipping next time", 3.0, "shipping",
               "Free shipping on your next order, no minimum", "Save it",
               nl=("Gratis verzending op je volgende bestelling, zonder minimum", "Bewaren")),
        _offer("disc-vip", "discount", "VIP 20% off", 6.0, "loyalty",
               "You're a regular: 20% off everything this week", "Unlock",
               nl=("Je bent een vaste klant: deze week 20% korting op alles", "Ontgrendelen")),
        _offer("disc-beauty-bundle", "discount", "Beauty bundle deal", 5.0, "makeup",
               "Any 3 makeup items for the price of 2", "Shop the deal"),
        _offer("disc-activewear", "discount", "20% off activewear", 5.0, "apparel",
               "20% off leggings, tops and runners", "Shop now"),
    )


def _reward() -> schemas.RewardDefinition:
    # Short wait: the simulated buyer answers within milliseconds, and the demo should learn in seconds.
    return schemas.RewardDefinition(weights={"accept": 1.0, "click": 0.0}, wait_seconds=1.0)


def _retrieval() -> schemas.Retrieval:
    # A handful of cross-sell products next to ~20 listed offers: enough for the basket to matter
    # without drowning the listed offers (squarecb's exploration grows with the candidate count).
    return schemas.Retrieval(co_purchase=6, history=2, popular=2, max_candidates=10)


@dataclass(frozen=True, slots=True)
class DemoStore:
    seed: int
    products: tuple[Product, ...]
    offers: tuple[schemas.Offer, ...]  # the non-product offers every placement lists

    @classmethod
    def build(cls, seed: int) -> DemoStore:
        return cls(seed, _products(seed), _non_product_offers())

    @property
    def offer_ids(self) -> tuple[str, ...]:
        return tuple(o.id for o in self.offers)

    def product_offers(self) -> list[schemas.Offer]:
        return [_product_offer(p) for p in self.products]

    def placements(self, static_order: Sequence[str], policy: str = LEARNED_POLICY) -> list[schemas.Placement]:
        """The policy placement (its learner's ``policy``) and its two controls; ``static_order`` ranks the
        listed offers."""
        listed = list(self.offer_ids)
        if sorted(static_order) != sorted(listed):
            raise ValueError("static_order must rank exactly the listed offers")
        common: dict[str, Any] = dict(slots=SLOTS, retrieval=_retrieval(), reward=_reward(), latency_budget_ms=50.0)
        return [
            schemas.Placement(
                id=POLICY, offers=listed, policy=policy, softmax_lambda=SOFTMAX_LAMBDA,
                gamma_scale=GAMMA_SCALE, min_learned_decisions=100, **common,
            ),
            schemas.Placement(id=RANDOM, offers=listed, policy="uniform", **common),
            schemas.Placement(
                id=STATIC, offers=list(static_order), policy="baseline", baseline="listed", exploration=0.0,
                **common,
            ),
        ]

    def catalog(self, static_order: Sequence[str], policy: str = LEARNED_POLICY) -> schemas.CatalogFile:
        return schemas.CatalogFile(offers=[*self.offers, *self.product_offers()],
                                   placements=self.placements(static_order, policy))

