"""POST /v1/webhooks/{platform} through the real app: verify, dedupe, ingest — and nothing written when refused."""

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
from kassa.config import load_settings
from kassa.integrations.config import webhook_settings
from tests.integrations.conftest import SHOPIFY_SECRET, WOO_SECRET, fixture
from tests.integrations.fakes.base import sign_b64

SHOPIFY_ORDER_ID = "820982911946154508"


@pytest.fixture
def hooks(kassa: Kassa) -> Iterator[TestClient]:
    """A client with no API key: webhooks authenticate by signature."""
    with TestClient(create_app(kassa)) as c:
        yield c


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def shopify_body(created: float, **changes: Any) -> bytes:
    payload = fixture("shopify", "orders_create.json") | {"created_at": _iso(created)} | changes
    return json.dumps(payload).encode()


def shopify_headers(body: bytes, secret: str = SHOPIFY_SECRET, delivery: str = "d-1",
                    topic: str = "orders/create") -> dict[str, str]:
    return {"X-Shopify-Hmac-Sha256": sign_b64(secret, body), "X-Shopify-Topic": topic,
            "X-Shopify-Webhook-Id": delivery, "X-Shopify-Shop-Domain": "fake.myshopify.com",
            "Content-Type": "application/json"}


def woo_body(created: float, status: str = "processing") -> bytes:
    payload = fixture("woocommerce", "order_created.json") | {"date_created_gmt": _iso(created)[:-1], "status": status}
    return json.dumps(payload).encode()


def woo_headers(body: bytes, secret: str = WOO_SECRET, delivery: str = "w-1", event: str = "created") -> dict[str, str]:
    return {"X-WC-Webhook-Signature": sign_b64(secret, body), "X-WC-Webhook-Topic": f"order.{event}",
            "X-WC-Webhook-Delivery-ID": delivery, "X-WC-Webhook-Resource": "order", "X-WC-Webhook-Event": event}


def stored(kassa: Kassa) -> list[schemas.Event]:
    return [event for _, event in kassa.event_log.read(0, 100)]


def assert_problem(response: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and problem["detail"]
    if field is not None:
        assert problem.get("field") == field
    return problem


# ----------------------------------------------------------------------------- accepted
def test_a_signed_shopify_order_is_stored_as_one_canonical_order_event(hooks, kassa, clock):
    body = shopify_body(clock())
    response = hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body))
    assert response.status_code == 200 and response.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    [event] = stored(kassa)
    assert event.event_id == f"shopify:order:{SHOPIFY_ORDER_ID}" and event.type == "order"
    assert event.customer is not None and event.customer.id == "115310627314723954"
    assert event.customer.email_sha256 == hashlib.sha256(b"jon@example.com").hexdigest()
    assert event.order is not None and event.order.platform == "shopify" and event.order.total == 403.0
    assert b"jon@example.com" not in kassa.event_log.path.read_bytes()  # never the raw address


def test_the_order_updates_the_buyers_profile_and_stream_features(hooks, kassa, clock):
    body = shopify_body(clock())
    assert hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)).status_code == 200
    profile = kassa.profiles.get("115310627314723954")
    assert profile is not None and profile["orders_count"] == 1 and profile["spend_total"] == 403.0
    row = kassa.store.get_now("customer", "115310627314723954")  # type: ignore[union-attr]
    assert row is not None and row["customer_activity"]["orders_1h"] == 1


def test_line_categories_missing_from_the_platform_are_taken_from_the_synced_offer(hooks, kassa, clock):
    kassa.catalog.put_offer(schemas.Offer(id="ipod", kind="product", title="iPod", sku="IPOD2008PINK",
                                          product_id="999", category="electronics"))
    body = shopify_body(clock())
    hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body))
    [event] = stored(kassa)
    assert event.order is not None and event.order.items[0].category == "electronics"


def test_a_signed_woocommerce_order_is_stored(hooks, kassa, clock):
    body = woo_body(clock())
    response = hooks.post("/v1/webhooks/woocommerce", content=body, headers=woo_headers(body))
    assert response.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    [event] = stored(kassa)
    assert event.event_id == "woocommerce:order:727" and event.order is not None
    assert event.order.created_at == clock()


