"""A fake Salesforce B2C Commerce: SLAS token endpoint, SCAPI Shopper Search / Products / Orders, the
Account Manager token endpoint and OCAPI Shop ``order_search`` — one local server for all of them.

Speaks the public shapes: SLAS ``client_credentials`` with HTTP Basic client auth, bearer tokens that can be
revoked (so the connector's refresh-on-401 is exercised), SCAPI problem bodies (``title``/``type``/
``detail``) on 401/403/404, ``productSearch`` paging by ``offset``/``limit`` (limit ≤ 200), ``getProducts``
refusing more than 24 ids, ``getCategory`` with ``parentCategoryTree``, and OCAPI ``order_search`` with a
``range_filter`` on ``creation_date``, sorts, ``start``/``count`` and a 1,000-hit ceiling.
"""

from __future__ import annotations

import base64
import copy
import json
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote

from tests.integrations.fakes.base import FakeRequest, FakeResponse, FakeServer

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sfcc"
ORG = "f_ecom_zzrf_001"
SITE = "RefArch"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def problem(status: int, title: str, detail: str, slug: str) -> FakeResponse:
    return FakeResponse.json({
        "title": title, "detail": detail,
        "type": f"https://api.commercecloud.salesforce.com/documentation/error/v1/errors/{slug}",
    }, status)


def make_catalog(n: int) -> list[dict[str, Any]]:
    template = load_fixture("products.json")["data"][0]
    out = []
    for i in range(1, n + 1):
        p = copy.deepcopy(template)
        p["id"] = f"P{i:06d}"
        p["name"] = f"Product {i}"
        p["price"] = round(10 + i % 50, 2)
        p["master"] = {"masterId": p["id"], "orderable": True, "price": p["price"]}
        p["inventory"] = {"ats": i % 7, "orderable": i % 7 != 0, "id": "inventory_m"}
        p["slugUrl"] = f"https://shop.example/s/{SITE}/product-{i}/{p['id']}.html"
        out.append(p)
    return out


def ocapi_order(order_no: str, created: str) -> dict[str, Any]:
    order = copy.deepcopy(load_fixture("ocapi_order_search.json")["hits"][0]["data"])
    order["order_no"] = order_no
    order["creation_date"] = created
    return order


