"""The feature injection API (a customer's proprietary signals) and how decisions read those views."""

from __future__ import annotations

import msgspec
import pytest

from kassa.events.decision_log import read_decisions
from tests.conftest import ADMIN, SECRET, decision_body
from tests.test_api import assert_problem

SECRET_H = {"Authorization": f"Bearer {SECRET}"}


def test_put_then_decide_uses_the_injected_values(client, kassa, clock):
    r = client.put("/v1/features/customer_signals/c-1",
                   json={"values": {"ltv": 512.5, "segment": "gold", "vip": True, "interests": ["yoga", "tea"]}},
                   headers=SECRET_H)
    assert r.status_code == 200 and r.json() == {"view": "customer_signals", "written": 1}
    client.put("/v1/features/session_signals/s-9", json={"values": {"pages_viewed": 7}}, headers=SECRET_H)
    d = client.post("/v1/decisions", json=decision_body(session_id="s-9")).json()
    kassa.decision_log.flush()
    row = next(r for r in read_decisions(kassa.settings.data_path).to_pylist() if r["decision_id"] == d["decision_id"])
    feats = msgspec.json.decode(row["features_json"])
    assert feats["customer_signals.ltv"] == 512.5 and feats["customer_signals.segment"] == "gold"
    assert feats["customer_signals.vip"] is True and feats["customer_signals.interests"] == "yoga|tea"
    assert feats["session_signals.pages_viewed"] == 7


def test_missing_and_stale_views_fall_back_to_defaults_and_are_counted(client, kassa, clock):
    client.put("/v1/features/session_signals/s-old", json={"values": {"pages_viewed": 3}}, headers=SECRET_H)
    clock.advance(2 * 3600)  # past the session view's 1h ttl
    d = client.post("/v1/decisions", json=decision_body(customer="c-new", session_id="s-old")).json()
    kassa.decision_log.flush()
    row = next(r for r in read_decisions(kassa.settings.data_path).to_pylist() if r["decision_id"] == d["decision_id"])
    feats = msgspec.json.decode(row["features_json"])
    assert feats["customer_signals.ltv"] == 0.0 and feats["customer_signals.segment"] == "unknown"
    assert feats["session_signals.pages_viewed"] == 0
    metrics = client.get("/metrics").text
    assert 'kassa_feature_defaults_total{view="customer_signals"} 1.0' in metrics
    assert 'kassa_feature_defaults_total{view="session_signals"} 1.0' in metrics


def test_batched_push_writes_every_row(client, kassa):
    rows = [{"key": f"c-{i}", "values": {"ltv": float(i), "segment": "s"}} for i in range(20)]
    r = client.post("/v1/features/push", json={"view": "customer_signals", "rows": rows}, headers=SECRET_H)
    assert r.json() == {"view": "customer_signals", "written": 20}
    got = client.portal.call(kassa.store.read, [("customer", "c-7")], kassa.repo.views)
    assert got[0]["customer_signals"].values["ltv"] == 7.0


def test_bad_feature_writes_are_refused_naming_the_field_and_write_nothing(client, kassa):
    url = "/v1/features/customer_signals/c-bad"
    assert_problem(client.put(url, json={"values": {"ltv": "lots"}}, headers=SECRET_H), 422, "values.ltv")
    assert_problem(client.put(url, json={"values": {"shoe_size": 42}}, headers=SECRET_H), 422, "values.shoe_size")
    assert_problem(client.put(url, json={"values": {"segment": "x" * 33}}, headers=SECRET_H), 422, "values.segment")
    assert_problem(client.put(url, json={"values": {"interests": ["a"] * 6}}, headers=SECRET_H), 422,
                   "values.interests")
    assert_problem(client.put(url, json={"values": {"vip": 1}}, headers=SECRET_H), 422, "values.vip")
    assert_problem(client.put(url, json={"values": {}}, headers=SECRET_H), 422, "values")
    assert_problem(client.put(url, content=b"{nope", headers=SECRET_H), 400)
    assert_problem(client.put("/v1/features/nope/c-1", json={"values": {"x": 1}}, headers=SECRET_H), 404, "view")
    # a push with one bad row writes none of its rows
    rows = [{"key": "ok-1", "values": {"ltv": 1.0}}, {"key": "ok-2", "values": {"ltv": "bad"}}]
    r = client.post("/v1/features/push", json={"view": "customer_signals", "rows": rows}, headers=SECRET_H)
    assert_problem(r, 422, "rows[1].values.ltv")
    got = client.portal.call(kassa.store.read, [("customer", "ok-1"), ("customer", "c-bad")], kassa.repo.views)
    assert got == [None, None]
    # too large
    big = {"view": "customer_signals", "rows": [{"key": f"k{i}", "values": {"segment": "s" * 30}} for i in range(200)]}
    assert_problem(client.post("/v1/features/push", json=big, headers=SECRET_H), 413)


