"""The OpenAPI 3.1 document, generated from the same msgspec types the handlers decode with."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import msgspec

from kassa import __version__, policies, schemas
from kassa.learn.registry import STAGES


def _body(ref: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _ok(ref: str | None, status: str = "200", desc: str = "OK") -> dict[str, Any]:
    resp: dict[str, Any] = {"description": desc}
    if ref:
        resp["content"] = {"application/json": {"schema": {"$ref": ref}}}
    return {status: resp}


def _created(ref: str) -> dict[str, Any]:
    """PUT answers 200 when it replaced and 201 when it created."""
    return {**_ok(ref, "200", "Replaced"), **_ok(ref, "201", "Created")}


_PROBLEMS = {
    str(code): {
        "description": desc,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for code, desc in [(400, "Malformed JSON"), (401, "Missing or unknown key"), (403, "Key not allowed"),
                       (404, "Unknown id"), (409, "Conflict"), (413, "Body too large"), (422, "Invalid field"),
                       (429, "The key is over its rate limit (see Retry-After)")]
}


@lru_cache(maxsize=1)
def openapi_document() -> bytes:
    from kassa.api.features import FeatureValues
    from kassa.api.models import Rollback, StageChange
    from kassa.events.decision_log import DecisionRecord

    types = [schemas.DecisionRequest, schemas.DecisionResponse, schemas.EventBatch, schemas.EventAck,
             schemas.WebhookAck, schemas.Offer, schemas.Placement, schemas.Problem, schemas.FeaturePush,
             schemas.FeatureWrite, schemas.FeatureAck, StageChange, Rollback, FeatureValues, DecisionRecord]
    _, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    components["Placement"]["properties"]["policy"]["enum"] = policies.names()  # the policy table's rows
    for name in ("countries", "exclude_countries"):  # refused on write (catalog.store.check_offer), not on read
        components["Eligibility"]["properties"][name]["anyOf"][0]["items"]["pattern"] = r"^\s*[A-Za-z]{2}\s*$"
    c = "#/components/schemas/"
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    # The snippet sends its publishable key as ?key= (a CORS-simple request, and sendBeacon has no headers).
    browser: list[dict[str, list[str]]] = [{"bearer": []}, {"queryKey": []}]

    def op(summary: str, body: str | None = None, ok: dict | None = None, key: str = "publishable") -> dict:
        out: dict[str, Any] = {"summary": summary, "security": bearer, "x-kassa-key": key,
                               "responses": {**(ok or _ok(None)), **_PROBLEMS}}
        if body:
            out["requestBody"] = _body(body)
        return out

    offer_id = [{"name": "offer_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    placement_id = [{"name": "placement_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    version = [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"},
                "example": "order_confirmation@12"}]

    feature_row = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                   for n in ("view", "entity_key")]

    def q(name: str) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
    get_decision = op("A served decision as logged: features, candidates, probabilities, shown offers",
                      ok=_ok(c + "DecisionRecord"), key="secret")
    get_decision["responses"]["500"] = {
        "description": "A file of the decision log is damaged (type .../decision-log-unreadable; the detail names "
                       "it: move it out of the folder)",
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "Kassa", "version": __version__,
                 "description": "Real-time decisions for checkout and the order-confirmation page."},
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                           "queryKey": {"type": "apiKey", "in": "query", "name": "key",
                                                        "description": "publishable keys only"}}},
        "paths": {
            "/v1/decisions": {"post": {**op("Rank offers for a placement", c + "DecisionRequest",
                                            _ok(c + "DecisionResponse")), "security": browser}},
            "/v1/decisions/{decision_id}": {"get": {
                **get_decision,
                "parameters": [{
                    "name": "decision_id", "in": "path", "required": True, "schema": {"type": "string"},
                    "description": "The decision_id POST /v1/decisions answered: 24 hex digits, the unix second it was "
                                   "made (8, big-endian) then 64 random bits; only that day's decision log is read. "
                                   "Any other id (the random ids of Kassa 0.2.0) is looked for in the last "
                                   "decision_lookup_days (30) days."}]}},
            "/v1/events": {"post": {**op("Record outcome and order events", c + "EventBatch", _ok(c + "EventAck")),
                                    "security": browser}},
            "/v1/features/push": {"post": op("Push feature rows of one view (proprietary signals)",
                                             c + "FeaturePush", _ok(c + "FeatureAck"), key="secret")},
            "/v1/features/{view}/{entity_key}": {
                "put": {**op("Write one entity's row of a push view", c + "FeatureWrite", _ok(c + "FeatureAck"),
                             key="secret"), "parameters": feature_row},
                "get": {**op("Read one entity's newest values of a stored view", ok=_ok(c + "FeatureValues"),
                             key="secret"), "parameters": feature_row}},
            "/v1/offers": {"get": op("List offers", key="admin")},
            "/v1/offers/{offer_id}": {
                "get": {**op("Get an offer", ok=_ok(c + "Offer"), key="admin"), "parameters": offer_id},
                "put": {**op("Create or replace an offer", c + "Offer", _created(c + "Offer"), key="admin"),
                        "parameters": offer_id},
                "delete": {**op("Delete an offer", ok=_ok(None, "204", "Deleted"), key="admin"),
                           "parameters": offer_id},
            },
            "/v1/placements": {"get": op("List placements", key="admin")},
            "/v1/placements/{placement_id}": {
                "get": {**op("Get a placement", key="admin"), "parameters": placement_id},
                "put": {**op("Create or replace a placement", c + "Placement", _created(c + "Placement"),
                             key="admin"),
                        "parameters": placement_id},
            },
            "/v1/models": {"get": {**op("Serving sets and registered model versions", key="admin"),
                                   "parameters": [q("placement"), {**q("stage"), "schema": {"enum": list(STAGES)}}]}},
            "/v1/models/{version}": {"get": {**op("A model version with its stage history", key="admin"),
                                             "parameters": version}},
            "/v1/models/{version}/stage": {"post": {
                **op("Move a version to a stage (production needs a passing evaluation or force)",
                     c + "StageChange", key="admin"), "parameters": version}},
            "/v1/placements/{placement_id}/rollback": {"post": {
                **op("Archive production and restore the previous production version", c + "Rollback",
                     key="admin"), "parameters": placement_id}},
            "/v1/webhooks/{platform}": {"post": {
                "summary": "Signed order webhook from a commerce platform (authenticated by its signature)",
                "parameters": [{"name": "platform", "in": "path", "required": True,
                                "schema": {"enum": ["shopify", "woocommerce", "magento", "sfcc", "sap"]}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
                "responses": {**_ok(c + "WebhookAck"), **_PROBLEMS}},
                "get": {"summary": "Adobe I/O Events URL check: echoes ?challenge= (magento only)",
                        "parameters": [{"name": "platform", "in": "path", "required": True,
                                        "schema": {"type": "string"}}, q("challenge")],
                        "responses": {**_ok(None), **_PROBLEMS}}},
            "/v1/snippet.js": {"get": {
                "summary": "The confirmation-page script (?v=<version> is cached immutable; X-Kassa-SRI "
                           "carries its integrity hash)",
                "parameters": [q("v")],
                "responses": {"200": {"description": "JavaScript", "content": {"text/javascript": {}}},
                              "304": {"description": "Not modified"}, "404": _PROBLEMS["404"]}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": _ok(None)}},
            "/readyz": {
                "get": {"summary": "Readiness",
                        "description": "200 once the process has loaded its catalog, models and state and the catalog "
                                       "has a placement. Redis, NATS and PostgreSQL are not checked: during their "
                                       "outages decisions are still answered (fallbacks without Redis, events "
                                       "spooled, catalog and models from memory), so every pod stays ready; "
                                       "docs/deploy.md, \"When a dependency is down\".",
                        "responses": {**_ok(None), "503": {
                            "description": "Starting, or no placements yet (the body says why)"}}}
            },
            "/metrics": {"get": {
                "summary": "Prometheus metrics",
                "description": "No key; with `server.metrics_token` set, only `Authorization: Bearer <that token>`.",
                "responses": {**_ok(None), "401": {
                    **_PROBLEMS["401"], "description": "Missing or wrong metrics token (server.metrics_token set)"}}}},
        },
    }
    return msgspec.json.encode(doc)
