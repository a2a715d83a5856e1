"""`/metrics`: what each series counts after real traffic, the bounded per-offer labels, no ``*_created``
series, and the shipped Grafana dashboard and Prometheus alert rules (checked with ``promtool``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kassa.monitor.metrics import Metrics
from tests.conftest import SECRET, decision_body

ROOT = Path(__file__).resolve().parent.parent


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if m is None or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    return None


def _train(client, kassa, clock, n: int = 8) -> None:
    for i in range(n):
        d = client.post("/v1/decisions", json=decision_body(customer=f"m{i}", limit=1)).json()
        top = d["offers"][0]["offer_id"]
        client.post("/v1/events", json={"events": [{"event_id": f"m{i}", "type": "accept",
                                                    "decision_id": d["decision_id"], "offer_id": top}]})
    clock.advance(61)
    kassa.learning.step()


def test_learned_examples_and_offer_series_count_what_the_learner_saw(client, kassa, clock):
    _train(client, kassa, clock)
    text = client.get("/metrics").text
    assert _sample(text, "kassa_learned_examples_total", placement="order_confirmation") == 8
    assert kassa.learning.learned == 8
    shown = sum(v for line in text.splitlines() if line.startswith("kassa_offer_impressions_total{")
                for v in [float(line.rsplit(" ", 1)[1])])
    accepts = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("kassa_offer_accepts_total{"))
    reward = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                 if line.startswith("kassa_offer_reward{"))
    assert shown == 8 and accepts == 8 and reward == 8.0  # accept weighs 1.0 in the test catalog
    assert _sample(text, "kassa_pending_decisions") == 0
    assert _sample(text, "kassa_reward_join_lag_seconds") == 0


def test_model_swaps_is_a_counter_and_the_serving_version_is_exposed(client, kassa, clock):
    _train(client, kassa, clock)
    kassa.learning.snapshot_due(force=True)
    text = client.get("/metrics").text
    assert "# TYPE kassa_model_swaps_total counter" in text
    assert _sample(text, "kassa_model_swaps_total") == kassa.models.swaps >= 1
    assert _sample(text, "kassa_serving_model_info", placement="order_confirmation", stage="production",
                   version="order_confirmation@1") == 1


def test_join_lag_grows_while_closed_windows_wait_for_the_learner(client, kassa, clock):
    client.post("/v1/decisions", json=decision_body())
    clock.advance(60 + 30)  # the wait (60 s) ended 30 s ago and nothing has joined it yet
    assert _sample(client.get("/metrics").text, "kassa_reward_join_lag_seconds") == 30


def test_no_created_series_are_exposed(client, kassa, clock):
    _train(client, kassa, clock, n=2)
    text = client.get("/metrics").text
    assert "kassa_decisions_total" in text
    assert "_created" not in text


def test_feature_freshness_reports_age_and_target_per_stored_view(client, kassa):
    r = client.put("/v1/features/customer_signals/c-9", json={"values": {"ltv": 3.0}},
                   headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code in (200, 201), r.text
    text = client.get("/metrics").text
    age = _sample(text, "kassa_feature_age_seconds", view="customer_signals")
    assert age is not None and 0 <= age < 60
    assert _sample(text, "kassa_feature_age_seconds", view="session_signals") is None  # nothing written yet
    assert _sample(text, "kassa_feature_freshness_target_seconds", view="customer_signals") == 60
    assert _sample(text, "kassa_feature_freshness_target_seconds", view="session_signals") == 60


def test_offer_labels_are_bounded_to_the_catalog() -> None:
    m = Metrics()
    m.known_offers = lambda: {"warranty"}
    for offer in ("warranty", "made-up-1", "made-up-2"):
        m.observe_event("accept", offer)
    text = m.render().decode()
    assert _sample(text, "kassa_offer_accepts_total", offer="warranty") == 1
    assert _sample(text, "kassa_offer_accepts_total", offer="other") == 2
    assert "made-up" not in text


# -- deploy/: the Grafana dashboard and the alert rules


def _exposed_names(client) -> set[str]:
    names = set()
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


_KASSA_NAME = re.compile(r"\bkassa_[a-z0-9_]+")


def test_grafana_dashboard_reads_only_metrics_kassa_exposes(client, kassa, clock):
    _train(client, kassa, clock)
    exposed = _exposed_names(client)
    dash = json.loads((ROOT / "deploy/grafana/kassa.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    used = {n for e in exprs for n in _KASSA_NAME.findall(e)}
    assert used and used <= exposed, used - exposed


def test_alert_rules_pass_promtool_and_read_only_exposed_metrics(client, kassa, clock):
    import subprocess

    from tests.services import ensure_promtool

    rules = ROOT / "deploy/prometheus/alerts.yml"
    result = subprocess.run([ensure_promtool(), "check", "rules", str(rules)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    _train(client, kassa, clock)
    exposed = _exposed_names(client)
    used = set(_KASSA_NAME.findall(rules.read_text()))
    assert used <= exposed, used - exposed
    for alert in ("KassaDecisionSLOBurnFast", "KassaFallbackShareHigh", "KassaRewardJoinLag", "KassaDrift",
                  "KassaCanaryRolledBack"):
        assert f"alert: {alert}" in rules.read_text()


def _families(text: str) -> set[str]:
    """Every series family `/metrics` declares (``# TYPE`` lines: also those with no sample yet), under the names
    a scrape shows (counters with their ``_total``)."""
    out = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            out.add(f"{name}_total" if kind == "counter" and not name.endswith("_total") else name)
    return out


def test_every_exported_series_is_documented_and_every_documented_series_is_exported(client, kassa, clock):
    """docs/metrics.md (and docs/drift.md for the drift series) list what `/metrics` exposes, both ways: a new
    series without a row, or a row whose series is gone, fails here."""
    _train(client, kassa, clock)
    exported = _families(client.get("/metrics").text)
    docs = (ROOT / "docs/metrics.md").read_text()
    drift_docs = (ROOT / "docs/drift.md").read_text()
    documented = set(re.findall(r"^\| `(kassa_[a-z_]+)`", docs, re.M))
    drift_documented = set(re.findall(r"`(kassa_drift_[a-z_]+)`", drift_docs))
    undocumented = sorted(n for n in exported
                          if n not in (drift_documented if n.startswith("kassa_drift_") else documented))
    assert not undocumented, f"series missing from docs/metrics.md or docs/drift.md: {undocumented}"
    stale = sorted((documented | drift_documented) - exported)
    assert not stale, f"documented series /metrics does not expose: {stale}"
    assert {"kassa_state_writes_dropped_total", "kassa_event_spool_depth", "kassa_circuit_open"} <= exported


def test_dropped_state_writes_are_exported_as_a_counter():
    m = Metrics()
    assert _sample(m.render().decode(), "kassa_state_writes_dropped_total") == 0
    dropped = [0]
    m.dropped_state_writes = lambda: dropped[0]
    dropped[0] = 7
    text = m.render().decode()
    assert "# TYPE kassa_state_writes_dropped_total counter" in text
    assert _sample(text, "kassa_state_writes_dropped_total") == 7


def test_a_metrics_token_closes_the_endpoint_to_requests_without_it(settings, clock) -> None:  # type: ignore[no-untyped-def]
    import msgspec
    import pytest
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings

    token = "m" * 24
    guarded = msgspec.structs.replace(settings, server=msgspec.structs.replace(settings.server, metrics_token=token))
    with TestClient(create_app(Kassa(guarded, clock=clock, seed=7))) as c:
        for headers, why in (({}, "needs `Authorization: Bearer"), ({"Authorization": f"Bearer {token}x"}, "wrong"),
                             ({"Authorization": f"Basic {token}"}, "needs"),
                             ({"Authorization": f"Bearer {SECRET}"}, "wrong")):  # an API key is not the token
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 401 and why in r.json()["detail"], (headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer" and r.json()["field"] == "Authorization"
            assert r.json()["title"] == "Missing or invalid metrics token"  # a token, not an API key
        r = c.get("/metrics", headers={"Authorization": f"bearer {token}"})
        assert r.status_code == 200 and "kassa_decisions_total" in r.text
        assert c.get("/healthz").status_code == 200  # probes stay open
    for bad in ("short", " " + "m" * 24, "m" * 12 + " " + "m" * 12, "   "):
        with pytest.raises(SystemExit, match=r"server\.metrics_token: use at least 16 characters"):
            load_settings(None, **{"server.metrics_token": bad})
