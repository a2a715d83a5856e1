"""SAP Commerce Cloud connector.

Owns: OCC v2 access with an OAuth2 client-credentials token (``/authorizationserver/oauth/token``); the
catalog crawl (``/occ/v2/{site}/products/search`` paged by ``currentPage`` until ``pagination.totalPages``,
then incremental through the ``products/expressupdate`` feed since the crawl started); single products and
orders (``/products/{code}``, ``/users/{userId}/orders/{code}`` or the trusted-client ``/orders/{code}``);
Integration API webhook deliveries of the order-placed event (``webhookservices`` with an ``ItemCreatedEvent``
on an Order integration object, and an ``ItemSavedEvent``'s ``Updated`` with ``status`` ``CANCELLED`` as the
order's cancellation, sent with CloudEvents ``ce-*`` headers and signed by a small extension with
the Kassa signature of ``auth.py``); and the audit.

SAP's webhook destinations authenticate with Basic or OAuth only and sign nothing, so the body signature
comes from a ``ClientHttpRequestInterceptor`` on the outbound REST template (docs/integrations/sap.md);
the dedupe id is the hash of the signed body because ``ce-id`` is not covered by any signature.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
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
    Refund,
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
from kassa.integrations.config import register
from kassa.integrations.connector import ConnectorOptions, HttpConnector, SetupMissing
from kassa.integrations.http import HttpClient, HttpStatusError

_CE_TYPE = re.compile(r"^sap\.cx\.commerce\.(?P<io>[^.]+)\.(?P<op>Created|Updated|Deleted|Unknown)\.v\d+$")
_ODATA_DATE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")
_PROBE = "kassa-audit-probe"  # a code that does not exist: "not found" proves access, 401/403 disproves it


@register("sap")
class SapConnector(HttpConnector):
    """SAP Commerce Cloud via OCC v2 and Integration API webhooks.

    Options (``cfg``): ``base_url`` (the API host), ``base_site_id`` (e.g. ``electronics``), ``client_id`` /
    ``client_secret`` (an OAuth client with ``ROLE_TRUSTED_CLIENT`` for orders and the express-update feed),
    ``token_path`` (default ``/authorizationserver/oauth/token``), ``occ_prefix`` (default ``/occ/v2``),
    ``page_size`` (default 100), ``catalog`` (``<catalogId>:<version>`` for the express-update feed, e.g.
    ``electronicsProductCatalog:Online``), ``currency`` / ``lang`` (OCC ``curr``/``lang``), ``media_url`` and
    ``storefront_url`` (prefixes of OCC's relative image and product URLs), ``integration_object`` (the
    webhook's Order integration object code, default ``KassaOrder``), ``integration_api`` (``user`` and
    ``password`` of an integration admin, to let the audit read webhook configurations), ``webhook_secret``
    and ``replay_window_seconds``.
    """

    platform = "sap"
    api_name = "SAP Commerce API"
    snippet_steps: ClassVar[list[str]] = [
        "Spartacus: add a CMS component (e.g. KassaOffersComponent) to the order confirmation page "
        "(OrderConfirmationPageTemplate, slot BodyContent) and map it with provideConfig({cmsComponents: …}) "
        "to an Angular component that reads OrderFacade.getOrderDetails() and loads the snippet.",
        "Accelerator (JSP storefront): add the snippet tag to "
        "checkout/checkoutConfirmationPage.jsp (or a CMS JSP include) using ${orderData}.",
        "Pass order code, currency, totalPrice, entries and deliveryAddress.country.isocode to the snippet.",
    ]
    webhook_steps: ClassVar[list[str]] = [
        "Create the Order integration object KassaOrder (ImpEx in docs/integrations/sap.md).",
        "Create a ConsumedDestination to https://<kassa>/v1/webhooks/sap and a WebhookConfiguration for "
        "de.hybris.platform.webhookservices.event.ItemCreatedEvent on KassaOrder.",
        "Deploy the kassawebhooks extension's interceptor, which adds X-Kassa-Signature with the shared secret.",
    ]

    def __init__(self, cfg: Mapping[str, Any], **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(cfg, **options)
        self.page_size = self._page_size(100, 1000)
        self.integration_object = str(self.cfg.get("integration_object") or "KassaOrder")
        self._token = BearerToken(lifetime=3600.0)

    # ------------------------------------------------------------------ config and HTTP
    @property
    def base_url(self) -> str:
        return self._need("base_url").rstrip("/")

    @property
    def occ(self) -> str:
        prefix = str(self.cfg.get("occ_prefix") or "/occ/v2").rstrip("/")
        return f"{prefix}/{quote(self._need('base_site_id'), safe='')}"

    def _open_http(self) -> HttpClient:
        return self._new_http(self.base_url)

    def _bearer(self, force: bool = False) -> str:
        path = str(self.cfg.get("token_path") or "/authorizationserver/oauth/token")
        return self._token.get(self.http, self.base_url + path, {"grant_type": "client_credentials"},
                               self._need("client_id"), self._need("client_secret"), force=force)

    def _params(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"fields": "FULL"}
        for key in ("currency", "lang"):
            if self.cfg.get(key):
                params["curr" if key == "currency" else key] = self.cfg[key]
        params.update(extra or {})
        return params

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET under the OCC site prefix with the bearer token; a 401 fetches a new token once."""
        return get_with_bearer(self.http, self.occ + path, self._params(params), self._bearer)

    # ------------------------------------------------------------------ webhooks
    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookDelivery:
        return verify_kassa_delivery(headers, raw_body, self.secret, self.replay_window, self.clock(), "ce-type")

    def is_order_topic(self, topic: str) -> bool:
        """``sap.cx.commerce.<IO>.Created.v1`` (or ``.Updated.`` from an ``ItemSavedEvent`` webhook) of the
        configured Order integration object; updates of a known order dedupe on its event id."""
        if topic == "order.created":
            return True
        m = _CE_TYPE.match(topic)
        return bool(m and m.group("io") == self.integration_object and m.group("op") in ("Created", "Updated"))

    def is_refund_topic(self, topic: str) -> bool:
        """An ``Updated`` of the Order integration object may bring its cancellation (``parse_refund``)."""
        m = _CE_TYPE.match(topic)
        return bool(m and m.group("io") == self.integration_object and m.group("op") == "Updated")

    def parse_refund(self, topic: str, payload: dict[str, Any]) -> Refund | None:
        """An order saved with ``status`` ``CANCELLED`` (the integration object's ``{"code": …}`` of the
        OrderStatus enum, or OCC's plain string): the whole order. None for any other status (read as an
        order, a duplicate of the placed one)."""
        order = payload.get("d") if isinstance(payload.get("d"), dict) else payload
        assert isinstance(order, dict)
        status = order.get("status")
        code = status.get("code") if isinstance(status, dict) else status
        if not isinstance(code, str) or code.upper() != "CANCELLED":
            return None
        changed = order.get("modifiedtime") or order.get("modifiedTime")
        when = _sap_time(changed, "modifiedtime") if changed is not None else parse_time(self.clock(), "time")
        return Refund(self.platform, required_id(order, "code", "SAP Commerce order"), None, when)

    # ------------------------------------------------------------------ parsing
    def parse_order(self, payload: dict[str, Any]) -> Order:
        """An OCC order (``fields=FULL``) or the integration-object payload of the Kassa order webhook."""
        payload = object_payload(payload, "an SAP Commerce order")
        order = payload.get("d") if isinstance(payload.get("d"), dict) else payload  # OData v2 envelope
        assert isinstance(order, dict)
        code = required_id(order, "code", "SAP Commerce order")
        created_raw = order.get("created", order.get("date"))
        if created_raw is None:
            raise PayloadError(f"order {code} has no `created`/`date`", "created")
        total_raw = order.get("totalPrice")
        if total_raw is None:
            raise PayloadError(f"order {code} has no `totalPrice`", "totalPrice")
        total, currency = _money(total_raw, "totalPrice")
        sub_raw = order.get("subTotal", order.get("subtotal"))
        subtotal = _money(sub_raw, "subTotal")[0] if sub_raw is not None else total
        if currency is None:
            cur = order.get("currency")
            currency = cur.get("isocode") if isinstance(cur, dict) else cur
        lines = []
        for i, entry in enumerate(_collection(order.get("entries"), "entries")):
            product = entry.get("product") if isinstance(entry.get("product"), dict) else {}
            assert isinstance(product, dict)
            sku = clip_id(product.get("code"))
            if sku is None:
                raise PayloadError(f"entries[{i}] has no product code", f"entries[{i}].product.code")
            qty = int(to_decimal(entry.get("quantity", 1), f"entries[{i}].quantity"))
            base = entry.get("basePrice")
            if base is not None:
                unit = _money(base, f"entries[{i}].basePrice")[0]
            else:
                line_total = _money(entry.get("totalPrice", 0), f"entries[{i}].totalPrice")[0]
                unit = line_total / qty if qty else line_total
            categories = product.get("categories", product.get("supercategories"))
            category = _first_category(_collection(categories, f"entries[{i}].product.categories")) \
                if categories is not None else None
            lines.append(OrderLine(sku, sku, category, qty, unit))
        user = order.get("user") if isinstance(order.get("user"), dict) else {}
        assert isinstance(user, dict)
        uid = str(user.get("uid") or "")
        guest = bool(order.get("guestCustomer")) or "|" in uid  # guests' uid is "<guid>|<email>"
        email = uid.rpartition("|")[2] if "@" in uid else None
        customer_id = None if guest else clip_id(user.get("customerId") or user.get("customerID"))
        address = order.get("deliveryAddress") if isinstance(order.get("deliveryAddress"), dict) else {}
        assert isinstance(address, dict)
        country = address.get("country")
        return Order(
            platform=self.platform,
            order_id=code,
            order_number=code,
            customer_id=customer_id,
            email_sha256=email_sha256(email),
            created_at=_sap_time(created_raw, "created"),
            currency=currency_code(currency, None, "currency"),
            subtotal=subtotal,
            total=total,
            ship_country=country_code(country.get("isocode") if isinstance(country, dict) else country),
            lines=tuple(lines),
        )

    def parse_product(self, payload: dict[str, Any]) -> Product:
        """An OCC product (``fields=FULL``)."""
        payload = object_payload(payload, "an SAP Commerce product")
        code = required_id(payload, "code", "SAP Commerce product")
        price_raw = payload.get("price")
        if not isinstance(price_raw, dict) or price_raw.get("value") is None:
            raise PayloadError(f"product {code} has no price for this site and currency", "price")
        price, currency = _money(price_raw, "price")
        stock: int | None = None
        stock_raw = payload.get("stock")
        if isinstance(stock_raw, dict):
            if stock_raw.get("stockLevel") is not None:
                stock = max(0, int(to_decimal(stock_raw["stockLevel"], "stock.stockLevel")))
            elif stock_raw.get("stockLevelStatus") == "outOfStock":
                stock = 0
        if payload.get("purchasable") is False:
            stock = 0
        categories = payload.get("categories")
        category = _first_category(categories) if isinstance(categories, list) else None
        base_product = clip_id(payload.get("baseProduct"))
        return Product(
            sku=code,
            product_id=base_product or code,
            title=str(payload.get("name") or code),
            price=price,
            currency=currency_code(currency, self.cfg.get("currency"), "price.currencyIso"),
            category_path=(category,) if category else (),
            stock=stock,
            image_url=self._absolute(_primary_image(payload.get("images")), "media_url"),
            url=self._absolute(payload.get("url"), "storefront_url"),
            updated_at=None,  # OCC exposes no modification time; the express-update feed drives increments
        )

    def _absolute(self, url: Any, prefix_key: str) -> str | None:
        if not isinstance(url, str) or not url:
            return None
        if url.startswith(("http://", "https://")):
            return url
        prefix = str(self.cfg.get(prefix_key) or self.cfg.get("base_url") or "").rstrip("/")
        return prefix + url if prefix else url

    # ------------------------------------------------------------------ catalog
    def _search(self, page: int) -> tuple[list[dict[str, Any]], int]:
        data = self._get("/products/search", {"query": "", "currentPage": page, "pageSize": self.page_size})
        if not isinstance(data, dict):
            raise PayloadError(f"products/search returned {type(data).__name__}, not a search page")
        products = data.get("products", [])
        pagination = data.get("pagination")
        total_pages = pagination.get("totalPages") if isinstance(pagination, dict) else None
        if not isinstance(products, list) or not isinstance(total_pages, int) or isinstance(total_pages, bool):
            raise PayloadError("products/search page lacks a `products` list or `pagination.totalPages`",
                               "pagination.totalPages")
        if not all(isinstance(p, dict) for p in products):
            raise PayloadError("products/search page has a product that is not an object", "products")
        return products, total_pages

    def iter_products(self, cursor: str | None = None) -> Iterator[tuple[list[Product], str | None]]:
        """A full crawl, then increments.

        Cursors: ``page:<n>@<started>`` resumes a full crawl at page ``n`` (0-based); when the crawl ends the
        cursor becomes ``since:<started>`` and the next sync reads only the products the express-update feed
        lists as changed since then (``since:<t>#<offset>`` resumes inside one increment).
        """
        now = _occ_timestamp(self.clock())
        if not cursor:
            kind, arg, started = "page", 0, now
        else:
            m = re.fullmatch(r"page:(\d+)@(.+)|since:([^#]+)(?:#(\d+))?", cursor)
            if not m:
                raise PayloadError(f"not an SAP Commerce catalog cursor: {cursor!r}")
            if m.group(1) is not None:
                kind, arg, started = "page", int(m.group(1)), m.group(2)
            else:
                kind, arg, started = "since", int(m.group(4) or 0), m.group(3)
        if kind == "page":
            page = arg
            while True:
                raws, total_pages = self._search(page)
                page += 1
                done = page >= total_pages or not raws
                yield self._parse_products(raws, "code"), (f"since:{started}" if done else f"page:{page}@{started}")
                if done:
                    return
        codes = self._express_update(started)
        offset = arg
        while offset < len(codes):
            batch = codes[offset:offset + self.page_size]
            raws = []
            for code in batch:
                try:
                    raws.append(self._get(f"/products/{quote(code, safe='')}"))
                except HttpStatusError as exc:
                    self.skipped.append(f"{code}: {exc}")  # deleted or unapproved since it was queued
            offset += len(batch)
            finished = offset >= len(codes)
            yield self._parse_products([r for r in raws if isinstance(r, dict)], "code"), (
                f"since:{now}" if finished else f"since:{started}#{offset}")

    def _express_update(self, since: str) -> list[str]:
        params: dict[str, Any] = {"timestamp": since}
        if self.cfg.get("catalog"):
            params["catalog"] = self.cfg["catalog"]
        data = self._get("/products/expressupdate", params)
        refs = data.get("productReferences") if isinstance(data, dict) else None
        if refs is None:
            refs = []
        if not isinstance(refs, list) or not all(isinstance(r, dict) and r.get("code") for r in refs):
            raise PayloadError("products/expressupdate answer lacks `productReferences` with codes",
                               "productReferences")
        seen: dict[str, None] = {}
        for ref in refs:
            seen.setdefault(str(ref["code"]), None)
        return list(seen)

    def count_products(self, cursor: str | None = None) -> int | None:
        """Products a run from ``cursor`` will read (a progress hint; ``None`` if unknown)."""
        try:
            m = re.fullmatch(r"page:(\d+)@.+|since:([^#]+)(?:#(\d+))?", cursor or "page:0@now")
            if m is None:
                self.total_hint = None
            elif m.group(1) is not None:
                data = self._get("/products/search", {"query": "", "currentPage": 0, "pageSize": 1})
                total = data.get("pagination", {}).get("totalResults") if isinstance(data, dict) else None
                done = int(m.group(1)) * self.page_size
                self.total_hint = max(0, int(total) - done) if isinstance(total, int) else None
            else:
                self.total_hint = max(0, len(self._express_update(m.group(2))) - int(m.group(3) or 0))
        except IntegrationError:
            self.total_hint = None
        return self.total_hint

    def get_order(self, order_id: str) -> Order:
        """``<userId>/<code>`` reads ``/users/{userId}/orders/{code}``; a bare code uses the trusted-client
        ``/orders/{code}`` (code or guid)."""
        user, sep, code = order_id.rpartition("/")
        path = f"/users/{quote(user, safe='')}/orders/{quote(code, safe='')}" if sep else \
            f"/orders/{quote(order_id, safe='')}"
        data = self._get(path)
        if not isinstance(data, dict):
            raise PayloadError(f"GET {path} did not return an order object")
        return self.parse_order(data)

    # ------------------------------------------------------------------ audit
    def audit(self) -> list[AuditCheck]:
        first: list[dict[str, Any]] = []

        def probe_missing(path: str, found: str, what: str) -> str:
            try:
                self._get(path)
            except HttpStatusError as exc:
                if exc.status in (400, 404) and ("UnknownIdentifier" in exc.body or "not found" in exc.body.lower()):
                    return found
                raise
            return f"{what} answered for a probe code (unexpected, but access is granted)"

        def products() -> str:
            data = self._get("/products/search", {"query": "", "currentPage": 0, "pageSize": 1})
            pagination = data.get("pagination") if isinstance(data, dict) else None
            if not isinstance(pagination, dict):
                raise PayloadError("products/search page lacks `pagination`")
            if isinstance(data.get("products"), list):
                first.extend(p for p in data["products"][:1] if isinstance(p, dict))
            return f"{pagination.get('totalResults')} products searchable on {self._need('base_site_id')}"

        def orders() -> str:
            return probe_missing(
                f"/orders/{_PROBE}",
                "order endpoint readable by this client (OCC cannot list all orders, so how far back depends on "
                "the order codes Kassa receives)",
                "orders",
            )

        def webhooks() -> AuditCheck | str:
            creds = self.cfg.get("integration_api")
            if not isinstance(creds, dict) or not creds.get("user"):
                return AuditCheck(
                    "order_webhooks", "missing_scope",
                    "webhook configurations are read through the Integration API: set sap.integration_api.user/"
                    "password (an integrationadmingroup member) to let the audit check them")
            response = self.http.get(
                "/odata2webservices/WebhookService/WebhookConfigurations",
                {"$expand": "integrationObject,destination", "$format": "json"},
                headers={"Authorization": "Basic " + _basic(str(creds["user"]), str(creds.get("password") or ""))},
            ).data
            rows = response.get("d", {}).get("results") if isinstance(response, dict) else None
            if not isinstance(rows, list):
                raise PayloadError("WebhookConfigurations answer lacks d.results")
            for row in rows:
                io = (row.get("integrationObject") or {}).get("code")
                url = str((row.get("destination") or {}).get("url") or "")
                if io == self.integration_object and "/v1/webhooks/sap" in url:
                    return f"webhook on {io} ({str(row.get('eventType')).rsplit('.', 1)[-1]}) posts to {url}"
            return AuditCheck("order_webhooks", "missing_scope",
                              f"no webhook configuration sends {self.integration_object} to /v1/webhooks/sap "
                              f"({len(rows)} configurations found)")

        def inventory() -> str:
            if not first:
                return "no product to probe stock with"
            code = str(first[0].get("code"))
            stock = self._get(f"/products/{quote(code, safe='')}").get("stock")
            if not isinstance(stock, dict):
                raise HttpStatusError(f"product {code} carries no stock data", 404)
            return f"stock readable (product {code}: {stock.get('stockLevel', stock.get('stockLevelStatus'))})"

        def customers() -> str:
            return probe_missing(
                f"/users/{_PROBE}@example.invalid",
                "customer records readable by this client (trusted client); orders give uid-based email hashes",
                "users",
            )

        return self._run_audit({"read_products": products, "read_orders": orders, "order_webhooks": webhooks,
                                "inventory": inventory, "customer_data": customers})

    def _refusal_detail(self, exc: AuthError | SetupMissing, capability: str) -> str:
        return _occ_message(str(exc), exc.status) if isinstance(exc, AuthError) else str(exc)

    def _failure_detail(self, exc: HttpStatusError) -> str:
        return _occ_message(str(exc), exc.status)


