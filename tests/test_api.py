"""The HTTP contract: decisions, events, catalog management, keys and every error status."""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.app import Kassa
from tests.conftest import ADMIN, PUB, SECRET, decision_body, order

ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}


def assert_problem(r, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status
    assert body["type"].startswith("https://") and body["title"] and body["detail"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def test_decision_matches_the_contract(client):
    r = client.post("/v1/decisions", json=decision_body(limit=3))
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"decision_id", "placement", "model_version", "offers", "explored", "fallback", "took_ms"}
    assert body["placement"] == "order_confirmation" and body["fallback"] is False
    assert [o["rank"] for o in body["offers"]] == [1, 2, 3]
    for o in body["offers"]:
        assert set(o) == {"offer_id", "rank", "score", "probability", "content"}
        assert 0 < o["probability"] <= 1
    assert body["took_ms"] > 0


def test_request_id_makes_a_retry_return_the_same_decision(client):
    body = decision_body(request_id="retry-1")
    first = client.post("/v1/decisions", json=body).json()
    for _ in range(3):
        assert client.post("/v1/decisions", json=body).json() == first
    other = client.post("/v1/decisions", json=decision_body(request_id="retry-2")).json()
    assert other["decision_id"] != first["decision_id"]


def test_conflicting_request_id_is_409(client):
    client.post("/v1/decisions", json=decision_body(request_id="dup"))
    r = client.post("/v1/decisions", json=decision_body(request_id="dup", order=order(total=999)))
    assert_problem(r, 409, "request_id")


def test_malformed_json_is_400(client):
    r = client.post("/v1/decisions", content=b'{"placement": ', headers={"content-type": "application/json"})
    assert_problem(r, 400)
    assert_problem(client.post("/v1/decisions", content=b""), 400)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"limit": "three"}, "limit"),
        ({"limit": 0}, "limit"),
        ({"order": {**order(), "total": -5}}, "order.total"),
        ({"order": {**order(), "currency": "usd"}}, "order.currency"),
        ({"surprise": 1}, None),
        ({"placement": 42}, "placement"),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, patch, field):
    body = assert_problem(client.post("/v1/decisions", json={**decision_body(), **patch}), 422)
    if field:
        assert body["field"] == field
    else:
        assert "surprise" in body["detail"]


def test_unknown_placement_is_404_and_unknown_candidate_is_422(client):
    assert_problem(client.post("/v1/decisions", json=decision_body(placement="nope")), 404, "placement")
    r = client.post("/v1/decisions", json=decision_body(candidates=["discount", "ghost"]))
    assert_problem(r, 422, "candidates[1]")


def test_oversized_body_is_413(client):
    big = decision_body(context={"device": "x" * 200, "referrer": "y" * 200})
    big["order"]["items"] = [{"sku": f"S{i}", "price": 1.0, "category": "c" * 100} for i in range(60)]
    assert len(json.dumps(big)) > 4096
    assert_problem(client.post("/v1/decisions", json=big), 413)


def test_keys_401_and_403(client, kassa):
    assert_problem(client.post("/v1/decisions", json=decision_body(), headers={"Authorization": ""}), 401)
    assert_problem(client.post("/v1/decisions", json=decision_body(),
                               headers={"Authorization": "Bearer wrong"}), 401, "Authorization")
    # publishable keys cannot manage the catalog
    assert_problem(client.get("/v1/offers"), 403, "Authorization")
    # a publishable key bound to an origin refuses other origins
    bound = kassa.keys.create("publishable", "shop", ["https://shop.example"])
    ok = client.post("/v1/decisions", json=decision_body(),
                     headers={"Authorization": f"Bearer {bound}", "Origin": "https://shop.example"})
    assert ok.status_code == 200
    r = client.post("/v1/decisions", json=decision_body(),
                    headers={"Authorization": f"Bearer {bound}", "Origin": "https://evil.example"})
    assert_problem(r, 403, "Origin")
    # the secret key also works for decisions (it outranks publishable)
    assert client.post("/v1/decisions", json=decision_body(),
                       headers={"Authorization": f"Bearer {SECRET}"}).status_code == 200


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(client, scheme):
    # RFC 9110 §11.1: `bearer <key>` (as some HTTP clients and proxies send it) was a 401
    auth = {"Authorization": f"{scheme} {ADMIN}"}
    assert client.get("/v1/offers", headers=auth).status_code == 200
    assert client.get("/dashboard", headers=auth, follow_redirects=False).status_code == 200
    assert client.post("/v1/decisions", json=decision_body(), headers={"Authorization": f"{scheme} {SECRET}"}
                       ).status_code == 200


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc"])
def test_other_schemes_and_no_token_are_401_saying_what_to_send(client, header):
    body = assert_problem(client.get("/v1/offers", headers={"Authorization": header}), 401, "Authorization")
    assert body["detail"] == "send `Authorization: Bearer <key>`"


def test_keys_are_stored_hashed(kassa):
    from sqlalchemy import text

    with kassa.db.connect() as conn:
        stored = [r[0] for r in conn.execute(text("select key_hash from api_keys"))]
    assert PUB not in stored and ADMIN not in stored and len(stored) >= 3
    assert all(len(h) == 64 for h in stored)


def test_unknown_route_and_method_are_problems(client):
    assert_problem(client.get("/v1/nothing"), 404)
    assert_problem(client.get("/v1/decisions"), 405)