# ----------------------------------------------------------------------------- duplicates
def test_a_replayed_delivery_is_counted_once(hooks, kassa, clock):
    body = shopify_body(clock())
    headers = shopify_headers(body)
    assert hooks.post("/v1/webhooks/shopify", content=body, headers=headers).json()["accepted"] == 1
    again = hooks.post("/v1/webhooks/shopify", content=body, headers=headers)
    assert again.status_code == 200 and again.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    assert len(stored(kassa)) == 1
    assert kassa.profiles.get("115310627314723954")["orders_count"] == 1  # type: ignore[index]


def test_the_same_order_under_a_new_delivery_id_is_still_a_duplicate(hooks, kassa, clock):
    # Delivery-id headers are outside the HMAC: a replayed body with a fresh id must not count twice.
    body = shopify_body(clock())
    hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body, delivery="d-1"))
    again = hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body, delivery="d-2"))
    assert again.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0} and len(stored(kassa)) == 1


def test_a_replayed_woocommerce_delivery_is_counted_once(hooks, kassa, clock):
    body = woo_body(clock())
    hooks.post("/v1/webhooks/woocommerce", content=body, headers=woo_headers(body))
    again = hooks.post("/v1/webhooks/woocommerce", content=body, headers=woo_headers(body))
    assert again.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0} and len(stored(kassa)) == 1


def test_the_dedupe_survives_a_restart(settings, clock):
    body = shopify_body(clock())
    for expected in (
            {"accepted": 1, "duplicates": 0, "unknown_decisions": 0},
            {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}):
        with TestClient(create_app(Kassa(settings, clock=clock))) as c:
            assert c.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)).json() == expected


# ----------------------------------------------------------------------------- refused: nothing written
@pytest.mark.parametrize("case", ["one_byte", "wrong_secret", "missing_header", "empty_header"])
def test_bad_signatures_are_401_and_nothing_is_written(hooks, kassa, clock, case):
    body = shopify_body(clock())
    headers = shopify_headers(body, "wrong-secret" if case == "wrong_secret" else SHOPIFY_SECRET)
    if case == "one_byte":
        body = body.replace(b'"403.00"', b'"403.01"')
    if case == "missing_header":
        del headers["X-Shopify-Hmac-Sha256"]
    if case == "empty_header":
        headers["X-Shopify-Hmac-Sha256"] = ""
    problem = assert_problem(hooks.post("/v1/webhooks/shopify", content=body, headers=headers), 401, "signature")
    # webhooks carry no API key: the title was "Missing or invalid API key"
    assert problem["title"] == "Missing or invalid webhook signature" and problem["type"].endswith("/unauthorized")
    assert kassa.event_log.count() == 0 and kassa.profiles.get("115310627314723954") is None


@pytest.mark.parametrize("case", ["one_byte", "wrong_secret", "missing_header"])
def test_bad_woocommerce_signatures_are_401_and_nothing_is_written(hooks, kassa, clock, case):
    body = woo_body(clock())
    headers = woo_headers(body, "wrong" if case == "wrong_secret" else WOO_SECRET)
    if case == "one_byte":
        body = body.replace(b'"29.35"', b'"29.36"')
    if case == "missing_header":
        del headers["X-WC-Webhook-Signature"]
    assert_problem(hooks.post("/v1/webhooks/woocommerce", content=body, headers=headers), 401, "signature")
    assert kassa.event_log.count() == 0


def test_an_unknown_platform_is_404(hooks, kassa):
    problem = assert_problem(hooks.post("/v1/webhooks/bigcommerce", content=b"{}"), 404, "platform")
    assert "unknown platform" in problem["detail"]


def test_a_platform_without_a_secret_is_404_saying_how_to_configure_it(settings, clock):
    import msgspec

    bare = msgspec.structs.replace(settings, integrations={})
    with TestClient(create_app(Kassa(bare, clock=clock))) as c:
        body = shopify_body(clock())
        problem = assert_problem(c.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 404)
    assert "KASSA_INTEGRATIONS__SHOPIFY__WEBHOOK_SECRET" in problem["detail"]


