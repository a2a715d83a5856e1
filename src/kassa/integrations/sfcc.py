"""Salesforce B2C Commerce (SFCC) connector.

Owns: SCAPI access with SLAS tokens (private client, ``client_credentials`` guest token from
``/shopper/auth/v1/organizations/{org}/oauth2/token``, refreshed before expiry and once more on a 401); the
catalog crawl (Shopper Search ``productSearch`` paged by ``offset``/``limit``, hydrated through Shopper
Products ``getProducts`` 24 ids at a time, category names from ``getCategory``); Shopper Orders
``getOrder``; the polling safety net ``poll_orders(since)`` over OCAPI Shop ``order_search`` (B2C Commerce
has no outbound webhooks); the audit; and verification of the Kassa cartridge hook's deliveries, signed
with the Kassa webhook signature of ``auth.py`` (``X-Kassa-Signature``, topic in ``X-Kassa-Topic``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar, Unpack
from urllib.parse import quote

from kassa.integrations.auth import BearerToken, get_with_bearer, verify_kassa_delivery
from kassa.integrations.base import (
    AuditCheck,
    AuthError,
    IntegrationError,
    Order,
    OrderLine,
    PayloadError,
    Product,
    WebhookDelivery,
    clip_id,
    country_code,
    currency_code,
    email_sha256,
    object_payload,
    parse_time,
    required_id,
    to_decimal,
)
from kassa.integrations.config import ConfigError, register
from kassa.integrations.connector import ConnectorOptions, HttpConnector, SetupMissing
from kassa.integrations.http import HttpClient, HttpStatusError

TOPIC_HEADER = "x-kassa-topic"
_GET_PRODUCTS_MAX_IDS = 24  # Shopper Products getProducts accepts at most 24 ids
_SEARCH_MAX_LIMIT = 200
AM_TOKEN_URL = "https://account.demandware.com/dwsso/oauth2/access_token"
# Order statuses of a placed order: NEW (placed), OPEN (placed and confirmed), COMPLETED. Not placed: CREATED
# (OrderMgr.createOrder made it from the basket; placeOrder or failOrder follows, after an off-site payment
# returns), FAILED (final), CANCELLED, and REPLACED (an order edit: the replacement is its own order).
PLACED_STATUSES = frozenset({"new", "open", "completed"})
# How long poll_orders keeps a CREATED order in reach (its cursor held before it) for a later poll to find it
# placed; one older is stepped past, so an order never placed or failed cannot pin the cursor for good.
UNPLACED_HOLD_SECONDS = 86_400.0


# --------------------------------------------------------------------------- connector
@register("sfcc")
class SfccConnector(HttpConnector):
    """Salesforce B2C Commerce via SCAPI (SLAS private client) and, for order polling, OCAPI.

    Options (``cfg``): ``short_code`` (SCAPI host ``<short_code>.api.commercecloud.salesforce.com``) or
    ``base_url``; ``organization_id`` (``f_ecom_…``); ``site_id``; ``client_id`` / ``client_secret`` (SLAS
    private client); ``catalog_refine`` (default ``cgid=root``); ``page_size`` (search ``limit``, ≤ 200);
    ``currency`` (fallback when a product has none); ``product_url`` (template with ``{id}``, used when
    SCAPI returns no ``slugUrl``); ``ocapi`` (``base_url`` of the instance, ``version`` such as ``23_2``,
    ``client_id``, ``client_secret``, ``token_url``) for ``poll_orders``; ``webhook_secret`` and
    ``replay_window_seconds`` for the cartridge hook's deliveries.
    """

    platform = "sfcc"
    order_topics = frozenset({"order.created"})
    api_name = "B2C Commerce API"
    snippet_steps: ClassVar[list[str]] = [
        "In your custom cartridge (e.g. int_kassa) add cartridge/controllers/Order.js with "
        "server.append('Confirm', …) putting the order (orderNo, currency, total, items, ship country) "
        "into res.viewData.",
        "Add cartridge/templates/default/kassa/snippet.isml rendering the snippet tag from that data and "
        "include it from checkout/confirmation/confirmation.isml (or append it via a template decorator).",
        "Put int_kassa before app_storefront_base in the site's cartridge path (Business Manager > "
        "Administration > Sites > Manage Sites > Settings).",
    ]
    webhook_steps: ClassVar[list[str]] = [
        "B2C Commerce has no outbound webhooks: deploy the int_kassa cartridge hook "
        "(dw.order.hooks / CheckoutServices-PlaceOrder append) posting the order with X-Kassa-Signature.",
        "Create the HTTP service `kassa.webhook` (Administration > Operations > Services) pointing at "
        "https://<kassa>/v1/webhooks/sfcc and the site preference kassaWebhookSecret.",
        "Keep `poll_orders` (OCAPI order_search) scheduled as the safety net for missed deliveries.",
    ]

    def __init__(self, cfg: Mapping[str, Any], **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(cfg, **options)
        self.page_size = self._page_size(_SEARCH_MAX_LIMIT, _SEARCH_MAX_LIMIT)
        self.fallback_currency = self.cfg.get("currency")
        self._ocapi_http: HttpClient | None = None
        self._slas = BearerToken(lifetime=1800.0)
        self._am = BearerToken(lifetime=1799.0)
        self._category_paths: dict[str, tuple[str, ...]] = {}

    # ------------------------------------------------------------------ config and HTTP
    @property
    def base_url(self) -> str:
        if self.cfg.get("base_url"):
            return str(self.cfg["base_url"]).rstrip("/")
        return f"https://{self._need('short_code')}.api.commercecloud.salesforce.com"

    @property
    def org(self) -> str:
        return quote(self._need("organization_id"), safe="")

    @property
    def site(self) -> str:
        return self._need("site_id")

    def _open_http(self) -> HttpClient:
        return self._new_http(self.base_url)

    def close(self) -> None:
        super().close()
        self._ocapi_http = None

    def _slas_token(self, force: bool = False) -> str:
        return self._slas.get(
            self.http,
            f"{self.base_url}/shopper/auth/v1/organizations/{self.org}/oauth2/token",
            {"grant_type": "client_credentials", "channel_id": self.site},
            self._need("client_id"), self._need("client_secret"), force=force,
        )

    def _scapi_get(self, path: str, params: Mapping[str, Any]) -> Any:
        """GET with the SLAS bearer token; a 401 refreshes the token once (it may have been revoked)."""
        return get_with_bearer(self.http, path, params, self._slas_token)

    # ------------------------------------------------------------------ webhooks
    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookDelivery:
        return verify_kassa_delivery(headers, raw_body, self.secret, self.replay_window, self.clock(), TOPIC_HEADER)

    # ------------------------------------------------------------------ parsing
    def parse_order(self, payload: dict[str, Any]) -> Order:
        """An order in the SCAPI shape (``getOrder``, the cartridge hook) or OCAPI's snake_case shape."""
        payload = object_payload(payload, "a B2C Commerce order")
        order = payload.get("order") if isinstance(payload.get("order"), dict) else payload
        assert isinstance(order, dict)
        if "order_no" in order and "orderNo" not in order:
            order = ocapi_to_scapi(order)
        order_no = required_id(order, "orderNo", "B2C Commerce order")
        if order.get("creationDate") is None:
            raise PayloadError(f"order {order_no} has no `creationDate`", "creationDate")
        if order.get("orderTotal") is None:
            raise PayloadError(f"order {order_no} has no `orderTotal` (not yet calculated?)", "orderTotal")
        total = to_decimal(order.get("orderTotal"), "orderTotal")
        subtotal = to_decimal(order["productSubTotal"], "productSubTotal") \
            if order.get("productSubTotal") is not None else total
        items = order.get("productItems") or []
        if not isinstance(items, list):
            raise PayloadError("`productItems` must be a list", "productItems")
        lines = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise PayloadError(f"productItems[{i}] must be an object", f"productItems[{i}]")
            sku = clip_id(item.get("productId"))
            if sku is None:
                raise PayloadError(f"productItems[{i}] has no productId", f"productItems[{i}].productId")
            qty = int(to_decimal(item.get("quantity", 1), f"productItems[{i}].quantity"))
            if item.get("basePrice") is not None:
                unit = to_decimal(item["basePrice"], f"productItems[{i}].basePrice")
            else:
                # `price` is the line total (basePrice × quantity) in SCAPI and OCAPI.
                line_total = to_decimal(item.get("price", 0), f"productItems[{i}].price")
                unit = (line_total / qty).quantize(Decimal("0.01")) if qty else line_total
            category = item.get("primaryCategoryId") or item.get("c_primaryCategoryId")
            lines.append(OrderLine(sku, clip_id(item.get("masterProductId")) or sku,
                                   str(category) if category else None, qty, unit))
        info = order.get("customerInfo") if isinstance(order.get("customerInfo"), dict) else {}
        assert isinstance(info, dict)
        ship_country = None
        shipments = order.get("shipments")
        if isinstance(shipments, list) and shipments and isinstance(shipments[0], dict):
            address = shipments[0].get("shippingAddress")
            if isinstance(address, dict):
                ship_country = country_code(address.get("countryCode"))
        return Order(
            platform=self.platform,
            order_id=order_no,
            order_number=order_no,
            # customerNo exists for registered shoppers only; a guest's customerId changes per session.
            customer_id=clip_id(info.get("customerNo")),
            email_sha256=email_sha256(info.get("email")),
            created_at=parse_time(order.get("creationDate"), "creationDate"),
            currency=currency_code(order.get("currency"), None, "currency"),
            subtotal=subtotal,
            total=total,
            ship_country=ship_country,
            lines=tuple(lines),
        )

    def parse_product(self, payload: dict[str, Any]) -> Product:
        """A product from Shopper Products ``getProduct(s)``."""
        payload = object_payload(payload, "a B2C Commerce product")
        pid = required_id(payload, "id", "B2C Commerce product")
        price = payload.get("price")
        if price is None:
            price = payload.get("priceMax")
        if price is None:
            raise PayloadError(f"product {pid} has no price in this site's price books", "price")
        currency = currency_code(payload.get("currency"), self.fallback_currency, "currency")
        stock: int | None = None
        inventory = payload.get("inventory")
        if isinstance(inventory, dict):
            if inventory.get("orderable") is False:
                stock = 0
            elif inventory.get("ats") is not None:
                stock = max(0, int(to_decimal(inventory["ats"], "inventory.ats")))
        master = payload.get("master") if isinstance(payload.get("master"), dict) else {}
        assert isinstance(master, dict)
        category_id = payload.get("primaryCategoryId")
        url = payload.get("slugUrl")
        if not url and self.cfg.get("product_url"):
            url = str(self.cfg["product_url"]).format(id=pid)
        return Product(
            sku=pid,
            product_id=clip_id(master.get("masterId")) or pid,
            title=str(payload.get("name") or pid),
            price=to_decimal(price, "price"),
            currency=currency,
            category_path=self._category_paths.get(str(category_id), (str(category_id),)) if category_id else (),
            stock=stock,
            image_url=_image_link(payload.get("imageGroups")),
            url=str(url) if url else None,
            updated_at=None,  # Shopper APIs expose no modification time
        )

    # ------------------------------------------------------------------ catalog
    def _category_path(self, category_id: str) -> tuple[str, ...]:
        if category_id not in self._category_paths:
            try:
                data = self._scapi_get(
                    f"/product/shopper-products/v1/organizations/{self.org}/categories/{quote(category_id, safe='')}",
                    {"siteId": self.site, "levels": 0},
                )
            except HttpStatusError:
                data = None  # offline/unknown category: keep its id as the path
            except AuthError as exc:
                if exc.status != 403:
                    raise
                data = None  # the client lacks sfcc.shopper-categories: ids instead of names
            path: list[str] = []
            if isinstance(data, dict):
                for node in data.get("parentCategoryTree") or []:
                    if isinstance(node, dict) and node.get("id") not in (None, "root"):
                        path.append(str(node.get("name") or node["id"]))
                name = str(data.get("name") or category_id)
                if not path or path[-1] != name:
                    path.append(name)
            self._category_paths[category_id] = tuple(path) or (category_id,)
        return self._category_paths[category_id]

    def _search_page(self, offset: int) -> tuple[list[str], int]:
        data = self._scapi_get(
            f"/search/shopper-search/v1/organizations/{self.org}/product-search",
            {"siteId": self.site, "refine": self.cfg.get("catalog_refine", "cgid=root"), "offset": offset,
             "limit": self.page_size},
        )
        if not isinstance(data, dict):
            raise PayloadError(f"productSearch returned {type(data).__name__}, not a search result")
        hits = data.get("hits") or []
        total = data.get("total")
        if not isinstance(hits, list) or not isinstance(total, int) or isinstance(total, bool):
            raise PayloadError("productSearch answer lacks a `hits` list or an integer `total`", "hits")
        ids: list[str] = []
        for hit in hits:
            if not isinstance(hit, dict) or not hit.get("productId"):
                raise PayloadError("productSearch hit without `productId`", "hits.productId")
            ids.append(str(hit["productId"]))
        return ids, total

    def get_products(self, ids: list[str]) -> list[dict[str, Any]]:
        """Shopper Products ``getProducts`` in batches of 24 ids, with availability, images and prices."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(ids), _GET_PRODUCTS_MAX_IDS):
            batch = ids[start:start + _GET_PRODUCTS_MAX_IDS]
            data = self._scapi_get(
                f"/product/shopper-products/v1/organizations/{self.org}/products",
                {"ids": ",".join(batch), "siteId": self.site, "expand": "availability,images,prices"},
            )
            items = data.get("data") if isinstance(data, dict) else None
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise PayloadError("getProducts answer lacks a `data` list of products", "data")
            out.extend(items)
        return out

    def iter_products(self, cursor: str | None = None) -> Iterator[tuple[list[Product], str | None]]:
        """Pages of the site catalog; the cursor is the search ``offset`` after the page.

        The Shopper APIs expose no modification time, so every sync is a full crawl; the cursor makes it
        resumable after a kill, and the last page's cursor is ``None`` (the next sync starts over). Products
        without a price are skipped and listed in ``skipped``.
        """
        try:
            offset = int(cursor) if cursor else 0
        except ValueError:
            raise PayloadError(f"not a B2C Commerce catalog cursor: {cursor!r} (expected a search offset)") from None
        while True:
            ids, total = self._search_page(offset)
            if not ids:
                return
            raws = self.get_products(ids)
            for raw in raws:
                category = raw.get("primaryCategoryId")
                if category:
                    self._category_path(str(category))
            products = self._parse_products(raws)
            offset += len(ids)
            if offset >= total:
                # No incremental API: a finished crawl leaves no cursor, so the next sync crawls afresh.
                yield products, None
                return
            yield products, str(offset)

    def count_products(self, cursor: str | None = None) -> int | None:
        """Products a crawl from ``cursor`` will read (a progress hint; ``None`` if unknown)."""
        try:
            _, total = self._search_page(0)
            self.total_hint = max(0, total - (int(cursor) if cursor else 0))
        except (IntegrationError, ValueError):
            self.total_hint = None
        return self.total_hint

    def get_order(self, order_id: str) -> Order:
        """Shopper Orders ``getOrder`` (a SLAS guest token reads only orders of its own shopper)."""
        data = self._scapi_get(
            f"/checkout/shopper-orders/v1/organizations/{self.org}/orders/{quote(order_id, safe='')}",
            {"siteId": self.site},
        )
        if not isinstance(data, dict):
            raise PayloadError(f"getOrder {order_id} did not return an order object")
        return self.parse_order(data)

    # ------------------------------------------------------------------ polling safety net (OCAPI)
    def _ocapi(self) -> tuple[HttpClient, dict[str, Any]]:
        ocapi = self.cfg.get("ocapi")
        if not isinstance(ocapi, dict) or not ocapi.get("base_url"):
            raise ConfigError("sfcc.ocapi (base_url, version, client_id, client_secret) is required to poll orders")
        if self._ocapi_http is None:
            self._ocapi_http = self._new_http(str(ocapi["base_url"]).rstrip("/"))
        return self._ocapi_http, ocapi

    def _am_token(self, ocapi: dict[str, Any], http: HttpClient) -> str:
        return self._am.get(http, str(ocapi.get("token_url") or AM_TOKEN_URL), {"grant_type": "client_credentials"},
                            str(ocapi.get("client_id") or ""), str(ocapi.get("client_secret") or ""))

    def _order_search(self, since: str | None, start: int, count: int) -> tuple[list[dict[str, Any]], int]:
        http, ocapi = self._ocapi()
        version = str(ocapi.get("version") or "23_2")
        query: dict[str, Any] = {"match_all_query": {}}
        if since:
            query = {"filtered_query": {"query": query, "filter": {"range_filter": {
                "field": "creation_date", "from": since, "from_inclusive": True}}}}
        body = {
            "query": query,
            "select": "(**)",
            "sorts": [{"field": "creation_date", "sort_order": "asc"}, {"field": "order_no", "sort_order": "asc"}],
            "start": start,
            "count": count,
        }
        headers = {"Authorization": f"Bearer {self._am_token(ocapi, http)}",
                   "x-dw-client-id": str(ocapi.get("client_id") or "")}
        data = http.post(f"/s/{quote(self.site, safe='')}/dw/shop/v{version}/order_search", body,
                         headers=headers).data
        if not isinstance(data, dict) or not isinstance(data.get("total"), int):
            raise PayloadError("order_search answer lacks an integer `total`", "total")
        hits = data.get("hits") or []
        orders = [h.get("data") for h in hits if isinstance(h, dict)]
        if len(orders) != len(hits) or not all(isinstance(o, dict) for o in orders):
            raise PayloadError("order_search hit without an order in `data`", "hits.data")
        return orders, data["total"]  # type: ignore[return-value]

    def is_placed(self, payload: Mapping[str, Any]) -> bool:
        """An order in a placed ``status`` (``PLACED_STATUSES``: new, open, completed). A ``created`` order is
        not placed yet (its payment may still fail or never return), and a ``failed``, ``cancelled`` or
        ``replaced`` one is no conversion; order search returns them all. One without a status (the cartridge
        hook's payload, posted after ``placeOrder``) is taken as placed."""
        order = payload.get("order") if isinstance(payload.get("order"), dict) else payload
        status = order.get("status") if isinstance(order, Mapping) else None
        return status is None or (isinstance(status, str) and status.strip().lower() in PLACED_STATUSES)

    def describe_unplaced(self, payload: Mapping[str, Any]) -> str:
        order = payload.get("order") if isinstance(payload.get("order"), dict) else payload
        assert isinstance(order, Mapping)
        order_no = order.get("orderNo") or order.get("order_no")
        return f"order {str(order_no)[:64]!r} (status {str(order.get('status'))[:32]!r})"

    def _may_still_be_placed(self, order: Mapping[str, Any]) -> bool:
        # A CREATED order becomes NEW or FAILED; within UNPLACED_HOLD_SECONDS a later poll should see which.
        status = order.get("status")
        if not (isinstance(status, str) and status.strip().lower() == "created"):
            return False
        created = parse_time(order.get("creation_date"), "creation_date")
        return self.clock() - created.timestamp() < UNPLACED_HOLD_SECONDS

    def poll_orders(self, since: datetime | str | None = None) -> Iterator[tuple[list[Order], str | None]]:
        """Placed orders created at/after ``since`` (or the cursor of a previous page), oldest first.

        The safety net for missed cartridge deliveries: run it on a schedule and feed the orders through the
        same ingest (the event id ``sfcc:order:<orderNo>`` dedupes those the webhook already delivered).
        Paging is keyset on ``(creation_date, order_no)`` — the cursor is ``"<creation_date>|<order_no>"`` —
        because order search answers at most its first 1,000 hits of a query. Orders not placed are left out
        (``is_placed``); the cursor is held before the oldest ``created`` one younger than
        ``UNPLACED_HOLD_SECONDS``, so the next poll from it reads that order again and takes it once it is
        placed (the placed orders after it come again too, each a duplicate of its event id).
        """
        if isinstance(since, datetime):
            after: tuple[str, str] | None = (since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z"), "")
        elif since:
            ts, _, last_no = since.partition("|")
            after = (ts, last_no)
        else:
            after = None
        held = False
        hold_at: tuple[str, str] | None = None  # the cursor before the oldest order that may still be placed
        count = self.page_size
        start = 0
        while True:
            raw, total = self._order_search(after[0] if after else None, start, count)
            fresh = [o for o in raw if after is None or (str(o.get("creation_date")), str(o.get("order_no"))) > after]
            if not fresh:
                if len(raw) < count or start + len(raw) >= total:
                    return
                start += len(raw)  # a page full of orders sharing the cursor's second: step over them
                continue
            start = 0
            orders = []
            for o in fresh:
                if self.is_placed(o):
                    orders.append(self.parse_order(o))
                elif not held and self._may_still_be_placed(o):
                    held, hold_at = True, after
                after = (str(o.get("creation_date")), str(o.get("order_no")))
            cursor = hold_at if held else after
            yield orders, f"{cursor[0]}|{cursor[1]}" if cursor else None
            if len(raw) < count or len(raw) >= total:
                return

    # ------------------------------------------------------------------ audit
    def audit(self) -> list[AuditCheck]:
        first_ids: list[str] = []

        def products() -> str:
            ids, total = self._search_page(0)
            first_ids.extend(ids[:1])
            refine = self.cfg.get("catalog_refine", "cgid=root")
            return f"{total} products searchable on site {self.site} (refine {refine})"

        def orders() -> AuditCheck | str:
            if not isinstance(self.cfg.get("ocapi"), dict):
                return AuditCheck("read_orders", "missing_scope",
                                  "SLAS guest tokens read only their own shopper's orders (Shopper Orders "
                                  "getOrder); configure `ocapi` with an order_search permission for back-office "
                                  "order reads and polling")
            raw, total = self._order_search(None, 0, 1)
            if not raw:
                return "orders readable through OCAPI order_search (no orders yet)"
            oldest = parse_time(raw[0].get("creation_date"), "creation_date")
            return f"{total} orders readable back to {oldest.date().isoformat()} (OCAPI order_search)"

        def webhooks() -> AuditCheck:
            detail = ("B2C Commerce has no outbound order webhooks; Kassa receives orders from the int_kassa "
                      "cartridge hook (X-Kassa-Signature) and polls OCAPI order_search as the safety net")
            if not self.secret:
                detail += "; no webhook_secret is configured yet"
            return AuditCheck("order_webhooks", "unsupported", detail)

        def inventory() -> str:
            if not first_ids:
                return "no product to probe availability with"
            raw = self.get_products(first_ids)
            inv = raw[0].get("inventory") if raw else None
            if not isinstance(inv, dict):
                raise HttpStatusError(f"product {first_ids[0]} has no inventory record for site {self.site}", 404)
            return f"availability readable (product {first_ids[0]}: ats {inv.get('ats')})"

        def customers() -> AuditCheck:
            return AuditCheck("customer_data", "unsupported",
                              "SLAS client-credentials tokens are guest shoppers: no customer records; orders carry "
                              "customerNo for registered shoppers and the e-mail (stored as SHA-256 only)")

        return self._run_audit({"read_products": products, "read_orders": orders, "order_webhooks": webhooks,
                                "inventory": inventory, "customer_data": customers})

    def _refusal_detail(self, exc: AuthError | SetupMissing, capability: str) -> str:
        return _scapi_message(exc) if isinstance(exc, AuthError) else str(exc)


# --------------------------------------------------------------------------- helpers
_OCAPI_KEYS = {
    "order_no": "orderNo", "creation_date": "creationDate", "currency": "currency",
    "product_sub_total": "productSubTotal", "order_total": "orderTotal",
}


def ocapi_to_scapi(order: dict[str, Any]) -> dict[str, Any]:
    """The fields Kassa reads, renamed from OCAPI's snake_case order document to SCAPI's camelCase."""
    out: dict[str, Any] = {new: order[old] for old, new in _OCAPI_KEYS.items() if old in order}
    info = order.get("customer_info")
    if isinstance(info, dict):
        out["customerInfo"] = {"customerNo": info.get("customer_no"), "customerId": info.get("customer_id"),
                               "email": info.get("email")}
    items = order.get("product_items")
    if isinstance(items, list):
        out["productItems"] = [
            {"productId": i.get("product_id"), "quantity": i.get("quantity"), "price": i.get("price"),
             "basePrice": i.get("base_price"), "masterProductId": i.get("master_product_id"),
             "c_primaryCategoryId": i.get("c_primaryCategoryId")}
            if isinstance(i, dict) else i
            for i in items
        ]
    elif "product_items" in order:
        out["productItems"] = items
    shipments = order.get("shipments")
    if isinstance(shipments, list):
        out["shipments"] = [
            {"shippingAddress": {"countryCode": (s.get("shipping_address") or {}).get("country_code")}}
            if isinstance(s, dict) else s
            for s in shipments
        ]
    return out


def _image_link(groups: Any) -> str | None:
    if not isinstance(groups, list):
        return None
    ordered = sorted((g for g in groups if isinstance(g, dict)), key=lambda g: g.get("viewType") != "large")
    for group in ordered:
        for image in group.get("images") or []:
            if isinstance(image, dict) and (image.get("disBaseLink") or image.get("link")):
                return str(image.get("disBaseLink") or image.get("link"))
    return None


def _scapi_message(exc: AuthError) -> str:
    """SCAPI's problem ``title: detail``, OCAPI's ``fault`` or SLAS's ``message``, not the raw JSON."""
    body = re.sub(r"^sfcc (?:token endpoint )?HTTP \d+(?: on \S+ \S+)?: ", "", str(exc))
    try:
        data = json.loads(body)
    except ValueError:
        return f"HTTP {exc.status}: {body}"
    if isinstance(data, dict) and isinstance(data.get("fault"), dict):
        data = data["fault"]
    if isinstance(data, dict):
        keys = ("title", "detail", "type", "message", "error", "error_description")
        parts = [str(data[k]) for k in keys if data.get(k) and not str(data[k]).startswith("http")]
        if parts:
            return f"HTTP {exc.status}: " + ": ".join(parts)
    return str(exc)


__all__ = ["SfccConnector", "ocapi_to_scapi"]