class SfccFake(FakeServer):
    platform = "sfcc"

    def __init__(self, client_id: str = "slas-client", client_secret: str = "slas-secret") -> None:
        super().__init__()
        self.client_id = client_id
        self.client_secret = client_secret
        self.am_client = ("am-client", "am-secret")
        self.tokens: set[str] = set()
        self.am_tokens: set[str] = set()
        self.token_requests = 0
        self.forbidden: set[str] = set()  # "search", "products", "categories", "orders", "order_search"
        self.products: list[dict[str, Any]] = load_fixture("products.json")["data"]
        self.categories = {"womens-clothing-jackets": load_fixture("category.json")}
        self.orders = {"00001603": load_fixture("order.json")}
        self.ocapi_orders: list[dict[str, Any]] = [load_fixture("ocapi_order_search.json")["hits"][0]["data"]]

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    # ------------------------------------------------------------------ auth
    def _basic(self, request: FakeRequest) -> tuple[str, str] | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user, password

    def _slas_token(self, request: FakeRequest) -> FakeResponse:
        self.token_requests += 1
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        if self._basic(request) != (self.client_id, self.client_secret):
            return FakeResponse.json({"status_code": "401 UNAUTHORIZED",
                                      "message": "Client credentials are invalid."}, 401)
        if form.get("grant_type") != "client_credentials" or form.get("channel_id") != SITE:
            return FakeResponse.json({"status_code": "400 BAD_REQUEST",
                                      "message": "Invalid grant_type or channel_id."}, 400)
        token = secrets.token_hex(12)
        self.tokens.add(token)
        return FakeResponse.json(load_fixture("token.json") | {"access_token": token})

    def _am_token(self, request: FakeRequest) -> FakeResponse:
        if self._basic(request) != self.am_client:
            return FakeResponse.json({"error": "invalid_client", "error_description": "Client authentication failed"},
                                     401)
        token = secrets.token_hex(12)
        self.am_tokens.add(token)
        return FakeResponse.json({"access_token": token, "scope": "mail tenantFilter profile", "token_type": "Bearer",
                                  "expires_in": 1799})

    def _bearer(self, request: FakeRequest, tokens: set[str]) -> bool:
        header = request.headers.get("authorization", "")
        return header.startswith("Bearer ") and header[7:] in tokens

    # ------------------------------------------------------------------ routes
    def handle(self, request: FakeRequest) -> FakeResponse:
        path = request.path
        if path == f"/shopper/auth/v1/organizations/{ORG}/oauth2/token" and request.method == "POST":
            return self._slas_token(request)
        if path == "/dwsso/oauth2/access_token" and request.method == "POST":
            return self._am_token(request)
        if path == f"/s/{SITE}/dw/shop/v23_2/order_search" and request.method == "POST":
            return self._order_search(request)
        if not path.startswith(("/search/", "/product/", "/checkout/")):
            return problem(404, "Not Found", f"No resource at {path}", "not-found")
        if not self._bearer(request, self.tokens):
            return FakeResponse.json(load_fixture("error_unauthorized.json"), 401)
        if request.param("siteId") != SITE:
            return problem(400, "Bad Request", "The siteId query parameter is required.", "bad-request")
        if path == f"/search/shopper-search/v1/organizations/{ORG}/product-search":
            return self._product_search(request)
        prefix = f"/product/shopper-products/v1/organizations/{ORG}/"
        if path == prefix + "products":
            return self._get_products(request)
        if path.startswith(prefix + "categories/"):
            if "categories" in self.forbidden:
                return FakeResponse.json(load_fixture("error_forbidden.json"), 403)
            category = self.categories.get(unquote(path[len(prefix + "categories/"):]))
            if category is None:
                return problem(404, "Category Not Found", "No category with that id was found.", "category-not-found")
            return FakeResponse.json(category)
        orders = f"/checkout/shopper-orders/v1/organizations/{ORG}/orders/"
        if path.startswith(orders):
            if "orders" in self.forbidden:
                return FakeResponse.json(load_fixture("error_forbidden.json"), 403)
            order_no = unquote(path[len(orders):])
            if order_no not in self.orders:
                return problem(404, "Order Not Found", f"No order with number '{order_no}' was found.",
                               "order-not-found")
            return FakeResponse.json(self.orders[order_no])
        return problem(404, "Not Found", f"No resource at {path}", "not-found")

    def _product_search(self, request: FakeRequest) -> FakeResponse:
        if "search" in self.forbidden:
            return FakeResponse.json(load_fixture("error_forbidden.json"), 403)
        offset = int(request.param("offset", "0") or 0)
        limit = int(request.param("limit", "25") or 25)
        if limit > 200:
            return problem(400, "Bad Request", "limit must be at most 200.", "value-out-of-range")
        hits = [{"productId": p["id"], "productName": p["name"], "hitType": "master", "price": p.get("price"),
                 "currency": p.get("currency"), "orderable": True} for p in self.products[offset:offset + limit]]
        return FakeResponse.json({"limit": len(hits), "hits": hits, "offset": offset, "query": "",
                                  "refinements": [], "selectedRefinements": {"cgid": "root"},
                                  "total": len(self.products)})

    def _get_products(self, request: FakeRequest) -> FakeResponse:
        if "products" in self.forbidden:
            return FakeResponse.json(load_fixture("error_forbidden.json"), 403)
        ids = (request.param("ids") or "").split(",")
        if len(ids) > 24:
            return problem(400, "Bad Request", "A maximum of 24 ids may be requested.", "value-out-of-range")
        by_id = {p["id"]: p for p in self.products}
        data = [by_id[i] for i in ids if i in by_id]
        return FakeResponse.json({"limit": len(data), "data": data, "total": len(data)})

    def _order_search(self, request: FakeRequest) -> FakeResponse:
        if not self._bearer(request, self.am_tokens):
            return FakeResponse.json({"_v": "23.2", "fault": {"type": "InvalidAccessTokenException",
                                                              "message": "The request is unauthorized: the access "
                                                                         "token is invalid."}}, 401)
        if "order_search" in self.forbidden:
            return FakeResponse.json({"_v": "23.2", "fault": {
                "type": "ClientAccessForbiddenException",
                "message": "Access to resource 'POST /order_search' is not allowed for client 'am-client'."}}, 403)
        body = request.json() or {}
        query = body.get("query", {})
        since = None
        if "filtered_query" in query:
            since = query["filtered_query"]["filter"]["range_filter"]["from"]
        selected = [o for o in self.ocapi_orders if since is None or o["creation_date"] >= since]
        selected.sort(key=lambda o: (o["creation_date"], o["order_no"]))
        total = len(selected)
        start, count = int(body.get("start", 0)), int(body.get("count", 25))
        window = selected[:1000][start:start + count]  # order search answers only its first 1,000 hits
        return FakeResponse.json({"_v": "23.2", "_type": "order_search_result", "count": len(window),
                                  "hits": [{"_type": "order_search_hit", "data": o, "relevance": 1.0}
                                           for o in window],
                                  "query": query, "select": body.get("select"), "start": start, "total": total})
