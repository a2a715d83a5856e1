"""Salesforce B2C Commerce connector against the local fake SLAS / SCAPI / OCAPI server, plus the Kassa
webhook signature the int_kassa cartridge hook sends."""

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
from kassa.integrations.auth import kassa_signature, verify_kassa_signature
from kassa.integrations.base import AuthError, PayloadError, RateLimited, ReplayError, SignatureError
from kassa.integrations.http import HttpStatusError
from kassa.integrations.sfcc import SfccConnector
from tests.integrations.fakes.sfcc import ORG, SITE, SfccFake, load_fixture, make_catalog, ocapi_order

SECRET = "whsec-sfcc-test"
NOW = 1_735_913_500.0  # 2025-01-03T14:11:40Z


class Clock:
    def __init__(self, t: float = NOW) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture()
def fake() -> Iterator[SfccFake]:
    with SfccFake() as server:
        assert isinstance(server, SfccFake)
        yield server


def connector(fake: SfccFake | None = None, sleeps: Sleeps | None = None, clock: Clock | None = None,
              **cfg: Any) -> SfccConnector:
    options: dict[str, Any] = {"organization_id": ORG, "site_id": SITE, "client_id": "slas-client",
                               "client_secret": "slas-secret", "webhook_secret": SECRET,
                               "replay_window_seconds": 300}
    if fake is not None:
        options["base_url"] = fake.url
        options["ocapi"] = {"base_url": fake.url, "version": "23_2", "client_id": "am-client",
                            "client_secret": "am-secret", "token_url": f"{fake.url}/dwsso/oauth2/access_token"}
    options.update(cfg)
    conn = connector_for("sfcc", options, sleep=sleeps if sleeps is not None else Sleeps(), clock=clock or Clock())
    assert isinstance(conn, SfccConnector)
    return conn


def signed(body: bytes, t: float = NOW, secret: str = SECRET) -> dict[str, str]:
    return {"x-kassa-signature": kassa_signature(secret, body, int(t)), "content-type": "application/json"}


CARTRIDGE_BODY = json.dumps(load_fixture("cartridge_order.json")).encode()


# --------------------------------------------------------------------------- webhook signature
def test_registered_in_connectors() -> None:
    from kassa.integrations.config import CONNECTORS

    assert CONNECTORS["sfcc"] is SfccConnector


def test_verify_accepts_signed_delivery_with_body_hash_id_and_signed_time() -> None:
    delivery = connector().verify(signed(CARTRIDGE_BODY), CARTRIDGE_BODY)
    assert delivery.topic == "order.created"
    assert delivery.delivery_id == "sha256:" + hashlib.sha256(CARTRIDGE_BODY).hexdigest()[:48]
    assert delivery.timestamp == datetime.fromtimestamp(int(NOW), UTC)
    assert connector().is_order_topic(delivery.topic)


def test_verify_takes_the_topic_header_and_ignores_header_case() -> None:
    headers = {k.upper(): v for k, v in signed(CARTRIDGE_BODY).items()} | {"X-Kassa-Topic": "order.updated"}
    delivery = connector().verify(headers, CARTRIDGE_BODY)
    assert delivery.topic == "order.updated" and not connector().is_order_topic(delivery.topic)


def test_verify_refuses_one_byte_change() -> None:
    tampered = CARTRIDGE_BODY.replace(b"58.99", b"08.99")
    assert len(tampered) == len(CARTRIDGE_BODY) and tampered != CARTRIDGE_BODY
    with pytest.raises(SignatureError, match="does not match"):
        connector().verify(signed(CARTRIDGE_BODY), tampered)


def test_verify_refuses_wrong_secret() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        connector().verify(signed(CARTRIDGE_BODY, secret="someone-elses-secret"), CARTRIDGE_BODY)


def test_verify_refuses_a_resigned_timestamp() -> None:
    # The signature covers t: moving t forward to dodge the replay window breaks it.
    header = kassa_signature(SECRET, CARTRIDGE_BODY, int(NOW) - 3600).replace(f"t={int(NOW) - 3600}", f"t={int(NOW)}")
    with pytest.raises(SignatureError):
        connector().verify({"x-kassa-signature": header}, CARTRIDGE_BODY)


@pytest.mark.parametrize("age", [301, -301, 86_400])
def test_verify_refuses_replay_outside_window(age: int) -> None:
    with pytest.raises(ReplayError, match="replay window"):
        connector().verify(signed(CARTRIDGE_BODY, t=NOW - age), CARTRIDGE_BODY)


