"""Localised offer content: the locale's variant over the base content, prices in the order's currency
formatted for the buyer's locale, the disclosure label, fallbacks, the cache, and catalogs that stay valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from starlette.testclient import TestClient

from kassa import schemas
from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.catalog import CatalogSnapshot, content
from kassa.catalog.content import OfferContent, format_price
from kassa.config import load_settings
from tests.conftest import ADMIN, PUB, decision_body, order

NBSP = "\u00a0"
OFFER: dict[str, Any] = {
    "id": "magazine", "kind": "partner", "title": "Magazine", "value": 3,
    "content": {"headline": "3 free issues, on us", "cta": "Add for {price}", "image_url": "https://x/y.png"},
    "prices": {"USD": 25.99, "EUR": 23.99, "GBP": 21.99},
    "content_by_locale": {
        "nl": {"headline": "3 gratis nummers", "cta": "Toevoegen voor {price}", "disclosure": "Gesponsord"},
        "en-GB": {"headline": "3 free issues, on the house"},
    },
    "disclosure": "Sponsored",
}
PLAIN: dict[str, Any] = {"id": "thanks", "kind": "discount", "title": "10% off", "value": 1,
                         "content": {"headline": "10% off your next order", "code": "THANKS10"}}


def _offer(**overrides: Any) -> schemas.Offer:
    return msgspec.convert({**OFFER, **overrides}, schemas.Offer)


def _resolve(locale: str | None, currency: str | None, **overrides: Any) -> dict[str, Any]:
    return OfferContent(_offer(**overrides)).resolve(locale, currency)


def test_a_dutch_order_in_euros_gets_dutch_text_and_a_euro_price_formatted_the_dutch_way() -> None:
    got = _resolve("nl-NL", "EUR")
    assert got == {"headline": "3 gratis nummers", "cta": f"Toevoegen voor €{NBSP}23,99", "disclosure": "Gesponsord",
                   "image_url": "https://x/y.png", "price": 23.99, "currency": "EUR", "price_display": f"€{NBSP}23,99"}


def test_the_same_price_is_formatted_for_each_buyers_locale() -> None:
    assert format_price(23.99, "EUR", "de-DE") == f"23,99{NBSP}€"
    assert format_price(25.99, "USD", "en-US") == "$25.99"
    assert format_price(1234.5, "EUR", "fr-FR") == f"1\u202f234,50{NBSP}€"
    assert format_price(25.99, "USD", "nl-NL") == f"US${NBSP}25,99"  # a dollar price is not mistaken for euros


def test_a_region_falls_back_to_its_language_then_to_the_base_content() -> None:
    assert _resolve("nl-BE", "EUR")["headline"] == "3 gratis nummers"  # no nl-BE variant: the nl one
    assert _resolve("en-GB", "GBP")["headline"] == "3 free issues, on the house"  # the whole tag wins
    assert _resolve("en-GB", "GBP")["disclosure"] == "Sponsored"  # fields a variant lacks come from the base
    assert _resolve("fr-FR", "EUR")["headline"] == "3 free issues, on us"  # no French: the base content
    assert _resolve("NL_nl", "EUR")["headline"] == "3 gratis nummers"  # tags compare case- and separator-blind


def test_a_currency_without_a_price_falls_back_to_the_first_listed() -> None:
    got = _resolve("nl-NL", "CAD")
    assert (got["currency"], got["price"]) == ("USD", 25.99)
    assert got["cta"] == f"Toevoegen voor US${NBSP}25,99"


def test_no_locale_or_an_unknown_one_formats_as_en_us() -> None:
    assert _resolve(None, None)["price_display"] == "$25.99"
    assert _resolve("xx-ZZ", "EUR")["price_display"] == "€23.99"


def test_without_prices_the_price_placeholder_and_fields_are_left_alone() -> None:
    got = _resolve("nl", "EUR", prices={})
    assert got["cta"] == "Toevoegen voor {price}" and "price_display" not in got and "currency" not in got


def test_each_offer_locale_and_currency_is_formatted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[float, str, str | None]] = []
    real = content.format_price

    def counting(amount: float, currency: str, locale: str | None) -> str:
        calls.append((amount, currency, locale))
        return real(amount, currency, locale)

    monkeypatch.setattr(content, "format_price", counting)
    offer = OfferContent(_offer())
    first = offer.resolve("nl-NL", "EUR")
    for _ in range(100):
        assert offer.resolve("nl-NL", "EUR") is first
    offer.resolve("de-DE", "EUR")
    assert calls == [(23.99, "EUR", "nl-NL"), (23.99, "EUR", "de-DE")]


def test_the_cache_is_bounded_against_made_up_locales() -> None:
    offer = OfferContent(_offer())
    for i in range(content.MAX_CACHED + 50):
        offer.resolve(f"nl-X{i:04d}", "EUR")
    assert len(offer._cache) == content.MAX_CACHED
    assert offer.resolve("nl-X9999", "EUR")["headline"] == "3 gratis nummers"  # still answered, just not kept


def test_an_unchanged_offer_keeps_its_formatted_content_across_snapshots() -> None:
    magazine, plain = _offer(), msgspec.convert(PLAIN, schemas.Offer)
    first = CatalogSnapshot.build([magazine, plain], [])
    resolved = first.content("magazine", "nl-NL", "EUR")
    second = CatalogSnapshot.build([magazine, plain], [], previous=first)
    assert second.content("magazine", "nl-NL", "EUR") is resolved
    changed = CatalogSnapshot.build([_offer(prices={"EUR": 19.99}), plain], [], previous=second)
    assert changed.content("magazine", "nl-NL", "EUR")["price"] == 19.99
    assert "thanks" not in first.contents  # an offer without localisation is served as it is, no lookup
    assert first.content("thanks", "nl-NL", "EUR") is plain.content


def test_bad_locale_tags_and_currency_codes_are_refused_naming_the_field() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$\.prices"):
        _offer(prices={"euro": 1.0})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.prices"):
        _offer(prices={"EUR": -1.0})
    with pytest.raises(msgspec.ValidationError, match=r"\$\.content_by_locale"):
        _offer(content_by_locale={"not a locale": {}})


def test_catalogs_without_the_new_fields_stay_valid_and_unchanged(tmp_path: Path) -> None:
    old = msgspec.convert(PLAIN, schemas.Offer)
    written = msgspec.json.decode(msgspec.json.encode(old))
    assert not {"content_by_locale", "prices", "disclosure"} & written.keys()  # nothing new written for old offers
    examples = Path(__file__).parent.parent / "examples" / "catalog.yaml"
    kassa = Kassa(load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(examples)))
    assert kassa.catalog.snapshot.offers["warranty-2y"].prices["EUR"] == 9.49


@pytest.fixture
def shop(tmp_path: Path) -> TestClient:
    catalog = tmp_path / "catalog.json"
    catalog.write_bytes(msgspec.json.encode({"offers": [OFFER, PLAIN], "placements": [
        {"id": "thanks_page", "offers": ["magazine", "thanks"], "policy": "baseline", "exploration": 0.0,
         "latency_budget_ms": 10000}]}))
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog),
                             admin_key=ADMIN, publishable_key=PUB)
    return TestClient(create_app(Kassa(settings, seed=1)), headers={"Authorization": f"Bearer {PUB}"})


def _decide(client: TestClient, currency: str, locale: str | None) -> dict[str, dict[str, Any]]:
    body = decision_body("thanks_page", order={**order(), "currency": currency})
    if locale is not None:
        body["context"]["locale"] = locale
    response = client.post("/v1/decisions", json=body)
    assert response.status_code == 200, response.text
    return {o["offer_id"]: o["content"] for o in response.json()["offers"]}


def test_decisions_serve_each_buyer_their_locale_and_currency(shop: TestClient) -> None:
    with shop:
        dutch = _decide(shop, "EUR", "nl-NL")
        american = _decide(shop, "USD", "en-US")
        unknown = _decide(shop, "EUR", None)
    assert dutch["magazine"]["cta"] == f"Toevoegen voor €{NBSP}23,99"
    assert dutch["magazine"]["disclosure"] == "Gesponsord"
    assert american["magazine"]["cta"] == "Add for $25.99" and american["magazine"]["disclosure"] == "Sponsored"
    assert unknown["magazine"]["price_display"] == "€23.99"
    assert dutch["thanks"] == american["thanks"] == PLAIN["content"]  # verbatim for offers without variants


def test_an_offer_put_with_a_bad_currency_is_a_422_naming_the_field(shop: TestClient) -> None:
    with shop:
        response = shop.put("/v1/offers/magazine", json={**OFFER, "prices": {"eur": 1}},
                            headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 422
    assert response.json()["field"] == "prices"


def test_the_demo_store_localises_cross_sells_and_labels_partner_offers() -> None:
    from kassa.demo.store import DemoStore

    store = DemoStore.build(1)
    offers = {o.id: o for o in store.catalog(store.offer_ids).offers}
    product = next(o for o in offers.values() if o.kind == "product")
    dutch = OfferContent(product).resolve("nl-NL", "EUR")
    assert dutch["headline"].startswith("Maak je bestelling compleet: ")
    assert dutch["cta"] == f"Toevoegen voor {dutch['price_display']}" and dutch["price_display"].startswith("€")
    assert OfferContent(product).resolve("en-US", "USD")["cta"].startswith("Add for $")
    app = OfferContent(offers["partner-app"]).resolve("nl-NL", "EUR")
    assert (app["disclosure"], app["cta"]) == ("Gesponsord", "Installeren")
    assert OfferContent(offers["partner-app"]).resolve("en-GB", "GBP")["disclosure"] == "Sponsored"
    assert all(o.disclosure is None for o in offers.values() if o.kind != "partner")
