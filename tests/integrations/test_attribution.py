"""Late order webhooks credit the decision that showed the bought product (the reward the learner gets)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from starlette.testclient import TestClient

from kassa import schemas
from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.events.join import JoinedExample, PendingDecision, order_amounts
from kassa.learn.online.rewards import RewardJoiner
from tests.conftest import PUB, decision_body, order
from tests.integrations.conftest import SHOPIFY_SECRET, fixture
from tests.integrations.fakes.base import sign_b64

CUSTOMER = "115310627314723954"  # the customer of the recorded Shopify order


@pytest.fixture
def app_client(kassa: Kassa) -> Iterator[TestClient]:
    with TestClient(create_app(kassa)) as c:
        yield c


def decide(client: TestClient, customer: str = CUSTOMER) -> dict[str, Any]:
    body = decision_body(customer=customer, order=order(80, "US", ("electronics",), order_id="5001"),
                         candidates=["serum-upsell", "discount"], limit=2)
    response = client.post("/v1/decisions", json=body, headers={"Authorization": f"Bearer {PUB}"})
    assert response.status_code == 200, response.text
    decision = response.json()
    assert "serum-upsell" in [o["offer_id"] for o in decision["offers"]]
    return decision


SERUM_LINE = {"id": 1, "product_id": "p-1", "variant_id": 77, "sku": "SERUM-C", "quantity": 1, "price": "19.00"}


def webhook(client: TestClient, created: float, order_id: int = 5002, customer: str = CUSTOMER,
            lines: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    lines = lines or [SERUM_LINE]
    total = f"{sum(float(line['price']) * line['quantity'] for line in lines):.2f}"
    payload = fixture("shopify", "orders_create.json") | {
        "id": order_id, "created_at": datetime.fromtimestamp(created, UTC).isoformat(),
        "customer": {"id": customer}, "total_price": total, "subtotal_price": total, "line_items": lines,
    }
    body = json.dumps(payload).encode()
    response = client.post("/v1/webhooks/shopify", content=body,
                           headers={"X-Shopify-Hmac-Sha256": sign_b64(SHOPIFY_SECRET, body),
                                    "X-Shopify-Topic": "orders/create", "X-Shopify-Webhook-Id": f"w-{order_id}"})
    assert response.status_code == 200, response.text
    return response.json()


def rewards_of(joined: list[JoinedExample], decision_id: str) -> dict[str, float]:
    return {e.offer_id: e.reward for e in joined if e.decision_id == decision_id}


def close_all(kassa: Kassa, clock: Any) -> None:
    clock.advance(61)  # past the placement's reward.wait_seconds (60)
    kassa.learning.step()


def test_a_webhook_arriving_after_the_decision_credits_its_conversion(app_client, kassa, clock, joined):
    decision = decide(app_client)
    clock.advance(40)  # the buyer comes back and buys the offered serum; the webhook lands 40 s later
    assert webhook(app_client, created=clock() - 15) == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    assert kassa.joiner.matched_events == 1
    close_all(kassa, clock)
    rewards = rewards_of(joined, decision["decision_id"])
    assert rewards["serum-upsell"] == 19.0  # conversion weighted by value (placement: conversion: value)
    assert rewards.get("discount", 0.0) == 0.0


def test_every_line_of_the_shown_product_is_credited_not_only_the_last(app_client, kassa, clock, joined):
    decision = decide(app_client)
    clock.advance(10)
    other_size = SERUM_LINE | {"id": 2, "variant_id": 78, "sku": "SERUM-C-50ML", "price": "25.00"}
    same_variant_again = SERUM_LINE | {"id": 3, "price": "4.00"}  # e.g. a line with other properties
    webhook(app_client, created=clock(), lines=[SERUM_LINE, other_size, same_variant_again])
    close_all(kassa, clock)
    # the offer is product p-1 (SKU SERUM-C): 19 + 25 + 4, under the placement's cap of 50
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 48.0


def test_an_order_past_500_lines_is_stored_with_500_keeping_the_offered_products_lines(
        app_client, kassa, clock, joined, caplog):
    # It was a 422, which Shopify retries and counts towards deleting the subscription. The lines dropped are
    # the last ones that are no offered product: what attribution needs is kept.
    decision = decide(app_client)
    clock.advance(10)
    filler = [SERUM_LINE | {"id": 100 + i, "product_id": f"x-{i}", "variant_id": 1000 + i, "sku": f"FILLER-{i}",
                            "price": "1.00"} for i in range(600)]
    with caplog.at_level(logging.WARNING, logger="kassa.integrations.webhooks"):
        answer = webhook(app_client, created=clock(), lines=[*filler, SERUM_LINE])
    assert answer == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0, "lines_dropped": 101}
    [event] = [e for _, e in kassa.event_log.read()]
    assert event.order is not None and len(event.order.items) == 500 and event.order.total == 619.0
    skus = [item.sku for item in event.order.items]
    assert skus[:499] == [f"FILLER-{i}" for i in range(499)] and skus[-1] == "SERUM-C"  # the order's own order
    [line] = [r.getMessage() for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert "shopify order '5002' has 601 lines" in line and "101" in line
    close_all(kassa, clock)
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 19.0


def test_a_line_whose_product_id_is_its_sku_counts_once():
    # SAP Commerce and SKU-less WooCommerce lines carry the same key as SKU and product id
    item = schemas.OrderItem(sku="2053367", product_id="2053367", qty=3, price=15.3)
    assert order_amounts(schemas.Order(id="o-1", items=[item])) == {"2053367": pytest.approx(45.9)}


def test_a_redelivered_webhook_credits_only_once(app_client, kassa, clock, joined):
    decision = decide(app_client)
    clock.advance(10)
    webhook(app_client, created=clock())
    assert webhook(app_client, created=clock()) == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    close_all(kassa, clock)
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 19.0


def test_the_order_placed_before_the_decision_is_not_its_conversion(app_client, kassa, clock, joined):
    decision = decide(app_client)
    clock.advance(20)
    webhook(app_client, created=clock() - 30)  # placed 10 s before the confirmation page asked
    close_all(kassa, clock)
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 0.0


def test_another_buyers_order_credits_nothing(app_client, kassa, clock, joined):
    decision = decide(app_client)
    clock.advance(5)
    webhook(app_client, created=clock(), customer="someone-else")
    close_all(kassa, clock)
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 0.0


def test_a_webhook_after_the_window_closed_is_too_late(app_client, kassa, clock, joined):
    decision = decide(app_client)
    close_all(kassa, clock)
    webhook(app_client, created=clock())
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 0.0


def test_a_guest_order_matches_a_decision_by_email_sha256():
    email = hashlib.sha256(b"guest@example.com").hexdigest()
    definition = schemas.RewardDefinition(weights={"conversion": "value"}, wait_seconds=60)
    joiner = RewardJoiner(lambda _p: definition)
    joiner.register(PendingDecision("d1", "p", 100.0, 160.0, "s", ["serum"], [" |o id=serum"], [1.0], None,
                                    ["SERUM-C"], email_sha256=email))
    guest_order = schemas.Order(id="o-9", created_at=130.0, items=[schemas.OrderItem(sku="SERUM-C", price=19.0)])
    other = schemas.Event("e0", "order", customer=schemas.Customer(email_sha256="0" * 64), order=guest_order)
    assert joiner.observe(other) == 0
    event = schemas.Event("e1", "order", customer=schemas.Customer(email_sha256=email), order=guest_order)
    assert joiner.observe(event) == 1
    [example] = joiner.expire(160.0)
    assert example.reward == 19.0 and len(joiner) == 0
    assert joiner.observe(schemas.Event("e2", "order", customer=schemas.Customer(email_sha256=email),
                                        order=guest_order)) == 0  # closed and forgotten


# --------------------------------------------------------------------------- Shopify cancellations and refunds
def shopify(client: TestClient, topic: str, payload: dict[str, Any], secret: str = SHOPIFY_SECRET) -> Any:
    body = json.dumps(payload).encode()
    return client.post("/v1/webhooks/shopify", content=body,
                       headers={"X-Shopify-Hmac-Sha256": sign_b64(secret, body), "X-Shopify-Topic": topic,
                                "X-Shopify-Webhook-Id": f"w-{topic}-{payload['id']}"})


def refund_body(refund_id: int, qty: int, order_id: int = 5002) -> dict[str, Any]:
    # The refunds/create body: the refund, each refunded line with the order's line_item it refunds.
    return {"id": refund_id, "order_id": order_id, "created_at": "2026-12-07T10:00:00-05:00", "note": "return",
            "refund_line_items": [{"id": 9, "line_item_id": 1, "quantity": qty, "subtotal": 19.0 * qty,
                                   "line_item": SERUM_LINE | {"quantity": 2}}],
            "transactions": [{"kind": "refund", "amount": f"{19.0 * qty:.2f}"}]}


def test_a_shopify_cancellation_in_the_window_takes_the_conversion_back(app_client, kassa, clock, joined):
    kept, cancelled = decide(app_client), decide(app_client, customer="c-cancel")
    clock.advance(10)
    webhook(app_client, created=clock())
    webhook(app_client, created=clock(), order_id=5003, customer="c-cancel")
    cancel = fixture("shopify", "orders_create.json") | {"id": 5003, "cancelled_at": "2026-12-07T10:00:00Z",
                                                         "cancel_reason": "customer"}
    response = shopify(app_client, "orders/cancelled", cancel)
    assert response.status_code == 200 and response.json() == {"accepted": 1, "duplicates": 0,
                                                               "unknown_decisions": 0}
    [event] = [e for _, e in kassa.event_log.read() if e.type == "refund"]
    assert event.event_id == "shopify:cancel:5003" and event.order is not None and event.order.items == []
    close_all(kassa, clock)
    assert rewards_of(joined, kept["decision_id"])["serum-upsell"] == 19.0
    assert rewards_of(joined, cancelled["decision_id"])["serum-upsell"] == 0.0


def test_a_shopify_partial_refund_reduces_the_value_reward_once_however_often_delivered(
        app_client, kassa, clock, joined):
    decision = decide(app_client)
    clock.advance(10)
    webhook(app_client, created=clock(), lines=[SERUM_LINE | {"quantity": 2}])
    assert shopify(app_client, "refunds/create", refund_body(801, 1)).json()["accepted"] == 1
    assert shopify(app_client, "refunds/create", refund_body(801, 1)).json() == {
        "accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    close_all(kassa, clock)
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 19.0  # 38.00 bought, 19.00 refunded


def test_a_shopify_refund_after_the_window_or_of_money_only_changes_no_learned_reward(
        app_client, kassa, clock, joined):
    decision = decide(app_client)
    clock.advance(10)
    webhook(app_client, created=clock())
    money_only = refund_body(802, 1) | {"refund_line_items": []}  # shipping refunded: no line taken back
    assert shopify(app_client, "refunds/create", money_only).json() == {"accepted": 0, "duplicates": 0,
                                                                         "ignored": 1}
    close_all(kassa, clock)
    assert shopify(app_client, "refunds/create", refund_body(803, 1)).json() == {
        "accepted": 1, "duplicates": 0, "unknown_decisions": 0, "unmatched_refunds": 1}
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 19.0
    assert (kassa.joiner.refunds_taken_back, kassa.joiner.refunds_unmatched) == (0, 1)


def test_orders_and_refunds_past_500_lines_warn_at_most_once_per_10_s_each(app_client, kassa, clock, caplog):
    # A store sending many huge orders logged one WARNING each; every answer still says lines_dropped.
    filler = [SERUM_LINE | {"id": 100 + i, "product_id": f"x-{i}", "variant_id": 1000 + i, "sku": f"FILLER-{i}",
                            "price": "1.00"} for i in range(600)]
    refund_filler = [{"id": 1000 + i, "line_item_id": 100 + i, "quantity": 1, "subtotal": 1.0,
                      "line_item": line} for i, line in enumerate(filler)]
    with caplog.at_level(logging.WARNING, logger="kassa.integrations.webhooks"):
        for n in range(3):
            answer = webhook(app_client, created=clock(), order_id=6000 + n, lines=[*filler, SERUM_LINE])
            assert answer["lines_dropped"] == 101
        for n in range(3):
            body = refund_body(900 + n, 1)
            body["refund_line_items"] = [*refund_filler, *body["refund_line_items"]]
            assert shopify(app_client, "refunds/create", body).json()["lines_dropped"] == 101
    lines = [r.getMessage() for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert len(lines) == 2, lines
    assert "shopify order '6000' has 601 lines" in lines[0] and "shopify refund '900'" in lines[1], lines
    receiver = app_client.app.state.webhook_receiver
    assert receiver._warn_long_order.suppressed == 2 and receiver._warn_long_refund.suppressed == 2


def test_a_shopify_refund_signed_with_another_secret_is_refused_and_changes_nothing(app_client, kassa):
    response = shopify(app_client, "refunds/create", refund_body(804, 1), secret="not-the-secret")
    assert response.status_code == 401
    assert [e for _, e in kassa.event_log.read()] == []


def test_a_shopify_refund_past_500_lines_is_stored_with_500_and_says_so(app_client, kassa, clock, joined, caplog):
    # It was cut to its first 500 lines without a word: the offered product's line, last, was not taken back.
    decision = decide(app_client)
    clock.advance(10)
    webhook(app_client, created=clock(), lines=[SERUM_LINE | {"quantity": 2}])
    filler = [{"id": 1000 + i, "line_item_id": 100 + i, "quantity": 1, "subtotal": 1.0,
               "line_item": SERUM_LINE | {"id": 100 + i, "product_id": f"x-{i}", "variant_id": 1000 + i,
                                          "sku": f"FILLER-{i}", "price": "1.00"}} for i in range(600)]
    body = refund_body(805, 1)
    body["refund_line_items"] = [*filler, *body["refund_line_items"]]
    with caplog.at_level(logging.WARNING, logger="kassa.integrations.webhooks"):
        answer = shopify(app_client, "refunds/create", body).json()
    assert answer == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0, "lines_dropped": 101}
    [event] = [e for _, e in kassa.event_log.read() if e.type == "refund"]
    assert event.order is not None and len(event.order.items) == 500 and event.order.items[-1].sku == "SERUM-C"
    [line] = [r.getMessage() for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert "shopify refund '805' of order '5002' has 601 lines" in line and "101 lines left out" in line
    close_all(kassa, clock)
    assert rewards_of(joined, decision["decision_id"])["serum-upsell"] == 19.0  # the offered line taken back
