"""Offer-entity feature views (e.g. an offer's accepts and accept rate in the last hour) for the policy.

Rows come from the serving process's memory (the embedded store, or Redis's `OfferFeatureCache`, kept
fresh by pub/sub), never from a per-request round trip. Values are bucketed into learner tokens in
namespace ``g`` (log2 buckets for numbers), so an offer's action line changes only when a bucket moves and
the serving model's parsed-example cache stays warm.

Each offer's full action line is kept with the row object it was built from and rebuilt only when the source
hands back another row (both sources replace a row on every change and return the same object otherwise):
a decision's 50 candidates then cost 50 lookups and no string building (issue 13). Comparing the rows'
event times instead, as before, kept serving an old line when a stream row changed without a newer event
time (a window emptying, a late event).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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
    def __init__(self, views: Sequence[FeatureView], get_row: Callable[[str], Row | None],
                 get_rows: Callable[[Sequence[str]], list[Row | None]] | None = None) -> None:
        self.views = [v for v in views if v.entity == "offer" and v.online]
        self.get_row = get_row
        self.get_rows = get_rows  # many rows in one call, when the source has that
        # offer id -> (the row, the base line, its suffix, the action line built from them)
        self._lines: dict[str, tuple[Row | None, str, str, str]] = {}

    def __bool__(self) -> bool:
        return bool(self.views)

    def lines(self, offer_ids: Sequence[str], base: Mapping[str, str],
              suffixes: list[str] | None = None) -> list[str]:
        """The action lines of ``offer_ids``: each one's catalog line in ``base`` with its ``|g`` namespace.
        ``suffixes``, when given, receives each one's ``|g`` namespace ("" when nothing is stored): what the
        decision log records, so batch training and evaluation rebuild the lines the decision scored."""
        cache = self._lines
        get_rows, get_row = self.get_rows, self.get_row
        rows = get_rows(offer_ids) if get_rows is not None else [get_row(o) for o in offer_ids]
        out = []
        for offer_id, row in zip(offer_ids, rows, strict=True):  # one loop and no call per candidate
            line = base[offer_id]
            cached = cache.get(offer_id)
            if cached is None or cached[0] is not row or cached[1] is not line:
                self._build(offer_id, row, line, cached)
                cached = cache[offer_id]
            out.append(cached[3])
            if suffixes is not None:
                suffixes.append(cached[2])
        return out

    def line(self, offer_id: str, base: str) -> str:
        """The offer's action line: ``base`` (its catalog line) with its ``|g`` namespace appended."""
        return self.lines((offer_id,), {offer_id: base})[0]

    def _build(self, offer_id: str, row: Row | None, base: str,
               cached: tuple[Row | None, str, str, str] | None) -> None:
        suffix = self._suffix(row)
        # No bucket moved: the same strings as before, whose hashes the scorer's caches already know.
        if cached is not None and cached[1] is base and cached[2] == suffix:
            suffix, line = cached[2], cached[3]
        else:
            line = base + suffix
        if len(self._lines) >= 100_000:  # offer ids are a catalog's; bound it anyway
            self._lines.clear()
        self._lines[offer_id] = (row, base, suffix, line)

    def _suffix(self, row: Row | None) -> str:
        """The ``|g`` namespace of an offer's stored ``row`` for its learner line ("" when nothing is stored)."""
        if not row:
            return ""
        feats: dict[str, Any] = {}
        for view in self.views:
            stored = row.get(view.name)
            if stored is None:
                continue
            for name, value in stored.values.items():
                feats[f"{view.name}.{name}"] = bucket(value)
        return (" |g " + " ".join(tokens(feats))) if feats else ""
