"""`ShopifyFake`: a local stand-in for the Shopify GraphQL Admin API, in its public response shapes.

Speaks ``POST /admin/api/{version}/graphql.json`` with ``X-Shopify-Access-Token``: the ``products``
connection (``UPDATED_AT`` order, opaque cursors, ``pageInfo``, ``updated_at:>``/``>=`` search), ``order(id:)``,
``currentAppInstallation.accessScopes``, ``webhookSubscriptions`` and the audit probes; ``extensions.cost``
with ``throttleStatus`` on every answer; ``THROTTLED`` and ``ACCESS_DENIED`` errors; a 401 with Shopify's
error text for a bad token. The catalog is either a list of product nodes or generated on the fly
(``generated=100_000`` costs no memory per product, for the sync benchmark).
"""

from __future__ import annotations

import base64
import bisect
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.integrations.fakes.base import FakeRequest, FakeResponse, FakeServer

API_VERSION = "2025-07"
BAD_TOKEN = {"errors": "[API] Invalid API key or access token (unrecognized login or wrong password)"}
ALL_SCOPES = ("read_products", "read_orders", "read_all_orders", "read_inventory", "read_customers")
_SINCE = re.compile(r"updated_at:>(=?)'([^']+)'")
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def product_node(i: int, updated_at: datetime | None = None, **overrides: Any) -> dict[str, Any]:
    """A product node in the shape the connector's query asks for (deterministic from ``i``)."""
    updated = updated_at or (_EPOCH + timedelta(seconds=i))
    node: dict[str, Any] = {
        "id": f"gid://shopify/Product/{1_000_000 + i}",
        "legacyResourceId": str(1_000_000 + i),
        "title": f"Product {i}",
        "handle": f"product-{i}",
        "productType": f"type-{i % 40}",
        "status": "ACTIVE",
        "updatedAt": _iso(updated),
        "onlineStoreUrl": f"https://fake-shop.myshopify.com/products/product-{i}",
        "totalInventory": i % 17,
        "tracksInventory": True,
        "category": None,
        "featuredMedia": {"preview": {"image": {"url": f"https://cdn.shopify.com/p/{i}.jpg"}}},
        "priceRangeV2": {"minVariantPrice": {"amount": f"{(i % 500) + 0.99:.2f}", "currencyCode": "USD"}},
        "variants": {"nodes": [{"id": f"gid://shopify/ProductVariant/{5_000_000 + i}",
                                "legacyResourceId": str(5_000_000 + i), "sku": f"SKU-{i:06d}",
                                "price": f"{(i % 500) + 0.99:.2f}", "inventoryQuantity": i % 17}]},
    }
    node.update(overrides)
    return node