@pytest.mark.parametrize("value", [1e30, -1e16, 10**20, 1e308])
def test_a_feature_value_the_learner_cannot_take_is_422_and_writes_nothing(client, kassa, value):
    # was stored: VW's weight for it became infinite, and UCB's probabilities for the buyer summed to 0.02
    r = client.put("/v1/features/customer_signals/c-huge", json={"values": {"ltv": value}}, headers=SECRET_H)
    assert "outside" in assert_problem(r, 422, "values.ltv")["detail"]
    got = client.portal.call(kassa.store.read, [("customer", "c-huge")], kassa.repo.views)
    assert got == [None]
    ok = client.put("/v1/features/customer_signals/c-huge", json={"values": {"ltv": 1e15}}, headers=SECRET_H)
    assert ok.status_code == 200


def test_feature_writes_need_a_secret_key(client):
    body = {"values": {"ltv": 1.0}}
    assert_problem(client.put("/v1/features/customer_signals/c-1", json=body), 403, "Authorization")
    assert client.put("/v1/features/customer_signals/c-1", json=body,
                      headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_an_order_event_is_in_the_buyers_stream_features_before_the_ack_returns(client, kassa, clock):
    from tests.conftest import order

    ev = {"event_id": "o-1", "type": "order", "customer": {"id": "c-raw"}, "order": {**order(total=42.0),
                                                                                    "created_at": clock()}}
    assert client.post("/v1/events", json={"events": [ev]}).json()["accepted"] == 1
    d = client.post("/v1/decisions", json=decision_body(customer="c-raw")).json()
    kassa.decision_log.flush()
    row = next(r for r in read_decisions(kassa.settings.data_path).to_pylist() if r["decision_id"] == d["decision_id"])
    feats = msgspec.json.decode(row["features_json"])
    assert feats["customer_activity.orders_1h"] == 1 and feats["customer_activity.spend_7d"] == 42.0


def test_an_event_batch_writes_each_changed_row_once(client, kassa, clock):
    """The ingest hands the stream processor the whole batch: three orders of one buyer are one row write
    (one pipelined round trip per view on Redis), carrying all three."""
    from tests.conftest import order

    evs = [{"event_id": f"ob-{i}", "type": "order", "customer": {"id": "c-batch"},
            "order": {**order(total=10.0), "id": f"ord-b{i}", "created_at": clock()}} for i in range(3)]
    written = kassa.stream.writes
    assert client.post("/v1/events", json={"events": evs}).json()["accepted"] == 3
    assert kassa.stream.writes - written == 1
    got = client.portal.call(kassa.store.read, [("customer", "c-batch")], kassa.repo.views)
    assert got[0]["customer_activity"].values == {"orders_1h": 3, "spend_7d": 30.0}


def test_offer_stream_features_reach_the_learner_lines(tmp_path, settings, clock):
    """Accepts of an offer update its offer-entity view in memory; the next decision's learner line for
    that offer carries the bucketed values (namespace g), without a per-request store read."""
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from tests.conftest import FEATURES, PUB

    extra = """
  - name: offer_performance
    kind: stream
    entity: offer
    source: {events: [impression, accept]}
    ttl: 1d
    fields:
      - {name: accepts_1h, dtype: int, agg: sum, of: type=accept, window: 1h, default: 0}
      - {name: accept_rate_1h, dtype: float, agg: mean, of: type=accept, window: 1h, default: 0.0}
"""
    path = tmp_path / "features-offers.yaml"
    path.write_text(FEATURES.replace("views:\n", "views:\n" + extra.lstrip("\n"), 1)
                    .replace("entities:\n", "entities:\n  - {name: offer, join_key: offer_id}\n", 1))
    settings = msgspec.structs.replace(
        settings, features=msgspec.structs.replace(settings.features, definitions_file=str(path)))
    kassa = Kassa(settings, clock=clock, seed=3)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        d = client.post("/v1/decisions", json=decision_body(candidates=["discount"], limit=1)).json()
        events = [{"event_id": f"e{i}", "type": t, "decision_id": d["decision_id"], "offer_id": "discount",
                   "timestamp": clock()} for i, t in enumerate(["impression", "accept"])]
        assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 2
        d2 = client.post("/v1/decisions", json=decision_body(candidates=["discount"], limit=1)).json()
        pending = kassa.joiner._pending[d2["decision_id"]]
        assert " |g " in pending.actions[0]
        assert "offer_performance.accepts_1h=b1" in pending.actions[0]
        assert "offer_performance.accept_rate_1h=b5" in pending.actions[0]  # 0.5 -> log2(1 + 50)
        # Every later event is in the very next decision's line (the offer's line is cached between changes).
        for n, bucket in ((2, "b1"), (3, "b2")):  # accepts: 2 -> log2(1 + 2) = 1.6, 3 -> 2; the rate stays 0.5
            events = [{"event_id": f"e{n}-{i}", "type": t, "decision_id": d["decision_id"], "offer_id": "discount",
                       "timestamp": clock()} for i, t in enumerate(["impression", "accept"])]
            assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 2
            d2 = client.post("/v1/decisions", json=decision_body(candidates=["discount"], limit=1)).json()
            line = kassa.joiner._pending[d2["decision_id"]].actions[0]
            assert f"offer_performance.accepts_1h={bucket}" in line, line
            assert "offer_performance.accept_rate_1h=b5" in line, line
        live = {d2["decision_id"]: line}
        assert kassa.decision_log is not None
        rec = kassa.decision_log.find_unwritten(d2["decision_id"])
        assert rec is not None and rec.candidate_offer_features is not None
        assert rec.candidate_offer_features[rec.candidates.index("discount")] == " |g " + line.split(" |g ", 1)[1]
        kassa.decision_log.flush()
        snap = kassa.catalog.snapshot
    # Batch training and evaluation rebuild the line the decision scored from the logged decision (issue 14:
    # before, they saw the offer's catalog line only, so a model that had learned its |g weights was
    # trained and judged on lines it was never served with).
    from kassa.learn.offline.dataset import load_logged

    data = load_logged(settings.data_path, snap.placements["order_confirmation"].placement, lambda o: o,
                       until=clock() + 86_400.0)
    i = data.decision_ids.index(d2["decision_id"])
    assert snap.action_lines["discount"] + data.action_suffix(i, "discount") == live[d2["decision_id"]]
    assert data.action_suffixes(i) == [data.action_suffix(i, c) for c in data.candidates[i]]  # a whole row at once
    first = data.decision_ids.index(d["decision_id"])  # before any event: the offer had no stored row
    assert data.offer_features[first] == [""]
    assert data.action_suffix(first, "discount") == ""


def test_offer_lines_follow_a_row_that_changes_without_a_newer_event_time() -> None:
    """A stream row is rewritten with the same event time when a window empties or a late event lands: the
    next line must carry the new values (a cache keyed by event times kept the old line)."""
    from kassa.features.definitions import FeatureView, Field
    from kassa.features.offer_features import OfferFeatureSource
    from kassa.features.online.base import ViewValues

    view = FeatureView(name="perf", kind="push", entity="offer", ttl="1d", fields=[Field("accepts", "int")])
    rows = {"o-1": {"perf": ViewValues(100.0, {"accepts": 3})}}
    source = OfferFeatureSource([view], rows.get)
    base = " |o id=o-1"
    first = source.line("o-1", base)
    assert first == " |o id=o-1 |g perf.accepts=b2"
    assert source.line("o-1", base) is first
    rows["o-1"] = {"perf": ViewValues(100.0, {"accepts": 0})}  # the hour passed: same event time, new value
    assert source.line("o-1", base) == " |o id=o-1 |g perf.accepts=0"
    rows["o-1"] = {"perf": ViewValues(100.0, {"accepts": 0})}  # rewritten, same bucket: the same line object
    again = source.line("o-1", base)
    assert again == " |o id=o-1 |g perf.accepts=0" and source.line("o-1", base) is again
    del rows["o-1"]
    assert source.lines(["o-1"], {"o-1": base}) == [base]
