"""Shopify connector against recorded payloads and the local fake GraphQL Admin API."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from kassa.integrations import connector_for
from kassa.integrations.base import AuthError, MissingScopeError, PayloadError, RateLimited, SignatureError
from kassa.integrations.config import ConfigError
from kassa.integrations.shopify import ShopifyConnector
from tests.integrations.conftest import SHOPIFY_SECRET, Sleeps, fixture, fixture_bytes
from tests.integrations.fakes.base import sign_b64
from tests.integrations.fakes.shopify import ShopifyFake, product_node


def _headers(body: bytes, secret: str = SHOPIFY_SECRET, **extra: str) -> dict[str, str]:
    return {"x-shopify-hmac-sha256": sign_b64(secret, body), "x-shopify-topic": "orders/create",
            "x-shopify-webhook-id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
            "x-shopify-triggered-at": "2026-01-14T19:05:11.123Z", **extra}


# ----------------------------------------------------------------------------- parsing
def test_order_webhook_payload_becomes_the_canonical_order():
    order = ShopifyConnector({}).parse_order(fixture("shopify", "orders_create.json"))
    assert order.platform == "shopify" and order.order_id == "820982911946154508" and order.order_number == "#9999"
    assert order.customer_id == "115310627314723954"
    # trimmed, lower-cased, hashed: the raw address is not kept anywhere on the order
    assert order.email_sha256 == hashlib.sha256(b"jon@example.com").hexdigest()
    assert "example.com" not in repr(order)
    assert order.created_at == datetime(2026, 1, 14, 19, 5, 10, tzinfo=UTC)  # -05:00 converted to UTC
    assert (order.currency, order.subtotal, order.total, order.ship_country) == (
        "USD", Decimal("389.98"), Decimal("403.00"), "US")
    first, second = order.lines
    assert (first.sku, first.product_id, first.qty, first.unit_price) == ("IPOD2008PINK", "632910392", 1,
                                                                         Decimal("199.00"))
    assert second.sku == "49148385" and second.qty == 2  # no SKU: the variant id is the key
    event = order.to_event("shopify:order:820982911946154508")
    assert event.type == "order" and event.value == 403.0 and event.customer is not None
    assert event.customer.email_sha256 == order.email_sha256 and event.order is not None
    assert event.order.items[1].price == 95.49 and event.order.created_at == order.created_at.timestamp()


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda p: p.pop("id"), "id"),
    (lambda p: p.update(line_items="nope"), "line_items"),
    (lambda p: p["line_items"][0].update(price="12,50"), "line_items[0].price"),
    (lambda p: p["line_items"][0].update(quantity="two"), "line_items[0].quantity"),
    (lambda p: p.update(currency="dollars"), "currency"),
    (lambda p: p.update(created_at="yesterday"), "created_at"),
    (lambda p: p.update(total_price="-1"), "total"),
])
def test_a_malformed_order_is_refused_naming_the_field(mutate, field):
    payload = fixture("shopify", "orders_create.json")
    mutate(payload)
    with pytest.raises(PayloadError) as err:
        ShopifyConnector({}).parse_order(payload)
    assert err.value.field == field


def test_product_node_becomes_a_product_offer():
    product = ShopifyConnector({}).parse_product(fixture("shopify", "product_node.json"))
    assert (product.sku, product.product_id, product.price, product.currency) == (
        "SB-DRAFT-158", "108828309", Decimal("629.95"), "USD")
    assert product.category_path[-1] == "Snowboards" and product.category == "Snowboards"
    assert product.stock == 12 and product.image_url and product.url and product.active
    offer = product.to_offer()
    assert offer.id == "SB-DRAFT-158" and offer.kind == "product" and offer.value == 629.95
    assert offer.category == "Snowboards" and offer.content["url"] == product.url


def test_draft_product_is_inactive_and_untracked_stock_is_none():
    node = fixture("shopify", "product_node.json") | {"status": "DRAFT", "tracksInventory": False}
    product = ShopifyConnector({}).parse_product(node)
    assert not product.active and product.stock is None and not product.to_offer().active


# ----------------------------------------------------------------------------- webhooks
def test_signature_good_is_accepted():
    body = fixture_bytes("shopify", "orders_create.json")
    delivery = connector_for("shopify", {"webhook_secret": SHOPIFY_SECRET}).verify(_headers(body), body)
    assert delivery.topic == "orders/create" and delivery.delivery_id == "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"
    assert delivery.body == body and delivery.timestamp is not None


@pytest.mark.parametrize("case", ["one_byte", "wrong_secret", "missing_header", "garbage_header"])
def test_signature_bad_cases_are_refused(case):
    body = fixture_bytes("shopify", "orders_create.json")
    headers = _headers(body, "another-secret" if case == "wrong_secret" else SHOPIFY_SECRET)
    if case == "one_byte":
        body = body.replace(b'"403.00"', b'"404.00"')
    if case == "missing_header":
        del headers["x-shopify-hmac-sha256"]
    if case == "garbage_header":
        headers["x-shopify-hmac-sha256"] = "ü not base64"
    with pytest.raises(SignatureError):
        ShopifyConnector({"webhook_secret": SHOPIFY_SECRET}).verify(headers, body)


def test_verify_without_a_configured_secret_is_refused():
    body = b"{}"
    with pytest.raises(SignatureError, match="not configured"):
        ShopifyConnector({}).verify(_headers(body), body)


@pytest.mark.parametrize("secret", [" ", "  \t\n"])
def test_a_blank_webhook_secret_is_a_configuration_error(secret):
    from kassa.integrations.config import IntegrationSettings

    with pytest.raises(ConfigError, match=r"shopify\.webhook_secret is blank"):
        IntegrationSettings.from_mapping("shopify", {"webhook_secret": secret})
    assert IntegrationSettings.from_mapping("shopify", {"webhook_secret": ""}).webhook_secret is None  # unset


# ----------------------------------------------------------------------------- catalog paging
def test_products_page_by_cursor_and_the_last_cursor_is_incremental(shopify_fake, shopify_cfg):
    conn = ShopifyConnector(shopify_cfg)
    pages = list(conn.iter_products())
    assert [len(p) for p, _ in pages] == [3, 3, 1]
    assert [p.sku for page, _ in pages for p in page] == [f"SKU-{i:06d}" for i in range(7)]
    assert json.loads(pages[0][1])["after"]  # resumes inside the run
    final = json.loads(pages[-1][1])
    assert final == {"since": "2026-01-01T00:00:06Z"}
    assert shopify_fake.queries[0]["variables"]["first"] == 3
    assert all(r.headers["x-shopify-access-token"] == "shpat_test" for r in shopify_fake.requests)
    # a resume from the first page's cursor yields only what came after it
    rest = list(conn.iter_products(pages[0][1]))
    assert [p.sku for page, _ in rest for p in page] == [f"SKU-{i:06d}" for i in range(3, 7)]
    # the next run asks only for products updated since the newest one seen
    shopify_fake.products = sorted([*shopify_fake.products, product_node(99)], key=lambda p: p["updatedAt"])
    again = list(conn.iter_products(pages[-1][1]))
    assert "updated_at:>='2026-01-01T00:00:06Z'" in shopify_fake.queries[-1]["variables"]["query"]
    assert [p.sku for page, _ in again for p in page] == ["SKU-000006", "SKU-000099"]


def test_a_malformed_page_raises_payload_error(shopify_fake, shopify_cfg):
    shopify_fake.malformed_next()
    with pytest.raises(PayloadError, match="malformed page"):
        list(ShopifyConnector(shopify_cfg).iter_products())


def test_a_page_without_page_info_raises_payload_error(shopify_fake, shopify_cfg):
    shopify_fake.inject(200, {"data": {"products": {"nodes": []}}})
    with pytest.raises(PayloadError, match="pageInfo"):
        list(ShopifyConnector(shopify_cfg).iter_products())


def test_an_unparseable_product_is_skipped_and_reported(shopify_fake, shopify_cfg):
    shopify_fake.products = [product_node(0), product_node(1, priceRangeV2=None, variants={"nodes": []})]
    conn = ShopifyConnector(shopify_cfg)
    products = [p for page, _ in conn.iter_products() for p in page]
    assert [p.sku for p in products] == ["SKU-000000"]
    assert len(conn.skipped) == 1 and "1000001" in conn.skipped[0]


def test_a_bad_token_is_an_auth_error_with_shopifys_message(shopify_fake, shopify_cfg):
    conn = ShopifyConnector(shopify_cfg | {"access_token": "shpat_wrong"})
    with pytest.raises(AuthError, match="Invalid API key or access token") as err:
        list(conn.iter_products())
    assert err.value.status == 401


def test_missing_api_credentials_are_a_clear_config_error():
    with pytest.raises(ConfigError, match="access_token"):
        list(ShopifyConnector({"shop": "x.myshopify.com"}).iter_products())


# ----------------------------------------------------------------------------- throttling
def test_http_429_retry_after_is_honoured(shopify_fake, shopify_cfg, sleeps: Sleeps):
    shopify_fake.throttle_next("2.5")
    pages = list(ShopifyConnector(shopify_cfg, sleep=sleeps).iter_products())
    assert sum(len(p) for p, _ in pages) == 7 and sleeps.calls == [2.5]


def test_http_429_retry_after_as_an_http_date(shopify_fake, shopify_cfg, sleeps: Sleeps):
    shopify_fake.throttle_next("Wed, 21 Oct 2015 07:28:10 GMT")
    conn = ShopifyConnector(shopify_cfg, sleep=sleeps, clock=lambda: 1445412480.0)  # 10 s before that date
    list(conn.iter_products())
    assert sleeps.calls == [10.0]


def test_persistent_429_gives_up_with_rate_limited(shopify_fake, shopify_cfg, sleeps: Sleeps):
    shopify_fake.throttle_next("1", times=10)
    with pytest.raises(RateLimited) as err:
        list(ShopifyConnector(shopify_cfg, sleep=sleeps).iter_products())
    assert err.value.retry_after == 1.0 and sleeps.calls == [1.0, 1.0, 1.0]  # max_retries=3


def test_5xx_is_retried_with_backoff(shopify_fake, shopify_cfg, sleeps: Sleeps):
    shopify_fake.inject(503, "upstream unavailable", times=2)
    pages = list(ShopifyConnector(shopify_cfg, sleep=sleeps).iter_products())
    assert len(pages) == 3 and sleeps.calls == [0.5, 1.0]


def test_throttled_graphql_error_waits_for_the_bucket_to_refill(shopify_fake, shopify_cfg, sleeps: Sleeps):
    shopify_fake.throttle_graphql = 1
    shopify_fake.currently_available = 2.0  # the THROTTLED answer asks 202 points with 2 left at 100/s
    pages = list(ShopifyConnector(shopify_cfg, sleep=sleeps, clock=lambda: 1000.0).iter_products())
    assert sum(len(p) for p, _ in pages) == 7
    assert sleeps.calls[0] == pytest.approx(2.0)


def test_a_low_bucket_is_waited_out_before_the_next_page(sleeps: Sleeps):
    with ShopifyFake(generated=250) as fake:
        assert isinstance(fake, ShopifyFake)
        fake.currently_available = 10.0
        fake.restore_rate = 50.0
        conn = ShopifyConnector({"shop": fake.url, "access_token": "shpat_test", "page_size": 100}, sleep=sleeps,
                                clock=lambda: 1000.0)
        pages = list(conn.iter_products())
    assert [len(p) for p, _ in pages] == [100, 100, 50]
    # each page requests 202 points; with 10 available at 50/s the client waits (202 - 10) / 50 s first
    assert sleeps.calls == [pytest.approx(3.84), pytest.approx(3.84)]


# ----------------------------------------------------------------------------- orders
def test_get_order_reads_the_graphql_order(shopify_fake, shopify_cfg):
    shopify_fake.orders["450789469"] = {
        "id": "gid://shopify/Order/450789469", "legacyResourceId": "450789469", "name": "#1001",
        "createdAt": "2026-02-01T10:00:00Z", "email": "Bob@example.com", "currencyCode": "EUR",
        "subtotalPriceSet": {"shopMoney": {"amount": "20.0"}}, "totalPriceSet": {"shopMoney": {"amount": "24.5"}},
        "customer": {"legacyResourceId": "207119551"}, "shippingAddress": {"countryCodeV2": "DE"},
        "lineItems": {"nodes": [{"sku": "TEA-1", "quantity": 2, "variant": {"legacyResourceId": "39072856"},
                                 "product": {"legacyResourceId": "632910392", "productType": "tea"},
                                 "originalUnitPriceSet": {"shopMoney": {"amount": "10.0"}}}]},
    }
    order = ShopifyConnector(shopify_cfg).get_order("450789469")
    assert (order.order_id, order.customer_id, order.currency, order.total, order.ship_country) == (
        "450789469", "207119551", "EUR", Decimal("24.5"), "DE")
    assert order.lines[0].category == "tea" and order.email_sha256 == hashlib.sha256(b"bob@example.com").hexdigest()
    assert shopify_fake.queries[-1]["variables"] == {"id": "gid://shopify/Order/450789469"}


def test_get_order_without_read_orders_is_a_missing_scope(shopify_fake, shopify_cfg):
    shopify_fake.scopes.discard("read_orders")
    with pytest.raises(MissingScopeError, match="read_orders"):
        ShopifyConnector(shopify_cfg).get_order("1")
