"""Offer-entity feature views (e.g. an offer's accepts and accept rate in the last hour) for the policy.

Rows come from the serving process's memory (the embedded store, or Redis's `OfferFeatureCache`, kept
fresh by pub/sub), never from a per-request round trip. Values are bucketed into learner tokens in
namespace ``g`` (log2 buckets for numbers), so an offer's action line changes only when a bucket moves and
the serving model's parsed-example cache stays warm.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from kassa.features.definitions import FeatureView
from kassa.features.featurize import tokens
from kassa.features.online.base import Row


def bucket(value: Any) -> Any:
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        if value == 0 or not math.isfinite(value):
            return "0"
        # Rates live in [0, 1]: scale so that 1 %, 2 %, 4 % ... land in different buckets.
        scaled = abs(value) * (100.0 if abs(value) <= 1.0 and isinstance(value, float) else 1.0)
        b = int(math.log2(1.0 + scaled))
        return f"{'-' if value < 0 else ''}b{b}"
    if isinstance(value, list):
        return [str(v) for v in value[:5]]
    return None


class OfferFeatureSource:
    def __init__(self, views: Sequence[FeatureView], get_row: Callable[[str], Row | None]) -> None:
        self.views = [v for v in views if v.entity == "offer" and v.online]
        self.get_row = get_row
        self._cache: dict[str, tuple[tuple[Any, ...], str]] = {}

    def __bool__(self) -> bool:
        return bool(self.views)

    def suffix(self, offer_id: str) -> str:
        """The offer's ``|g`` namespace for the learner line ("" when nothing is stored)."""
        row = self.get_row(offer_id)
        if not row:
            return ""
        stamp = tuple((name, vv.ts) for name, vv in row.items())
        cached = self._cache.get(offer_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        feats: dict[str, Any] = {}
        for view in self.views:
            stored = row.get(view.name)
            if stored is None:
                continue
            for name, value in stored.values.items():
                feats[f"{view.name}.{name}"] = bucket(value)
        line = (" |g " + " ".join(tokens(feats))) if feats else ""
        self._cache[offer_id] = (stamp, line)
        return line