@pytest.mark.parametrize("header", [None, "", "v1=abc", "t=123", "t=soon,v1=abc", "garbage"])
def test_verify_refuses_missing_or_malformed_signature_header(header: str | None) -> None:
    headers = {} if header is None else {"x-kassa-signature": header}
    with pytest.raises(SignatureError):
        connector().verify(headers, CARTRIDGE_BODY)


def test_verify_accepts_any_matching_v1_during_secret_rotation() -> None:
    old = kassa_signature("old-secret", CARTRIDGE_BODY, int(NOW)).split(",")[1]
    new = kassa_signature(SECRET, CARTRIDGE_BODY, int(NOW))
    assert connector().verify({"x-kassa-signature": f"{new},{old}"}, CARTRIDGE_BODY).topic == "order.created"


def test_verify_without_configured_secret_refuses_everything() -> None:
    with pytest.raises(SignatureError, match="no webhook_secret"):
        connector(webhook_secret=None).verify(signed(CARTRIDGE_BODY), CARTRIDGE_BODY)


def test_signature_is_hex_hmac_sha256_of_timestamp_dot_body() -> None:
    import hmac

    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert kassa_signature("k", b"{}", 1_700_000_000) == f"t=1700000000,v1={expected}"
    assert verify_kassa_signature({"x-kassa-signature": f"t=1700000000,v1={expected.upper()}"}, b"{}", "k", 10,
                                  1_700_000_005.0) == datetime.fromtimestamp(1_700_000_000, UTC)


# --------------------------------------------------------------------------- parsing
def test_parse_order_maps_scapi_order() -> None:
    order = connector().parse_order(load_fixture("order.json"))
    assert (order.platform, order.order_id, order.order_number) == ("sfcc", "00001603", "00001603")
    assert order.customer_id == "00012503"
    assert order.email_sha256 == hashlib.sha256(b"jane.doe@example.com").hexdigest()
    assert order.created_at == datetime(2025, 1, 3, 14, 7, 21, tzinfo=UTC)
    assert (order.currency, order.subtotal, order.total, order.ship_country) == (
        "USD", Decimal("143.48"), Decimal("150.19"), "US")
    assert [(line.sku, line.qty, line.unit_price) for line in order.lines] == [
        ("701644035564M", 1, Decimal("129")), ("701643108633M", 2, Decimal("7.24"))]


def test_parse_order_maps_cartridge_payload_with_category_and_master() -> None:
    order = connector().parse_order(load_fixture("cartridge_order.json"))
    assert order.customer_id is None  # guest: no customerNo
    assert (order.currency, order.ship_country, order.total) == ("GBP", "GB", Decimal("58.99"))
    line = order.lines[0]
    assert (line.sku, line.product_id, line.category, line.qty, line.unit_price) == (
        "701643108633M", "25518823M", "womens-clothing-tops", 3, Decimal("18.0"))


def test_parse_order_maps_ocapi_snake_case_order() -> None:
    ocapi = load_fixture("ocapi_order_search.json")["hits"][0]["data"]
    assert connector().parse_order(ocapi) == connector().parse_order(load_fixture("order.json"))


def test_parse_order_derives_unit_price_from_line_total_without_base_price() -> None:
    order = load_fixture("order.json")
    for item in order["productItems"]:
        del item["basePrice"]
    lines = connector().parse_order(order).lines
    assert [line.unit_price for line in lines] == [Decimal("129.00"), Decimal("7.24")]


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda o: o.pop("orderTotal"), "orderTotal"),
    (lambda o: o.pop("orderNo"), "orderNo"),
    (lambda o: o.pop("creationDate"), "creationDate"),
    (lambda o: o.update(productItems="none"), "productItems"),
    (lambda o: o.update(currency="usd dollars"), "currency"),
    (lambda o: o["productItems"][0].pop("productId"), "productId"),
    # a line total past 1e18 made quantizing the unit price raise InvalidOperation: HTTP 500 on the webhook
    (lambda o: [o["productItems"][0].pop("basePrice"), o["productItems"][0].update(price=1e308)], "below 1e18"),
])
def test_parse_order_rejects_malformed_orders(mutate: Any, message: str) -> None:
    order = load_fixture("order.json")
    mutate(order)
    with pytest.raises(PayloadError, match=message):
        connector().parse_order(order)


