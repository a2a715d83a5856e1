"""SAP Commerce Cloud connector against the local fake OCC / OAuth / Integration API server, plus the signed
Integration API webhook deliveries of the order-placed event."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from kassa.integrations import connector_for
from kassa.integrations.auth import kassa_signature
from kassa.integrations.base import AuthError, PayloadError, RateLimited, ReplayError, SignatureError
from kassa.integrations.http import HttpStatusError
from kassa.integrations.sap import SapConnector
from tests.integrations.fakes.sap import SITE, SapFake, load_fixture, make_products

SECRET = "whsec-sap-test"
NOW = 1_735_917_010.0  # 2025-01-03T15:10:10Z
CE_TYPE = "sap.cx.commerce.KassaOrder.Created.v1"


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture()
def fake() -> Iterator[SapFake]:
    with SapFake() as server:
        assert isinstance(server, SapFake)
        yield server


def connector(fake: SapFake | None = None, sleeps: Sleeps | None = None, clock: Clock | None = None,
              **cfg: Any) -> SapConnector:
    options: dict[str, Any] = {"base_site_id": SITE, "client_id": "kassa_client", "client_secret": "kassa-secret",
                               "webhook_secret": SECRET, "replay_window_seconds": 300}
    if fake is not None:
        options["base_url"] = fake.url
    options.update(cfg)
    conn = connector_for("sap", options, sleep=sleeps if sleeps is not None else Sleeps(), clock=clock or Clock())
    assert isinstance(conn, SapConnector)
    return conn


WEBHOOK_BODY = json.dumps(load_fixture("webhook_order.json")).encode()


def delivery_headers(body: bytes, t: float = NOW, secret: str = SECRET, ce_type: str = CE_TYPE) -> dict[str, str]:
    # What SAP's webhookservices sends (CloudEvents binary-mode headers) plus the extension's signature.
    return {
        "ce-id": "5f3c7a2e-1b4d-4e6f-8a9b-0c1d2e3f4a5b",
        "ce-type": ce_type,
        "ce-source": "/eu10/sap.cx.commerce/c1a2b3",
        "ce-specversion": "1.0",
        "ce-time": datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "ce-subject": "00002004",
        "content-type": "application/json",
        "x-kassa-signature": kassa_signature(secret, body, int(t)),
    }


# --------------------------------------------------------------------------- webhook verification
def test_registered_in_connectors() -> None:
    from kassa.integrations.config import CONNECTORS

    assert CONNECTORS["sap"] is SapConnector


def test_verify_accepts_signed_delivery_with_cloudevent_type() -> None:
    conn = connector()
    delivery = conn.verify(delivery_headers(WEBHOOK_BODY), WEBHOOK_BODY)
    assert delivery.topic == CE_TYPE and conn.is_order_topic(delivery.topic)
    assert delivery.delivery_id == "sha256:" + hashlib.sha256(WEBHOOK_BODY).hexdigest()[:48]
    assert delivery.timestamp == datetime.fromtimestamp(int(NOW), UTC)


@pytest.mark.parametrize(("topic", "is_order"), [
    ("sap.cx.commerce.KassaOrder.Created.v1", True),
    ("sap.cx.commerce.KassaOrder.Updated.v1", True),
    ("sap.cx.commerce.KassaOrder.Deleted.v1", False),
    ("sap.cx.commerce.OutboundProduct.Created.v1", False),
    ("order.created", True),
])
def test_only_order_object_created_or_updated_events_are_orders(topic: str, is_order: bool) -> None:
    assert connector().is_order_topic(topic) is is_order


def test_verify_refuses_one_byte_change() -> None:
    tampered = WEBHOOK_BODY.replace(b"53.4", b"03.4")
    assert len(tampered) == len(WEBHOOK_BODY) and tampered != WEBHOOK_BODY
    with pytest.raises(SignatureError, match="does not match"):
        connector().verify(delivery_headers(WEBHOOK_BODY), tampered)


def test_verify_refuses_wrong_secret() -> None:
    with pytest.raises(SignatureError):
        connector().verify(delivery_headers(WEBHOOK_BODY, secret="not-the-secret"), WEBHOOK_BODY)


def test_verify_refuses_replay_outside_window() -> None:
    with pytest.raises(ReplayError):
        connector().verify(delivery_headers(WEBHOOK_BODY, t=NOW - 900), WEBHOOK_BODY)


def test_verify_refuses_unsigned_delivery_even_with_cloudevent_headers() -> None:
    headers = delivery_headers(WEBHOOK_BODY)
    del headers["x-kassa-signature"]
    with pytest.raises(SignatureError, match="missing"):
        connector().verify(headers, WEBHOOK_BODY)


# --------------------------------------------------------------------------- parsing
def test_parse_order_maps_occ_order() -> None:
    order = connector().parse_order(load_fixture("order.json"))
    assert (order.platform, order.order_id, order.order_number) == ("sap", "00002003", "00002003")
    assert order.customer_id == "b5c1e3f2-7a9d-4c6e-8b1f-3d2a4e5f6a7b"  # customerId, never the e-mail uid
    assert order.email_sha256 == hashlib.sha256(b"max.mustermann@example.com").hexdigest()
    assert order.created_at == datetime(2025, 1, 3, 14, 7, 21, tzinfo=UTC)
    assert (order.currency, order.subtotal, order.total, order.ship_country) == (
        "EUR", Decimal("122.65"), Decimal("132.64"), "DE")
    assert [(line.sku, line.category, line.qty, line.unit_price) for line in order.lines] == [
        ("1934793", "Digital Compacts", 1, Decimal("99.85")), ("1641905", None, 2, Decimal("11.4"))]


def test_parse_order_maps_integration_object_webhook_payload() -> None:
    order = connector().parse_order(load_fixture("webhook_order.json"))
    assert (order.order_id, order.currency, order.total, order.subtotal) == (
        "00002004", "USD", Decimal("53.4"), Decimal("45.9"))
    assert order.created_at == datetime.fromtimestamp(1735917002, UTC)  # OData /Date(ms)/
    assert order.customer_id is None  # guest
    assert order.email_sha256 == hashlib.sha256(b"guest.buyer@example.com").hexdigest()
    assert [(line.sku, line.category, line.qty) for line in order.lines] == [("2053367", "Camera Flashes", 3)]


def test_parse_order_accepts_odata_envelopes_and_collections() -> None:
    payload = load_fixture("webhook_order.json")
    payload["entries"] = {"results": payload["entries"]}
    assert connector().parse_order({"d": payload}).lines[0].sku == "2053367"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda o: o.pop("totalPrice"), "totalPrice"),
    (lambda o: o.pop("code"), "code"),
    (lambda o: o.pop("created"), "created"),
    (lambda o: o.update(entries="none"), "entries"),
    (lambda o: o["entries"][0].pop("product"), "product code"),
    (lambda o: o.update(created="03/01/2025"), "ISO 8601"),
])
def test_parse_order_rejects_malformed_orders(mutate: Any, message: str) -> None:
    order = load_fixture("order.json")
    mutate(order)
    with pytest.raises(PayloadError, match=message):
        connector().parse_order(order)


@pytest.mark.parametrize("created", ["/Date(253402300800000)/", "/Date(-99999999999999999)/",
                                     "/Date(99999999999999999999)/", "/Date(" + "9" * 5000 + ")/"])
def test_an_odata_date_out_of_range_is_a_payload_error_naming_created(created: str) -> None:
    # was a ValueError (year 10000 is out of range) or an OSError from fromtimestamp: a 500 on the webhook
    order = load_fixture("order.json") | {"created": created}
    with pytest.raises(PayloadError, match="out of range") as refused:
        connector().parse_order(order)
    assert refused.value.field == "created"


def test_parse_product_maps_occ_product(fake: SapFake) -> None:
    product = connector(fake, media_url="https://media.example", storefront_url="https://shop.example").parse_product(
        load_fixture("product.json"))
    assert (product.sku, product.product_id, product.title) == ("1934793", "1934793", "PowerShot A480")
    assert (product.price, product.currency, product.stock) == (Decimal("99.85"), "USD", 500)
    assert product.category_path == ("Digital Compacts",)
    assert product.image_url is not None and product.image_url.startswith("https://media.example/medias/")
    assert "cHJvZHVjdA" in product.image_url  # the PRIMARY "product" format, not zoom or thumbnail
    assert product.url == "https://shop.example/Open-Catalogue/Cameras/Digital-Cameras/Digital-Compacts/PowerShot-A480/p/1934793"


def test_parse_product_without_price_or_purchasable_flag() -> None:
    raw = load_fixture("product.json") | {"purchasable": False}
    assert connector().parse_product(raw).stock == 0
    with pytest.raises(PayloadError, match="no price"):
        connector().parse_product(load_fixture("product.json") | {"price": {"formattedValue": ""}})


# --------------------------------------------------------------------------- catalog crawl
def test_iter_products_full_crawl_then_express_update_increments(fake: SapFake) -> None:
    fake.products = make_products(45)
    clock = Clock()
    pages = list(connector(fake, clock=clock, page_size=20).iter_products())
    assert [len(p) for p, _ in pages] == [20, 20, 5]
    started = "2025-01-03T15:10:10+0000"
    assert [c for _, c in pages] == [f"page:1@{started}", f"page:2@{started}", f"since:{started}"]
    assert [p.sku for page, _ in pages for p in page] == [str(3000000 + i) for i in range(1, 46)]
    # Two products change after the crawl started; one of them twice.
    fake.touch("3000007", "2025-01-03T15:20:00+0000")
    fake.touch("3000009", "2025-01-03T15:21:00+0000")
    fake.touch("3000007", "2025-01-03T15:22:00+0000")
    fake.touch("3000001", "2025-01-03T14:00:00+0000")  # before the crawl: already read
    clock.t = NOW + 3600
    increment = list(connector(fake, clock=clock, page_size=20).iter_products(pages[-1][1]))
    assert [[p.sku for p in page] for page, _ in increment] == [["3000007", "3000009"]]
    assert increment[-1][1] == "since:2025-01-03T16:10:10+0000"


def test_iter_products_resumes_a_full_crawl_and_an_increment(fake: SapFake) -> None:
    fake.products = make_products(45)
    _, cursor = next(connector(fake, page_size=20).iter_products())
    rest = [p.sku for page, _ in connector(fake, page_size=20).iter_products(cursor) for p in page]
    assert rest == [str(3000000 + i) for i in range(21, 46)]
    for i in range(1, 6):
        fake.touch(str(3000000 + i), "2025-01-03T16:00:00+0000")
    first = next(connector(fake, page_size=2).iter_products("since:2025-01-03T15:00:00+0000"))
    assert first[1] == "since:2025-01-03T15:00:00+0000#2"
    resumed = [p.sku for page, _ in connector(fake, page_size=2).iter_products(first[1]) for p in page]
    assert resumed == ["3000003", "3000004", "3000005"]


def test_iter_products_skips_products_deleted_since_they_were_queued(fake: SapFake) -> None:
    fake.touch("9999999", "2025-01-03T16:00:00+0000")
    fake.touch("1934793", "2025-01-03T16:00:00+0000")
    conn = connector(fake)
    skus = [p.sku for page, _ in conn.iter_products("since:2025-01-03T15:00:00+0000") for p in page]
    assert skus == ["1934793"]
    assert conn.skipped and conn.skipped[0].startswith("9999999: ") and "not found" in conn.skipped[0]


def test_count_products_hints_full_crawls_and_increments(fake: SapFake) -> None:
    fake.products = make_products(45)
    conn = connector(fake, page_size=20)
    assert conn.count_products() == 45 and conn.count_products("page:2@2025-01-03T15:10:10+0000") == 5
    fake.touch("3000001", "2025-01-03T16:00:00+0000")
    assert conn.count_products("since:2025-01-03T15:00:00+0000") == 1


def test_catalog_sync_resumes_after_a_kill_then_follows_the_express_feed(fake: SapFake, tmp_path: Any) -> None:
    from kassa.catalog.store import SqlCatalogStore
    from kassa.db import make_engine
    from kassa.integrations.sync import sync_catalog

    fake.products = make_products(45)
    store = SqlCatalogStore(make_engine(tmp_path / "kassa.db"))
    killed = sync_catalog(connector(fake, page_size=20), store, tmp_path, max_pages=1)
    assert (killed.products, killed.complete) == (20, False)
    resumed = sync_catalog(connector(fake, page_size=20), store, tmp_path)
    assert (resumed.resumed, resumed.products, resumed.complete) == (True, 25, True)
    assert resumed.cursor == "since:2025-01-03T15:10:10+0000"
    assert len(store.load()[0]) == 45
    fake.products[9]["price"]["value"] = 1234.5
    fake.touch(fake.products[9]["code"], "2025-01-03T15:30:00+0000")
    later = Clock(NOW + 3600)
    changed = sync_catalog(connector(fake, clock=later, page_size=20), store, tmp_path)
    assert changed.products == 1 and changed.cursor == "since:2025-01-03T16:10:10+0000"
    assert {o.id: o.value for o in store.load()[0]}["3000010"] == 1234.5


def test_iter_products_rejects_unknown_cursor(fake: SapFake) -> None:
    with pytest.raises(PayloadError, match="cursor"):
        next(connector(fake).iter_products("offset=40"))


def test_get_order_by_code_and_by_user(fake: SapFake) -> None:
    conn = connector(fake)
    assert conn.get_order("00002003").total == Decimal("132.64")
    assert conn.get_order("max.mustermann@example.com/00002003").order_id == "00002003"
    with pytest.raises(HttpStatusError, match="UnknownIdentifierError"):
        conn.get_order("someone@example.com/00002003")


# --------------------------------------------------------------------------- tokens and HTTP failure modes
def test_token_is_reused_and_refetched_once_after_a_401(fake: SapFake) -> None:
    conn = connector(fake)
    conn.get_order("00002003")
    conn.get_order("00002003")
    assert fake.token_requests == 1
    fake.revoke_tokens()
    assert conn.get_order("00002003").order_id == "00002003"
    assert fake.token_requests == 2


def test_bad_client_credentials_are_an_auth_error_with_the_oauth_servers_words(fake: SapFake) -> None:
    with pytest.raises(AuthError, match="Bad client credentials"):
        connector(fake, client_secret="nope").get_order("00002003")


def test_access_denied_is_an_auth_error(fake: SapFake) -> None:
    fake.trusted = False
    with pytest.raises(AuthError, match="AccessDeniedError") as err:
        connector(fake).get_order("00002003")
    assert err.value.status == 403


def test_429_retry_after_is_honoured(fake: SapFake) -> None:
    sleeps = Sleeps()
    fake.throttle_next(retry_after="4", times=1)  # lands on the token request
    fake.inject(429, b'{"errors":[{"type":"TooManyRequests"}]}', {"Retry-After": "7"}, path_contains="/search")
    pages = list(connector(fake, sleeps).iter_products())
    assert [p.sku for p in pages[0][0]] == ["1934793"]
    assert sleeps == [4.0, 7.0]


def test_429_that_never_clears_is_rate_limited(fake: SapFake) -> None:
    conn = connector(fake, max_retries=1)
    conn._bearer()
    fake.inject(429, b"{}", {"Retry-After": "1"}, times=10, path_contains="/orders/")
    with pytest.raises(RateLimited):
        conn.get_order("00002003")


def test_malformed_page_is_a_payload_error(fake: SapFake) -> None:
    fake.malformed_next(path_contains="/products/search")
    with pytest.raises(PayloadError, match="malformed page"):
        next(connector(fake).iter_products())
    fake.inject(200, {"products": []}, path_contains="/products/search")
    with pytest.raises(PayloadError, match="totalPages"):
        next(connector(fake).iter_products())


# --------------------------------------------------------------------------- audit
def audit_map(conn: SapConnector) -> dict[str, tuple[str, str]]:
    return {c.capability: (c.status, c.detail) for c in conn.audit()}


def test_audit_with_trusted_client_and_integration_admin(fake: SapFake) -> None:
    result = audit_map(connector(fake, integration_api={"user": "kassa-admin", "password": "admin-pass"}))
    assert {k: v[0] for k, v in result.items()} == {
        "read_products": "ok", "read_orders": "ok", "order_webhooks": "ok", "inventory": "ok", "customer_data": "ok"}
    assert result["read_products"][1] == "1 products searchable on electronics"
    assert result["order_webhooks"][1] == (
        "webhook on KassaOrder (ItemCreatedEvent) posts to https://kassa.example.com/v1/webhooks/sap")
    assert result["inventory"][1] == "stock readable (product 1934793: 500)"


def test_audit_reports_missing_roles_and_missing_webhook(fake: SapFake) -> None:
    fake.trusted = False
    fake.webhook_configs = []
    result = audit_map(connector(fake, integration_api={"user": "kassa-admin", "password": "admin-pass"}))
    assert result["read_products"][0] == "ok"
    assert result["read_orders"] == ("missing_scope", "HTTP 403: AccessDeniedError: Access is denied")
    assert result["customer_data"][0] == "missing_scope"
    assert result["order_webhooks"][0] == "missing_scope" and "0 configurations" in result["order_webhooks"][1]


def test_audit_without_integration_api_credentials_explains_what_to_set(fake: SapFake) -> None:
    status, detail = audit_map(connector(fake))["order_webhooks"]
    assert status == "missing_scope" and "integration_api" in detail


def test_audit_reports_unreachable_and_refused_credentials(fake: SapFake) -> None:
    assert audit_map(connector(None, base_url="http://127.0.0.1:9", max_retries=0))["read_products"][0] == \
        "unreachable"
    refused = audit_map(connector(fake, client_secret="nope"))
    assert refused["read_products"] == ("missing_scope", "HTTP 401: invalid_client: Bad client credentials")


# --------------------------------------------------------------------------- end to end through the app
@pytest.fixture()
def sap_app(tmp_path: Any, catalog_file: Any) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings
    from tests.conftest import ADMIN, PUB
    from tests.conftest import SECRET as KASSA_SECRET

    settings = load_settings(
        None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog_file), admin_key=ADMIN,
        publishable_key=PUB, secret_key=KASSA_SECRET,
        integrations={"sap": {"webhook_secret": SECRET, "replay_window_seconds": 300}},
    )
    kassa = Kassa(settings, seed=7)
    with TestClient(create_app(kassa)) as client:
        yield client, kassa


def test_webhook_endpoint_accepts_stores_and_dedupes_order_placed(sap_app: Any) -> None:
    client, kassa = sap_app
    first = client.post("/v1/webhooks/sap", content=WEBHOOK_BODY, headers=delivery_headers(WEBHOOK_BODY, time.time()))
    assert first.status_code == 200, first.text
    assert first.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    events = [e for _, e in kassa.event_log.read()]
    assert [e.event_id for e in events] == ["sap:order:00002004"]
    assert events[0].order is not None and events[0].order.total == pytest.approx(53.4)
    assert events[0].customer is not None and events[0].customer.id is None  # guest: e-mail hash only
    again = client.post("/v1/webhooks/sap", content=WEBHOOK_BODY, headers=delivery_headers(WEBHOOK_BODY, time.time()))
    assert again.status_code == 200 and again.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    updated = delivery_headers(WEBHOOK_BODY, time.time(), ce_type="sap.cx.commerce.KassaOrder.Updated.v1")
    assert client.post("/v1/webhooks/sap", content=WEBHOOK_BODY, headers=updated).json()["duplicates"] == 1
    deleted = delivery_headers(WEBHOOK_BODY, time.time(), ce_type="sap.cx.commerce.KassaOrder.Deleted.v1")
    assert client.post("/v1/webhooks/sap", content=WEBHOOK_BODY, headers=deleted).json().get("ignored") == 1
    assert kassa.event_log.count() == 1


def test_webhook_endpoint_refuses_bad_signatures_and_writes_nothing(sap_app: Any) -> None:
    client, kassa = sap_app
    now = time.time()
    cases = [
        (WEBHOOK_BODY, delivery_headers(WEBHOOK_BODY, now, secret="wrong"), 401),
        (WEBHOOK_BODY.replace(b"53.4", b"03.4"), delivery_headers(WEBHOOK_BODY, now), 401),
        (WEBHOOK_BODY, {k: v for k, v in delivery_headers(WEBHOOK_BODY, now).items() if k != "x-kassa-signature"},
         401),
        (WEBHOOK_BODY, delivery_headers(WEBHOOK_BODY, now - 3600), 409),
    ]
    for body, headers, status in cases:
        response = client.post("/v1/webhooks/sap", content=body, headers=headers)
        assert response.status_code == status, response.text
    assert kassa.event_log.count() == 0


def test_an_order_saved_as_cancelled_becomes_a_refund_of_the_whole_order_once(sap_app: Any) -> None:
    # An ItemSavedEvent webhook (ce-type …Updated…) of the order with the integration object's `status`.
    client, kassa = sap_app
    updated = "sap.cx.commerce.KassaOrder.Updated.v1"
    client.post("/v1/webhooks/sap", content=WEBHOOK_BODY, headers=delivery_headers(WEBHOOK_BODY, time.time()))
    cancelled = json.dumps(load_fixture("webhook_order.json") | {"status": {"code": "CANCELLED"}}).encode()
    first = client.post("/v1/webhooks/sap", content=cancelled,
                        headers=delivery_headers(cancelled, time.time(), ce_type=updated))
    assert first.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0, "unmatched_refunds": 1}
    again = client.post("/v1/webhooks/sap", content=cancelled,
                        headers=delivery_headers(cancelled, time.time(), ce_type=updated))
    assert again.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    completed = json.dumps(load_fixture("webhook_order.json") | {"status": {"code": "COMPLETED"}}).encode()
    assert client.post("/v1/webhooks/sap", content=completed,
                       headers=delivery_headers(completed, time.time(), ce_type=updated)).json()["duplicates"] == 1
    placed, refund = [e for _, e in kassa.event_log.read()]
    assert placed.type == "order" and (refund.type, refund.event_id) == ("refund", "sap:cancel:00002004")
    assert refund.order is not None and refund.order.items == []
    forged = delivery_headers(cancelled, time.time(), secret="wrong", ce_type=updated)
    assert client.post("/v1/webhooks/sap", content=cancelled, headers=forged).status_code == 401