@pytest.mark.parametrize(("section", "says"), [
    ({"webhook_secret": "   "}, "shopify.webhook_secret is blank"),
    ({"webhook_secret": SHOPIFY_SECRET, "replay_window_seconds": -5}, "replay_window_seconds must be positive"),
    ({"webhook_secret": SHOPIFY_SECRET, "max_body_bytes": "2MB"}, "max_body_bytes must be a whole number"),
    ({"webhook_secret": SHOPIFY_SECRET, "max_body_bytes": -1}, "max_body_bytes must be a whole number"),
    ({"webhook_secret": SHOPIFY_SECRET, "page_size": "many"}, "shopify.page_size must be a whole number"),
])
def test_a_misconfigured_platform_is_404_naming_the_setting_not_a_500(settings, clock, section, says):
    import msgspec

    bad = msgspec.structs.replace(settings, integrations={"shopify": section})
    with TestClient(create_app(Kassa(bad, clock=clock))) as c:
        body = shopify_body(clock())
        problem = assert_problem(c.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 404)
    assert "misconfigured" in problem["detail"] and says in problem["detail"]


def test_signed_but_malformed_json_is_400(hooks, kassa):
    body = b'{"id": 1, "line_items": ['
    assert_problem(hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 400)
    assert kassa.event_log.count() == 0


@pytest.mark.parametrize("platform", ["shopify", "woocommerce"])
def test_a_signed_body_nested_too_deeply_is_400_not_a_500(hooks, kassa, platform):
    # msgspec raises RecursionError past its depth limit as json.loads does (the shared parser catches it)
    body = b'{"id": 1, "line_items": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    headers = shopify_headers(body) if platform == "shopify" else woo_headers(body)
    problem = assert_problem(hooks.post(f"/v1/webhooks/{platform}", content=body, headers=headers), 400)
    assert problem["detail"] == "webhook body is nested too deeply"
    assert kassa.event_log.count() == 0


def test_signed_json_that_is_not_an_object_is_422(hooks, kassa):
    body = b"[1, 2]"
    assert_problem(hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 422)
    assert kassa.event_log.count() == 0


def test_a_signed_order_with_a_bad_field_is_422_naming_it(hooks, kassa, clock):
    body = shopify_body(clock(), line_items=[{"sku": "A", "quantity": "many", "price": "1.00"}])
    assert_problem(hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 422,
                   "line_items[0].quantity")
    assert kassa.event_log.count() == 0


def test_a_signed_woocommerce_line_price_past_any_amount_is_422_not_500(hooks, kassa, clock):
    payload = json.loads(woo_body(clock()))
    payload["line_items"][0]["price"] = 1e308
    body = json.dumps(payload).encode()
    problem = assert_problem(hooks.post("/v1/webhooks/woocommerce", content=body, headers=woo_headers(body)), 422,
                             "line_items[0].price")
    assert "below 1e18" in problem["detail"]
    assert kassa.event_log.count() == 0


@pytest.mark.parametrize("created", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_signed_order_time_that_leaves_the_datetime_range_in_utc_is_422_not_500(hooks, kassa, created):
    # fromisoformat reads them; converting to UTC raised OverflowError, which no handler turned into a 4xx
    body = shopify_body(0, created_at=created)
    assert_problem(hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 422, "created_at")
    assert kassa.event_log.count() == 0


def test_a_signed_order_time_past_the_clock_skew_allowance_is_kept_as_the_time_it_arrived(hooks, kassa, clock,
                                                                                           caplog):
    # A 2999 created_at was stored as is and stuck in the buyer's last_order_ts (a max) for good; a 422 would
    # have the platform retry the order until it drops it, so the order is kept at the time it arrived.
    with caplog.at_level(logging.WARNING, logger="kassa.integrations.webhooks"):
        body = shopify_body(0, created_at="2999-01-01T00:00:00Z")
        assert hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)).json()["accepted"] == 1
    [event] = stored(kassa)
    assert event.order is not None and event.order.created_at == clock() and event.timestamp == clock()
    profile = kassa.profiles.get("115310627314723954")
    assert profile is not None and profile["last_order_ts"] == clock()
    [line] = [r.getMessage() for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert "created_at 2999-01-01T00:00:00+00:00" in line and "clock skew" in line
    within = clock() + 3_600  # a store clock an hour ahead is within the allowance: kept as sent
    body = shopify_body(within, id=1)
    assert hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body, delivery="d-2")).json()[
        "accepted"] == 1
    assert stored(kassa)[1].order.created_at == within  # type: ignore[union-attr]


def test_an_unsigned_triggered_at_header_out_of_range_is_ignored(hooks, kassa, clock):
    body = shopify_body(clock())
    headers = shopify_headers(body) | {"X-Shopify-Triggered-At": "0001-01-01T00:00:00+01:00"}
    assert hooks.post("/v1/webhooks/shopify", content=body, headers=headers).json()["accepted"] == 1


