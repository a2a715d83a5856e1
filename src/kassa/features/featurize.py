"""Turn feature dicts into Vowpal Wabbit text lines, once per offer and once per request.

Context features go in namespace ``c`` (the shared example), offer features in ``o``; the learner is
configured with ``-q co`` so every context feature is crossed with every offer feature. A product offer's
category is the exception: it goes in ``k``, learned linearly and crossed (``-q bk``) only with the categories
of the basket and of the buyer's recent orders, which the shared example repeats in ``b`` (ADR 0010: a category
crossed with every context feature cost the product learner ~6 % where the categories carried no signal). Strings become
one-hot ``name=value`` tokens, numbers ``name:value``, ``True`` a bare ``name``; ``None``/``False`` are
dropped. VW's separators (space, ``|``, ``:``) are replaced in names and values.

A number past ±100 reaches the learner log-compressed (`learner_value`): the model is linear in it, so a
value far outside what it learned from (an amount in cents, a timestamp, an outlier order) moved every
score by its multiple. Measured (a squareCB learner on amounts of 1,000-20,000 cents, three seeds): scored
at 1e9 the scores reached 3.9e3 (0.3 in range) and the pmf put 1.0 on the same offer for every buyer; over
72 out-of-range probes of three value ranges the right offer led 40 times raw and 62 times compressed, the
largest score 2.8e13 raw and 88 compressed. Decisions, batch training and evaluation all build their lines
here, so the compression is the same everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kassa import schemas

_CLEAN = str.maketrans({" ": "_", "|": "/", ":": ";", "\t": "_", "\n": "_", "\r": "_"})


def clean(token: str) -> str:
    return token.translate(_CLEAN)


_MAX = schemas.FEATURE_VALUE_MAX
LINEAR_BOUND = 100.0


def learner_value(x: float) -> float:
    """The value the learner sees for the number ``x``: ``x`` itself within ±`LINEAR_BOUND` (counts, rates,
    Kassa's log order total, most prices in major units), beyond it ``sign(x)·B·(1 + ln(|x|/B))``: continuous
    and with the same slope at ±B, then growing with the logarithm (1e3 -> 330, 1e9 -> 1,712, the ±1e15 bound
    -> 3,093). Ratios stay ordered, so the learner can still use the number; a value 1,000 times the ones it
    learned from weighs about 3 times as much, not 1,000."""
    if -LINEAR_BOUND <= x <= LINEAR_BOUND:
        return x
    return math.copysign(LINEAR_BOUND * (1.0 + math.log(abs(x) / LINEAR_BOUND)), x)


_TOKENS: dict[tuple[str, str], str] = {}


def _token(name: str, value: str) -> str:
    # Categorical (name, value) pairs repeat across requests (countries, devices, categories): building
    # and cleaning each token once and looking it up after is cheaper than formatting it every time.
    key = (name, value)
    token = _TOKENS.get(key)
    if token is None:
        if len(_TOKENS) >= 200_000:
            _TOKENS.clear()
        token = _TOKENS[key] = f"{clean(name)}={clean(value)}"
    return token


def tokens(features: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for name, value in features.items():
        if value is None or value is False:
            continue
        if value is True:
            out.append(clean(name))
        elif isinstance(value, str):
            out.append(_token(name, value))
        elif isinstance(value, (list, tuple, set, frozenset)):
            out.extend(_token(name, str(v)) for v in value)
        elif isinstance(value, (int, float)):
            # Left out: 0 (VW's default), NaN, and magnitudes past what a feature write accepts
            # (`schemas.FEATURE_VALUE_MAX`; a batch source is not checked), whose square left VW's weight infinite.
            if value != 0 and -_MAX <= value <= _MAX:
                out.append(f"{clean(name)}:{learner_value(float(value)):.6g}")
        else:
            out.append(f"{clean(name)}={clean(str(value))}")
    return out


# Context features repeated in namespace ``b`` (the basket's categories and the buyer's recent ones), for ``-q bk``.
BASKET_FEATURES = ("cat", "prev_cat")


def shared_line(features: Mapping[str, Any]) -> str:
    line = "shared |c " + " ".join(tokens(features))
    basket = {k: features[k] for k in BASKET_FEATURES if features.get(k)}
    if basket:
        line += " |b " + " ".join(tokens(basket))
    return line


def value_bucket(value: float) -> str:
    if value <= 0:
        return "0"
    return str(min(12, int(math.log2(value + 1))))


def offer_features(offer: schemas.Offer) -> dict[str, Any]:
    """The offer features crossed with the context: identity, kind, category, value bucket."""
    feats: dict[str, Any] = {"id": offer.id, "kind": offer.kind, "vb": value_bucket(offer.value)}
    if offer.category:
        feats["cat"] = offer.category
    return feats


def action_line(offer: schemas.Offer) -> str:
    """Namespace ``o`` (crossed with every context feature) holds what the offer *is*; the offer's own
    ``features`` go in namespace ``f``, learned linearly. Crossing those too multiplied predict cost by
    ~3 (30 context x 14 offer features x 50 offers per request) for little gain: ``c x id`` already
    gives every offer its own context weights."""
    feats = offer_features(offer)
    if offer.kind == "product":
        # No product id: with 10,000 products crossing the id with the context gave each product ~30 sparse
        # weights that one accept inflated, and even a linear per-product bias (namespace ``i``) is learned
        # from a handful of shows per product; the model ranked by which products it had seen accepted
        # rather than by why they were retrieved (issue 14's product world; bench/quality.py). What a product
        # placement learns is carried by the retrieval signals (``|r``, `kassa.decide.retrieval.signals`).
        # The category is not crossed with every context feature (hour, weekday, basket size, ...): for a
        # retrieved product that cross is ~15 weights per category, learned from few shows, that moved the
        # ranking on noise where the categories said nothing (ADR 0010's addendum: 1.22x -> 1.15x the best
        # heuristic with 50 labels the world never used). Linear in ``k``, and crossed with the basket's
        # categories (``-q bk``: complementary categories), it keeps the signal a real catalog's carry.
        del feats["id"]
        cat = feats.pop("cat", None)
        line = " |o " + " ".join(tokens(feats))
        if cat is not None:
            line += " |k " + _token("cat", cat)
    else:
        line = " |o " + " ".join(tokens(feats))
    if offer.features:
        line += " |f " + " ".join(tokens(offer.features))
    return line


_SLOTS = [""] + [f" |s slot={k}" for k in range(1, 20)]


def slot_suffix(slot: int) -> str:
    """Appended to a shown offer's action line when it is *learned* from slot ``slot`` (0-based): a linear
    per-position feature that absorbs position bias (slot 2 is seen less than slot 1), so an offer's learned
    value is its slot-1 value. Decisions score every candidate as slot 1, i.e. with no slot feature."""
    return _SLOTS[slot] if slot < len(_SLOTS) else f" |s slot={slot}"
