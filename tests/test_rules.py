"""Each eligibility rule, and frequency caps, on the pure rule functions and through the API."""

from __future__ import annotations

import pytest

from kassa import schemas
from kassa.decide.rules import FrequencyLedger, OrderFacts, eligible
from tests.conftest import decision_body, order

NOW = 1_800_000_000.0


def facts(total: float = 80.0, country: str | None = "US", cats=("electronics",), keys=("SKU-1",)) -> OrderFacts:
    return OrderFacts(country, total, frozenset(cats), frozenset(keys))


def offer(**rules) -> schemas.Offer:
    extra = {k: rules.pop(k) for k in ("stock", "sku", "product_id", "active") if k in rules}
    return schemas.Offer(id="o", kind="partner", title="t", eligibility=schemas.Eligibility(**rules), **extra)


@pytest.mark.parametrize(
    ("rules", "facts_kw", "expected"),
    [
        ({"countries": ["US"]}, {"country": "US"}, None),
        ({"countries": ["US"]}, {"country": "DE"}, "country"),
        ({"countries": ["US"]}, {"country": None}, "country"),
        ({"exclude_countries": ["DE"]}, {"country": "DE"}, "country"),
        ({"min_order_total": 50}, {"total": 49.99}, "order_total"),
        ({"min_order_total": 50}, {"total": 50}, None),
        ({"max_order_total": 30}, {"total": 30.01}, "order_total"),
        ({"require_categories": ["skincare"]}, {"cats": ("electronics",)}, "required_category"),
        ({"require_categories": ["skincare", "electronics"]}, {"cats": ("electronics",)}, None),
        ({"exclude_categories": ["beauty"]}, {"cats": ("beauty", "toys")}, "excluded_category"),
        ({"sku": "SKU-1"}, {}, "in_order"),
        ({"product_id": "p-9"}, {"keys": ("p-9",)}, "in_order"),
        ({"sku": "SKU-1", "exclude_if_in_order": False}, {}, None),
        ({"stock": 0}, {}, "stock"),
        ({"stock": 3}, {}, None),
        ({"starts_at": NOW + 1}, {}, "date_window"),
        ({"ends_at": NOW}, {}, "date_window"),
        ({"starts_at": NOW - 1, "ends_at": NOW + 1}, {}, None),
        ({"active": False}, {}, "inactive"),
    ],
)
def test_each_rule_admits_or_names_the_failing_rule(rules, facts_kw, expected):
    assert eligible(offer(**rules), facts(**facts_kw), NOW, "c-1", None) == expected


def test_frequency_cap_blocks_after_max_shows_within_window_and_frees_after():
    ledger = FrequencyLedger()
    capped = offer(max_per_customer=2, cap_window_seconds=3600)
    f = facts()
    ledger.record("c-1", ["o"], NOW)
    assert eligible(capped, f, NOW + 1, "c-1", ledger) is None
    ledger.record("c-1", ["o"], NOW + 1)
    assert eligible(capped, f, NOW + 2, "c-1", ledger) == "frequency_cap"
    assert eligible(capped, f, NOW + 2, "c-2", ledger) is None  # per customer
    assert eligible(capped, f, NOW + 3602, "c-1", ledger) is None  # window passed


def test_api_applies_rules_to_the_order(client):
    def shown(body):
        r = client.post("/v1/decisions", json=body)
        assert r.status_code == 200, r.text
        return {o["offer_id"] for o in r.json()["offers"]}

    # limit high enough to see every eligible offer
    us_electronics = shown(decision_body(order=order(80, "US", ("electronics",)), limit=20))
    assert us_electronics == {"warranty", "partner-us", "discount", "no-beauty", "serum-upsell"}
    de_beauty_small = shown(decision_body(order=order(20, "DE", ("beauty",)), limit=20))
    assert de_beauty_small == {"discount", "small-orders", "serum-upsell"}
    skincare_with_serum = shown(decision_body(
        order=order(60, "US", ("skincare",), skus=("SERUM-C",)), limit=20))
    assert "serum-upsell" not in skincare_with_serum and "subscription" in skincare_with_serum


def test_api_frequency_cap_per_customer(client, clock):
    body = decision_body(order=order(60, "US", ("skincare",)), limit=20)
    seen = []
    for _ in range(3):
        r = client.post("/v1/decisions", json=body)
        seen.append("subscription" in {o["offer_id"] for o in r.json()["offers"]})
        clock.advance(1)
    assert seen == [True, True, False]
    other = client.post("/v1/decisions", json={**body, "customer": {"id": "c-other"}}).json()
    assert "subscription" in {o["offer_id"] for o in other["offers"]}
    clock.advance(3600)
    again = client.post("/v1/decisions", json=body).json()
    assert "subscription" in {o["offer_id"] for o in again["offers"]}