def test_a_body_over_the_limit_is_413(hooks, kassa):
    body = b"x" * 1_100_000
    assert_problem(hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 413)
    assert kassa.event_log.count() == 0


def test_a_platforms_max_body_bytes_raises_its_limit(settings, clock):
    import msgspec

    roomy = msgspec.structs.replace(settings, integrations={
        "shopify": {"webhook_secret": SHOPIFY_SECRET, "max_body_bytes": "2097152"}})  # quoted in YAML
    with TestClient(create_app(Kassa(roomy, clock=clock))) as c:
        body = b"x" * 1_100_000
        assert_problem(c.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)), 400)  # read


# ----------------------------------------------------------------------------- acknowledged, not orders
def test_another_topic_is_acknowledged_and_not_written(hooks, kassa, clock):
    body = shopify_body(clock())
    response = hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body, topic="orders/updated"))
    assert response.json() == {"accepted": 0, "duplicates": 0, "ignored": 1} and kassa.event_log.count() == 0


def test_a_subscription_to_another_topic_is_said_once_in_the_log(hooks, clock, caplog):
    # Shopify shows such deliveries as succeeding while no order ever arrives: the log says why, once per topic
    body = shopify_body(clock())
    with caplog.at_level(logging.WARNING, logger="kassa.integrations.webhooks"):
        for _ in range(3):
            hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body, topic="orders/paid"))
    [line] = [r.getMessage() for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert ("'orders/paid' is acknowledged and ignored: Kassa reads orders/cancelled, orders/create, "
            "refunds/create") in line


def test_an_order_not_placed_yet_is_said_once_in_the_log(hooks, clock, caplog):
    # a store that subscribed only `Order created` never sees such an order counted: the log says what is needed
    with caplog.at_level(logging.WARNING, logger="kassa.integrations.webhooks"):
        for delivery in ("w-1", "w-2"):
            body = woo_body(clock(), "pending")
            hooks.post("/v1/webhooks/woocommerce", content=body, headers=woo_headers(body, delivery=delivery))
    [line] = [r.getMessage() for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert "woocommerce order '727' (status 'pending') is not placed yet" in line
    assert "docs/integrations/woocommerce.md" in line


def test_a_woocommerce_order_counts_once_it_is_placed_not_when_created_as_a_draft(hooks, kassa, clock):
    # The Checkout block creates a `checkout-draft` order (order.created) when the buyer opens the checkout;
    # an off-site payment leaves it `pending` until the buyer returns; the update that places it follows.
    ignored = {"accepted": 0, "duplicates": 0, "ignored": 1}
    for status, event, delivery in (("checkout-draft", "created", "w-1"), ("pending", "updated", "w-2"),
                                    ("failed", "updated", "w-3")):
        body = woo_body(clock(), status)
        response = hooks.post("/v1/webhooks/woocommerce", content=body, headers=woo_headers(body, delivery=delivery,
                                                                                          event=event))
        assert response.json() == ignored, status
    assert kassa.event_log.count() == 0
    placed = woo_body(clock(), "processing")
    paid = woo_headers(placed, delivery="w-4", event="updated")
    assert hooks.post("/v1/webhooks/woocommerce", content=placed, headers=paid).json() == {
        "accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    completed = woo_body(clock(), "completed")  # later updates of the placed order change nothing
    shipped = woo_headers(completed, delivery="w-5", event="updated")
    again = hooks.post("/v1/webhooks/woocommerce", content=completed, headers=shipped)
    assert again.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    [stored_event] = stored(kassa)
    assert stored_event.event_id == "woocommerce:order:727"


def test_a_shopify_test_notification_is_acknowledged_not_stored_and_said_once(hooks, kassa, clock, caplog):
    # "Send test notification" in the admin (and a test-mode order) carries `"test": true` and a sample order
    # with real-looking ids: it was stored as an order, a conversion and a purchase in the buyer's features.
    with caplog.at_level(logging.INFO, logger="kassa.integrations.webhooks"):
        for delivery in ("d-1", "d-2"):
            body = shopify_body(clock(), test=True)
            response = hooks.post("/v1/webhooks/shopify", content=body,
                                  headers=shopify_headers(body, delivery=delivery))
            assert response.status_code == 200 and response.json() == {"accepted": 0, "duplicates": 0, "ignored": 1}
    assert kassa.event_log.count() == 0 and kassa.profiles.get("115310627314723954") is None
    [line] = [r for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert line.levelno == logging.INFO and "shopify test notification" in line.getMessage()
    body = shopify_body(clock(), test=False)  # a real order still counts
    assert hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)).json()["accepted"] == 1


def test_the_woocommerce_ping_is_acknowledged_and_not_written(hooks, kassa):
    response = hooks.post("/v1/webhooks/woocommerce", content=b"webhook_id=12",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200 and response.json()["ignored"] == 1 and kassa.event_log.count() == 0


def test_every_key_of_the_200_bodies_is_in_the_openapi_spec(hooks, kassa, clock):
    spec = hooks.get("/openapi.json").json()
    ok = spec["paths"]["/v1/webhooks/{platform}"]["post"]["responses"]["200"]["content"]["application/json"]
    documented = spec["components"]["schemas"][ok["schema"]["$ref"].rsplit("/", 1)[1]]["properties"]
    body = shopify_body(clock())
    stored_order = hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body)).json()
    other_topic = hooks.post("/v1/webhooks/shopify", content=body,
                             headers=shopify_headers(body, topic="orders/updated")).json()
    assert other_topic["ignored"] == 1
    for answer in (stored_order, other_topic):
        assert set(answer) <= set(documented), f"undocumented: {set(answer) - set(documented)}"


def test_the_webhook_secret_can_come_from_the_environment(monkeypatch, tmp_path):
    # An all-digit secret with a leading zero would be turned into a number by the YAML-typed env loader.
    monkeypatch.setenv("KASSA_INTEGRATIONS__WOOCOMMERCE__WEBHOOK_SECRET", "0123")
    monkeypatch.setenv("KASSA_INTEGRATIONS__WOOCOMMERCE__REPLAY_WINDOW_SECONDS", "60")
    settings = load_settings(None, data_dir=str(tmp_path))
    cfg = webhook_settings("woocommerce", settings.integrations)
    assert cfg.webhook_secret == "0123" and cfg.replay_window_seconds == 60.0


def test_two_long_order_ids_sharing_their_start_are_two_orders(hooks, kassa, clock):
    # `shopify:order:<id>` past the 128-character id bound was cut, so orders whose ids shared their first
    # ~114 characters were one event id and the second was dropped as a duplicate.
    ids = ["7" * 120 + "1", "7" * 120 + "2"]
    for n, order_id in enumerate(ids):
        body = shopify_body(clock(), id=order_id)
        response = hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body, delivery=f"d-{n}"))
        assert response.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}, response.text
    events = stored(kassa)
    assert [e.order.id for e in events if e.order is not None] == ids
    assert len({e.event_id for e in events}) == 2 and all(len(e.event_id) <= 128 for e in events)
    body = shopify_body(clock(), id=ids[1])  # the same long order again: still one order
    again = hooks.post("/v1/webhooks/shopify", content=body, headers=shopify_headers(body, delivery="d-9"))
    assert again.json()["duplicates"] == 1