@pytest.mark.parametrize("email", [0, 1.5, True, [], {"a": 1}, "  "])
def test_an_email_that_is_no_address_string_is_no_email(email: Any) -> None:
    # `"email": 0` or `[]` in a signed delivery was an AttributeError in email_sha256: HTTP 500
    order = load_fixture("order.json")
    order["customerInfo"]["email"] = email
    assert connector().parse_order(order).email_sha256 is None


def test_parse_product_maps_shopper_product(fake: SfccFake) -> None:
    conn = connector(fake)
    raw = load_fixture("products.json")["data"][0]
    conn._category_path(raw["primaryCategoryId"])
    product = conn.parse_product(raw)
    assert (product.sku, product.product_id, product.title) == ("25592770M", "25592770M", "Classic Pea Coat")
    assert (product.price, product.currency, product.stock) == (Decimal("129"), "USD", 45)
    assert product.category_path == ("Womens", "Clothing", "Jackets & Coats")
    assert product.image_url is not None and "/images/large/" in product.image_url
    assert product.url == "https://zzrf-001.dx.commercecloud.salesforce.com/s/RefArch/classic-pea-coat/25592770M.html"


def test_parse_product_unorderable_is_out_of_stock_and_priceless_is_refused() -> None:
    raw = load_fixture("products.json")["data"][0]
    raw["inventory"]["orderable"] = False
    assert connector().parse_product(raw).stock == 0
    del raw["price"]
    with pytest.raises(PayloadError, match="no price"):
        connector().parse_product(raw)


# --------------------------------------------------------------------------- catalog crawl
def test_iter_products_searches_hydrates_in_batches_of_24_and_resolves_categories(fake: SfccFake) -> None:
    fake.products = make_catalog(130)
    conn = connector(fake, page_size=50)
    pages = list(conn.iter_products())
    assert [len(p) for p, _ in pages] == [50, 50, 30]
    assert [c for _, c in pages] == ["50", "100", None]  # no incremental API: a finished crawl leaves no cursor
    assert [p.sku for page, _ in pages for p in page] == [f"P{i:06d}" for i in range(1, 131)]
    assert pages[0][0][0].category_path == ("Womens", "Clothing", "Jackets & Coats")
    assert pages[0][0][6].stock == 0  # orderable: false
    category_calls = [r for r in fake.requests if "/categories/" in r.path]
    assert len(category_calls) == 1  # cached per category
    get_products = [r for r in fake.requests if r.path.endswith("/products")]
    assert all(len((r.param("ids") or "").split(",")) <= 24 for r in get_products)
    assert fake.token_requests == 1  # one SLAS token for the whole crawl


def test_iter_products_without_category_scope_keeps_category_ids(fake: SfccFake) -> None:
    fake.forbidden.add("categories")
    pages = list(connector(fake).iter_products())
    assert pages[0][0][0].category_path == ("womens-clothing-jackets",)


def test_iter_products_resumes_from_the_offset_cursor(fake: SfccFake) -> None:
    fake.products = make_catalog(130)
    _, cursor = next(connector(fake, page_size=50).iter_products())
    rest = [p.sku for page, _ in connector(fake, page_size=50).iter_products(cursor) for p in page]
    assert rest == [f"P{i:06d}" for i in range(51, 131)]
    with pytest.raises(PayloadError, match="cursor"):
        next(connector(fake).iter_products("next-page"))


def test_iter_products_skips_priceless_products_and_reports_them(fake: SfccFake) -> None:
    fake.products = make_catalog(5)
    del fake.products[2]["price"]
    conn = connector(fake)
    skus = [p.sku for page, _ in conn.iter_products() for p in page]
    assert skus == ["P000001", "P000002", "P000004", "P000005"]
    assert len(conn.skipped) == 1 and conn.skipped[0].startswith("P000003: ")


def test_count_products_hints_the_remaining_crawl(fake: SfccFake) -> None:
    fake.products = make_catalog(130)
    conn = connector(fake)
    assert conn.count_products() == 130 and conn.count_products("100") == 30


