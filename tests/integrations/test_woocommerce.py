"""WooCommerce connector against recorded payloads and the local fake REST API v3."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from kassa.integrations import connector_for
from kassa.integrations.base import AuthError, IntegrationError, PayloadError, RateLimited, SignatureError
from kassa.integrations.config import ConfigError
from kassa.integrations.woocommerce import WooCommerceConnector
from tests.integrations.conftest import WOO_SECRET, Sleeps, fixture, fixture_bytes
from tests.integrations.fakes.base import sign_b64
from tests.integrations.fakes.woocommerce import wc_product


def _headers(body: bytes, secret: str = WOO_SECRET) -> dict[str, str]:
    return {"x-wc-webhook-signature": sign_b64(secret, body), "x-wc-webhook-topic": "order.created",
            "x-wc-webhook-delivery-id": "4f1b0c6e2c6c4a", "x-wc-webhook-source": "https://woo.example/"}


def test_order_created_payload_becomes_the_canonical_order():
    order = WooCommerceConnector({"currency": "USD"}).parse_order(fixture("woocommerce", "order_created.json"))
    assert (order.platform, order.order_id, order.order_number) == ("woocommerce", "727", "727")
    assert order.customer_id is None  # customer_id 0 is a guest
    assert order.email_sha256 == hashlib.sha256(b"john.doe@example.com").hexdigest()
    assert order.created_at == datetime(2026, 1, 22, 19, 25, 38, tzinfo=UTC)  # the GMT field
    assert (order.currency, order.subtotal, order.total, order.ship_country) == (
        "USD", Decimal("18.00"), Decimal("29.35"), "US")
    single, variation = order.lines
    assert (single.sku, single.product_id, single.qty, single.unit_price) == ("WOO-SINGLE-1", "93", 2, Decimal(3))
    assert (variation.sku, variation.product_id) == ("23", "22")  # no SKU: the variation id
    event = order.to_event("woocommerce:order:727")
    assert event.customer is not None and event.customer.id is None and event.order is not None
    assert event.order.total == 29.35


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda p: p.pop("id"), "id"),
    (lambda p: p.update(line_items={"a": 1}), "line_items"),
    (lambda p: p["line_items"][0].update(quantity=1.5), "line_items[0].quantity"),
    (lambda p: p.update(total="lots"), "total"),
    # past 1e18, quantizing the unit price raised InvalidOperation: HTTP 500 on the webhook
    (lambda p: p["line_items"][0].update(price=1e308), "line_items[0].price"),
    (lambda p: p["line_items"][0].update(price="9" * 40), "line_items[0].price"),
    (lambda p: p["line_items"][0].update(price=None, subtotal=-1e30), "line_items[0].subtotal"),
    (lambda p: p.pop("date_created_gmt") and p.pop("date_created"), "date_created_gmt"),
])
def test_a_malformed_order_is_refused_naming_the_field(mutate, field):
    payload = fixture("woocommerce", "order_created.json")
    mutate(payload)
    with pytest.raises(PayloadError) as err:
        WooCommerceConnector({}).parse_order(payload)
    assert err.value.field == field


def test_product_becomes_a_product_offer():
    product = WooCommerceConnector({"currency": "EUR"}).parse_product(fixture("woocommerce", "product.json"))
    assert (product.sku, product.product_id, product.title, product.price, product.currency) == (
        "PQ-19", "794", "Premium Quality", Decimal("21.99"), "EUR")
    assert product.category_path == ("Clothing",) and product.stock == 7 and product.active
    assert product.url == "https://example.com/product/premium-quality-19/" and product.image_url
    assert product.to_offer().category == "Clothing"


def test_out_of_stock_without_stock_management_is_zero_and_drafts_are_inactive():
    raw = fixture("woocommerce", "product.json") | {"manage_stock": False, "stock_quantity": None,
                                                    "stock_status": "outofstock", "status": "draft"}
    product = WooCommerceConnector({"currency": "USD"}).parse_product(raw)
    assert product.stock == 0 and not product.active


# ----------------------------------------------------------------------------- webhooks
def test_signature_good_is_accepted():
    body = fixture_bytes("woocommerce", "order_created.json")
    delivery = connector_for("woocommerce", {"webhook_secret": WOO_SECRET}).verify(_headers(body), body)
    assert (delivery.topic, delivery.delivery_id, delivery.timestamp) == ("order.created", "4f1b0c6e2c6c4a", None)


@pytest.mark.parametrize("case", ["one_byte", "wrong_secret", "missing_header"])
def test_signature_bad_cases_are_refused(case):
    body = fixture_bytes("woocommerce", "order_created.json")
    headers = _headers(body, "not-the-secret" if case == "wrong_secret" else WOO_SECRET)
    if case == "one_byte":
        body = body[:-3] + bytes([body[-3] ^ 1]) + body[-2:]
    if case == "missing_header":
        del headers["x-wc-webhook-signature"]
    with pytest.raises(SignatureError):
        WooCommerceConnector({"webhook_secret": WOO_SECRET}).verify(headers, body)


def test_the_unsigned_ping_is_recognised_but_other_unsigned_bodies_are_not():
    conn = WooCommerceConnector({"webhook_secret": WOO_SECRET})
    assert conn.verify({}, b"webhook_id=15").topic == "ping"
    with pytest.raises(SignatureError):
        conn.verify({}, b'{"webhook_id": 15}')


# ----------------------------------------------------------------------------- catalog paging
def test_products_page_by_page_number_and_the_last_cursor_is_incremental(woo_fake, woo_cfg):
    conn = WooCommerceConnector(woo_cfg)
    pages = list(conn.iter_products())
    assert [len(p) for p, _ in pages] == [3, 3, 1]
    assert [p.sku for page, _ in pages for p in page] == [f"WOO-{i:05d}" for i in range(7)]
    assert json.loads(pages[0][1])["page"] == 2
    assert json.loads(pages[-1][1]) == {"since": "2026-01-01T00:00:06Z"}
    product_requests = [r for r in woo_fake.requests if r.path.endswith("/products")]
    assert product_requests[0].param("per_page") == "3" and product_requests[0].headers["authorization"]
    # the currency is asked once and applies to every product
    assert sum(r.path.endswith("/currencies/current") for r in woo_fake.requests) == 1
    rest = list(conn.iter_products(pages[0][1]))
    assert [p.sku for page, _ in rest for p in page] == [f"WOO-{i:05d}" for i in range(3, 7)]
    woo_fake.products.append(wc_product(50))
    again = list(conn.iter_products(pages[-1][1]))
    assert woo_fake.requests[-1].param("modified_after") == "2026-01-01T00:00:05"
    assert [p.sku for page, _ in again for p in page] == ["WOO-00006", "WOO-00050"]


def test_query_string_auth_sends_the_keys_as_parameters(woo_fake, woo_cfg):
    pages = list(WooCommerceConnector(woo_cfg | {"query_string_auth": True}).iter_products())
    assert sum(len(p) for p, _ in pages) == 7
    assert "authorization" not in woo_fake.requests[-1].headers
    assert woo_fake.requests[-1].param("consumer_key") == "ck_test"


def test_a_malformed_page_raises_payload_error(woo_fake, woo_cfg):
    woo_fake.malformed_next(path_contains="/products")
    with pytest.raises(PayloadError, match="malformed page"):
        list(WooCommerceConnector(woo_cfg).iter_products())


def test_a_page_that_is_not_a_list_raises_payload_error(woo_fake, woo_cfg):
    woo_fake.inject(200, {"unexpected": True}, path_contains="/products")
    with pytest.raises(PayloadError, match="not a JSON list"):
        list(WooCommerceConnector(woo_cfg).iter_products())


def test_bad_keys_are_an_auth_error_with_woocommerces_message(woo_fake, woo_cfg):
    with pytest.raises(AuthError, match="woocommerce_rest_authentication_error") as err:
        list(WooCommerceConnector(woo_cfg | {"consumer_secret": "cs_wrong"}).iter_products())
    assert err.value.status == 401


def test_plain_http_to_a_remote_store_is_refused():
    conn = WooCommerceConnector({"url": "http://shop.example", "consumer_key": "k", "consumer_secret": "s"})
    with pytest.raises(ConfigError, match="HTTPS"):
        list(conn.iter_products())


def test_http_429_retry_after_is_honoured(woo_fake, woo_cfg, sleeps: Sleeps):
    woo_fake.throttle_next("3", times=2)
    pages = list(WooCommerceConnector(woo_cfg, sleep=sleeps).iter_products())
    assert sum(len(p) for p, _ in pages) == 7 and sleeps.calls == [3.0, 3.0]


def test_429_without_retry_after_backs_off(woo_fake, woo_cfg, sleeps: Sleeps):
    woo_fake.throttle_next(None, times=2)
    list(WooCommerceConnector(woo_cfg, sleep=sleeps).iter_products())
    assert sleeps.calls == [0.5, 1.0]


def test_503_with_retry_after_waits_as_told(woo_fake, woo_cfg, sleeps: Sleeps):
    woo_fake.inject(503, "maintenance", {"Retry-After": "7"})
    assert sum(len(p) for p, _ in WooCommerceConnector(woo_cfg, sleep=sleeps).iter_products()) == 7
    assert sleeps.calls == [7.0]


def test_a_retry_after_beyond_max_wait_is_rate_limited_at_once(woo_fake, woo_cfg, sleeps: Sleeps):
    woo_fake.throttle_next("3600")
    with pytest.raises(RateLimited) as err:
        list(WooCommerceConnector(woo_cfg, sleep=sleeps).iter_products())
    assert err.value.retry_after == 3600 and sleeps.calls == []


# ----------------------------------------------------------------------------- orders
def test_get_order_and_an_unknown_order(woo_fake, woo_cfg):
    woo_fake.orders["727"] = fixture("woocommerce", "order_created.json")
    conn = WooCommerceConnector(woo_cfg)
    assert conn.get_order("727").total == Decimal("29.35")
    with pytest.raises(IntegrationError, match="not found"):
        conn.get_order("9999")
