"""WooCommerce connector: ``order.created`` / ``order.updated`` webhooks and the ``/wp-json/wc/v3`` REST API.

Owns everything WooCommerce-specific:

- Webhooks: ``X-WC-Webhook-Signature`` is the base64 HMAC-SHA256 of the raw body keyed with the
  webhook's secret; topic in ``X-WC-Webhook-Topic``; delivery id in ``X-WC-Webhook-Delivery-ID``. No
  signed timestamp, so replays are stopped by deduplication. ``order.created`` fires before an order is
  placed (the Checkout block's ``checkout-draft`` when a buyer opens the checkout; ``pending`` until an
  off-site payment returns; ``failed``), so only ``processing``, ``on-hold`` and ``completed`` orders count,
  and ``order.updated`` is an order topic too: the update that places the order brings it (once: the
  event id is the order id). An ``order.updated`` to ``cancelled`` or ``refunded`` (a full refund; a
  partial one leaves the status, and the order body lists no refunded lines) takes the whole order back, once
  (event ``woocommerce:cancel:{id}``). The unsigned ``webhook_id=<n>`` ping
  WooCommerce sends when a webhook is saved is acknowledged (it carries no data).
- REST API: consumer key/secret as HTTP Basic auth (WooCommerce accepts that only over HTTPS; hosts that
  strip the ``Authorization`` header can use ``query_string_auth: true``), ``page``/``per_page`` paging
  with ``X-WP-TotalPages``, ``modified_after`` for incremental catalog runs.
- Audit: a probe per capability; WooCommerce keys have read/write permissions rather than scopes, and
  its own error codes (``woocommerce_rest_cannot_view``) tell a missing permission from bad credentials.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from datetime import timedelta
from decimal import Decimal
from typing import Any, Unpack
from urllib.parse import urlsplit

import httpx

from kassa.integrations.auth import verify_body_hmac
from kassa.integrations.base import (
    AuditCheck,
    AuthError,
    IntegrationError,
    Order,
    OrderLine,
    PayloadError,
    Product,
    Refund,
    WebhookDelivery,
    clip_id,
    country_code,
    currency_code,
    email_sha256,
    int_quantity,
    malformed,
    object_payload,
    parse_time,
    required_id,
    required_list,
    to_decimal,
)
from kassa.integrations.config import ConfigError, register
from kassa.integrations.connector import ConnectorOptions, HttpConnector, decode_cursor, encode_cursor, newest_update
from kassa.integrations.http import HttpClient, HttpStatusError

API_PREFIX = "/wp-json/wc/v3"
_PING = re.compile(rb"^webhook_id=\d+$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
PLACED_STATUSES = frozenset({"processing", "on-hold", "completed"})
TAKEN_BACK_STATUSES = frozenset({"cancelled", "refunded"})  # refunded: in full (a partial refund keeps the status)

SNIPPET_STEPS = [
    "Add a small plugin (or a snippet in your theme's functions.php) hooked on `woocommerce_thankyou` "
    "(it receives the order id): load the order with wc_get_order($order_id).",
    "Print Kassa's snippet script with your publishable key and the order context: order id, currency, total, "
    "line items (SKU, product id, category, qty, price) and shipping country.",
    "The snippet POSTs to `/v1/decisions`, renders the offers on the Order received page and sends "
    "impression/accept events to `/v1/events`; allow your shop's origin on the publishable key.",
]
WEBHOOK_STEPS = [
    "Give Kassa the webhook secret you will use: KASSA_INTEGRATIONS__WOOCOMMERCE__WEBHOOK_SECRET=<secret>.",
    "WooCommerce > Settings > Advanced > Webhooks > Add webhook: topic `Order created`, delivery URL "
    "https://<kassa-host>/v1/webhooks/woocommerce, API version WP REST API Integration v3, and that secret; "
    "then a second one, the same but topic `Order updated` (an order unpaid when created is placed by an update).",
]


@register("woocommerce")
class WooCommerceConnector(HttpConnector):
    """WooCommerce REST client and webhook verifier.

    cfg keys: ``url`` (the store's base URL), ``consumer_key``, ``consumer_secret``, ``per_page`` (≤ 100),
    ``currency`` (skips the store-currency lookup), ``query_string_auth``, ``webhook_secret``,
    ``timeout``, ``max_retries``, ``allow_insecure_http`` (plain HTTP to a non-local host; WooCommerce
    itself refuses Basic auth there, so only for proxies that terminate TLS).
    """

    platform = "woocommerce"
    order_topics = frozenset({"order.created", "order.updated"})
    refund_topics = frozenset({"order.updated"})  # to `cancelled` or `refunded`
    snippet_steps = SNIPPET_STEPS
    webhook_steps = WEBHOOK_STEPS

    def __init__(self, cfg: Mapping[str, Any], **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(cfg, **options)
        self.per_page = self._page_size(100, 100, "per_page")
        try:
            self._currency: str | None = currency_code(self.cfg["currency"]) if self.cfg.get("currency") else None
        except PayloadError as exc:
            raise ConfigError(f"woocommerce.currency: {exc}") from None
        self._query_auth: dict[str, str] = {}

    # ------------------------------------------------------------------ HTTP plumbing
    def _open_http(self) -> HttpClient:
        url = str(self.cfg.get("url") or "")
        key, secret = self.cfg.get("consumer_key"), self.cfg.get("consumer_secret")
        if not url:
            raise ConfigError("woocommerce: set `url` (https://your-store.example) in the integration config")
        if not key or not secret:
            raise ConfigError("woocommerce: set `consumer_key` and `consumer_secret` (WooCommerce > Settings > "
                              "Advanced > REST API) in the integration config")
        parts = urlsplit(url)
        if parts.scheme != "https" and parts.hostname not in _LOOPBACK and not self.cfg.get("allow_insecure_http"):
            raise ConfigError(f"woocommerce: {url} is not HTTPS; WooCommerce accepts consumer keys over Basic "
                              "auth only on HTTPS")
        self._query_auth = {"consumer_key": str(key), "consumer_secret": str(secret)} \
            if self.cfg.get("query_string_auth") else {}
        return self._new_http(url.rstrip("/") + API_PREFIX,
                              auth=None if self._query_auth else (str(key), str(secret)))

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> tuple[Any, httpx.Headers]:
        http = self.http
        response = http.get(path, {**(params or {}), **self._query_auth})
        return response.data, response.headers

    @property
    def currency(self) -> str:
        """The store currency (products carry none): ``currency`` from the config, else asked once."""
        if self._currency is None:
            data, _ = self._get("/data/currencies/current")
            self._currency = currency_code(data.get("code") if isinstance(data, dict) else None, field="currency")
        return self._currency

    # ------------------------------------------------------------------ webhooks
    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookDelivery:
        signature = headers.get("x-wc-webhook-signature")
        if not signature and _PING.match(raw_body.strip()):
            # Sent unsigned when a webhook is saved; it holds nothing and is never written.
            return WebhookDelivery(None, "ping", None, raw_body)
        verify_body_hmac(headers, raw_body, self.secret, "X-WC-Webhook-Signature", self.platform)
        return WebhookDelivery(headers.get("x-wc-webhook-delivery-id") or None,
                               headers.get("x-wc-webhook-topic", ""), None, raw_body)

    def is_placed(self, payload: Mapping[str, Any]) -> bool:
        """A placed order: ``processing`` (paid), ``on-hold`` (awaiting a bank transfer) or ``completed``. A
        draft, pending, failed or cancelled order is not (one without a status is taken as placed)."""
        status = payload.get("status")
        return status is None or (isinstance(status, str) and status in PLACED_STATUSES)

    def parse_refund(self, topic: str, payload: dict[str, Any]) -> Refund | None:
        """An ``order.updated`` to ``cancelled`` or ``refunded``: the whole order (None for any other status,
        which is then read as an order)."""
        if payload.get("status") not in TAKEN_BACK_STATUSES:
            return None
        with malformed("WooCommerce order"):
            changed = payload.get("date_modified_gmt") or payload.get("date_modified")
            return Refund("woocommerce", required_id(payload, "id", "woocommerce order"), None,
                          parse_time(changed, "date_modified_gmt"))

    # ------------------------------------------------------------------ parsing
    def parse_order(self, payload: dict[str, Any]) -> Order:
        """An order from an ``order.created`` / ``order.updated`` webhook body (as ``GET /orders/{id}``)."""
        payload = object_payload(payload, "a WooCommerce order")
        with malformed("WooCommerce order"):
            order_id = required_id(payload, "id", "woocommerce order")
            raw_lines = required_list(payload, "line_items", "woocommerce order")
            parsed = [self._parse_line(item, i) for i, item in enumerate(raw_lines)]
            lines = tuple(line for line, _ in parsed)
            subtotal = sum((line_subtotal for _, line_subtotal in parsed), Decimal(0))
            billing = payload.get("billing") if isinstance(payload.get("billing"), dict) else {}
            shipping = payload.get("shipping") if isinstance(payload.get("shipping"), dict) else {}
            assert isinstance(billing, dict) and isinstance(shipping, dict)
            customer = payload.get("customer_id")
            # Guests have customer_id 0.
            customer_id = clip_id(customer) if customer not in (None, 0, "0", "") else None
            created = payload.get("date_created_gmt") or payload.get("date_created")
            number = payload.get("number")
            return Order(
                platform="woocommerce",
                order_id=order_id,
                order_number=str(number) if number not in (None, "") else None,
                customer_id=customer_id,
                email_sha256=email_sha256(billing.get("email") if isinstance(billing.get("email"), str) else None),
                created_at=parse_time(created, "date_created_gmt"),
                currency=currency_code(payload.get("currency"), field="currency"),
                subtotal=subtotal,
                total=to_decimal(payload.get("total"), "total"),
                ship_country=country_code(shipping.get("country")) or country_code(billing.get("country")),
                lines=lines,
            )

    @staticmethod
    def _parse_line(item: Any, i: int) -> tuple[OrderLine, Decimal]:
        where = f"line_items[{i}]"
        if not isinstance(item, dict):
            raise PayloadError(f"{where} must be an object", where)
        product_id = clip_id(item.get("product_id")) if item.get("product_id") not in (None, 0) else None
        variation = item.get("variation_id")
        sku = clip_id(item.get("sku")) or (clip_id(variation) if variation not in (None, 0) else None) or product_id
        if sku is None:
            raise PayloadError(f"{where} has no sku or product_id", f"{where}.sku")
        quantity = int_quantity(item.get("quantity", 1), f"{where}.quantity")
        subtotal = to_decimal(item.get("subtotal", "0") or "0", f"{where}.subtotal")
        price = item.get("price")
        unit = to_decimal(price, f"{where}.price") if price not in (None, "") else (
            (subtotal / quantity) if quantity else Decimal(0))
        return OrderLine(sku=sku, product_id=product_id, category=None, qty=quantity,
                         unit_price=unit.quantize(Decimal("0.0001")).normalize()), subtotal

    def parse_product(self, payload: dict[str, Any]) -> Product:
        """A product from ``GET /products`` (variable products: the parent, priced at its lowest variation)."""
        payload = object_payload(payload, "a WooCommerce product")
        with malformed("WooCommerce product", KeyError):
            product_id = required_id(payload, "id", "woocommerce product")
            sku = clip_id(payload.get("sku")) or product_id
            categories = payload.get("categories") or []
            path = tuple(str(c["name"]) for c in categories[:1] if isinstance(c, dict) and c.get("name"))
            images = payload.get("images") or []
            image = images[0].get("src") if images and isinstance(images[0], dict) else None
            if payload.get("manage_stock") and payload.get("stock_quantity") is not None:
                stock: int | None = int(payload["stock_quantity"])
            elif payload.get("stock_status") == "outofstock":
                stock = 0
            else:
                stock = None
            raw_price = payload.get("price")
            if raw_price in (None, ""):
                raw_price = payload.get("regular_price") or "0"
            modified = payload.get("date_modified_gmt") or payload.get("date_modified")
            return Product(
                sku=sku,
                product_id=product_id,
                title=str(payload.get("name") or sku),
                price=to_decimal(raw_price, "price"),
                currency=self.currency,
                category_path=path,
                stock=stock,
                image_url=image if isinstance(image, str) else None,
                url=payload.get("permalink") or None,
                updated_at=parse_time(modified, "date_modified_gmt") if modified else None,
                active=payload.get("status", "publish") == "publish",
            )

    # ------------------------------------------------------------------ catalog
    def iter_products(self, cursor: str | None = None) -> Iterator[tuple[list[Product], str | None]]:
        """Products by id, ``per_page`` at a time; the cursor is ``{"page", "since", "high"}`` as JSON.

        Ordering by id keeps pages stable while the run goes on (new products land on later pages). At the
        end the cursor becomes ``{"since": newest date_modified_gmt}``; the next run asks for
        ``modified_after`` one second before it, so a product saved in that same second is not missed.
        """
        state = decode_cursor(cursor, self.platform)
        page = int(state.get("page") or 1)
        since, high = state.get("since"), state.get("high") or state.get("since")
        params: dict[str, Any] = {"per_page": self.per_page, "orderby": "id", "order": "asc"}
        if since:
            start = parse_time(since) - timedelta(seconds=1)
            params.update(modified_after=start.strftime("%Y-%m-%dT%H:%M:%S"), dates_are_gmt="true")
        while True:
            data, headers = self._get("/products", {**params, "page": page})
            if not isinstance(data, list):
                raise PayloadError(f"woocommerce products page {page} is not a JSON list")
            try:
                total_pages = int(headers.get("x-wp-totalpages") or 0)
            except ValueError:
                raise PayloadError(f"woocommerce X-WP-TotalPages is not a number: "
                                   f"{headers.get('x-wp-totalpages')!r}") from None
            if headers.get("x-wp-total", "").isdigit():
                self.total_hint = int(headers["x-wp-total"])
            products = self._parse_products(data)
            high = newest_update(products, high)
            last = not data or page >= total_pages
            next_cursor: str | None
            if last:
                next_cursor = encode_cursor({"since": high}) if high else None
            else:
                next_cursor = encode_cursor({"page": page + 1, "since": since, "high": high})
            yield products, next_cursor
            if last:
                return
            page += 1

    # ------------------------------------------------------------------ orders
    def get_order(self, order_id: str) -> Order:
        try:
            data, _ = self._get(f"/orders/{order_id}")
        except HttpStatusError as exc:
            if exc.status == 404:
                raise IntegrationError(f"woocommerce: order {order_id} not found: {exc.body[:200]}") from None
            raise
        return self.parse_order(data)

    # ------------------------------------------------------------------ audit
    def audit(self) -> list[AuditCheck]:
        checks: list[AuditCheck] = []
        sample: list[Any] = []
        try:
            sample, _ = self._get("/products", {"per_page": 20})
            checks.append(AuditCheck("read_products", "ok", f"products readable ({len(sample)} sampled)"))
        except Exception as exc:
            checks.append(_failed("read_products", exc))
        try:
            oldest, headers = self._get("/orders", {"per_page": 1, "orderby": "date", "order": "asc"})
            if oldest and isinstance(oldest[0], dict):
                first = oldest[0].get("date_created_gmt") or oldest[0].get("date_created")
                detail = f"orders readable back to {str(first)[:10]} ({headers.get('x-wp-total', '?')} in all)"
            else:
                detail = "orders readable (none placed yet)"
            checks.append(AuditCheck("read_orders", "ok", detail))
        except Exception as exc:
            checks.append(_failed("read_orders", exc))
        try:
            hooks, _ = self._get("/webhooks", {"per_page": 100})
            found = []
            for topic in sorted(self.order_topics):  # order.created, and order.updated for orders paid later
                ours = [h for h in hooks if isinstance(h, dict) and h.get("topic") == topic]
                active = [h for h in ours if h.get("status") == "active"]
                if active:
                    found.append(f"{topic} delivered to " + ", ".join(str(h.get("delivery_url")) for h in active))
                elif ours:
                    found.append(f"{topic} webhook exists but is {ours[0].get('status')} (re-activate it)")
                else:
                    found.append(f"no {topic} webhook yet (see the webhook steps)")
            checks.append(AuditCheck("order_webhooks", "ok", "; ".join(found)))
        except Exception as exc:
            checks.append(_failed("order_webhooks", exc))
        if checks[0].status == "ok":
            managed = sum(1 for p in sample if isinstance(p, dict) and p.get("manage_stock"))
            checks.append(AuditCheck("inventory", "ok", f"stock readable on products ({managed} of {len(sample)} "
                                                        "sampled manage stock)"))
        else:
            checks.append(AuditCheck("inventory", checks[0].status, checks[0].detail))
        try:
            self._get("/customers", {"per_page": 1})
            checks.append(AuditCheck("customer_data", "ok", "customer records readable; Kassa stores only the "
                                                            "billing e-mail SHA-256"))
        except Exception as exc:
            checks.append(_failed("customer_data", exc))
        return checks


def _failed(capability: str, exc: Exception) -> AuditCheck:
    text = str(exc)
    if isinstance(exc, AuthError) and ("cannot_view" in text or "cannot_list" in text or "cannot_read" in text
                                       or exc.status == 403):
        return AuditCheck(capability, "missing_scope", text)
    if isinstance(exc, HttpStatusError) and exc.status == 404:
        return AuditCheck(capability, "unsupported", text)
    return AuditCheck(capability, "unreachable", text)