def test_catalog_sync_resumes_after_a_kill_and_recrawls_when_finished(fake: SfccFake, tmp_path: Any) -> None:
    from kassa.catalog.store import SqlCatalogStore
    from kassa.db import make_engine
    from kassa.integrations.sync import sync_catalog

    fake.products = make_catalog(60)
    store = SqlCatalogStore(make_engine(tmp_path / "kassa.db"))
    killed = sync_catalog(connector(fake, page_size=25), store, tmp_path, max_pages=1)
    assert (killed.products, killed.complete, killed.cursor) == (25, False, "25")
    resumed = sync_catalog(connector(fake, page_size=25), store, tmp_path)
    assert (resumed.resumed, resumed.products, resumed.complete) == (True, 35, True)
    offers, _ = store.load()
    assert sorted(o.id for o in offers) == [f"P{i:06d}" for i in range(1, 61)]
    assert {o.category for o in offers} == {"Jackets & Coats"}
    again = sync_catalog(connector(fake, page_size=25), store, tmp_path)
    assert (again.resumed, again.products) == (False, 60)  # B2C Commerce syncs are full crawls


def test_get_order_reads_shopper_order(fake: SfccFake) -> None:
    assert connector(fake).get_order("00001603").total == Decimal("150.19")
    with pytest.raises(HttpStatusError, match="Order Not Found"):
        connector(fake).get_order("99999999")


# --------------------------------------------------------------------------- SLAS tokens and HTTP failure modes
def test_revoked_token_is_refreshed_once_on_401(fake: SfccFake) -> None:
    conn = connector(fake)
    conn.get_order("00001603")
    fake.revoke_tokens()
    assert conn.get_order("00001603").order_id == "00001603"
    assert fake.token_requests == 2


def test_expired_token_is_renewed_before_use(fake: SfccFake) -> None:
    clock = Clock()
    conn = connector(fake, clock=clock)
    conn.get_order("00001603")
    clock.t += 1800
    conn.get_order("00001603")
    # Renewed from the clock, before the request, not after a 401.
    assert [r.path.rsplit("/", 1)[-1] for r in fake.requests] == ["token", "00001603", "token", "00001603"]


def test_wrong_client_credentials_are_an_auth_error_with_slas_message(fake: SfccFake) -> None:
    with pytest.raises(AuthError, match="Client credentials are invalid") as err:
        connector(fake, client_secret="wrong").get_order("00001603")
    assert err.value.status == 401


def test_forbidden_api_is_an_auth_error_with_scapi_detail(fake: SfccFake) -> None:
    fake.forbidden.add("orders")
    with pytest.raises(AuthError, match="required permissions") as err:
        connector(fake).get_order("00001603")
    assert err.value.status == 403


def test_429_retry_after_is_honoured_on_api_and_token_endpoint(fake: SfccFake) -> None:
    sleeps = Sleeps()
    fake.inject(429, b'{"title":"Too Many Requests"}', {"Retry-After": "2"}, path_contains="/oauth2/token")
    fake.inject(429, b'{"title":"Too Many Requests"}', {"Retry-After": "5"}, path_contains="/product-search")
    pages = list(connector(fake, sleeps).iter_products())
    assert [p.sku for p in pages[0][0]] == ["25592770M"]
    assert sleeps == [2.0, 5.0]


def test_429_that_never_clears_is_rate_limited(fake: SfccFake) -> None:
    conn = connector(fake, max_retries=1)
    conn._slas_token()
    fake.inject(429, b"{}", {"Retry-After": "1"}, times=10, path_contains="/orders/")
    with pytest.raises(RateLimited):
        conn.get_order("00001603")


def test_malformed_search_page_is_a_payload_error(fake: SfccFake) -> None:
    fake.malformed_next(path_contains="/product-search")
    with pytest.raises(PayloadError, match="malformed page"):
        next(connector(fake).iter_products())
    fake.inject(200, {"hits": []}, path_contains="/product-search")
    with pytest.raises(PayloadError, match="total"):
        next(connector(fake).iter_products())


# --------------------------------------------------------------------------- polling safety net
def test_poll_orders_pages_keyset_and_resumes(fake: SfccFake) -> None:
    fake.ocapi_orders = [ocapi_order(f"{i:08d}", f"2025-01-0{1 + i // 3}T10:00:00.000Z") for i in range(1, 8)]
    pages = list(connector(fake, page_size=2).poll_orders())
    assert [[o.order_id for o in page] for page, _ in pages] == [
        ["00000001", "00000002"], ["00000003", "00000004"], ["00000005", "00000006"], ["00000007"]]
    assert pages[0][1] == "2025-01-01T10:00:00.000Z|00000002"
    resumed = [o.order_id for page, _ in connector(fake, page_size=2).poll_orders(pages[1][1]) for o in page]
    assert resumed == ["00000005", "00000006", "00000007"]
    since = [o.order_id for page, _ in connector(fake).poll_orders(datetime(2025, 1, 3, tzinfo=UTC)) for o in page]
    assert since == ["00000006", "00000007"]


