"""Adobe Commerce / Magento 2 connector against the local fake REST API and RSA-signed I/O Events."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kassa.integrations import connector_for
from kassa.integrations.base import AuthError, PayloadError, RateLimited, ReplayError, SignatureError
from kassa.integrations.magento import MagentoConnector, oauth_base_string, oauth_header
from tests.integrations.fakes.magento import MagentoFake, load_fixture, make_products

KEY1_PATH = "/prod/keys/pub-key-1a2b3c.pem"
KEY2_PATH = "/prod/keys/pub-key-4d5e6f.pem"
CLIENT_ID = "4b2d8e1f0c9a47b3a5e6d7c8b9a0f1e2"
EVENT_TIME = datetime(2025, 1, 3, 14, 7, 23, 512000, tzinfo=UTC).timestamp()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    # 1024-bit keys keep key generation fast; verification code is size-agnostic.
    return {
        KEY1_PATH: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        KEY2_PATH: rsa.generate_private_key(public_exponent=65537, key_size=1024),
        "attacker": rsa.generate_private_key(public_exponent=65537, key_size=1024),
    }


class KeyHost:
    """The injected stand-in for static.adobeioevents.com: path -> PEM, counting fetches."""

    def __init__(self, keys: dict[str, rsa.RSAPrivateKey]) -> None:
        self.keys = keys
        self.fetched: list[str] = []

    def __call__(self, path: str) -> str:
        self.fetched.append(path)
        return self.keys[path].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def sign(key: rsa.RSAPrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()


def adobe_headers(keys: dict[str, rsa.RSAPrivateKey], body: bytes, signer1: str = KEY1_PATH,
                  signer2: str = KEY2_PATH) -> dict[str, str]:
    return {
        "x-adobe-digital-signature-1": sign(keys[signer1], body),
        "x-adobe-digital-signature-2": sign(keys[signer2], body),
        "x-adobe-public-key1-path": KEY1_PATH,
        "x-adobe-public-key2-path": KEY2_PATH,
    }


@pytest.fixture()
def fake() -> Iterator[MagentoFake]:
    with MagentoFake() as server:
        assert isinstance(server, MagentoFake)
        yield server


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture()
def sleeps() -> Sleeps:
    return Sleeps()


def connector(fake: MagentoFake | None = None, sleeps: Sleeps | None = None, **cfg: Any) -> MagentoConnector:
    options: dict[str, Any] = {"access_token": "integration-token", "adobe_client_id": CLIENT_ID,
                               "replay_window_seconds": 300}
    if fake is not None:
        options["base_url"] = fake.url
    options.update(cfg)
    conn = connector_for("magento", options, sleep=sleeps if sleeps is not None else Sleeps(),
                         clock=lambda: EVENT_TIME + 5)
    assert isinstance(conn, MagentoConnector)
    return conn


def event_body(**changes: Any) -> bytes:
    event = load_fixture("order_event.json")
    event.update(changes)
    return json.dumps(event).encode()


# --------------------------------------------------------------------------- parsing
def test_registered_in_connectors() -> None:
    from kassa.integrations.config import CONNECTORS

    assert CONNECTORS["magento"] is MagentoConnector


def test_parse_order_maps_rest_order_and_skips_configurable_child_lines() -> None:
    order = connector().parse_order(load_fixture("order.json"))
    assert order.platform == "magento"
    assert (order.order_id, order.order_number) == ("3", "000000003")
    assert order.customer_id == "1"
    assert order.email_sha256 == hashlib.sha256(b"roni_cost@example.com").hexdigest()
    assert order.created_at == datetime(2025, 1, 3, 14, 7, 21, tzinfo=UTC)
    assert (order.currency, order.subtotal, order.total) == ("USD", Decimal("99"), Decimal("113.6"))
    assert order.ship_country == "CA"  # shipping assignment, not the billing address
    assert [(line.sku, line.product_id, line.qty, line.unit_price) for line in order.lines] == [
        ("24-MB01", "1", 2, Decimal("34")),
        ("WJ12-S-Blue", "1236", 1, Decimal("31")),
    ]


def test_parse_order_unwraps_io_events_cloudevent() -> None:
    order = connector().parse_order(load_fixture("order_event.json"))
    assert (order.order_id, order.order_number, order.currency) == ("4", "000000004", "EUR")
    assert order.customer_id is None  # guest checkout
    assert order.ship_country == "AT"
    assert order.lines[0].qty == 3 and order.lines[0].unit_price == Decimal("15.0000")
    assert order.total == Decimal("52.5000")


@pytest.mark.parametrize(("is_guest", "customer_id"), [("0", "12"), (0, "12"), (False, "12"), ("1", None), (1, None)])
def test_an_io_events_order_of_a_registered_customer_keeps_its_customer_id(is_guest: Any, customer_id: Any) -> None:
    # I/O Events payloads carry the order model's data as strings: "0" is a registered customer, not a guest
    event = load_fixture("order_event.json")
    event["data"]["value"] |= {"customer_is_guest": is_guest, "customer_id": "12"}
    assert connector().parse_order(event).customer_id == customer_id


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda o: o.pop("grand_total"), "grand_total"),
    (lambda o: o.pop("created_at"), "created_at"),
    (lambda o: o.update(items={"sku": "x"}), "items"),
    (lambda o: o.update(order_currency_code="dollars"), "currency"),
    (lambda o: o["items"][0].pop("sku"), "sku"),
    (lambda o: o.update(created_at="yesterday"), "ISO 8601"),
    (lambda o: (o.pop("entity_id"), o.pop("increment_id")), "entity_id"),
])
def test_parse_order_rejects_malformed_orders_with_clear_errors(mutate: Any, message: str) -> None:
    order = load_fixture("order.json")
    mutate(order)
    with pytest.raises(PayloadError, match=message):
        connector().parse_order(order)


def test_parse_order_rejects_cloudevent_without_order_value() -> None:
    event = load_fixture("order_event.json")
    event["data"] = {"value": "not an order"}
    with pytest.raises(PayloadError, match=r"data\.value"):
        connector().parse_order(event)


def test_parse_product_resolves_category_names_image_url_and_stock(fake: MagentoFake) -> None:
    conn = connector(fake)
    conn.load_categories()
    product = conn.parse_product(load_fixture("product.json"))
    assert (product.sku, product.product_id, product.title) == ("24-MB01", "1", "Joust Duffle Bag")
    assert (product.price, product.currency, product.stock) == (Decimal("34"), "USD", 100)
    assert product.category_path == ("Gear", "Bags")  # deepest of its categories, store root dropped
    assert product.image_url == f"{fake.url}/media/catalog/product/m/b/mb01-blue-0.jpg"
    assert product.url == f"{fake.url}/joust-duffle-bag.html"
    assert product.updated_at == datetime(2025, 1, 3, 10, 15, tzinfo=UTC)
    assert product.to_offer().category == "Bags"


def test_parse_product_marks_disabled_and_out_of_stock_products_unavailable() -> None:
    disabled = load_fixture("product.json") | {"status": 2}
    assert connector().parse_product(disabled).stock == 0
    sold_out = load_fixture("product.json")
    sold_out["extension_attributes"]["stock_item"]["is_in_stock"] = False
    assert connector().parse_product(sold_out).stock == 0


def test_parse_product_without_sku_is_a_payload_error() -> None:
    product = load_fixture("product.json")
    del product["sku"]
    with pytest.raises(PayloadError, match="sku"):
        connector().parse_product(product)


# --------------------------------------------------------------------------- webhook verification
def verifier(keys: dict[str, rsa.RSAPrivateKey], **cfg: Any) -> tuple[MagentoConnector, KeyHost]:
    host = KeyHost(keys)
    options: dict[str, Any] = {"adobe_client_id": CLIENT_ID, "replay_window_seconds": 300, **cfg}
    conn = connector_for("magento", options, fetch_public_key=host, clock=lambda: EVENT_TIME + 5)
    assert isinstance(conn, MagentoConnector)
    return conn, host


def test_verify_accepts_signed_event_and_returns_cloudevent_identity(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    conn, host = verifier(keys)
    body = event_body()
    delivery = conn.verify(adobe_headers(keys, body), body)
    assert delivery.delivery_id == "0c5a3d2e-6f1b-4a8d-9e2c-7b1f0a9d8c73"
    assert delivery.topic == "com.adobe.commerce.observer.sales_order_place_after"
    assert delivery.timestamp == datetime(2025, 1, 3, 14, 7, 23, 512000, tzinfo=UTC)
    assert delivery.body == body
    conn.verify(adobe_headers(keys, body), body)
    assert host.fetched == [KEY1_PATH]  # first signature verified; its key was fetched once and cached


def test_verify_accepts_when_only_the_second_signature_verifies(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    conn, host = verifier(keys)
    body = event_body()
    headers = adobe_headers(keys, body, signer1="attacker")
    assert conn.verify(headers, body).delivery_id is not None
    assert host.fetched == [KEY1_PATH, KEY2_PATH]


def test_verify_refuses_one_byte_change(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    conn, _ = verifier(keys)
    body = event_body()
    headers = adobe_headers(keys, body)
    tampered = body.replace(b'"52.5000"', b'"02.5000"')
    assert len(tampered) == len(body) and tampered != body
    with pytest.raises(SignatureError, match="does not verify"):
        conn.verify(headers, tampered)


def test_verify_refuses_signatures_from_a_key_adobe_did_not_publish(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    conn, _ = verifier(keys)
    body = event_body()
    with pytest.raises(SignatureError):
        conn.verify(adobe_headers(keys, body, signer1="attacker", signer2="attacker"), body)


@pytest.mark.parametrize("drop", [
    ["x-adobe-digital-signature-1", "x-adobe-digital-signature-2"],
    ["x-adobe-public-key1-path", "x-adobe-public-key2-path"],
])
def test_verify_refuses_missing_signature_headers(keys: dict[str, rsa.RSAPrivateKey], drop: list[str]) -> None:
    conn, _ = verifier(keys)
    body = event_body()
    headers = {k: v for k, v in adobe_headers(keys, body).items() if k not in drop}
    with pytest.raises(SignatureError, match="missing"):
        conn.verify(headers, body)


@pytest.mark.parametrize("path", ["https://evil.example/key.pem", "/prod/../../etc/key.pem", "/prod/keys/key.txt"])
def test_verify_never_fetches_a_key_path_that_is_not_an_adobe_key_file(keys: dict[str, rsa.RSAPrivateKey],
                                                                       path: str) -> None:
    conn, host = verifier(keys)
    body = event_body()
    headers = adobe_headers(keys, body) | {"x-adobe-public-key1-path": path, "x-adobe-public-key2-path": path}
    with pytest.raises(SignatureError, match="refusing"):
        conn.verify(headers, body)
    assert host.fetched == []


def test_verify_refuses_replay_outside_window(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    conn, _ = verifier(keys)
    body = event_body(time="2025-01-03T13:00:00Z")  # signed by Adobe, but an hour old
    with pytest.raises(ReplayError, match="replay window"):
        conn.verify(adobe_headers(keys, body), body)


def test_verify_refuses_event_addressed_to_another_client(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    conn, _ = verifier(keys)
    body = event_body(recipient_client_id="someone-else")
    with pytest.raises(SignatureError, match="addressed"):
        conn.verify(adobe_headers(keys, body), body)


def test_verify_header_lookup_is_case_insensitive(keys: dict[str, rsa.RSAPrivateKey]) -> None:
    conn, _ = verifier(keys)
    body = event_body()
    headers = {k.upper(): v for k, v in adobe_headers(keys, body).items()}
    assert conn.verify(headers, body).topic.endswith("sales_order_place_after")


# --------------------------------------------------------------------------- catalog paging
def test_iter_products_pages_the_whole_catalog_once_with_category_paths(fake: MagentoFake) -> None:
    fake.products = make_products(250)
    pages = list(connector(fake, page_size=100).iter_products())
    assert [len(p) for p, _ in pages] == [100, 100, 50]
    skus = [prod.sku for page, _ in pages for prod in page]
    assert skus == [f"SKU-{i:06d}" for i in range(1, 251)]
    assert [prod.category_path for prod in pages[0][0][:2]] == [("Gear", "Bags"), ("Gear", "Fitness Equipment")]
    assert pages[-1][1] == f"{fake.products[-1]['updated_at']}|250"


def test_iter_products_without_category_acl_keeps_category_ids(fake: MagentoFake) -> None:
    fake.resources.discard("Magento_Catalog::categories")
    pages = list(connector(fake).iter_products())
    assert pages[0][0][0].category_path == ("3",)  # ids; the first of equally deep ones


def test_iter_products_resumes_after_the_cursor_of_a_page(fake: MagentoFake) -> None:
    fake.products = make_products(250)
    first_page, cursor = next(connector(fake, page_size=100).iter_products())
    rest = [prod.sku for page, _ in connector(fake, page_size=100).iter_products(cursor) for prod in page]
    assert len(first_page) == 100
    assert rest == [f"SKU-{i:06d}" for i in range(101, 251)]


def test_iter_products_is_incremental_and_loses_nothing_edited_mid_crawl(fake: MagentoFake) -> None:
    fake.products = make_products(30)
    conn = connector(fake, page_size=10)
    crawl = conn.iter_products()
    first, _ = next(crawl)
    # Product 25 (not yet read) and product 3 (already read) are edited while the crawl runs.
    for p in fake.products:
        if p["id"] in (3, 25):
            p["updated_at"] = "2025-06-01 00:00:00"
    rest = [prod.sku for page, _ in crawl for prod in page]
    seen = [prod.sku for prod in first] + rest
    assert set(seen) == {f"SKU-{i:06d}" for i in range(1, 31)}
    assert seen[-2:] == ["SKU-000003", "SKU-000025"]  # edited ones come last, in (updated_at, id) order
    _, last_cursor = list(connector(fake, page_size=10).iter_products())[-1]
    assert list(connector(fake, page_size=10).iter_products(last_cursor)) == []  # nothing newer: no pages
    fake.products[0]["updated_at"] = "2025-07-01 00:00:00"
    again = [prod.sku for page, _ in connector(fake, page_size=10).iter_products(last_cursor) for prod in page]
    assert again == ["SKU-000001"]


def test_iter_products_pages_through_many_products_sharing_one_updated_at(fake: MagentoFake) -> None:
    fake.products = make_products(40)
    for p in fake.products:
        p["updated_at"] = "2025-02-02 02:02:02"  # a bulk import stamps them all alike
    skus = [prod.sku for page, _ in connector(fake, page_size=7).iter_products() for prod in page]
    assert skus == [f"SKU-{i:06d}" for i in range(1, 41)]


def test_an_unmappable_product_is_skipped_and_reported_not_a_stuck_sync(fake: MagentoFake, tmp_path: Any) -> None:
    from kassa.catalog.store import SqlCatalogStore
    from kassa.db import make_engine
    from kassa.integrations.sync import sync_catalog

    fake.products = make_products(10)
    fake.products[3]["price"] = 2_500_000_000  # past Kassa's 1e9 money bound (an IDR or VND store)
    result = sync_catalog(connector(fake, page_size=3), SqlCatalogStore(make_engine(tmp_path / "kassa.db")),
                          tmp_path)
    assert (result.complete, result.products, result.skipped) == (True, 9, 1)
    assert "SKU-000004" in result.skipped_examples[0] and "1e9" in result.skipped_examples[0]


def test_iter_products_rejects_a_cursor_it_did_not_write(fake: MagentoFake) -> None:
    with pytest.raises(PayloadError, match="cursor"):
        next(connector(fake).iter_products("page-2"))


def test_count_products_hints_the_remaining_crawl(fake: MagentoFake) -> None:
    fake.products = make_products(30)
    conn = connector(fake, page_size=10)
    assert conn.count_products() == 30
    _, cursor = next(conn.iter_products())
    assert conn.count_products(cursor) == 20


def test_catalog_sync_resumes_after_a_kill_then_fetches_only_changes(fake: MagentoFake, tmp_path: Any) -> None:
    from kassa.catalog.store import SqlCatalogStore
    from kassa.db import make_engine
    from kassa.integrations.sync import sync_catalog

    fake.products = make_products(45)
    store = SqlCatalogStore(make_engine(tmp_path / "kassa.db"))
    killed = sync_catalog(connector(fake, page_size=20), store, tmp_path, max_pages=1)
    assert (killed.products, killed.complete) == (20, False)
    resumed = sync_catalog(connector(fake, page_size=20), store, tmp_path)
    assert (resumed.resumed, resumed.products, resumed.complete) == (True, 25, True)
    offers, _ = store.load()
    assert len(offers) == 45 and {o.category for o in offers} == {"Bags", "Fitness Equipment"}
    fake.products[4]["updated_at"] = "2025-09-09 09:09:09"
    fake.products[4]["price"] = 999
    changed = sync_catalog(connector(fake, page_size=20), store, tmp_path)
    assert changed.products == 1
    assert {o.id: o.value for o in store.load()[0]}["SKU-000005"] == 999


def test_iter_orders_stops_on_total_count_when_magento_repeats_the_last_page(fake: MagentoFake) -> None:
    template = load_fixture("order.json")
    fake.orders = [template | {"entity_id": i, "increment_id": f"{i:09d}", "created_at": f"2025-01-{i:02d} 10:00:00"}
                   for i in range(1, 24)]
    pages = list(connector(fake, page_size=10).iter_orders())
    assert [len(p) for p, _ in pages] == [10, 10, 3]
    ids = [o.order_id for page, _ in pages for o in page]
    assert ids == [str(i) for i in range(1, 24)]
    since = datetime(2025, 1, 20, tzinfo=UTC)
    assert [o.order_id for page, _ in connector(fake, page_size=10).iter_orders(since) for o in page] == [
        "20", "21", "22", "23"]


def test_get_order_by_entity_id_and_by_increment_id(fake: MagentoFake) -> None:
    conn = connector(fake)
    assert conn.get_order("3").order_number == "000000003"
    assert conn.get_order("#000000003").order_id == "3"
    with pytest.raises(PayloadError, match="no Magento order"):
        conn.get_order("#999")


# --------------------------------------------------------------------------- HTTP failure modes
def test_auth_failure_carries_magentos_message(fake: MagentoFake) -> None:
    with pytest.raises(AuthError, match="isn't authorized") as err:
        next(connector(fake, access_token="revoked").iter_products())
    assert err.value.status == 401


def test_429_retry_after_is_honoured_through_the_shared_client(fake: MagentoFake, sleeps: Sleeps) -> None:
    fake.throttle_next(retry_after="3", times=2)
    pages = list(connector(fake, sleeps).iter_products())
    assert [p.sku for p in pages[0][0]] == ["24-MB01"]
    assert sleeps == [3.0, 3.0]


def test_429_that_never_clears_is_rate_limited(fake: MagentoFake, sleeps: Sleeps) -> None:
    fake.throttle_next(retry_after="1", times=50)
    with pytest.raises(RateLimited):
        connector(fake, sleeps, max_retries=2).get_order("3")


def test_malformed_page_is_a_payload_error(fake: MagentoFake) -> None:
    fake.malformed_next(path_contains="/V1/products")
    with pytest.raises(PayloadError, match="malformed page"):
        next(connector(fake).iter_products())


def test_page_without_total_count_is_a_payload_error(fake: MagentoFake) -> None:
    fake.inject(200, {"items": []}, path_contains="/V1/products")
    with pytest.raises(PayloadError, match="total_count"):
        next(connector(fake).iter_products())


# --------------------------------------------------------------------------- OAuth 1.0a
def test_oauth_base_string_matches_rfc5849_example() -> None:
    # RFC 5849 §3.4.1.1: query and form-body parameters plus the oauth_* protocol parameters.
    base = oauth_base_string(
        "POST",
        "http://example.com/request?b5=%3D%253D&a3=a&c%40=&a2=r%20b",
        [("c2", ""), ("a3", "2 q"), ("oauth_consumer_key", "9djdj82h48djs9d2"), ("oauth_token", "kkk9d7dh3k39sjv7"),
         ("oauth_signature_method", "HMAC-SHA1"), ("oauth_timestamp", "137131201"), ("oauth_nonce", "7d8f3e4a"),
         ("realm", "Example"), ("oauth_signature", "ignored")],
    )
    assert base == (
        "POST&http%3A%2F%2Fexample.com%2Frequest&a2%3Dr%2520b%26a3%3D2%2520q%26a3%3Da%26b5%3D%253D%25253D%26"
        "c%2540%3D%26c2%3D%26oauth_consumer_key%3D9djdj82h48djs9d2%26oauth_nonce%3D7d8f3e4a%26"
        "oauth_signature_method%3DHMAC-SHA1%26oauth_timestamp%3D137131201%26oauth_token%3Dkkk9d7dh3k39sjv7"
    )


def test_oauth_header_is_deterministic_for_fixed_nonce_and_time() -> None:
    args = ("GET", "https://shop.example/rest/V1/products", {"searchCriteria[pageSize]": 1}, "ck", "cs", "at", "ats")
    one = oauth_header(*args, nonce="n1", timestamp=1700000000)
    assert one == oauth_header(*args, nonce="n1", timestamp=1700000000)
    assert one != oauth_header(*args, nonce="n2", timestamp=1700000000)
    assert 'oauth_signature_method="HMAC-SHA256"' in one


OAUTH = {"consumer_key": "ck-1", "consumer_secret": "cs-1", "access_token": "at-1", "access_token_secret": "ats-1"}


def test_oauth_signed_requests_are_accepted_by_the_fake(fake: MagentoFake) -> None:
    fake.oauth = OAUTH
    fake.products = make_products(12)
    conn = connector(fake, access_token=None, oauth=OAUTH, page_size=5)
    assert len([p for page, _ in conn.iter_products() for p in page]) == 12


def test_oauth_request_is_resigned_when_magento_reports_a_reused_nonce(fake: MagentoFake, sleeps: Sleeps) -> None:
    # A request retried after a 5xx that Magento had already logged comes back "nonce already used".
    fake.oauth = OAUTH
    fake.inject(401, {"message": "The nonce is already being used by the consumer with ID %1", "parameters": ["1"]})
    conn = connector(fake, sleeps, access_token=None, oauth=OAUTH)
    assert conn.get_order("3").order_id == "3"
    nonces = [r.headers["authorization"].split('oauth_nonce="')[1].split('"')[0] for r in fake.requests]
    assert len(nonces) == 2 and nonces[0] != nonces[1]


def test_oauth_with_wrong_secret_is_refused(fake: MagentoFake) -> None:
    fake.oauth = OAUTH
    conn = connector(fake, access_token=None, oauth=OAUTH | {"consumer_secret": "wrong"})
    with pytest.raises(AuthError, match="signature is invalid"):
        conn.get_order("3")


# --------------------------------------------------------------------------- audit
def audit_map(conn: MagentoConnector) -> dict[str, tuple[str, str]]:
    return {c.capability: (c.status, c.detail) for c in conn.audit()}


def test_audit_with_full_acl_reports_every_capability_ok(fake: MagentoFake) -> None:
    result = audit_map(connector(fake))
    assert {k: v[0] for k, v in result.items()} == {
        "read_products": "ok", "read_orders": "ok", "order_webhooks": "ok", "inventory": "ok", "customer_data": "ok"}
    assert result["read_orders"][1] == "1 orders readable back to 2025-01-03"
    assert "sales_order_place_after is subscribed" in result["order_webhooks"][1]


def test_audit_reports_missing_acl_with_magentos_own_text(fake: MagentoFake) -> None:
    fake.resources -= {"Magento_Sales::sales", "Magento_Customer::customer"}
    result = audit_map(connector(fake))
    assert result["read_products"][0] == "ok"
    assert result["read_orders"] == (
        "missing_scope",
        "HTTP 401: The consumer isn't authorized to access Magento_Sales::sales. (grant Magento_Sales::sales)",
    )
    assert result["customer_data"][0] == "missing_scope"


def test_audit_reports_io_events_missing_or_not_subscribed(fake: MagentoFake) -> None:
    fake.subscriptions = [s for s in fake.subscriptions or [] if s["name"] != "observer.sales_order_place_after"]
    status, detail = audit_map(connector(fake))["order_webhooks"]
    assert status == "missing_scope" and "events:subscribe observer.sales_order_place_after" in detail
    fake.subscriptions = None  # module not installed: no route
    status, detail = audit_map(connector(fake))["order_webhooks"]
    assert status == "unsupported" and "not installed" in detail and "Request does not match any route" in detail


def test_audit_warns_without_the_credit_memo_subscription(fake: MagentoFake) -> None:
    # Only the order subscription was looked for: a store without the credit-memo one read as all set, though
    # its refunded orders then stay conversions.
    status, detail = audit_map(connector(fake))["order_webhooks"]
    assert status == "ok" and "observer.sales_order_place_after is subscribed" in detail
    assert "warning: observer.sales_order_creditmemo_save_after is not subscribed" in detail
    assert "refunded order is not taken back" in detail
    assert "events:subscribe observer.sales_order_creditmemo_save_after" in detail
    fake.subscriptions = [*(fake.subscriptions or []), {"name": "observer.sales_order_creditmemo_save_after",
                                                        "fields": [{"name": "*"}]}]
    status, detail = audit_map(connector(fake))["order_webhooks"]
    assert status == "ok" and "warning: observer.sales_order_creditmemo_save_after" not in detail
    assert "observer.sales_order_creditmemo_save_after is subscribed" in detail


def test_audit_warns_without_the_order_save_subscription(fake: MagentoFake) -> None:
    # sales_order_place_after brings an order paid off-site as pending_payment (not counted): only a later
    # sales_order_save_after brings it paid, so a store without that subscription never sees those counted.
    status, detail = audit_map(connector(fake))["order_webhooks"]
    assert status == "ok" and "warning: observer.sales_order_save_after is not subscribed" in detail
    assert "pending_payment" in detail and "events:subscribe observer.sales_order_save_after" in detail
    fake.subscriptions = [*(fake.subscriptions or []),
                          *({"name": name, "fields": [{"name": "*"}]} for name in (
                              "observer.sales_order_save_after", "observer.sales_order_creditmemo_save_after"))]
    status, detail = audit_map(connector(fake))["order_webhooks"]
    assert status == "ok" and "warning" not in detail
    assert "observer.sales_order_save_after is subscribed" in detail


def test_audit_reports_unreachable_store() -> None:
    conn = connector(None, base_url="http://127.0.0.1:9", max_retries=0)
    result = audit_map(conn)
    assert {status for status, _ in result.values()} == {"unreachable"}
    assert "unreachable" in result["read_products"][1]


# --------------------------------------------------------------------------- end to end through the app
def _pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture()
def magento_app(tmp_path: Any, catalog_file: Any, keys: dict[str, rsa.RSAPrivateKey]) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings
    from tests.conftest import ADMIN, PUB, SECRET
    from tests.integrations.fakes.magento import AdobeKeyHostFake

    with AdobeKeyHostFake({KEY1_PATH: _pem(keys[KEY1_PATH]), KEY2_PATH: _pem(keys[KEY2_PATH])}) as key_host:
        settings = load_settings(
            None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog_file), admin_key=ADMIN,
            publishable_key=PUB, secret_key=SECRET,
            integrations={"magento": {
                # No shared secret: Adobe signs with its RSA keys, and the client id enables the endpoint.
                "adobe_client_id": CLIENT_ID,
                "adobe_key_host": key_host.url, "replay_window_seconds": 300,
            }},
        )
        kassa = Kassa(settings, seed=7)
        with TestClient(create_app(kassa)) as client:
            yield client, kassa, key_host


def _live_event(**changes: Any) -> bytes:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return event_body(time=now, **changes)


def test_webhook_endpoint_accepts_stores_and_dedupes_signed_order_event(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    client, kassa, key_host = magento_app
    body = _live_event()
    headers = adobe_headers(keys, body) | {"content-type": "application/json"}
    first = client.post("/v1/webhooks/magento", content=body, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    stored = [e for _, e in kassa.event_log.read()]
    assert [e.event_id for e in stored] == ["magento:order:000000004"]
    assert stored[0].order is not None and stored[0].order.platform == "magento"
    assert stored[0].order.items[0].sku == "24-WG085" and stored[0].order.ship_country == "AT"
    replay = client.post("/v1/webhooks/magento", content=body, headers=headers)
    assert replay.status_code == 200 and replay.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    assert kassa.event_log.count() == 1
    # both keys the delivery names fetched once each from the (fake) Adobe host, off the event loop
    assert sorted(r.path for r in key_host.requests) == [KEY1_PATH, KEY2_PATH]


def test_the_first_public_key_fetch_does_not_hold_up_other_requests(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    # The fetch was a blocking httpx.get inside the async handler: every request of the server waited for it.
    client, _, key_host = magento_app
    key_host.delay = 0.3
    body = _live_event()
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        webhook = pool.submit(client.post, "/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
        time.sleep(0.1)  # the webhook is waiting for its keys (0.3 s each)
        assert client.get("/healthz").status_code == 200
        health_done = time.perf_counter() - started
        assert webhook.result().json()["accepted"] == 1
    assert health_done < 0.45, f"/healthz waited {health_done:.2f} s for the key fetch"
    assert sorted(r.path for r in key_host.requests) == [KEY1_PATH, KEY2_PATH]


def test_a_public_key_adobe_does_not_serve_is_refused_without_a_fetch_per_delivery(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    client, kassa, key_host = magento_app
    key_host.keys.clear()  # both paths answer 404
    body = _live_event()
    for _ in range(3):
        response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
        assert response.status_code == 401 and "could not fetch public key" in response.json()["detail"]
    assert sorted(r.path for r in key_host.requests) == [KEY1_PATH, KEY2_PATH]  # tried again after a minute
    assert kassa.event_log.count() == 0


def test_webhook_endpoint_refuses_bad_signature_and_writes_nothing(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    client, kassa, _ = magento_app
    body = _live_event()
    headers = adobe_headers(keys, body, signer1="attacker", signer2="attacker")
    response = client.post("/v1/webhooks/magento", content=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    tampered = body.replace(b"24-WG085", b"24-WG086")
    assert client.post("/v1/webhooks/magento", content=tampered, headers=adobe_headers(keys, body)).status_code == 401
    assert client.post("/v1/webhooks/magento", content=body).status_code == 401  # no headers at all
    stale = event_body(time="2025-01-03T14:07:23Z")
    assert client.post("/v1/webhooks/magento", content=stale, headers=adobe_headers(keys, stale)).status_code == 409
    assert kassa.event_log.count() == 0


def test_a_batch_delivery_is_refused_saying_to_choose_single_webhook_delivery(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    client, kassa, _ = magento_app
    body = b"[" + _live_event() + b"]"  # the registration's Batch delivery style
    response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
    assert response.status_code == 422 and "delivery to Webhook" in response.json()["detail"]
    assert kassa.event_log.count() == 0


def test_a_signed_body_nested_too_deeply_is_400_not_a_500(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    # json.loads raised RecursionError from the verifier: a 500 with a traceback for a signed delivery
    client, kassa, _ = magento_app
    for body in (b'{"data": ' * 5000 + b"1" + b"}" * 5000, b'{"data": ' + b"[" * 5000 + b"]" * 5000 + b"}"):
        response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
        assert response.status_code == 400 and response.json()["detail"] == "webhook body is nested too deeply", \
            response.text
    assert kassa.event_log.count() == 0


def test_a_signed_body_that_is_not_json_is_400_as_on_every_platform(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    client, kassa, _ = magento_app
    for body in (b'{"type": "com.adobe', b"\xff\xfe"):
        response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
        assert response.status_code == 400 and "not JSON" in response.json()["detail"], response.text
    assert kassa.event_log.count() == 0


def test_webhook_endpoint_answers_adobes_url_challenge_and_writes_nothing(magento_app: Any) -> None:
    client, kassa, _ = magento_app
    ok = client.get("/v1/webhooks/magento", params={"challenge": "f4c3-91"})
    assert ok.status_code == 200 and ok.json() == {"challenge": "f4c3-91"}
    missing = client.get("/v1/webhooks/magento")
    assert missing.status_code == 400 and missing.json()["field"] == "challenge"
    assert client.get("/v1/webhooks/shopify", params={"challenge": "x"}).status_code == 404  # POST-only platform
    assert client.get("/v1/webhooks/nope", params={"challenge": "x"}).status_code == 404
    assert kassa.event_log.count() == 0


def test_magento_webhooks_stay_off_without_a_client_id(tmp_path: Any, catalog_file: Any) -> None:
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings

    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog_file))
    with TestClient(create_app(Kassa(settings))) as client:
        r = client.post("/v1/webhooks/magento", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 404 and "ADOBE_CLIENT_ID" in r.json()["detail"]


def test_an_order_placed_unpaid_counts_once_a_later_save_brings_it_paid(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey], caplog: pytest.LogCaptureFixture) -> None:
    # sales_order_place_after fires for a redirect payment method's order in state pending_payment (the buyer
    # may never pay); it was stored as a placed order and a conversion. The save that moves it on counts it.
    client, kassa, _ = magento_app
    order = load_fixture("order_event.json")["data"]["value"]
    ignored = {"accepted": 0, "duplicates": 0, "ignored": 1}

    def deliver(event_type: str, state: str, event_id: str) -> dict[str, Any]:
        body = _live_event(type=f"com.adobe.commerce.observer.{event_type}", id=event_id,
                           data={"value": order | {"state": state, "status": state}})
        response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
        assert response.status_code == 200, response.text
        return dict(response.json())

    with caplog.at_level(logging.WARNING, logger="kassa.integrations.webhooks"):
        assert deliver("sales_order_place_after", "pending_payment", "e-1") == ignored
        assert deliver("sales_order_save_after", "payment_review", "e-2") == ignored
    # once, naming the order inside the CloudEvent (not the event's id) and where the subscriptions are said
    [line] = [r.getMessage() for r in caplog.records if r.name == "kassa.integrations.webhooks"]
    assert "magento order '4' (state 'pending_payment') is not placed yet" in line
    assert "docs/integrations/magento.md" in line
    assert kassa.event_log.count() == 0
    assert deliver("sales_order_save_after", "processing", "e-3") == {
        "accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    # every later save of the placed order (invoice, shipment, complete) is the same order again
    assert deliver("sales_order_save_after", "complete", "e-4") == {
        "accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    assert [e.event_id for _, e in kassa.event_log.read()] == ["magento:order:000000004"]
    # an unpaid order Magento cancels (Pending Payment Order Lifetime) is never counted; its cancellation is
    # stored like any other, of an order that converted nothing
    order["entity_id"], order["increment_id"] = 5, "000000005"
    assert deliver("sales_order_place_after", "pending_payment", "e-5") == ignored
    assert deliver("sales_order_save_after", "canceled", "e-6") == {
        "accepted": 1, "duplicates": 0, "unknown_decisions": 0, "unmatched_refunds": 1}
    assert [e.event_id for _, e in kassa.event_log.read()] == ["magento:order:000000004", "magento:cancel:5"]


def test_an_order_placed_without_its_entity_id_and_saved_with_it_counts_once(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    # Adobe's events reference lists no order `entity_id` in `observer.sales_order_save_after`'s payload, only
    # `increment_id`, and Magento dispatches sales_order_place_after before the order is first saved: an order
    # paid at checkout came as `magento:order:000000004` (placed) and `magento:order:4` (its invoice's save),
    # two orders and two conversions. Both carry the increment id: the event is named by it.
    client, kassa, _ = magento_app
    order = load_fixture("order_event.json")["data"]["value"] | {"state": "processing", "status": "processing"}
    placed = {k: v for k, v in order.items() if k != "entity_id"}

    def deliver(event_type: str, value: dict[str, Any], event_id: str) -> dict[str, Any]:
        body = _live_event(type=f"com.adobe.commerce.observer.{event_type}", id=event_id, data={"value": value})
        response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
        assert response.status_code == 200, response.text
        return dict(response.json())

    assert deliver("sales_order_place_after", placed, "e-1")["accepted"] == 1
    assert deliver("sales_order_save_after", order, "e-2") == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    assert [e.event_id for _, e in kassa.event_log.read()] == ["magento:order:000000004"]


def test_an_order_saved_canceled_takes_its_conversion_back_like_a_credit_memo(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    # A counted order the merchant cancels arrives as another sales_order_save_after, state `canceled`: it was
    # acknowledged and ignored (not placed), and the cancelled order stayed a conversion.
    client, kassa, _ = magento_app
    order = load_fixture("order_event.json")["data"]["value"]

    def deliver(event_type: str, state: str, event_id: str) -> dict[str, Any]:
        body = _live_event(type=f"com.adobe.commerce.observer.{event_type}", id=event_id,
                           data={"value": order | {"state": state, "status": state,
                                                   "updated_at": "2025-01-05 10:00:00"}})
        response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
        assert response.status_code == 200, response.text
        return dict(response.json())

    assert deliver("sales_order_place_after", "processing", "e-1")["accepted"] == 1
    cancelled = {"accepted": 1, "duplicates": 0, "unknown_decisions": 0, "unmatched_refunds": 1}  # no decision
    assert deliver("sales_order_save_after", "canceled", "e-2") == cancelled
    # every later save of the cancelled order (a comment) is the same cancellation
    assert deliver("sales_order_save_after", "canceled", "e-3") == {"accepted": 0, "duplicates": 1,
                                                                   "unknown_decisions": 0}
    placed, cancel = [e for _, e in kassa.event_log.read()]
    assert (cancel.type, cancel.event_id) == ("refund", "magento:cancel:4")
    assert cancel.order is not None and placed.order is not None
    assert cancel.order.id == placed.order.id and cancel.order.items == []  # the whole order it converted


def test_an_order_placed_with_an_offline_payment_counts_when_placed() -> None:
    # state new (bank transfer, check: awaiting payment) is placed, as WooCommerce's on-hold
    conn = connector()
    value = load_fixture("order_event.json")["data"]["value"]
    for state, placed in (("new", True), ("processing", True), ("holded", True), ("pending_payment", False),
                          ("payment_review", False), ("canceled", False)):
        assert conn.is_placed({"data": {"value": value | {"state": state}}}) is placed, state
    assert conn.is_placed(load_fixture("order_event.json"))  # no state in the payload: taken as placed
    assert conn.is_placed(load_fixture("order.json"))  # a REST order (iter_orders, get_order)


def test_a_signed_credit_memo_becomes_a_refund_of_its_refunded_lines_and_a_forged_one_is_refused(
        magento_app: Any, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    # A credit memo lists every line of the order (not refunded: qty 0) and a configurable product twice (the
    # priced parent line and its child at 0, the same SKU): only the priced lines with a quantity are refunded.
    client, kassa, _ = magento_app
    memo = {"entity_id": 21, "increment_id": "000000021", "order_id": 4, "created_at": "2025-01-04 09:00:00",
            "items": [{"sku": "24-WG085", "product_id": 7, "qty": "2.0000", "price": "15.0000"},
                      {"sku": "24-MB01", "product_id": 1, "qty": "0.0000", "price": "34.0000"},
                      {"sku": "WJ12-S-Blue", "product_id": 1236, "qty": "1.0000", "price": "31.0000"},
                      {"sku": "WJ12-S-Blue", "product_id": 1220, "qty": "1.0000", "price": "0.0000"}]}
    body = _live_event(type="com.adobe.commerce.observer.sales_order_creditmemo_save_after",
                       data={"value": memo}, id="memo-21")
    response = client.post("/v1/webhooks/magento", content=body, headers=adobe_headers(keys, body))
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0, "unmatched_refunds": 1}
    [event] = [e for _, e in kassa.event_log.read()]
    assert (event.type, event.event_id) == ("refund", "magento:refund:21")
    assert event.order is not None and event.order.id == "4"
    assert [(i.sku, i.product_id, i.qty, i.price) for i in event.order.items] == [
        ("24-WG085", "7", 2, 15.0), ("WJ12-S-Blue", "1236", 1, 31.0)]
    adjustment = _live_event(type="com.adobe.commerce.observer.sales_order_creditmemo_save_after",
                             data={"value": memo | {"entity_id": 22, "items": []}}, id="memo-22")
    assert client.post("/v1/webhooks/magento", content=adjustment,
                       headers=adobe_headers(keys, adjustment)).json() == {"accepted": 0, "duplicates": 0, "ignored": 1}
    forged = adobe_headers(keys, body, signer1="attacker", signer2="attacker")
    assert client.post("/v1/webhooks/magento", content=body, headers=forged).status_code == 401
    assert kassa.event_log.count() == 1
