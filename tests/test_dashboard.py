"""The dashboard's data and sessions, in-process (the pages themselves are in tests/browser/test_dashboard.py)."""

from __future__ import annotations

import re

import msgspec
import pytest
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.api.dashboard.outcomes import Outcomes
from kassa.api.dashboard.traffic import bucket_quantile
from kassa.app import Kassa
from kassa.config import Settings
from tests.conftest import PUB, Clock, decision_body, order


def test_quantiles_interpolate_inside_a_bucket_like_histogram_quantile() -> None:
    buckets = {0.001: 50.0, 0.002: 90.0, 0.005: 100.0, float("inf"): 100.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.001)
    assert bucket_quantile(0.7, buckets) == pytest.approx(0.0015)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.0047)
    assert bucket_quantile(0.5, {0.001: 0.0, float("inf"): 0.0}) is None
    assert bucket_quantile(0.99, {0.001: 1.0, float("inf"): 10.0}) == 0.001  # above the last finite bound


def test_the_joined_reward_weights_events_in_the_window_caps_them_and_skips_late_ones(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    body = decision_body(order=order(total=80.0, categories=("electronics", "skincare")))
    r = client.post("/v1/decisions", json=body)
    d = r.json()
    assert r.status_code == 200, d
    first, second = d["offers"][0]["offer_id"], d["offers"][1]["offer_id"]

    def send(*events: dict) -> None:
        assert client.post("/v1/events", json={"events": list(events)}).status_code == 200

    did = d["decision_id"]
    send({"event_id": "a", "type": "accept", "decision_id": did, "offer_id": first},
         {"event_id": "b", "type": "click", "decision_id": did, "offer_id": first},
         {"event_id": "c", "type": "conversion", "decision_id": did, "offer_id": second, "value": 80.0})
    clock.advance(61)  # past the 60 s window
    send({"event_id": "d", "type": "accept", "decision_id": did, "offer_id": second})
    detail = Outcomes(kassa).decision(did, now=clock())
    assert detail is not None and detail.closed
    rewards = {o.offer_id: o.reward for o in detail.shown}
    assert rewards[first] == pytest.approx(1.1)
    assert rewards[second] == pytest.approx(50.0)  # 80 capped at 50; the late accept is not counted
    assert rewards[d["offers"][2]["offer_id"]] == 0.0  # the default
    assert [inside for _, _, inside in detail.events] == [True, True, True, False]
    assert {c for c, _ in detail.candidates} >= {first, second}
    assert Outcomes(kassa).decision("no-such-decision") is None


def test_reward_by_version_counts_only_closed_decisions(client: TestClient, kassa: Kassa, clock: Clock) -> None:
    ids = [client.post("/v1/decisions", json=decision_body(request_id=f"r{i}")).json()["decision_id"]
           for i in range(3)]
    outcomes = Outcomes(kassa)
    since = clock() - 10
    open_now = outcomes.placements(since, now=clock())["order_confirmation"].by_version["baseline"]
    assert (open_now.decisions, open_now.open) == (0, 3)
    closed = outcomes.placements(since, now=clock() + 120)["order_confirmation"].by_version["baseline"]
    assert (closed.decisions, closed.open) == (3, 0)
    assert outcomes.recent(2)[0][0] in ids


def _login(c: TestClient, key: str) -> int:
    r = c.post("/dashboard/login", data={"key": key, "next": "/dashboard"}, follow_redirects=False)
    return r.status_code


def test_revoking_the_admin_key_ends_its_dashboard_sessions(kassa: Kassa) -> None:
    key = kassa.keys.create("admin", "operator")
    with TestClient(create_app(kassa)) as c:
        assert _login(c, PUB) == 401
        assert _login(c, key) == 303
        assert c.get("/dashboard", follow_redirects=False).status_code == 200
        kassa.keys.revoke(key)
        r = c.get("/dashboard", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")


def test_login_redirects_only_inside_the_dashboard(kassa: Kassa) -> None:
    key = kassa.keys.create("admin", "operator")
    with TestClient(create_app(kassa)) as c:
        for target in ("https://evil.example/", "//evil.example/x", "/v1/offers"):
            r = c.post("/dashboard/login", data={"key": key, "next": target}, follow_redirects=False)
            assert r.headers["location"] == "/dashboard"


def test_with_auth_off_the_dashboard_opens_without_a_key_and_posts_still_need_the_csrf_token(
        settings: Settings) -> None:
    kassa = Kassa(msgspec.structs.replace(settings, auth=False), seed=1)
    with TestClient(create_app(kassa)) as c:
        page = c.get("/dashboard/offers/discount")
        assert page.status_code == 200
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        doc = msgspec.json.encode(msgspec.structs.replace(kassa.catalog.snapshot.offers["discount"],
                                                          title="12% off")).decode()
        assert c.post("/dashboard/offers/discount", data={"document": doc}, follow_redirects=False).status_code == 403
        r = c.post("/dashboard/offers/discount", data={"document": doc, "csrf": token.group(1)},
                   follow_redirects=False)
        assert r.status_code == 303
        assert kassa.catalog.snapshot.offers["discount"].title == "12% off"
