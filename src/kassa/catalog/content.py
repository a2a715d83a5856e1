"""An offer's content for one buyer: the locale's variant, the price in the order's currency, the disclosure.

An offer's ``content`` is what the page renders. Three optional offer fields make it the buyer's
(issue 16: a Dutch order in euros was offered "Add for $25.99"):

* ``content_by_locale``: fields that replace ``content``'s for a locale. The buyer's locale (the
  request's ``context.locale``, e.g. ``nl-NL``) picks the variant keyed by the whole tag (``nl-NL``),
  else by its language (``nl``); fields a variant does not set fall back to ``content``.
* ``prices``: the offer's price per currency (``{"USD": 25.99, "EUR": 23.99}``). The order's currency is
  used when listed, else the first one listed (the store's own). The content then carries ``price``
  (the number), ``currency`` and ``price_display`` (formatted for the buyer's locale with Babel's CLDR
  data: ``€ 23,99`` for ``nl-NL``, ``23,99 €`` for ``de-DE``), and every ``{price}`` in a text field
  (``"cta": "Add for {price}"``) becomes ``price_display``.
* ``disclosure``: a label the page shows with the offer (``"Sponsored"`` on partner offers), set into
  the content as ``disclosure``; a locale variant may translate it.

An offer with none of the three is returned as it always was (``offer.content``, no lookup). Otherwise
the resolved content is built once per (locale, currency) the offer is asked for and kept in the
catalog snapshot, so the hot path pays one dict lookup: Babel's formatting costs ~15 µs and runs once per
offer, locale and currency, never per decision. The cache is bounded per offer (locales come from the
request), and a new snapshot keeps the entries of offers that did not change.
"""

from __future__ import annotations

from typing import Any

from babel import Locale, UnknownLocaleError
from babel.numbers import format_currency

from kassa import schemas

DEFAULT_LOCALE = "en-US"  # when the request names none, or one Babel does not know
MAX_CACHED = 256  # (locale, currency) pairs kept per offer; beyond it a pair is resolved per request
PRICE = "{price}"

_locales: dict[str, Locale] = {}


def localised(offer: schemas.Offer) -> bool:
    """Whether the offer's content depends on the buyer (otherwise ``offer.content`` is served as is)."""
    return bool(offer.content_by_locale or offer.prices or offer.disclosure)


def _norm(tag: str) -> str:
    return tag.replace("_", "-").lower()


def babel_locale(tag: str | None) -> Locale:
    """The Babel locale of a BCP 47 tag (``nl-NL``, ``nl``, ``pt_BR``); unknown or missing: ``en-US``."""
    key = tag or DEFAULT_LOCALE
    found = _locales.get(key)
    if found is not None:
        return found
    try:
        found = Locale.parse(key.replace("-", "_"))
    except (UnknownLocaleError, ValueError, TypeError):
        found = Locale.parse(DEFAULT_LOCALE.replace("-", "_"))
    if len(_locales) < 4 * MAX_CACHED:
        _locales[key] = found
    return found


def format_price(amount: float, currency: str, locale: str | None) -> str:
    """``amount`` in ``currency`` as a buyer of ``locale`` reads it (``format_price(23.99, "EUR", "nl-NL")``
    is ``'€ 23,99'``)."""
    return str(format_currency(amount, currency, locale=babel_locale(locale)))


class OfferContent:
    """One offer's resolved content per (locale, currency), built on first use and cached."""

    __slots__ = ("_cache", "_variants", "offer")

    def __init__(self, offer: schemas.Offer) -> None:
        self.offer = offer
        self._variants = {_norm(tag): fields for tag, fields in offer.content_by_locale.items()}
        self._cache: dict[tuple[str | None, str | None], dict[str, Any]] = {}

    def resolve(self, locale: str | None, currency: str | None) -> dict[str, Any]:
        key = (locale, currency)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        content = self.build(locale, currency)
        if len(self._cache) < MAX_CACHED:
            self._cache[key] = content
        return content

    def variant(self, locale: str | None) -> dict[str, Any] | None:
        """The locale's fields: the whole tag's variant, else its language's, else none."""
        if not locale or not self._variants:
            return None
        tag = _norm(locale)
        found = self._variants.get(tag)
        if found is None and "-" in tag:
            found = self._variants.get(tag.split("-", 1)[0])
        return found

    def build(self, locale: str | None, currency: str | None) -> dict[str, Any]:
        offer = self.offer
        content: dict[str, Any] = dict(offer.content)
        if offer.disclosure:
            content["disclosure"] = offer.disclosure
        variant = self.variant(locale)
        if variant:
            content.update(variant)
        if offer.prices:
            code = currency if currency in offer.prices else next(iter(offer.prices))
            amount = offer.prices[code]
            shown = format_price(amount, code, locale)
            for name, value in content.items():
                if isinstance(value, str) and PRICE in value:
                    content[name] = value.replace(PRICE, shown)
            content.update(price=amount, currency=code, price_display=shown)
        return content