def test_poll_orders_leaves_out_failed_orders_and_steps_past_them(fake: SfccFake) -> None:
    # order search also returns orders whose payment failed (OrderMgr.failOrder): never placed, never will be
    fake.ocapi_orders = [ocapi_order(f"{i:08d}", f"2025-01-0{i}T10:00:00.000Z") for i in range(1, 5)]
    fake.ocapi_orders[1]["status"] = "failed"
    fake.ocapi_orders[3]["status"] = "failed"
    pages = list(connector(fake, page_size=2).poll_orders())
    assert [o.order_id for page, _ in pages for o in page] == ["00000001", "00000003"]
    assert pages[-1][1] == "2025-01-04T10:00:00.000Z|00000004"  # the next poll starts after the failed one


def test_poll_orders_takes_a_created_order_once_a_later_poll_finds_it_placed(fake: SfccFake) -> None:
    # A `created` order (createOrder done, an off-site payment not back yet) was taken as placed: a conversion
    # whether or not the buyer paid. Now it is left out and the cursor is held before it for the next poll.
    fake.ocapi_orders = [ocapi_order(f"{i:08d}", f"2025-01-03T1{i}:00:00.000Z") for i in range(1, 5)]
    fake.ocapi_orders[1]["status"] = "created"
    fake.ocapi_orders[2]["status"] = "open"
    fake.ocapi_orders[3]["status"] = "completed"
    pages = list(connector(fake, page_size=2).poll_orders())
    assert [o.order_id for page, _ in pages for o in page] == ["00000001", "00000003", "00000004"]
    assert {cursor for _, cursor in pages} == {"2025-01-03T11:00:00.000Z|00000001"}  # held before 00000002
    fake.ocapi_orders[1]["status"] = "new"  # placeOrder after the payment came back
    again = list(connector(fake, page_size=2).poll_orders(pages[-1][1]))
    # 00000003 and 00000004 come again: the same event ids, so duplicates when ingested
    assert [o.order_id for page, _ in again for o in page] == ["00000002", "00000003", "00000004"]
    assert again[-1][1] == "2025-01-03T14:00:00.000Z|00000004"


def test_poll_orders_steps_past_a_created_order_older_than_a_day_and_orders_no_longer_placed(fake: SfccFake) -> None:
    # a created order neither placed nor failed within UNPLACED_HOLD_SECONDS must not pin the cursor for good
    fake.ocapi_orders = [ocapi_order(f"{i:08d}", f"2025-01-0{i}T10:00:00.000Z") for i in range(1, 4)]
    fake.ocapi_orders[0]["status"] = "created"  # 2025-01-01, two days before the clock
    fake.ocapi_orders[1]["status"] = "cancelled"
    fake.ocapi_orders[2]["status"] = "replaced"  # an edited order: its replacement is an order of its own
    pages = list(connector(fake).poll_orders())
    assert [o.order_id for page, _ in pages for o in page] == []
    assert pages[-1][1] == "2025-01-03T10:00:00.000Z|00000003"


def test_a_cartridge_delivery_of_an_order_not_placed_yet_is_not_placed() -> None:
    conn = connector()
    cartridge = load_fixture("cartridge_order.json")
    assert conn.is_placed(cartridge)  # no status: posted after placeOrder
    for status, placed in (("created", False), ("failed", False), ("new", True), ("OPEN", True)):
        assert conn.is_placed(cartridge | {"status": status}) is placed, status
        assert conn.is_placed({"order": cartridge | {"status": status}}) is placed, status
    # the log line saying so names the order number (an SFCC order has no `id`)
    assert conn.describe_unplaced({"order": cartridge | {"status": "created"}}) == "order '00001604' (status 'created')"


def test_poll_orders_steps_over_more_same_second_orders_than_a_page(fake: SfccFake) -> None:
    fake.ocapi_orders = [ocapi_order(f"{i:08d}", "2025-01-05T10:00:00.000Z") for i in range(1, 8)]
    ids = [o.order_id for page, _ in connector(fake, page_size=3).poll_orders() for o in page]
    assert ids == [f"{i:08d}" for i in range(1, 8)]


