"""HTTP reads: a feature view's values for one key, and a served decision from the decision log (both in the
writer's memory and after its flush to Parquet); secret or admin key; problem+json 404s; in the OpenAPI spec."""

from __future__ import annotations

from tests.conftest import ADMIN, PUB, SECRET, decision_body
from tests.test_api import assert_problem

SECRET_H = {"Authorization": f"Bearer {SECRET}"}
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
PUB_H = {"Authorization": f"Bearer {PUB}"}


def test_a_written_feature_row_reads_back_with_its_age(client, clock):
    client.put("/v1/features/customer_signals/c-7", json={"values": {"ltv": 42.5, "segment": "gold"},
                                                          "timestamp": clock() - 30}, headers=SECRET_H)
    for headers in (SECRET_H, ADMIN_H):
        r = client.get("/v1/features/customer_signals/c-7", headers=headers)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["view"] == "customer_signals" and body["entity"] == "customer" and body["key"] == "c-7"
        assert body["values"]["ltv"] == 42.5 and body["values"]["segment"] == "gold"
        assert body["ts"] == clock() - 30


def test_feature_reads_are_404_problems_for_unknown_views_and_keys(client):
    assert_problem(client.get("/v1/features/nope/c-1", headers=SECRET_H), 404, "view")
    assert_problem(client.get("/v1/features/customer_signals/never-written", headers=SECRET_H), 404, "entity_key")


def test_feature_reads_need_a_secret_or_admin_key(client):
    assert_problem(client.get("/v1/features/customer_signals/c-1", headers=PUB_H), 403)
    assert_problem(client.get("/v1/features/customer_signals/c-1", headers={"Authorization": ""}), 401)


def test_a_decision_reads_back_before_and_after_the_log_flush(client, kassa):
    d = client.post("/v1/decisions", json=decision_body(request_id="r-1")).json()
    r = client.get(f"/v1/decisions/{d['decision_id']}", headers=SECRET_H)  # still in the writer's buffer
    assert r.status_code == 200, r.text
    before = r.json()
    assert before["decision_id"] == d["decision_id"] and before["placement"] == "order_confirmation"
    assert before["chosen"] == [o["offer_id"] for o in d["offers"]]
    assert before["request_id"] == "r-1" and before["customer_id"] == "c-1"
    assert len(before["candidates"]) == len(before["probabilities"]) and before["features"]
    kassa.decision_log.flush()
    assert kassa.decision_log.find_unwritten(d["decision_id"]) is None
    after = client.get(f"/v1/decisions/{d['decision_id']}", headers=ADMIN_H)
    assert after.status_code == 200 and after.json() == before


def test_unknown_decisions_are_404_and_publishable_keys_cannot_read_decisions(client):
    d = client.post("/v1/decisions", json=decision_body()).json()
    assert_problem(client.get("/v1/decisions/000000000000000000000000", headers=SECRET_H), 404, "decision_id")
    assert_problem(client.get(f"/v1/decisions/{d['decision_id']}", headers=PUB_H), 403)



def test_a_decision_id_carries_its_second_and_an_unknown_one_reads_only_that_day(client, kassa, clock):
    # Ids were 96 random bits: an unknown id read every date partition of the log's history (3-7 s at 10,000 files).
    made = []
    for step in (0.0, 0.4, 1.0, -3600.0):  # within a second, the next one, a clock set back
        clock.advance(step)
        made.append((clock(), client.post("/v1/decisions", json=decision_body()).json()["decision_id"]))
    assert [did[:8] for _, did in made] == [f"{int(t):08x}" for t, _ in made]
    assert len({did for _, did in made}) == 4 and all(len(did) == 24 and int(did, 16) for _, did in made)
    d = {"decision_id": made[0][1]}
    kassa.decision_log.flush()
    old = kassa.settings.data_path / "decisions" / "date=2026-01-01"  # a file no lookup should open
    old.mkdir()
    (old / "part-1-1.parquet").write_bytes(b"not parquet")
    assert client.get(f"/v1/decisions/{d['decision_id']}", headers=SECRET_H).status_code == 200
    assert_problem(client.get(f"/v1/decisions/{d['decision_id'][:8]}{'0' * 16}", headers=SECRET_H), 404,
                   "decision_id")
    assert_problem(client.get(f"/v1/decisions/{'f' * 24}", headers=SECRET_H), 404, "decision_id")  # random form

def test_reads_are_in_the_openapi_spec(client):
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v1/features/{view}/{entity_key}"]["get"]["x-kassa-key"] == "secret"
    assert spec["paths"]["/v1/decisions/{decision_id}"]["get"]["responses"]["404"]
    assert "unix second" in spec["paths"]["/v1/decisions/{decision_id}"]["get"]["parameters"][0]["description"]
    assert {"FeatureValues", "DecisionRecord"} <= set(spec["components"]["schemas"])
