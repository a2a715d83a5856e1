"""`WooCommerceFake`: a local stand-in for the WooCommerce REST API v3 (``/wp-json/wc/v3``).

Public response shapes: products/orders/customers/webhooks lists with ``page``/``per_page`` and the
``X-WP-Total`` / ``X-WP-TotalPages`` headers, ``modified_after`` filtering, single orders, the current
currency; consumer key/secret by HTTP Basic auth (or query string); WooCommerce's own error bodies
(``woocommerce_rest_authentication_error`` 401, ``woocommerce_rest_cannot_view`` for a key without read
permission on a resource, ``woocommerce_rest_shop_order_invalid_id`` 404).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.integrations.fakes.base import FakeRequest, FakeResponse, FakeServer

PREFIX = "/wp-json/wc/v3"
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def _gmt(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S")


def wc_product(i: int, modified: datetime | None = None, **overrides: Any) -> dict[str, Any]:
    stamp = _gmt(modified or (_EPOCH + timedelta(seconds=i)))
    product: dict[str, Any] = {
        "id": 100 + i, "name": f"Woo Product {i}", "slug": f"woo-product-{i}",
        "permalink": f"https://woo.example/product/woo-product-{i}/", "date_modified_gmt": stamp,
        "date_created_gmt": stamp, "type": "simple", "status": "publish", "sku": f"WOO-{i:05d}",
        "price": f"{(i % 90) + 9.5:.2f}", "regular_price": f"{(i % 90) + 9.5:.2f}", "manage_stock": i % 2 == 0,
        "stock_quantity": (i % 11) if i % 2 == 0 else None, "stock_status": "instock",
        "categories": [{"id": 9 + i % 5, "name": f"cat-{i % 5}", "slug": f"cat-{i % 5}"}],
        "images": [{"id": 1000 + i, "src": f"https://woo.example/wp-content/uploads/{i}.jpg"}],
    }
    product.update(overrides)
    return product


def _error(code: str, message: str, status: int) -> FakeResponse:
    return FakeResponse.json({"code": code, "message": message, "data": {"status": status}}, status)


class WooCommerceFake(FakeServer):
    platform = "woocommerce"

    def __init__(self, products: list[dict[str, Any]] | None = None, key: str = "ck_test", secret: str = "cs_test",
                 denied: Sequence[str] = (), currency: str = "USD") -> None:
        super().__init__()
        self.key, self.secret = key, secret
        self.products = sorted(products or [], key=lambda p: p["id"])
        self.orders: dict[str, dict[str, Any]] = {}
        self.webhooks: list[dict[str, Any]] = []
        self.customers: list[dict[str, Any]] = [{"id": 1, "email": "c1@example.com"}]
        self.denied = set(denied)  # resources this key may not read ("products", "orders", "webhooks", ...)
        self.currency = currency

    def _authorized(self, request: FakeRequest) -> bool:
        header = request.headers.get("authorization", "")
        if header.startswith("Basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return False
            return user == self.key and password == self.secret
        return request.param("consumer_key") == self.key and request.param("consumer_secret") == self.secret

    def handle(self, request: FakeRequest) -> FakeResponse:
        if not request.path.startswith(PREFIX):
            return _error("rest_no_route", "No route was found matching the URL and request method.", 404)
        if not self._authorized(request):
            return _error("woocommerce_rest_authentication_error", "Consumer key is invalid.", 401)
        path = request.path[len(PREFIX):].strip("/")
        resource = path.split("/", 1)[0]
        if resource in self.denied:
            return _error("woocommerce_rest_cannot_view", "Sorry, you cannot list resources.", 401)
        if path == "data/currencies/current":
            return FakeResponse.json({"code": self.currency, "name": "United States (US) dollar", "symbol": "$"})
        if path == "products":
            items = self.products
            after = request.param("modified_after")
            if after:
                items = [p for p in items if p["date_modified_gmt"] > after]
            return self._page(request, items)
        if path == "orders":
            items = sorted(self.orders.values(), key=lambda o: o["date_created_gmt"],
                           reverse=request.param("order", "desc") == "desc")
            return self._page(request, items)
        if path.startswith("orders/"):
            order = self.orders.get(path.split("/", 1)[1])
            if order is None:
                return _error("woocommerce_rest_shop_order_invalid_id", "Invalid ID.", 404)
            return FakeResponse.json(order)
        if path == "webhooks":
            return self._page(request, self.webhooks)
        if path == "customers":
            return self._page(request, self.customers)
        return _error("rest_no_route", "No route was found matching the URL and request method.", 404)

    @staticmethod
    def _page(request: FakeRequest, items: Sequence[dict[str, Any]]) -> FakeResponse:
        try:
            page = int(request.param("page", "1") or 1)
            per_page = int(request.param("per_page", "10") or 10)
        except ValueError:
            return _error("rest_invalid_param", "Invalid parameter(s): page", 400)
        if not 1 <= per_page <= 100:
            return _error("rest_invalid_param", "Invalid parameter(s): per_page", 400)
        total_pages = max(1, math.ceil(len(items) / per_page)) if items else 0
        chunk = list(items[(page - 1) * per_page: page * per_page])
        return FakeResponse.json(chunk, headers={"X-WP-Total": str(len(items)), "X-WP-TotalPages": str(total_pages)})