class _Generated(Sequence[dict[str, Any]]):
    """``n`` products, product ``i`` updated at epoch + i seconds: sorted by construction."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [product_node(j) for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return product_node(i)


class ShopifyFake(FakeServer):
    platform = "shopify"

    def __init__(self, products: list[dict[str, Any]] | None = None, generated: int = 0, token: str = "shpat_test",
                 scopes: Sequence[str] = ALL_SCOPES, api_version: str = API_VERSION) -> None:
        super().__init__()
        self.token = token
        self.scopes = set(scopes)
        self.path = f"/admin/api/{api_version}/graphql.json"
        self.products: Sequence[dict[str, Any]] = (
            _Generated(generated) if generated else sorted(products or [], key=lambda p: (p["updatedAt"], p["id"])))
        self.orders: dict[str, dict[str, Any]] = {}
        self.webhook_subscriptions: list[dict[str, Any]] = []
        # Bucket state reported in extensions.cost (the fake does not drain it; tests set it).
        self.maximum_available = 2000.0
        self.currently_available = 2000.0
        self.restore_rate = 100.0
        self.throttle_graphql = 0  # answer this many queries with a THROTTLED error
        self.queries: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ helpers
    def _cost(self, requested: float, actual: float | None) -> dict[str, Any]:
        return {"cost": {"requestedQueryCost": requested, "actualQueryCost": actual,
                         "throttleStatus": {"maximumAvailable": self.maximum_available,
                                            "currentlyAvailable": self.currently_available,
                                            "restoreRate": self.restore_rate}}}

    def _ok(self, data: dict[str, Any], requested: float) -> FakeResponse:
        return FakeResponse.json({"data": data, "extensions": self._cost(requested, requested)})

    def _denied(self, field: str, scope: str, requested: float) -> FakeResponse:
        error = {"message": f"Access denied for {field} field. Required access: `{scope}` access scope.",
                 "locations": [{"line": 1, "column": 9}], "path": [field],
                 "extensions": {"code": "ACCESS_DENIED", "documentation": "https://shopify.dev/api/usage/access-scopes",
                                "requiredAccess": f"`{scope}` access scope."}}
        return FakeResponse.json({"errors": [error], "data": None, "extensions": self._cost(requested, None)})

    # ------------------------------------------------------------------ routing
    def handle(self, request: FakeRequest) -> FakeResponse:
        if request.method != "POST" or request.path != self.path:
            return FakeResponse.json({"errors": "Not Found"}, 404)
        if request.headers.get("x-shopify-access-token") != self.token:
            return FakeResponse.json(BAD_TOKEN, 401)
        body = request.json()
        query: str = body.get("query", "")
        variables: dict[str, Any] = body.get("variables") or {}
        self.queries.append(body)
        if self.throttle_graphql > 0:
            self.throttle_graphql -= 1
            return FakeResponse.json({
                "errors": [{"message": "Throttled", "extensions": {
                    "code": "THROTTLED", "documentation": "https://shopify.dev/api/usage/rate-limits"}}],
                "extensions": self._cost(202, None)})
        if "KassaCount" in query:
            return self._ok({"productsCount": {"count": len(self._matching(variables))}}, 1)
        if "KassaProducts" in query:
            return self._products(variables)
        if "KassaOrder" in query:
            return self._order(variables)
        if "KassaAudit" in query:
            return self._ok({"shop": {"name": "Fake Shop", "currencyCode": "USD"},
                             "currentAppInstallation": {"accessScopes": [{"handle": s} for s in sorted(self.scopes)]}},
                            2)
        if "webhookSubscriptions" in query:
            return self._ok({"webhookSubscriptions": {"nodes": self.webhook_subscriptions}}, 27)
        for needle, field, scope in (("products(", "products", "read_products"),
                                     ("orders(", "orders", "read_orders"),
                                     ("inventoryItems(", "inventoryItems", "read_inventory"),
                                     ("customers(", "customers", "read_customers")):
            if needle in query:
                if scope not in self.scopes:
                    return self._denied(field, scope, 3)
                return self._ok({field: {"nodes": self._probe(field)}}, 3)
        return FakeResponse.json({"errors": [{"message": "fake: unsupported query"}]}, 200)

    def _probe(self, field: str) -> list[dict[str, Any]]:
        if field == "products":
            return [{"id": p["id"], "updatedAt": p["updatedAt"]} for p in self.products[:1]]
        if field == "orders":
            oldest = sorted(self.orders.values(), key=lambda o: o["createdAt"])[:1]
            return [{"id": o["id"], "createdAt": o["createdAt"]} for o in oldest]
        if field == "inventoryItems":
            return [{"id": "gid://shopify/InventoryItem/1", "tracked": True}]
        return [{"id": "gid://shopify/Customer/1"}]

    def _products(self, variables: dict[str, Any]) -> FakeResponse:
        first = int(variables.get("first") or 50)
        requested = 2 + first * 2
        if "read_products" not in self.scopes:
            return self._denied("products", "read_products", requested)
        start = self._first_matching(variables)
        after = variables.get("after")
        if after:
            try:
                start = int(base64.b64decode(after).decode().split(":", 1)[1]) + 1
            except (ValueError, IndexError):
                return FakeResponse.json({"errors": [{"message": "Invalid cursor for current pagination."}],
                                          "extensions": self._cost(requested, None)})
        end = min(len(self.products), start + first)
        nodes = list(self.products[start:end])
        has_next = end < len(self.products)
        end_cursor = base64.b64encode(f"cursor:{end - 1}".encode()).decode() if nodes else None
        return self._ok({"products": {"pageInfo": {"hasNextPage": has_next, "endCursor": end_cursor},
                                      "nodes": nodes}}, requested)

    def _first_matching(self, variables: dict[str, Any]) -> int:
        match = _SINCE.search(variables.get("query") or "")
        if not match:
            return 0
        inclusive, since = match.group(1) == "=", match.group(2)
        finder = bisect.bisect_left if inclusive else bisect.bisect_right
        return finder(self.products, since, key=lambda p: p["updatedAt"])

    def _matching(self, variables: dict[str, Any]) -> range:
        return range(self._first_matching(variables), len(self.products))

    def _order(self, variables: dict[str, Any]) -> FakeResponse:
        if "read_orders" not in self.scopes:
            return self._denied("order", "read_orders", 10)
        order_id = str(variables.get("id", "")).rsplit("/", 1)[-1]
        return self._ok({"order": self.orders.get(order_id)}, 10)
