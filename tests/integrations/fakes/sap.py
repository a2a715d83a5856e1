"""A fake SAP Commerce Cloud: the OAuth token endpoint, OCC v2 (products search with 0-based ``currentPage``
and ``pagination.totalPages``, product details, the ``expressupdate`` feed, orders by user or by code,
users) and the Integration API's ``WebhookConfigurations`` OData service.

Errors are worded as SAP words them: OCC ``{"errors": [{"message", "type"}]}`` (``InvalidTokenError`` 401,
``AccessDeniedError`` 403, ``UnknownIdentifierError`` 400 for unknown codes), the OAuth server's
``{"error": "invalid_client", "error_description": …}``.
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

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "sap"
SITE = "electronics"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def occ_error(status: int, error_type: str, message: str) -> FakeResponse:
    return FakeResponse.json({"errors": [{"message": message, "type": error_type}]}, status)


def make_products(n: int) -> list[dict[str, Any]]:
    template = load_fixture("product.json")
    out = []
    for i in range(1, n + 1):
        p = copy.deepcopy(template)
        p["code"] = f"{3000000 + i}"
        p["name"] = f"Camera {i}"
        p["price"] = {"currencyIso": "USD", "value": round(50 + i % 40, 2), "priceType": "BUY"}
        p["stock"] = {"stockLevel": i % 5, "stockLevelStatus": "inStock" if i % 5 else "outOfStock"}
        p["url"] = f"/Open-Catalogue/Cameras/Camera-{i}/p/{p['code']}"
        out.append(p)
    return out


class SapFake(FakeServer):
    platform = "sap"

    def __init__(self, client_id: str = "kassa_client", client_secret: str = "kassa-secret") -> None:
        super().__init__()
        self.client = (client_id, client_secret)
        self.integration_admin = ("kassa-admin", "admin-pass")
        self.tokens: set[str] = set()
        self.token_requests = 0
        self.trusted = True  # ROLE_TRUSTED_CLIENT: orders by code, users, express update
        self.products: list[dict[str, Any]] = [load_fixture("product.json")]
        self.orders = {"00002003": load_fixture("order.json")}
        self.order_owner = {"00002003": "max.mustermann@example.com"}
        self.express: list[dict[str, Any]] = []  # the express-update queue: {"code", "at"}
        self.webhook_configs: list[dict[str, Any]] = load_fixture("webhook_configurations.json")["d"]["results"]

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def touch(self, code: str, at: str) -> None:
        """Queue ``code`` in the express-update feed as changed at ``at`` (``yyyy-MM-ddTHH:mm:ss+0000``)."""
        self.express.append({"code": code, "at": at})

    # ------------------------------------------------------------------ routes
    def _basic(self, request: FakeRequest) -> tuple[str, str] | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user, password

    def handle(self, request: FakeRequest) -> FakeResponse:
        if request.path == "/authorizationserver/oauth/token" and request.method == "POST":
            return self._token(request)
        if request.path == "/odata2webservices/WebhookService/WebhookConfigurations":
            if self._basic(request) != self.integration_admin:
                return FakeResponse(401, b"", {"WWW-Authenticate": 'Basic realm="Integration API"'})
            return FakeResponse.json({"d": {"results": self.webhook_configs}})
        prefix = f"/occ/v2/{SITE}"
        if not request.path.startswith(prefix + "/"):
            return occ_error(400, "UnknownResourceError", f"Cannot find resource for request {request.path}")
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer ") or header[7:] not in self.tokens:
            return occ_error(401, "InvalidTokenError", f"Invalid access token: {header[7:]}")
        path = request.path[len(prefix):]
        if path == "/products/search":
            return self._search(request)
        if path == "/products/expressupdate":
            if not self.trusted:
                return occ_error(403, "AccessDeniedError", "Access is denied")
            since = request.param("timestamp") or ""
            refs = [{"catalogId": "electronicsProductCatalog", "catalogVersion": "Online", "code": e["code"]}
                    for e in self.express if e["at"] >= since]
            return FakeResponse.json({"productReferences": refs})
        if path.startswith("/products/"):
            code = unquote(path[len("/products/"):])
            for p in self.products:
                if p["code"] == code:
                    return FakeResponse.json(p)
            return occ_error(400, "UnknownIdentifierError", f"Product with code '{code}' not found!")
        if path.startswith("/orders/"):
            if not self.trusted:
                return occ_error(403, "AccessDeniedError", "Access is denied")
            return self._order(unquote(path[len("/orders/"):]), None)
        if path.startswith("/users/"):
            parts = [unquote(p) for p in path.split("/")[2:]]
            if len(parts) == 3 and parts[1] == "orders":
                return self._order(parts[2], parts[0])
            if len(parts) == 1:
                if not self.trusted:
                    return occ_error(403, "AccessDeniedError", "Access is denied")
                return occ_error(400, "UnknownIdentifierError", f"Cannot find user with propertyValue '{parts[0]}'")
        return occ_error(400, "UnknownResourceError", f"Cannot find resource for request {request.path}")

    def _token(self, request: FakeRequest) -> FakeResponse:
        self.token_requests += 1
        form = {k: v[0] for k, v in parse_qs(request.body.decode()).items()}
        if self._basic(request) != self.client:
            return FakeResponse.json({"error": "invalid_client", "error_description": "Bad client credentials"}, 401)
        if form.get("grant_type") != "client_credentials":
            return FakeResponse.json({"error": "unsupported_grant_type",
                                      "error_description": "Unsupported grant type"}, 400)
        token = secrets.token_urlsafe(16)
        self.tokens.add(token)
        return FakeResponse.json(load_fixture("token.json") | {"access_token": token})

    def _search(self, request: FakeRequest) -> FakeResponse:
        page = int(request.param("currentPage", "0") or 0)
        size = int(request.param("pageSize", "20") or 20)
        total = len(self.products)
        pages = -(-total // size) if size else 0
        body = load_fixture("search_page.json")
        body["products"] = self.products[page * size:(page + 1) * size]
        body["pagination"] = {"currentPage": page, "pageSize": size, "sort": "relevance", "totalPages": pages,
                              "totalResults": total}
        return FakeResponse.json(body)

    def _order(self, code: str, user: str | None) -> FakeResponse:
        order = self.orders.get(code)
        if order is None or (user is not None and self.order_owner.get(code) != user.lower()):
            return occ_error(400, "UnknownIdentifierError", f"Order with guid {code} not found for current user "
                                                            "in current BaseStore")
        return FakeResponse.json(order)
