"""A fake Magento 2 / Adobe Commerce REST API for the connector tests.

Speaks the public ``/rest/V1`` shape: ``searchCriteria`` filter groups (filters OR-ed inside a group, groups
AND-ed), sort orders, ``pageSize``/``currentPage`` with Magento's habit of answering a page past the end with
the last page again, ``total_count``; ACL refusals as Magento words them (HTTP 401, ``%resources``
placeholder plus ``parameters``); Bearer integration tokens and OAuth 1.0a HMAC-SHA256 signatures (checked
with a nonce log, as Magento does); and the Adobe I/O Events subscription list.
"""

from __future__ import annotations

import copy
import json
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from kassa.integrations.magento import oauth_base_string, oauth_signature
from tests.integrations.fakes.base import FakeRequest, FakeResponse, FakeServer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "magento"

ALL_RESOURCES = frozenset({
    "Magento_Catalog::products",
    "Magento_Catalog::categories",
    "Magento_Sales::sales",
    "Magento_AdobeCommerceEventsClient::event_list",
    "Magento_CatalogInventory::cataloginventory",
    "Magento_Customer::customer",
})

_CRITERIA = re.compile(r"^searchCriteria\[(.+)\]$")


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def make_products(n: int, start: datetime | None = None) -> list[dict[str, Any]]:
    """``n`` products shaped like ``GET /V1/products`` items; several share one ``updated_at`` (as a bulk
    import leaves them), which is what keyset paging must cope with."""
    base = start or datetime(2025, 1, 1, tzinfo=UTC)
    template = load_fixture("product.json")
    out = []
    for i in range(1, n + 1):
        p = copy.deepcopy(template)
        p["id"] = i
        p["sku"] = f"SKU-{i:06d}"
        p["name"] = f"Product {i}"
        p["price"] = round(5 + (i % 97) * 1.25, 2)
        p["updated_at"] = (base + timedelta(minutes=i // 3)).strftime("%Y-%m-%d %H:%M:%S")
        p["custom_attributes"] = [
            {"attribute_code": "url_key", "value": f"product-{i}"},
            {"attribute_code": "image", "value": f"/p/{i}.jpg"},
        ]
        p["extension_attributes"]["category_links"] = [{"position": 0, "category_id": "4" if i % 2 else "5"}]
        out.append(p)
    return out


def _resource_for(path: str) -> str | None:
    for prefix, resource in (
        ("/products", "Magento_Catalog::products"),
        ("/categories", "Magento_Catalog::categories"),
        ("/orders", "Magento_Sales::sales"),
        ("/eventing", "Magento_AdobeCommerceEventsClient::event_list"),
        ("/stockItems", "Magento_CatalogInventory::cataloginventory"),
        ("/customers", "Magento_Customer::customer"),
    ):
        if path.startswith(prefix):
            return resource
    return None


def _compare(left: Any, right: str) -> tuple[Any, Any]:
    try:
        return float(left), float(right)
    except (TypeError, ValueError):
        return str(left), right


def _sort_key(value: Any) -> tuple[int, float, str]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _matches(item: dict[str, Any], field: str, value: str, condition: str, id_field: str) -> bool:
    actual = item.get(id_field if field == "entity_id" else field)
    if condition == "in":
        return str(actual) in value.split(",")
    if condition == "like":
        pattern = re.escape(value).replace("%", ".*")
        return re.fullmatch(pattern, str(actual)) is not None
    a, b = _compare(actual, value)
    return {
        "eq": a == b, "neq": a != b, "gt": a > b, "gteq": a >= b, "lt": a < b, "lteq": a <= b,
    }[condition]


def search(items: list[dict[str, Any]], query: dict[str, list[str]], id_field: str) -> dict[str, Any]:
    """Apply a ``searchCriteria`` query string the way Magento's repository ``getList`` does."""
    groups: dict[int, dict[int, dict[str, str]]] = {}
    sorts: dict[int, dict[str, str]] = {}
    page_size = 0
    current = 1
    for key, values in query.items():
        m = _CRITERIA.match(key)
        if not m:
            continue
        parts = m.group(1).split("][")
        value = values[0]
        if parts[0] == "filter_groups":
            groups.setdefault(int(parts[1]), {}).setdefault(int(parts[3]), {})[parts[4]] = value
        elif parts[0] == "sortOrders":
            sorts.setdefault(int(parts[1]), {})[parts[2]] = value
        elif parts[0] == "pageSize":
            page_size = int(value)
        elif parts[0] == "currentPage":
            current = int(value)
    selected = [
        item for item in items
        if all(
            any(_matches(item, f["field"], f.get("value", ""), f.get("condition_type", "eq"), id_field)
                for f in group.values())
            for group in groups.values()
        )
    ]
    for _, order in sorted(sorts.items(), reverse=True):
        name = id_field if order["field"] == "entity_id" else order["field"]
        selected.sort(key=lambda it, n=name: _sort_key(it.get(n)), reverse=order.get("direction") == "DESC")
    total = len(selected)
    if page_size:
        last_page = max(1, -(-total // page_size))
        current = min(current, last_page)  # Magento: a page past the end is the last page again
        page = selected[(current - 1) * page_size: current * page_size]
    else:
        page = selected
    return {"items": page, "search_criteria": {"current_page": current, "page_size": page_size}, "total_count": total}


class MagentoFake(FakeServer):
    platform = "magento"

    def __init__(self, token: str = "integration-token", products: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.token = token
        self.oauth: dict[str, str] | None = None  # consumer_key/secret, access_token/secret when OAuth is on
        self.resources = set(ALL_RESOURCES)
        self.products: list[dict[str, Any]] = products if products is not None else [load_fixture("product.json")]
        self.categories = load_fixture("categories.json")
        self.orders: list[dict[str, Any]] = [load_fixture("order.json")]
        self.subscriptions: list[dict[str, Any]] | None = load_fixture("event_subscriptions.json")
        self.customers = [{"id": 1, "email": "roni_cost@example.com"}]
        self.nonces: set[str] = set()

    # ------------------------------------------------------------------ auth
    def _unauthorized(self, resource: str) -> FakeResponse:
        return FakeResponse.json(
            {"message": "The consumer isn't authorized to access %resources.", "parameters": {"resources": resource}},
            401,
        )

    def _authenticated(self, request: FakeRequest) -> bool | FakeResponse:
        header = request.headers.get("authorization", "")
        if self.oauth is None:
            return header == f"Bearer {self.token}"
        if not header.startswith("OAuth "):
            return False
        fields = dict(re.findall(r'(\w+)="([^"]*)"', header))
        fields = {k: unquote(v) for k, v in fields.items()}
        if fields.get("oauth_consumer_key") != self.oauth["consumer_key"] or \
                fields.get("oauth_token") != self.oauth["access_token"]:
            return False
        if fields.get("oauth_signature_method") != "HMAC-SHA256":
            return False
        nonce = fields.get("oauth_nonce", "")
        if nonce in self.nonces:
            return FakeResponse.json(
                {"message": "The nonce is already being used by the consumer with ID %1", "parameters": ["1"]}, 401)
        query = [(k, v) for k, vs in request.query.items() for v in vs]
        params = query + [(k, v) for k, v in fields.items() if k.startswith("oauth_")]
        base = oauth_base_string(request.method, self.url + request.path, params)
        expected = oauth_signature(base, self.oauth["consumer_secret"], self.oauth["access_token_secret"])
        if fields.get("oauth_signature") != expected:
            return FakeResponse.json({"message": "The signature is invalid. Verify and try again."}, 401)
        self.nonces.add(nonce)
        return True

    # ------------------------------------------------------------------ routes
    def handle(self, request: FakeRequest) -> FakeResponse:
        m = re.match(r"^/rest(?:/[a-z0-9_]+)?/V1(/.*)$", request.path)
        if not m:
            return FakeResponse.json({"message": "Request does not match any route."}, 404)
        path = m.group(1)
        resource = _resource_for(path)
        auth = self._authenticated(request)
        if isinstance(auth, FakeResponse):
            return auth
        if not auth or (resource is not None and resource not in self.resources):
            return self._unauthorized(resource or "Magento_Backend::admin")
        if path == "/products":
            return FakeResponse.json(search(self.products, request.query, "id"))
        if path.startswith("/products/"):
            sku = unquote(path.split("/", 2)[2])
            for p in self.products:
                if p["sku"] == sku:
                    return FakeResponse.json(p)
            return self._no_entity()
        if path == "/categories":
            return FakeResponse.json(self.categories)
        if path == "/orders":
            return FakeResponse.json(search(self.orders, request.query, "entity_id"))
        if path.startswith("/orders/"):
            wanted = path.split("/", 2)[2]
            for o in self.orders:
                if str(o["entity_id"]) == wanted:
                    return FakeResponse.json(o)
            return self._no_entity()
        if path == "/eventing/getEventSubscriptions":
            if self.subscriptions is None:
                return FakeResponse.json({"message": "Request does not match any route."}, 404)
            return FakeResponse.json(self.subscriptions)
        if path.rstrip("/") == "/stockItems/lowStock":
            return FakeResponse.json({"items": [], "search_criteria": {}, "total_count": 0})
        if path == "/customers/search":
            return FakeResponse.json(search(self.customers, request.query, "id"))
        return FakeResponse.json({"message": "Request does not match any route."}, 404)

    @staticmethod
    def _no_entity() -> FakeResponse:
        return FakeResponse.json(
            {"message": "The entity that was requested doesn't exist. Verify the entity and try again."}, 404)


class AdobeKeyHostFake(FakeServer):
    """Stands in for static.adobeioevents.com: serves PEM public keys by path (``keys`` maps path -> PEM)."""

    platform = "adobe-keys"

    def __init__(self, keys: dict[str, str]) -> None:
        super().__init__()
        self.keys = keys
        self.delay = 0.0  # seconds each key takes to arrive (a slow CDN)

    def handle(self, request: FakeRequest) -> FakeResponse:
        if self.delay:
            time.sleep(self.delay)
        pem = self.keys.get(request.path)
        if pem is None:
            return FakeResponse(404, b"<Error><Code>NoSuchKey</Code></Error>", {"Content-Type": "application/xml"})
        return FakeResponse(200, pem.encode(), {"Content-Type": "application/x-pem-file"})
