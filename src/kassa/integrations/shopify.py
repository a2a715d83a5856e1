"""Shopify connector: ``orders/create``, ``orders/cancelled`` and ``refunds/create`` webhooks, the GraphQL Admin
API catalog, orders and an access audit.

Owns everything Shopify-specific:

- Webhooks: HMAC-SHA256 of the raw body keyed with the app's client secret, base64, in
  ``X-Shopify-Hmac-Sha256``; topic in ``X-Shopify-Topic``; delivery id in ``X-Shopify-Webhook-Id``. A test
  order (``"test": true``: the admin's test notification, or test mode) is acknowledged and not counted. Shopify
  signs no timestamp (``X-Shopify-Triggered-At`` is outside the HMAC and stays the same across its retries),
  so replays are stopped by deduplication, not by a time window. ``orders/cancelled`` (the order body) takes
  the whole order back, ``refunds/create`` (a refund body) its ``refund_line_items``; a refund of money only
  (shipping, an adjustment) takes back no line and is ignored.
- Catalog: the GraphQL Admin ``products`` connection (REST product endpoints are legacy), sorted by
  ``UPDATED_AT`` with cursor pagination (``pageInfo { hasNextPage endCursor }``) and an
  ``updated_at:>=`` search filter for incremental runs. Calculated-query-cost throttling is honoured:
  before a call the client waits until the bucket (``extensions.cost.throttleStatus``) holds the last
  requested cost, and a ``THROTTLED`` error is waited out and retried.
- Orders: ``order(id:)`` over GraphQL, mapped to the webhook (REST) shape so one parser serves both.
- Audit: ``currentAppInstallation.accessScopes`` plus a probe per capability.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Unpack

from kassa.integrations.auth import verify_body_hmac
from kassa.integrations.base import (
    AuditCheck,
    AuthError,
    IntegrationError,
    MissingScopeError,
    Order,
    OrderLine,
    PayloadError,
    Product,
    RateLimited,
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
from kassa.integrations.http import HttpClient

API_VERSION = "2025-07"

PRODUCTS_QUERY = """
query KassaProducts($first: Int!, $after: String, $query: String) {
  products(first: $first, after: $after, query: $query, sortKey: UPDATED_AT) {
    pageInfo { hasNextPage endCursor }
    nodes {
      id legacyResourceId title handle productType status updatedAt onlineStoreUrl
      totalInventory tracksInventory
      category { fullName }
      featuredMedia { preview { image { url } } }
      priceRangeV2 { minVariantPrice { amount currencyCode } }
      variants(first: 1) { nodes { id legacyResourceId sku price inventoryQuantity } }
    }
  }
}
"""

COUNT_QUERY = """
query KassaCount($query: String) { productsCount(query: $query, limit: null) { count } }
"""

ORDER_QUERY = """
query KassaOrder($id: ID!) {
  order(id: $id) {
    id legacyResourceId name createdAt email currencyCode
    subtotalPriceSet { shopMoney { amount } }
    totalPriceSet { shopMoney { amount } }
    customer { legacyResourceId }
    shippingAddress { countryCodeV2 }
    lineItems(first: 250) {
      nodes {
        sku quantity
        variant { legacyResourceId }
        product { legacyResourceId productType }
        originalUnitPriceSet { shopMoney { amount } }
      }
    }
  }
}
"""

AUDIT_QUERY = """
query KassaAudit {
  shop { name currencyCode }
  currentAppInstallation { accessScopes { handle } }
}
"""

# Each probe is its own request so one missing scope (ACCESS_DENIED) doesn't hide the other answers.
PROBES: dict[str, str] = {
    "read_products": "query { products(first: 1) { nodes { id updatedAt } } }",
    "read_orders": "query { orders(first: 1, sortKey: CREATED_AT) { nodes { id createdAt } } }",
    "order_webhooks": (
        "query { webhookSubscriptions(first: 50, topics: [ORDERS_CREATE, ORDERS_CANCELLED, REFUNDS_CREATE]) "
        "{ nodes { id topic endpoint { __typename ... on WebhookHttpEndpoint { callbackUrl } } } } }"
    ),
    "inventory": "query { inventoryItems(first: 1) { nodes { id tracked } } }",
    "customer_data": "query { customers(first: 1) { nodes { id } } }",
}
SCOPES: dict[str, str] = {
    "read_products": "read_products",
    "read_orders": "read_orders",
    "inventory": "read_inventory",
    "customer_data": "read_customers",
}

SNIPPET_STEPS = [
    "Generate a checkout UI extension in your Shopify app: `shopify app generate extension --template "
    "checkout_ui` and set its target to `purchase.thank-you.block.render` in shopify.extension.toml.",
    "Allow it to call Kassa: `[extensions.capabilities] network_access = true` (and request network access "
    "for the app in the Partner Dashboard).",
    "In the extension, read the order (order id, lines, totals) from the Thank-you page API and POST it to "
    "Kassa's `/v1/decisions` with your publishable key; render the returned offers and send impression/accept "
    "events to `/v1/events`.",
    "Deploy (`shopify app deploy`), then add the block to the Thank you page in the checkout editor.",
]
WEBHOOK_STEPS = [
    "Subscribe `orders/create`, and `orders/cancelled` and `refunds/create` so cancelled and returned orders "
    "stop counting as conversions, to https://<kassa-host>/v1/webhooks/shopify (shopify.app.toml "
    "`[[webhooks.subscriptions]] topics = [\"orders/create\", \"orders/cancelled\", \"refunds/create\"]`, or "
    "the webhookSubscriptionCreate mutation).",
    "Give Kassa the app's client secret: KASSA_INTEGRATIONS__SHOPIFY__WEBHOOK_SECRET=<secret> "
    "(or `integrations: {shopify: {webhook_secret: ...}}` in Kassa's settings).",
]


def _legacy_id(node: Mapping[str, Any], field: str = "id") -> str | None:
    """Numeric id of a node: ``legacyResourceId`` or the tail of its ``gid://shopify/Type/123``."""
    legacy = node.get("legacyResourceId")
    if legacy not in (None, ""):
        return clip_id(legacy)
    gid = node.get(field)
    if isinstance(gid, str) and gid:
        return clip_id(gid.rsplit("/", 1)[-1])
    return clip_id(gid)