def test_events_are_deduplicated_on_event_id(client):
    d = client.post("/v1/decisions", json=decision_body()).json()
    offer_id = d["offers"][0]["offer_id"]
    events = [{"event_id": "e-1", "type": "impression", "decision_id": d["decision_id"], "offer_id": offer_id},
              {"event_id": "e-2", "type": "accept", "decision_id": d["decision_id"], "offer_id": offer_id},
              {"event_id": "e-2", "type": "accept", "decision_id": d["decision_id"], "offer_id": offer_id}]
    assert client.post("/v1/events", json={"events": events}).json() == \
        {"accepted": 2, "duplicates": 1, "unknown_decisions": 0}
    assert client.post("/v1/events", json={"events": events[:2]}).json() == \
        {"accepted": 0, "duplicates": 2, "unknown_decisions": 0}


def test_bad_events_are_rejected_whole(client, kassa):
    good = {"event_id": "ok-1", "type": "order", "order": order(), "customer": {"id": "c-9"}}
    r = client.post("/v1/events", json={"events": [good, {"event_id": "x", "type": "accept",
                                                          "decision_id": "d", "offer_id": "ghost"}]})
    assert_problem(r, 422, "events[1].offer_id")
    assert_problem(client.post("/v1/events", json={"events": [{"event_id": "y", "type": "teleport"}]}),
                   422, "events[0].type")
    assert_problem(client.post("/v1/events", json={"events": []}), 422, "events")
    assert_problem(client.post("/v1/events", json={"events": [{"event_id": "z", "type": "order"}]}),
                   422, "events[0].order")
    assert kassa.event_log.count() == 0  # nothing half-written


def test_acknowledged_event_survives_a_restart(settings, clock):
    first = Kassa(settings, clock=clock)
    with TestClient(create_app(first), headers={"Authorization": f"Bearer {PUB}"}) as c:
        ev = {"event_id": "order-1", "type": "order", "customer": {"id": "c-restart"},
              "order": order(order_id="A-1", categories=("skincare",))}
        assert c.post("/v1/events", json={"events": [ev]}).json() == \
            {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    second = Kassa(settings, clock=clock)
    with TestClient(create_app(second), headers={"Authorization": f"Bearer {PUB}"}) as c:
        assert second.event_log.count() == 1
        # the replayed order rebuilt the buyer's profile...
        assert second.profiles.get("c-restart")["orders_count"] == 1
        # ...and the same event is still a duplicate
        ev = {"event_id": "order-1", "type": "order", "customer": {"id": "c-restart"},
              "order": order(order_id="A-1")}
        assert c.post("/v1/events", json={"events": [ev]}).json() == \
            {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}


def test_offer_and_placement_management(client):
    offer = {"id": "new-offer", "kind": "partner", "title": "New", "value": 99, "content": {"headline": "Hi"}}
    r = client.put("/v1/offers/new-offer", json=offer, headers=ADMIN_H)
    assert r.status_code == 201
    assert client.put("/v1/offers/new-offer", json=offer, headers=ADMIN_H).status_code == 200
    assert client.get("/v1/offers/new-offer", headers=ADMIN_H).json()["value"] == 99
    assert_problem(client.put("/v1/offers/other", json=offer, headers=ADMIN_H), 422, "id")
    assert_problem(client.get("/v1/offers/ghost", headers=ADMIN_H), 404, "offer_id")
    placement = {"id": "p2", "slots": 1, "offers": ["new-offer"], "policy": "baseline", "exploration": 0}
    assert client.put("/v1/placements/p2", json=placement, headers=ADMIN_H).status_code == 201
    # the hot path sees the change at once
    d = client.post("/v1/decisions", json=decision_body(placement="p2")).json()
    assert [o["offer_id"] for o in d["offers"]] == ["new-offer"]
    # an offer in use cannot be deleted; unknown offers in a placement are refused
    assert_problem(client.delete("/v1/offers/new-offer", headers=ADMIN_H), 409, "offer_id")
    assert_problem(client.put("/v1/placements/p3", json={"id": "p3", "offers": ["ghost"]}, headers=ADMIN_H),
                   422, "offers")
    client.put("/v1/placements/p2", json={**placement, "offers": ["discount"]}, headers=ADMIN_H)
    assert client.delete("/v1/offers/new-offer", headers=ADMIN_H).status_code == 204
    assert_problem(client.delete("/v1/offers/new-offer", headers=ADMIN_H), 404)
    assert len(client.get("/v1/placements", headers=ADMIN_H).json()["placements"]) == 3


def test_health_ready_metrics_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["offers"] == 11
    client.post("/v1/decisions", json=decision_body())
    metrics = client.get("/metrics").text
    assert 'kassa_decisions_total{fallback="false",placement="order_confirmation"} 1.0' in metrics
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    for path in ("/v1/decisions", "/v1/events", "/v1/offers/{offer_id}", "/v1/placements/{placement_id}"):
        assert path in spec["paths"]
    assert "DecisionRequest" in spec["components"]["schemas"]


def test_openapi_documents_every_route(client):
    spec = client.get("/openapi.json").json()
    documented = {(path, method) for path, ops in spec["paths"].items() for method in ops}
    served = set()
    for route in client.app.routes:
        path = getattr(route, "path", "")
        # pages for people (the demo page, the dashboard, the API reference) are not API operations
        if path.startswith(("/_bench", "/demo", "/dashboard", "/docs", "/assets")) or path == "/openapi.json":
            continue
        for method in getattr(route, "methods", None) or ():
            if method not in ("HEAD", "OPTIONS"):
                served.add((path, method.lower()))
    assert served - documented == set(), "routes missing from /openapi.json"
    assert documented - served == set(), "documented routes that do not exist"
