"""`CatalogSnapshot`: an immutable, precomputed view of offers and placements for the hot path.

Everything a decision needs from the catalog is a dict lookup here: offers by id and by product, each
placement's static candidate list and baseline order, each offer's learner line (built once when the
offer changes, never per request), and the localised content of offers that have it (`content.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kassa import schemas
from kassa.catalog.content import OfferContent, localised
from kassa.features.featurize import action_line


@dataclass(frozen=True, slots=True)
class PlacementView:
    placement: schemas.Placement
    static_offers: tuple[str, ...]  # active offers listed for (or matching the kinds of) the placement
    by_value: tuple[str, ...]  # static offers sorted by value, high first (the default baseline)


@dataclass(frozen=True, slots=True)
class CatalogSnapshot:
    version: int
    offers: dict[str, schemas.Offer]
    placements: dict[str, PlacementView]
    action_lines: dict[str, str]
    product_offer: dict[str, str]  # product key (product_id or sku) -> offer id, product offers only
    unconstrained: frozenset[str] = field(default=frozenset())  # active offers no rule can exclude
    contents: dict[str, OfferContent] = field(default_factory=dict)  # offers whose content is the buyer's

    def content(self, offer_id: str, locale: str | None, currency: str | None) -> dict[str, Any]:
        """What the page renders of an offer for this buyer (`kassa.catalog.content`); cached per pair."""
        localised_content = self.contents.get(offer_id)
        if localised_content is None:
            return self.offers[offer_id].content
        return localised_content.resolve(locale, currency)

    @classmethod
    def build(
        cls,
        offers: list[schemas.Offer],
        placements: list[schemas.Placement],
        previous: CatalogSnapshot | None = None,
    ) -> CatalogSnapshot:
        by_id = {o.id: o for o in offers}
        lines: dict[str, str] = {}
        contents: dict[str, OfferContent] = {}
        for offer in offers:
            # Reuse the previous line (and formatted content) when the offer did not change: a PUT of one
            # offer among 10,000 then costs one line, not 10,000.
            unchanged = previous is not None and previous.offers.get(offer.id) == offer
            if unchanged:
                lines[offer.id] = previous.action_lines[offer.id]  # type: ignore[union-attr]
            else:
                lines[offer.id] = action_line(offer)
            if localised(offer):
                kept = previous.contents.get(offer.id) if unchanged else None  # type: ignore[union-attr]
                contents[offer.id] = kept if kept is not None else OfferContent(offer)
        product_offer: dict[str, str] = {}
        for offer in offers:
            if offer.kind == "product" and offer.active:
                for key in (offer.product_id, offer.sku):
                    if key:
                        product_offer.setdefault(key, offer.id)
        views: dict[str, PlacementView] = {}
        for p in placements:
            if p.offers is not None:
                # once each: a row stored before duplicates were refused would show one offer in several slots
                static = [i for i in dict.fromkeys(p.offers) if i in by_id and by_id[i].active]
            elif p.kinds is not None:
                static = [o.id for o in offers if o.active and o.kind in p.kinds]
            elif p.retrieval is not None:
                static = []  # pure retrieval placement
            else:
                static = [o.id for o in offers if o.active and o.kind != "product"]
            by_value = sorted(static, key=lambda i: -by_id[i].value)
            views[p.id] = PlacementView(p, tuple(static), tuple(by_value))
        no_rules = schemas.Eligibility()
        unconstrained = frozenset(
            o.id for o in offers
            if o.active and o.stock is None and o.eligibility == no_rules and o.sku is None and o.product_id is None
        )
        return cls(
            version=(previous.version + 1) if previous else 1,
            offers=by_id,
            placements=views,
            action_lines=lines,
            product_offer=product_offer,
            unconstrained=unconstrained,
            contents=contents,
        )