def _dig(node: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _error_messages(errors: Any) -> str:
    if isinstance(errors, list):
        return "; ".join(str(e.get("message", e)) if isinstance(e, Mapping) else str(e) for e in errors)
    return str(errors)


def _error_codes(errors: Any) -> set[str]:
    codes: set[str] = set()
    if isinstance(errors, list):
        for e in errors:
            if isinstance(e, Mapping):
                code = _dig(e, "extensions", "code")
                if isinstance(code, str):
                    codes.add(code)
                if e.get("message") == "Throttled":
                    codes.add("THROTTLED")
    return codes


@register("shopify")
class ShopifyConnector(HttpConnector):
    """Shopify Admin API client and webhook verifier.

    cfg keys: ``shop`` (``name.myshopify.com`` or a full base URL), ``access_token`` (Admin API token,
    sent as ``X-Shopify-Access-Token``), ``api_version``, ``page_size`` (products per page, ≤ 250),
    ``webhook_secret`` (the app's client secret), ``timeout``, ``max_retries``.
    """

    platform = "shopify"
    order_topics = frozenset({"orders/create"})
    refund_topics = frozenset({"orders/cancelled", "refunds/create"})
    snippet_steps = SNIPPET_STEPS
    webhook_steps = WEBHOOK_STEPS

    def __init__(self, cfg: Mapping[str, Any], **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(cfg, **options)
        self.api_version = str(self.cfg.get("api_version") or API_VERSION)
        self.page_size = self._page_size(100, 250)
        self.max_throttle_retries: int = self._number("max_throttle_retries", 10, 0, 1000)
        # Last seen bucket state (extensions.cost.throttleStatus) and when it was seen.
        self._available: float | None = None
        self._restore_rate = 50.0
        self._maximum: float | None = None
        self._seen_at = 0.0
        self._last_cost = 0.0

    # ------------------------------------------------------------------ HTTP plumbing
    def _open_http(self) -> HttpClient:
        shop = self.cfg.get("shop")
        token = self.cfg.get("access_token")
        if not shop:
            raise ConfigError("shopify: set `shop` (your-store.myshopify.com) in the integration config")
        if not token:
            raise ConfigError("shopify: set `access_token` (Admin API access token) in the integration config")
        base = str(shop) if "://" in str(shop) else f"https://{shop}"
        return self._new_http(base, {"X-Shopify-Access-Token": str(token), "Content-Type": "application/json"})

    @property
    def graphql_path(self) -> str:
        return f"/admin/api/{self.api_version}/graphql.json"

    def _wait_for_bucket(self) -> None:
        """Wait until the cost bucket, refilled since it was last seen, holds the last request's cost."""
        if self._available is None or self._last_cost <= 0:
            return
        now = self.clock()
        available = self._available + self._restore_rate * max(0.0, now - self._seen_at)
        if self._maximum is not None:
            available = min(available, self._maximum)
        if available < self._last_cost:
            self.http.wait((self._last_cost - available) / self._restore_rate, "Shopify query cost bucket")

    def _remember_cost(self, cost: Any) -> float:
        """Record the bucket state; returns the seconds a THROTTLED retry of this query should wait."""
        status = _dig(cost, "throttleStatus")
        requested = _dig(cost, "requestedQueryCost")
        if isinstance(requested, int | float):
            self._last_cost = float(requested)
        if isinstance(status, Mapping):
            try:
                self._available = float(status["currentlyAvailable"])
                self._restore_rate = float(status.get("restoreRate") or self._restore_rate) or 1.0
                if status.get("maximumAvailable") is not None:
                    self._maximum = float(status["maximumAvailable"])
                self._seen_at = self.clock()
            except (KeyError, TypeError, ValueError):
                pass
        if self._available is None:
            return 1.0
        return max(0.0, (self._last_cost - self._available) / self._restore_rate)

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run one GraphQL query, honouring the cost bucket; returns ``data``."""
        for attempt in range(self.max_throttle_retries + 1):
            self._wait_for_bucket()
            response = self.http.post(self.graphql_path, {"query": query, "variables": dict(variables or {})})
            body = response.data
            if not isinstance(body, dict):
                raise PayloadError(f"shopify returned a non-object GraphQL response: {str(body)[:120]!r}")
            wait = self._remember_cost(_dig(body, "extensions", "cost"))
            errors = body.get("errors")
            if errors:
                codes = _error_codes(errors)
                if "THROTTLED" in codes:
                    if attempt == self.max_throttle_retries:
                        break  # no retry left to wait for
                    self.http.retry_wait(max(wait, 0.05), (attempt + 1, self.max_throttle_retries + 1),
                                         "GraphQL query", "Shopify THROTTLED")
                    continue
                message = f"shopify: {_error_messages(errors)}"
                if "ACCESS_DENIED" in codes:
                    raise MissingScopeError(message, 403)
                raise IntegrationError(message)
            data = body.get("data")
            if not isinstance(data, dict):
                raise PayloadError("shopify GraphQL response has no `data` object")
            return data
        raise RateLimited(f"shopify kept answering THROTTLED after {self.max_throttle_retries} retries",
                          self._last_cost / self._restore_rate)

    # ------------------------------------------------------------------ webhooks
    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookDelivery:
        verify_body_hmac(headers, raw_body, self.secret, "X-Shopify-Hmac-Sha256", self.platform)
        triggered = headers.get("x-shopify-triggered-at")
        timestamp = None
        if triggered:
            try:
                timestamp = parse_time(triggered)
            except PayloadError:
                timestamp = None  # informational only: it is not covered by the signature
        return WebhookDelivery(headers.get("x-shopify-webhook-id") or None, headers.get("x-shopify-topic", ""),
                               timestamp, raw_body)

    @staticmethod
    def is_test(payload: Mapping[str, Any]) -> bool:
        """``"test": true``: the sample order of the admin's *Send test notification*, or an order placed in
        test mode (Bogus Gateway, a payment provider's test mode); neither is a sale."""
        return payload.get("test") is True

    # ------------------------------------------------------------------ parsing
    def parse_order(self, payload: dict[str, Any]) -> Order:
        """An order from the ``orders/create`` webhook body (the REST order representation)."""
        payload = object_payload(payload, "a Shopify order")
        with malformed("Shopify order"):
            order_id = required_id(payload, "id", "shopify order")
            raw_lines = required_list(payload, "line_items", "shopify order")
            lines = tuple(self._parse_line(item, i) for i, item in enumerate(raw_lines))
            raw_customer, raw_shipping = payload.get("customer"), payload.get("shipping_address")
            customer: dict[str, Any] = raw_customer if isinstance(raw_customer, dict) else {}
            shipping: dict[str, Any] = raw_shipping if isinstance(raw_shipping, dict) else {}
            email = payload.get("email") or payload.get("contact_email") or customer.get("email")
            total = to_decimal(payload.get("total_price"), "total_price")
            raw_subtotal = payload.get("subtotal_price")
            subtotal = (to_decimal(raw_subtotal, "subtotal_price") if raw_subtotal not in (None, "")
                        else sum((line.unit_price * line.qty for line in lines), Decimal(0)))
            number = payload.get("name") or payload.get("order_number")
            return Order(
                platform="shopify",
                order_id=order_id,
                order_number=str(number) if number not in (None, "") else None,
                customer_id=clip_id(customer.get("id")),
                email_sha256=email_sha256(email if isinstance(email, str) else None),
                created_at=parse_time(payload.get("created_at"), "created_at"),
                currency=currency_code(payload.get("currency") or payload.get("presentment_currency"),
                                       field="currency"),
                subtotal=subtotal,
                total=total,
                ship_country=country_code(shipping.get("country_code")),
                lines=lines,
            )

    def parse_refund(self, topic: str, payload: dict[str, Any]) -> Refund | None:
        """``orders/cancelled``: the cancelled order, whole. ``refunds/create``: its ``refund_line_items``, each
        keyed and priced as the order's line (``line_item``) was, with the refunded quantity."""
        with malformed("Shopify refund"):
            if topic == "orders/cancelled":
                return Refund("shopify", required_id(payload, "id", "shopify order"), None,
                              parse_time(payload.get("cancelled_at") or payload.get("updated_at"), "cancelled_at"))
            lines = []
            for i, raw in enumerate(required_list(payload, "refund_line_items", "shopify refund")):
                where = f"refund_line_items[{i}]"
                if not isinstance(raw, dict) or not isinstance(raw.get("line_item"), dict):
                    raise PayloadError(f"{where} must be an object with its line_item", where)
                line = self._parse_line(raw["line_item"], i)
                qty = int_quantity(raw.get("quantity", line.qty), f"{where}.quantity")
                lines.append(OrderLine(line.sku, line.product_id, line.category, qty, line.unit_price))
            if not lines:
                return None
            return Refund("shopify", required_id(payload, "order_id", "shopify refund"),
                          required_id(payload, "id", "shopify refund"),
                          parse_time(payload.get("created_at"), "created_at"), tuple(lines))

    @staticmethod
    def _parse_line(item: Any, i: int) -> OrderLine:
        where = f"line_items[{i}]"
        if not isinstance(item, dict):
            raise PayloadError(f"{where} must be an object", where)
        # Variants without a SKU (and custom lines) still need a stable key: the variant id, as the
        # catalog sync uses for the same variant.
        sku = clip_id(item.get("sku")) or clip_id(item.get("variant_id")) or clip_id(
            f"line-{item.get('id')}" if item.get("id") is not None else None)
        if sku is None:
            raise PayloadError(f"{where} has no sku, variant_id or id", f"{where}.sku")
        category = item.get("product_type")
        return OrderLine(
            sku=sku,
            product_id=clip_id(item.get("product_id")),
            category=str(category) if category else None,
            qty=int_quantity(item.get("quantity", 1), f"{where}.quantity"),
            unit_price=to_decimal(item.get("price"), f"{where}.price"),
        )

    def parse_product(self, payload: dict[str, Any]) -> Product:
        """A product from a GraphQL ``Product`` node (its first variant gives SKU and price)."""
        payload = object_payload(payload, "a Shopify product")
        with malformed("Shopify product", IndexError):
            product_id = _legacy_id(payload)
            if product_id is None:
                raise PayloadError("shopify product has no `id`", "id")
            variants = _dig(payload, "variants", "nodes") or []
            variant = variants[0] if variants and isinstance(variants[0], dict) else {}
            sku = clip_id(variant.get("sku")) or (_legacy_id(variant) if variant else None) or product_id
            min_price = _dig(payload, "priceRangeV2", "minVariantPrice") or {}
            raw_price = variant.get("price") if variant.get("price") not in (None, "") else min_price.get("amount")
            currency = currency_code(min_price.get("currencyCode"), self.cfg.get("currency"), "currency")
            full_name = _dig(payload, "category", "fullName")
            if isinstance(full_name, str) and full_name:
                path = tuple(part.strip() for part in full_name.split(" > ") if part.strip())
            elif payload.get("productType"):
                path = (str(payload["productType"]),)
            else:
                path = ()
            tracked = payload.get("tracksInventory")
            stock = payload.get("totalInventory") if tracked is not False else None
            updated = payload.get("updatedAt")
            return Product(
                sku=sku,
                product_id=product_id,
                title=str(payload.get("title") or sku),
                price=to_decimal(raw_price, "price"),
                currency=currency,
                category_path=path,
                stock=int(stock) if isinstance(stock, int | float) and not isinstance(stock, bool) else None,
                image_url=_dig(payload, "featuredMedia", "preview", "image", "url"),
                url=payload.get("onlineStoreUrl"),
                updated_at=parse_time(updated, "updatedAt") if updated else None,
                active=payload.get("status", "ACTIVE") == "ACTIVE",
            )

    # ------------------------------------------------------------------ catalog
    def iter_products(self, cursor: str | None = None) -> Iterator[tuple[list[Product], str | None]]:
        """Products by ``updatedAt``; the cursor is ``{"after", "since", "high"}`` as JSON.

        ``after`` resumes inside a run (Shopify's ``endCursor``, valid for the same search query);
        at the end of a run the returned cursor becomes ``{"since": newest updatedAt}`` so the next run
        only asks for products changed since.
        """
        state = decode_cursor(cursor, self.platform)
        since, after, high = state.get("since"), state.get("after"), state.get("high") or state.get("since")
        search = f"updated_at:>='{since}'" if since else None
        while True:
            data = self.graphql(PRODUCTS_QUERY, {"first": self.page_size, "after": after, "query": search})
            connection = data.get("products")
            nodes = _dig(connection, "nodes")
            page_info = _dig(connection, "pageInfo")
            if not isinstance(nodes, list) or not isinstance(page_info, dict):
                raise PayloadError("shopify products page lacks `nodes` or `pageInfo`")
            products = self._parse_products(nodes)
            high = newest_update(products, high)
            has_next = bool(page_info.get("hasNextPage"))
            end = page_info.get("endCursor")
            if has_next and not end:
                raise PayloadError("shopify products page says hasNextPage but has no endCursor")
            next_cursor: str | None
            if has_next:
                next_cursor = encode_cursor({"after": end, "since": since, "high": high})
            else:
                next_cursor = encode_cursor({"since": high}) if high else None
            yield products, next_cursor
            if not has_next:
                return
            after = end

    def count_products(self, cursor: str | None = None) -> int | None:
        """How many products a run from ``cursor`` will see in all (a progress-bar hint; None if unknown)."""
        since = decode_cursor(cursor, self.platform).get("since")
        try:
            data = self.graphql(COUNT_QUERY, {"query": f"updated_at:>='{since}'" if since else None})
        except IntegrationError:
            return None  # only a hint: never fail a sync over it
        count = _dig(data, "productsCount", "count")
        self.total_hint = int(count) if isinstance(count, int) else None
        return self.total_hint

    # ------------------------------------------------------------------ orders
    def get_order(self, order_id: str) -> Order:
        gid = order_id if order_id.startswith("gid://") else f"gid://shopify/Order/{order_id}"
        node = self.graphql(ORDER_QUERY, {"id": gid}).get("order")
        if not isinstance(node, dict):
            raise IntegrationError(f"shopify: order {order_id} not found")
        return self.parse_order(_graphql_order_to_rest(node))

    # ------------------------------------------------------------------ audit
    def audit(self) -> list[AuditCheck]:
        try:
            info = self.graphql(AUDIT_QUERY)
        except (AuthError, IntegrationError) as exc:
            return [AuditCheck(cap, "unreachable", str(exc)) for cap in PROBES]
        handles = {s.get("handle") for s in _dig(info, "currentAppInstallation", "accessScopes") or []
                   if isinstance(s, dict)}
        granted = ", ".join(sorted(h for h in handles if isinstance(h, str))) or "none"
        checks: list[AuditCheck] = []
        for capability, probe in PROBES.items():
            scope = SCOPES.get(capability)
            try:
                data = self.graphql(probe)
            except MissingScopeError as exc:
                checks.append(AuditCheck(capability, "missing_scope", f"{exc} (granted: {granted})"))
                continue
            except (AuthError, IntegrationError) as exc:
                checks.append(AuditCheck(capability, "unreachable", str(exc)))
                continue
            if scope is not None and handles and scope not in handles and not (
                    scope.startswith("read_") and f"write_{scope[5:]}" in handles):
                checks.append(AuditCheck(capability, "missing_scope", f"access scope {scope} not granted "
                                                                      f"(granted: {granted})"))
                continue
            checks.append(AuditCheck(capability, "ok", self._audit_detail(capability, data, handles)))
        return checks

    @staticmethod
    def _audit_detail(capability: str, data: dict[str, Any], handles: set[Any]) -> str:
        if capability == "read_products":
            return "products readable" if _dig(data, "products", "nodes") else "products readable (store has none)"
        if capability == "read_orders":
            nodes = _dig(data, "orders", "nodes") or []
            oldest = nodes[0].get("createdAt") if nodes and isinstance(nodes[0], dict) else None
            if "read_all_orders" in handles:
                reach = "all orders (read_all_orders granted)"
            else:
                since = (datetime.now(UTC) - timedelta(days=60)).date().isoformat()
                reach = f"last 60 days only (since {since}; request read_all_orders for older orders)"
            found = f"; oldest readable order {str(oldest)[:10]}" if oldest else "; no orders readable yet"
            return reach + found
        if capability == "order_webhooks":
            nodes = [n for n in _dig(data, "webhookSubscriptions", "nodes") or [] if isinstance(n, dict)]
            said = []
            for topic in ("orders/create", "orders/cancelled", "refunds/create"):  # GraphQL spells ORDERS_CREATE
                urls = [str(u) for n in nodes if str(n.get("topic", "")).lower().replace("_", "/", 1) == topic
                        and (u := _dig(n, "endpoint", "callbackUrl"))]
                if urls:
                    said.append(f"{topic} subscribed to {', '.join(urls)}")
                elif topic == "orders/create":
                    said.append("no orders/create subscription yet (see the webhook steps)")
                else:  # refund_topics: recommended, not needed to learn from orders
                    said.append(f"warning: no {topic} subscription (recommended: without it a "
                                f"{'cancelled' if topic == 'orders/cancelled' else 'refunded'} order is not taken "
                                "back and stays a conversion; see the webhook steps)")
            return "; ".join(said)
        if capability == "inventory":
            return "inventory levels readable"
        if capability == "customer_data":
            return "customer records readable (read_customers); Kassa stores only the e-mail SHA-256"
        return "ok"


def _graphql_order_to_rest(node: Mapping[str, Any]) -> dict[str, Any]:
    """Map a GraphQL ``Order`` to the webhook/REST field names ``parse_order`` reads."""
    lines = []
    for item in _dig(node, "lineItems", "nodes") or []:
        if not isinstance(item, dict):
            continue
        lines.append({
            "sku": item.get("sku"),
            "quantity": item.get("quantity"),
            "variant_id": _legacy_id(item.get("variant") or {}) if item.get("variant") else None,
            "product_id": _legacy_id(item.get("product") or {}) if item.get("product") else None,
            "product_type": _dig(item, "product", "productType"),
            "price": _dig(item, "originalUnitPriceSet", "shopMoney", "amount"),
        })
    return {
        "id": _legacy_id(node),
        "name": node.get("name"),
        "created_at": node.get("createdAt"),
        "email": node.get("email"),
        "currency": node.get("currencyCode"),
        "subtotal_price": _dig(node, "subtotalPriceSet", "shopMoney", "amount"),
        "total_price": _dig(node, "totalPriceSet", "shopMoney", "amount"),
        "customer": {"id": _legacy_id(node["customer"])} if isinstance(node.get("customer"), dict) else None,
        "shipping_address": {"country_code": _dig(node, "shippingAddress", "countryCodeV2")},
        "line_items": lines,
    }
