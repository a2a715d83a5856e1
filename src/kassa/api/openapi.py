"""The OpenAPI 3.1 document, generated from the same msgspec types the handlers decode with."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgspec

from kassa import __version__, schemas


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _ok(ref: str | None, status: str = "200", desc: str = "OK") -> dict[str, Any]:
    resp: dict[str, Any] = {"description": desc}
    if ref:
        resp["content"] = {"application/json": {"schema": {"$ref": ref}}}
    return {status: resp}


_PROBLEMS = {
    str(code): {
        "description": desc,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for code, desc in [(400, "Malformed JSON"), (401, "Missing or unknown key"), (403, "Key not allowed"),
                       (404, "Unknown id"), (409, "Conflict"), (413, "Body too large"), (422, "Invalid field")]
}


@lru_cache(maxsize=1)
def openapi_document() -> bytes:
    types = [schemas.DecisionRequest, schemas.DecisionResponse, schemas.EventBatch, schemas.EventAck,
             schemas.Offer, schemas.Placement, schemas.Problem]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    c = "#/components/schemas/"
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]

    def op(summary: str, body: str | None = None, ok: dict | None = None, key: str = "publishable") -> dict:
        out: dict[str, Any] = {"summary": summary, "security": bearer, "x-kassa-key": key,
                               "responses": {**(ok or _ok(None)), **_PROBLEMS}}
        if body:
            out["requestBody"] = _body(body)
        return out

    offer_id = [{"name": "offer_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    placement_id = [{"name": "placement_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Kassa", "version": __version__,
                 "description": "Real-time decisions for checkout and the order-confirmation page."},
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/decisions": {"post": op("Rank offers for a placement", c + "DecisionRequest",
                                         _ok(c + "DecisionResponse"))},
            "/v1/events": {"post": op("Record outcome and order events", c + "EventBatch", _ok(c + "EventAck"))},
            "/v1/offers": {"get": op("List offers", key="admin")},
            "/v1/offers/{offer_id}": {
                "get": {**op("Get an offer", ok=_ok(c + "Offer"), key="admin"), "parameters": offer_id},
                "put": {**op("Create or replace an offer", c + "Offer", _ok(c + "Offer"), key="admin"),
                        "parameters": offer_id},
                "delete": {**op("Delete an offer", ok=_ok(None, "204", "Deleted"), key="admin"),
                           "parameters": offer_id},
            },
            "/v1/placements": {"get": op("List placements", key="admin")},
            "/v1/placements/{placement_id}": {
                "get": {**op("Get a placement", key="admin"), "parameters": placement_id},
                "put": {**op("Create or replace a placement", c + "Placement", _ok(c + "Placement"), key="admin"),
                        "parameters": placement_id},
            },
            "/v1/models": {"get": op("Models serving each placement", key="admin")},
            "/healthz": {"get": {"summary": "Liveness", "responses": _ok(None)}},
            "/readyz": {
                "get": {"summary": "Readiness", "responses": {**_ok(None), "503": {"description": "Starting"}}}
            },
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": _ok(None)}},
        },
    }
    return msgspec.json.encode(doc)