def test_a_woocommerce_order_updated_to_cancelled_or_refunded_takes_the_whole_order_back_once(hooks, kassa, clock):
    placed = woo_body(clock(), "processing")
    hooks.post("/v1/webhooks/woocommerce", content=placed, headers=woo_headers(placed))
    for status, delivery, answer in (
            ("cancelled", "w-2", {"accepted": 1, "duplicates": 0, "unknown_decisions": 0, "unmatched_refunds": 1}),
            ("refunded", "w-3", {"accepted": 0, "duplicates": 1, "unknown_decisions": 0})):
        body = woo_body(clock(), status)
        response = hooks.post("/v1/webhooks/woocommerce", content=body,
                              headers=woo_headers(body, delivery=delivery, event="updated"))
        assert response.json() == answer, status  # unmatched: no decision was made for this buyer
    order, refund = stored(kassa)
    assert (order.type, refund.type, refund.event_id) == ("order", "refund", "woocommerce:cancel:727")
    assert refund.order is not None and refund.order.id == "727" and refund.order.items == []
    bad = woo_body(clock(), "cancelled")
    forged = woo_headers(bad, secret="not-the-secret", delivery="w-4", event="updated")
    assert hooks.post("/v1/webhooks/woocommerce", content=bad, headers=forged).status_code == 401