# --------------------------------------------------------------------------- helpers
def _basic(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _occ_timestamp(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S+0000")


def _sap_time(value: Any, field: str) -> datetime:
    """OCC's ``2025-01-03T14:07:21+0000``, OData v2's ``/Date(1735913241000)/`` or ISO 8601."""
    if isinstance(value, str):
        m = _ODATA_DATE.match(value.strip())
        if m:  # parse_time refuses a time out of datetime's range (was a ValueError or OSError: a 500)
            try:
                seconds = int(m.group(1)) / 1000
            except (ValueError, OverflowError):  # past int's digit limit, or a float
                raise PayloadError(f"timestamp out of range: {value!r}", field) from None
            return parse_time(seconds, field)
        text = value.strip()
        if re.search(r"[+-]\d{4}$", text):
            text = text[:-2] + ":" + text[-2:]  # +0000 -> +00:00 for fromisoformat
        return parse_time(text, field)
    return parse_time(value, field)


def _money(value: Any, field: str) -> tuple[Any, str | None]:
    """A ``PriceWsDTO`` (``{"value", "currencyIso"}``) or a bare number from an integration object."""
    if isinstance(value, dict):
        return to_decimal(value.get("value"), f"{field}.value"), value.get("currencyIso")
    return to_decimal(value, field), None


def _collection(value: Any, field: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, dict) and isinstance(value.get("results"), list):
        value = value["results"]  # OData v2 collection
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise PayloadError(f"`{field}` must be a list of objects", field)
    return value


def _first_category(categories: list[Any]) -> str | None:
    """The first merchandising category (brand categories in the electronics sample are ``brand_*``)."""
    for c in categories:
        if isinstance(c, dict) and c.get("code") and not str(c["code"]).startswith("brand_"):
            return str(c.get("name") or c["code"])
    return None


def _primary_image(images: Any) -> str | None:
    if not isinstance(images, list):
        return None
    ranked = sorted((i for i in images if isinstance(i, dict) and i.get("url")),
                    key=lambda i: (i.get("imageType") != "PRIMARY", i.get("format") != "product"))
    return str(ranked[0]["url"]) if ranked else None


def _occ_message(text: str, status: int | None) -> str:
    """OCC's ``errors[].type: message`` (or the OAuth server's ``error: error_description``), whether the
    error body arrives whole or as the shared client's excerpt of it."""
    body = re.sub(r"^sap (?:token endpoint )?HTTP \d+(?: on \S+ \S+)?: ", "", text)
    try:
        data = json.loads(body)
    except ValueError:
        return text
    if isinstance(data, dict) and isinstance(data.get("errors"), list):
        data = data["errors"]
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return f"HTTP {status}: {data[0].get('type')}: {data[0].get('message')}"
    if isinstance(data, dict) and data.get("error"):
        return f"HTTP {status}: {data.get('error')}: {data.get('error_description', '')}".rstrip(": ")
    return text


__all__ = ["SapConnector"]