def test_poll_orders_without_ocapi_config_is_a_clear_error() -> None:
    from kassa.integrations.config import ConfigError

    with pytest.raises(ConfigError, match="ocapi"):
        next(connector(None, base_url="http://127.0.0.1:9").poll_orders())


# --------------------------------------------------------------------------- audit
def audit_map(conn: SfccConnector) -> dict[str, tuple[str, str]]:
    return {c.capability: (c.status, c.detail) for c in conn.audit()}


def test_audit_reports_reachable_capabilities(fake: SfccFake) -> None:
    result = audit_map(connector(fake))
    assert result["read_products"] == ("ok", "1 products searchable on site RefArch (refine cgid=root)")
    assert result["read_orders"] == ("ok", "1 orders readable back to 2025-01-03 (OCAPI order_search)")
    assert result["order_webhooks"][0] == "unsupported" and "cartridge" in result["order_webhooks"][1]
    assert result["inventory"] == ("ok", "availability readable (product 25592770M: ats 45)")
    assert result["customer_data"][0] == "unsupported"


def test_audit_reports_missing_permissions_with_platform_text(fake: SfccFake) -> None:
    fake.forbidden |= {"search", "order_search"}
    result = audit_map(connector(fake))
    assert result["read_products"] == (
        "missing_scope",
        "HTTP 403: Forbidden: Your access token is valid, but you don’t have the required permissions to access the "
        "resource.",
    )
    assert result["read_orders"][0] == "missing_scope"
    assert "not allowed for client 'am-client'" in result["read_orders"][1]


def test_audit_without_ocapi_explains_order_access(fake: SfccFake) -> None:
    status, detail = audit_map(connector(fake, ocapi=None))["read_orders"]
    assert status == "missing_scope" and "own shopper's orders" in detail


def test_audit_reports_unreachable_platform() -> None:
    result = audit_map(connector(None, base_url="http://127.0.0.1:9", max_retries=0))
    assert result["read_products"][0] == "unreachable"


# --------------------------------------------------------------------------- end to end through the app
@pytest.fixture()
def sfcc_app(tmp_path: Any, catalog_file: Any) -> Iterator[Any]:
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings
    from tests.conftest import ADMIN, PUB
    from tests.conftest import SECRET as KASSA_SECRET

    settings = load_settings(
        None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog_file), admin_key=ADMIN,
        publishable_key=PUB, secret_key=KASSA_SECRET,
        integrations={"sfcc": {"webhook_secret": SECRET, "replay_window_seconds": 300}},
    )
    kassa = Kassa(settings, seed=7)
    with TestClient(create_app(kassa)) as client:
        yield client, kassa


def test_webhook_endpoint_accepts_stores_and_dedupes_cartridge_delivery(sfcc_app: Any) -> None:
    client, kassa = sfcc_app
    headers = signed(CARTRIDGE_BODY, t=time.time())
    first = client.post("/v1/webhooks/sfcc", content=CARTRIDGE_BODY, headers=headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    events = [e for _, e in kassa.event_log.read()]
    assert [e.event_id for e in events] == ["sfcc:order:00001604"]
    assert events[0].order is not None and events[0].order.currency == "GBP"
    assert events[0].order.items[0].category == "womens-clothing-tops"
    again = client.post("/v1/webhooks/sfcc", content=CARTRIDGE_BODY, headers=signed(CARTRIDGE_BODY, t=time.time()))
    assert again.status_code == 200 and again.json() == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    assert kassa.event_log.count() == 1


def test_webhook_endpoint_refuses_bad_signatures_and_writes_nothing(sfcc_app: Any) -> None:
    client, kassa = sfcc_app
    now = time.time()
    cases = [
        (CARTRIDGE_BODY, signed(CARTRIDGE_BODY, t=now, secret="wrong"), 401),
        (CARTRIDGE_BODY.replace(b"58.99", b"08.99"), signed(CARTRIDGE_BODY, t=now), 401),
        (CARTRIDGE_BODY, {"content-type": "application/json"}, 401),
        (CARTRIDGE_BODY, signed(CARTRIDGE_BODY, t=now - 3600), 409),
    ]
    for body, headers, status in cases:
        response = client.post("/v1/webhooks/sfcc", content=body, headers=headers)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
    assert kassa.event_log.count() == 0
