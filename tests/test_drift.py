"""Drift detection (`kassa.monitor.drift`): statistics against hand-computed values, detectors on shifted
and unshifted data, the streaming monitor's memory bound, metrics and alert hook, and the demo
simulator's drift option."""

from __future__ import annotations

import http.server
import json
import logging
import math
import random
import threading
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kassa import errors
from kassa.demo.simulator import APPEAL, DRIFTED_APPEAL, World
from kassa.demo.store import DemoStore
from kassa.events.decision_log import DecisionRecord, loggable_features, records_to_table
from kassa.events.join import JoinedExample
from kassa.monitor.drift.alerts import ALERT_MESSAGE, AlertHook
from kassa.monitor.drift.config import DriftConfig
from kassa.monitor.drift.cusum import RateCusum, cusum_threshold
from kassa.monitor.drift.metrics import DriftMetrics
from kassa.monitor.drift.monitor import DriftMonitor
from kassa.monitor.drift.offline import compare, window_from_decisions
from kassa.monitor.drift.statistics import (
    align_categories,
    binned_psi,
    categorical_psi,
    chi2_sf,
    kolmogorov_sf,
    ks_2samp,
    psi,
    psi_p_value,
)
from kassa.monitor.drift.window import Window, decision_action


# --------------------------------------------------------------------------- statistics, by hand
def test_psi_matches_the_hand_computed_value() -> None:
    # shares 0.5/0.3/0.2 -> 0.3/0.3/0.4: (0.3-0.5)ln(0.3/0.5) + 0 + (0.4-0.2)ln(0.4/0.2)
    assert psi([50, 30, 20], [30, 30, 40]) == pytest.approx(0.2 * math.log(5 / 3) + 0.2 * math.log(2), rel=1e-12)
    assert psi([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-15)  # same shares, any totals


def test_psi_floors_an_empty_bin_at_epsilon() -> None:
    # reference shares 1 / 0 (floored to 1e-4), live 0.5 / 0.5
    expected = (0.5 - 1.0) * math.log(0.5 / 1.0) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert psi([10, 0], [5, 5], epsilon=1e-4) == pytest.approx(expected, rel=1e-12)
    assert psi([10, 0], [5, 5], epsilon=1e-3) < psi([10, 0], [5, 5], epsilon=1e-4)


def test_categorical_psi_compares_the_union_of_categories() -> None:
    ref = {"mobile": 60, "desktop": 40}
    live = {"mobile": 30, "desktop": 40, "tablet": 30}
    by_hand = psi([40, 60, 0], [40, 30, 30])  # desktop, mobile, tablet
    assert categorical_psi(ref, live) == pytest.approx(by_hand, rel=1e-12)


def test_binned_psi_cuts_bins_at_the_reference_quantiles() -> None:
    reference = np.arange(1.0, 11.0)  # median 5.5: five values each side
    live = np.array([1.0, 2.0, 8.0, 9.0, 10.0, 10.0])  # 2 below, 4 above
    by_hand = (1 / 3 - 1 / 2) * math.log((1 / 3) / (1 / 2)) + (2 / 3 - 1 / 2) * math.log((2 / 3) / (1 / 2))
    assert binned_psi(reference, live, bins=2) == pytest.approx(by_hand, rel=1e-12)


def test_ks_matches_the_hand_computed_value() -> None:
    # ECDFs of {1,2,3,4} and {3,4,5,6,7} differ most at x = 4: 1.0 - 0.4 = 0.6.
    d, p = ks_2samp([1, 2, 3, 4], [3, 4, 5, 6, 7])
    assert d == pytest.approx(0.6)
    en = math.sqrt(4 * 5 / 9)
    lam = (en + 0.12 + 0.11 / en) * 0.6
    series = 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 50))
    assert p == pytest.approx(series, rel=1e-9)
    assert p == pytest.approx(0.2587, abs=1e-4)
    assert ks_2samp([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)


def test_kolmogorov_tail_is_continuous_across_its_two_series() -> None:
    for lam in (0.2, 0.5, 1.0, 1.17, 1.18, 1.19, 1.5, 3.0):
        series = 2 * sum((-1) ** (j - 1) * math.exp(-2 * j * j * lam * lam) for j in range(1, 5000))
        assert kolmogorov_sf(lam) == pytest.approx(series, abs=1e-12), lam
    assert kolmogorov_sf(0.0) == 1.0


def test_chi_square_tail_matches_known_values() -> None:
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1.0), rel=1e-12)  # df 2: exp(-x/2)
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-9)
    assert chi2_sf(0.0, 3) == 1.0
    # PSI x n1 n2 / (n1 + n2) is the homogeneity statistic: a PSI of 0.02 over 1000 vs 1000 in 2 bins
    assert psi_p_value(0.02, 1000, 1000, 2) == pytest.approx(chi2_sf(10.0, 1), rel=1e-12)


def test_ks_p_values_are_calibrated_under_no_drift() -> None:
    rng = np.random.default_rng(7)
    p = np.array([ks_2samp(rng.normal(size=300), rng.normal(size=400))[1] for _ in range(600)])
    assert 0.02 <= float(np.mean(p < 0.05)) <= 0.08
    assert float(np.mean(p < 0.01)) <= 0.025


def test_bad_inputs_to_the_statistics_raise() -> None:
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        psi([0, 0], [1, 1])
    with pytest.raises(ValueError):
        psi([-1, 2], [1, 1])
    with pytest.raises(ValueError):
        ks_2samp([], [1.0])
    with pytest.raises(ValueError):
        binned_psi([], [1.0])
    with pytest.raises(ValueError):
        chi2_sf(1.0, 0)
    with pytest.raises(ValueError):
        RateCusum(0.1, 1.5, 10.0, "down")
    with pytest.raises(ValueError):
        RateCusum(0.1, 0.5, 0.0, "down")
    with pytest.raises(ValueError):
        cusum_threshold(1.0)


@pytest.mark.parametrize(("field", "value"), [
    ("psi_warn", 0.3), ("psi_alert", -1.0), ("ks_p_alert", 1.5), ("psi_p_alert", 0.0), ("bins", 1),
    ("window", 0), ("min_samples", 10_000), ("arl", 1.0), ("reward_changes", (0.2, 1.2)), ("offer_changes", ()),
    ("reward_direction", "sideways"), ("epsilon", 0.5), ("reference_z", -1.0), ("ks_min_statistic", 2.0),
    ("reference_lag", 2),
])
def test_invalid_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(errors.Invalid) as exc:
        DriftConfig(**{field: value})  # type: ignore[arg-type]
    assert exc.value.field == field


def test_align_categories_folds_values_the_capped_side_could_not_keep() -> None:
    ref = {"a": 5, "b": 3, "__other__": 2}  # ran out of room: "c" may hide in __other__
    live = {"a": 4, "c": 6}
    r, c = align_categories(ref, live)
    assert r == ref and c == {"a": 4, "__other__": 6}
    assert align_categories({"a": 1}, {"b": 1}) == ({"a": 1}, {"b": 1})  # nothing capped: unchanged


# --------------------------------------------------------------------------- feature drift on windows
CFG = DriftConfig(window=800, min_samples=300, sample_size=800)


def _decisions(rng: random.Random, n: int, mobile: float, total_mean: float) -> Iterator[dict]:
    for _ in range(n):
        yield {"device": "mobile" if rng.random() < mobile else rng.choice(["desktop", "tablet"]),
               "total": rng.gauss(total_mean, 1.0), "country": rng.choice(["US", "GB", "DE", "FR"]),
               "cat": "|".join(sorted(rng.sample(["skincare", "pet", "toys", "home", "shoes"], rng.randint(1, 2)))),
               "guest": rng.random() < 0.2, "hour": str(rng.randrange(24))}


def _window(rng: random.Random, n: int, mobile: float = 0.6, total_mean: float = 4.0) -> Window:
    w = Window(CFG, seed=rng.randrange(1 << 30))
    for f in _decisions(rng, n, mobile, total_mean):
        w.add_decision(f)
    return w


def test_feature_drift_fires_on_shifted_data_and_not_on_unshifted_data() -> None:
    rng = random.Random(11)
    trials = 60
    false_alarms = 0
    for _ in range(trials):
        report = compare(_window(rng, 800), _window(rng, 600), "p")
        false_alarms += bool(report.alerts)
    # Each check runs ~8 tests at p < 0.01 (and PSI >= 0.2 or D >= 0.1 besides): well under 5 % together.
    assert false_alarms / trials <= 0.05

    for _ in range(10):
        device = compare(_window(rng, 800), _window(rng, 600, mobile=0.25), "p")
        assert {(r.kind, r.feature) for r in device.alerts} == {("psi", "device")}
        total = compare(_window(rng, 800), _window(rng, 600, total_mean=4.8), "p")
        assert {r.kind for r in total.alerts if r.feature == "total"} == {"psi_binned", "ks"}
        assert all(r.feature == "total" for r in total.alerts)


def test_clock_features_are_excluded_and_lists_count_each_element() -> None:
    w = Window(CFG)
    w.add_decision({"cat": "pet|toys", "hour": "3", "device": "mobile"})
    w.add_decision({"cat": ["pet"], "device": "desktop"})
    w.add_decision({"guest": True})
    assert "hour" not in w.features
    assert w.category_counts("cat") == {"pet": 2, "toys": 1, "__missing__": 1}
    assert w.category_counts("guest") == {"true": 1, "__missing__": 2}


def test_a_feature_that_stops_arriving_is_drift() -> None:
    rng = random.Random(3)
    ref, live = _window(rng, 800), Window(CFG)
    for f in _decisions(rng, 600, 0.6, 4.0):
        f.pop("total")
        live.add_decision(f)
    rows = {(r.kind, r.feature): r for r in compare(ref, live).rows}
    assert rows[("psi_binned", "total")].severity == "alert"
    assert ("ks", "total") not in rows  # nothing to compare the reference's values with


def test_small_windows_report_nothing_rather_than_noise() -> None:
    rng = random.Random(5)
    assert compare(_window(rng, 800), _window(rng, 100)).rows == []


# --------------------------------------------------------------------------- reward-rate detectors
def test_cusum_false_alarms_stay_within_lordens_bound() -> None:
    rng = np.random.default_rng(2)
    arl, n, trials = 200.0, 200, 300
    h = cusum_threshold(arl)
    alarms = 0
    for _ in range(trials):
        c = RateCusum(0.1, 0.5, h, "down")
        alarms += any(c.update(float(x)) for x in rng.random(n) < 0.1)
    # P(alarm within n) <= n * e^-h = n / arl = 1.0 here is the guarantee; CUSUM does far better.
    assert alarms / trials <= 0.05


def test_cusum_finds_a_halved_accept_rate_quickly() -> None:
    rng = np.random.default_rng(4)
    delays = []
    for _ in range(50):
        c = RateCusum(0.1, 0.5, cusum_threshold(1e6), "down")
        for x in rng.random(2_000) < 0.1:  # no change: no alarm
            assert not c.update(float(x))
        for i, x in enumerate(rng.random(20_000) < 0.05):
            if c.update(float(x)):
                delays.append(i + 1)
                break
    assert len(delays) == 50
    # ln(1e6) / KL(0.05 || 0.1 via the Poisson ratio) ~ 13.8 / 0.0153 ~ 900 observations on average
    assert 300 < float(np.median(delays)) < 2_500


def _feed(monitor: DriftMonitor, rng: random.Random, n: int, p_app: float, p_other: float = 0.05) -> None:
    for _ in range(n):
        monitor.observe_decision({"device": "mobile"}, 0.8, "app", "v1")
        monitor.observe_outcome([("app", float(rng.random() < p_app)), ("other", float(rng.random() < p_other))])


def test_monitor_reward_detectors_fire_on_a_change_and_stay_quiet_without_one() -> None:
    cfg = DriftConfig(window=2_000, min_samples=500)
    rng = random.Random(9)
    quiet = DriftMonitor("p", cfg)
    _feed(quiet, rng, 2_000, 0.12)  # the first window becomes the reference
    for _ in range(20):
        _feed(quiet, rng, 500, 0.12)
        assert not quiet.check().alerts
    assert quiet.windows_closed == 6

    changed = DriftMonitor("p", cfg)
    _feed(changed, rng, 2_000, 0.12)
    detected_after = None
    for step in range(1, 21):
        _feed(changed, rng, 100, 0.03)  # the app offer stopped working
        report = changed.check()
        if report.alerts:
            detected_after = step * 100
            break
    assert detected_after is not None and detected_after <= 1_500
    first = report.alerts[0]
    assert (first.kind, first.feature) == ("offer_rate", "app")
    assert first.detail["method"] == "cusum" and first.detail["reference_rate"] == pytest.approx(0.12, abs=0.03)


def test_observe_joined_sums_each_decision_and_ignores_other_placements() -> None:
    m = DriftMonitor("p", DriftConfig(window=100, min_samples=10))
    ex = [JoinedExample("p", "d1", "", "", "a", 1.0, 0.5, 0), JoinedExample("p", "d1", "", "", "b", 0.0, 0.5, 1),
          JoinedExample("q", "d2", "", "", "a", 1.0, 0.5, 0),
          JoinedExample("p", "d3", "", "", "a", 0.0, 0.5, 0), JoinedExample("p", "d3", "", "", "c", 1.0, 0.5, 1)]
    m.observe_joined(ex)
    assert m.live.rewards.n == 2 and m.live.rewards.sum == 2.0
    assert {o: (s.n, s.sum) for o, s in m.live.offers.items()} == {"a": (2, 1.0), "b": (1, 0.0), "c": (1, 1.0)}


def test_compare_tests_reward_windows_with_welch() -> None:
    rng = random.Random(1)
    ref, live, same = Window(CFG), Window(CFG), Window(CFG)
    for w, p in ((ref, 0.3), (live, 0.15), (same, 0.3)):
        for _ in range(1_500):
            w.add_outcome([("a", float(rng.random() < p)), ("b", float(rng.random() < 0.1))])
    drop = {r.feature: r for r in compare(ref, live).rows}
    assert drop["reward"].severity == "alert" and drop["reward"].statistic == pytest.approx(-0.3, abs=0.1)
    assert drop["a"].severity == "alert" and drop["b"].severity == "ok"
    assert not compare(ref, same).alerts


# --------------------------------------------------------------------------- the monitor
def test_monitor_memory_is_bounded_whatever_the_traffic() -> None:
    cfg = DriftConfig(window=500, min_samples=100, sample_size=200, max_features=10, max_categories=20,
                      max_offers=10)
    m = DriftMonitor("p", cfg)
    rng = random.Random(0)
    peak = 0
    for i in range(30_000):
        # Unique values everywhere: ids as features, new feature names, new offers and versions.
        feats = {f"f{i % 40}": f"v{i}", "order_id": f"o{i}", "total": rng.random()}
        m.observe_decision(feats, rng.random(), f"offer-{i}", f"v{i}")
        m.observe_outcome([(f"offer-{i}", 1.0), ("a", 0.0)])
        if i % 1000 == 999:
            m.check()
            peak = max(peak, m.memory_bound)
    per_window = (cfg.sample_size * (1 + cfg.max_features) + cfg.max_features * (cfg.max_categories + 1)
                  + 2 * (cfg.max_categories + 1) + cfg.max_offers)
    assert peak <= 3 * per_window + cfg.max_offers * 6 + 6
    assert m.windows_closed == 60


def test_prediction_drift_alerts_under_one_model_and_only_warns_when_the_model_changed() -> None:
    cfg = DriftConfig(window=1_000, min_samples=300)
    rng = random.Random(2)

    def run(live_version: str) -> list:
        m = DriftMonitor("p", cfg)
        for _ in range(1_000):
            m.observe_decision({"device": "mobile"}, rng.betavariate(8, 2), rng.choice("ab"), "v1")
        for _ in range(600):
            m.observe_decision({"device": "mobile"}, rng.betavariate(2, 8), rng.choice("cd"), live_version)
        return m.check().rows

    fixed = {r.kind: r for r in run("v1") if r.group == "prediction"}
    assert {k for k, r in fixed.items() if r.severity == "alert"} == {"score_psi", "score_ks", "action_psi"}
    learning = {r.kind: r for r in run("v2") if r.group == "prediction"}
    assert all(r.severity == "warn" and r.detail["model_changed"] for r in learning.values())


def test_rolling_reference_follows_a_slow_trend_and_a_fixed_one_does_not() -> None:
    def run(rolling: bool) -> int:
        m = DriftMonitor("p", DriftConfig(window=1_000, min_samples=300, rolling_reference=rolling))
        rng = random.Random(4)
        alerts = 0
        for i in range(12_000):
            share = 0.2 + 0.5 * i / 12_000  # the mobile share creeps from 20 % to 70 %
            m.observe_decision({"device": "mobile" if rng.random() < share else "desktop"})
            if i % 500 == 499:
                alerts += len(m.check().alerts)
        return alerts

    assert run(rolling=True) == 0
    assert run(rolling=False) > 0


def test_rebase_takes_the_present_as_the_reference() -> None:
    m = DriftMonitor("p", DriftConfig(window=1_000, min_samples=300, rolling_reference=False))
    rng = random.Random(8)
    for _ in range(1_000):
        m.observe_decision({"device": "mobile" if rng.random() < 0.2 else "desktop"})
    for _ in range(600):
        m.observe_decision({"device": "mobile" if rng.random() < 0.8 else "desktop"})
    assert [r.feature for r in m.check().alerts] == ["device"]
    m.rebase()
    for _ in range(600):
        m.observe_decision({"device": "mobile" if rng.random() < 0.8 else "desktop"})
    assert not m.check().alerts


def test_decision_records_feed_the_monitor_and_the_offline_report() -> None:
    rng = random.Random(6)

    def record(i: int, mobile: float) -> DecisionRecord:
        feats = loggable_features({"device": "mobile" if rng.random() < mobile else "desktop",
                                   "cat": rng.sample(["pet", "toys", "home"], 2), "total": rng.random()})
        return DecisionRecord(f"d{i}", 1e9 + i, "p", "p@1", None, None, feats, ["a", "b", "c"],
                              [0.2, 0.7, 0.1], ["b", "a"], [0.7, 0.5], False, False, 0.5)

    ref_records = [record(i, 0.7) for i in range(800)]
    live_records = [record(i, 0.2) for i in range(800, 1_400)]
    assert decision_action(["a", "b", "c"], [0.2, 0.7, 0.1]) == "b"

    m = DriftMonitor("p", DriftConfig(window=800, min_samples=300))
    for r in ref_records + live_records:
        m.observe_record(r)
    m.observe_record(DecisionRecord("x", 0.0, "other", "v", None, None, {}, [], [], [], [], False, False, 0.0))
    assert m.live.decisions == 600
    streaming = {(r.kind, r.feature) for r in m.check().alerts}

    rewards = {f"d{i}": [("b", 1.0), ("a", 0.0)] for i in range(0, 1_400, 2)}
    ref = window_from_decisions(records_to_table(ref_records), rewards, DriftConfig(window=800, min_samples=300))
    live = window_from_decisions(records_to_table(live_records), rewards, DriftConfig(window=800, min_samples=300))
    assert ref.rewards.n == 400 and ref.category_counts("cat")["pet"] > 0
    offline = compare(ref, live, "p")
    assert {(r.kind, r.feature) for r in offline.alerts} == streaming == {("psi", "device")}


def test_report_serialises_to_json_and_a_table() -> None:
    rng = random.Random(12)
    report = compare(_window(rng, 800), _window(rng, 600, mobile=0.2), "order_confirmation", now=1.0)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["placement"] == "order_confirmation" and data["severity"] == "alert" and data["alerts"] == 1
    row = next(r for r in data["rows"] if r["feature"] == "device")
    assert set(row) >= {"feature", "kind", "statistic", "p_value", "severity", "reference_n", "live_n"}
    assert 0.0 < row["p_value"] < 1e-6  # significant digits survive, not rounded to 0
    text = report.table()
    assert text.splitlines()[2].startswith("alert") and "device" in text


# --------------------------------------------------------------------------- metrics and the alert hook
def _drifting_monitor(**kwargs: object) -> DriftMonitor:
    m = DriftMonitor("checkout", DriftConfig(window=600, min_samples=300), **kwargs)  # type: ignore[arg-type]
    rng = random.Random(1)
    for _ in range(600):
        m.observe_decision({"device": "mobile" if rng.random() < 0.8 else "desktop"})
    for _ in range(400):
        m.observe_decision({"device": "mobile" if rng.random() < 0.2 else "desktop"})
    return m


def test_metrics_expose_psi_and_count_alerts_once() -> None:
    registry = CollectorRegistry()
    m = _drifting_monitor(metrics=DriftMetrics(registry))
    m.check()
    m.check()  # the same alert again: not a new one
    text = generate_latest(registry).decode()
    assert 'kassa_drift_psi{feature="device",placement="checkout"}' in text
    assert 'kassa_drift_alerts_total{kind="feature",placement="checkout"} 1.0' in text
    assert 'kassa_drift_checks_total{placement="checkout"} 2.0' in text
    assert 'kassa_drift_severity{placement="checkout"} 2.0' in text


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: ClassVar[list[dict]] = []
    status = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append(json.loads(body))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[_Receiver]]]:
    handler = type("Handler", (_Receiver,), {"bodies": [], "status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/drift", handler
    server.shutdown()
    server.server_close()


def test_alert_hook_logs_a_stable_line_and_posts_the_report(receiver: tuple[str, type[_Receiver]],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    url, handler = receiver
    hook = AlertHook(url, timeout=5.0)
    m = _drifting_monitor(hook=hook)
    with caplog.at_level(logging.WARNING, logger="kassa.drift"):
        m.check()
        assert hook.flush(10.0)
    hook.close()
    lines = [r for r in caplog.records if r.msg == ALERT_MESSAGE]
    assert len(lines) == 1 and lines[0].getMessage().startswith(
        "kassa drift alert: placement=checkout kind=psi feature=device statistic=")
    assert hook.posted == 1 and hook.failed == 0
    [body] = handler.bodies
    assert body["event"] == "kassa.drift.alert" and body["placement"] == "checkout"
    assert [a["feature"] for a in body["alerts"]] == ["device"] and body["report"]["severity"] == "alert"


def test_a_failing_webhook_is_logged_and_never_raises(receiver: tuple[str, type[_Receiver]],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    url, handler = receiver
    handler.status = 500
    hook = AlertHook(url, timeout=2.0)
    with socket_closed_port() as dead:
        down = AlertHook(dead, timeout=0.5)
        with caplog.at_level(logging.WARNING, logger="kassa.drift"):
            _drifting_monitor(hook=hook).check()
            _drifting_monitor(hook=down).check()
            assert hook.flush(10.0) and down.flush(10.0)
    assert (hook.posted, hook.failed) == (0, 1) and (down.posted, down.failed) == (0, 1)
    assert sum("drift webhook POST" in r.getMessage() for r in caplog.records) == 2
    hook.close()
    down.close()


class socket_closed_port:
    """A URL on a local port nobody listens on."""

    def __enter__(self) -> str:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return f"http://127.0.0.1:{port}/"

    def __exit__(self, *exc: object) -> None:
        return None


def test_alert_hook_rejects_bad_settings() -> None:
    with pytest.raises(errors.Invalid) as exc:
        AlertHook("ftp://example.com/hook")
    assert exc.value.field == "webhook_url"
    with pytest.raises(errors.Invalid) as exc:
        AlertHook("https://example.com/hook", timeout=0)
    assert exc.value.field == "timeout"


# --------------------------------------------------------------------------- the simulator's drift option
@pytest.fixture(scope="module")
def store() -> DemoStore:
    return DemoStore.build(3)


def test_simulator_drift_changes_acceptance_only_after_drift_at(store: DemoStore) -> None:
    plain, drifting = World(store, 3), World(store, 3, drift_at=300)
    a, b = plain.checkouts(600), drifting.checkouts(600)
    assert [(c.customer_id, c.total, c.draws) for c in a] == [(c.customer_id, c.total, c.draws) for c in b]
    offers = list(plain.offers)
    for c in a[:300]:
        assert [plain.p_accept(c, o) for o in offers] == [drifting.p_accept(c, o) for o in offers]
    changed = sum(plain.p_accept(c, o) != drifting.p_accept(c, o) for c in a[300:] for o in offers)
    assert changed > 300
    mobile = [c for c in a[300:] if c.device == "mobile"]
    assert max(drifting.p_accept(c, "partner-app") for c in mobile) < 0.05 < min(
        plain.p_accept(c, "partner-app") for c in mobile)
    assert plain.drift_at is None and not any(plain.drifted(c) for c in a)


def test_drift_moves_the_best_offer_but_not_the_best_achievable_rate(store: DemoStore) -> None:
    world = World(store, 3)
    assert set(DRIFTED_APPEAL) == set(APPEAL) and DRIFTED_APPEAL != APPEAL
    p_pre, ok = world.static_matrices(world.checkouts(3_000, stream="test-drift"), drifted=False)
    p_post, _ = world.static_matrices(world.checkouts(3_000, stream="test-drift"), drifted=True)
    top = lambda p: float(np.sort(np.where(ok, p, 0.0), axis=0)[-3:].sum(axis=0).mean())  # noqa: E731
    assert top(p_post) == pytest.approx(top(p_pre), rel=0.1)
    best_before = np.argmax(np.where(ok, p_pre, -1.0), axis=0)
    best_after = np.argmax(np.where(ok, p_post, -1.0), axis=0)
    assert float(np.mean(best_before != best_after)) > 0.3  # a third of buyers have a new best offer
    assert world.best_static_order() != world.best_static_order(drifted=True)


def test_simulator_rejects_a_negative_drift_point(store: DemoStore) -> None:
    with pytest.raises(ValueError, match="drift_at"):
        World(store, 3, drift_at=-1)


def test_kassa_drift_windows_from_the_log_know_the_serving_version_so_learning_is_not_an_alert() -> None:
    import pyarrow as pa

    from kassa.events.decision_log import DecisionRecord, records_to_table
    from kassa.monitor.drift.offline import compare, window_from_decisions

    rng = random.Random(3)

    def table(version: str, lo: float, hi: float) -> pa.Table:
        return records_to_table([
            DecisionRecord(f"{version}-{i}", 1.0 + i, "p", version, None, None, {"x": 1.0}, ["a", "b"],
                           [p := rng.uniform(lo, hi), 1 - p], ["a"], [p], False, False, 1.0)
            for i in range(1500)])

    ref = window_from_decisions(table("p@1", 0.5, 0.6))
    live = window_from_decisions(table("p@9", 0.9, 0.99))  # the model learned: far more confident
    rows = [r for r in compare(ref, live).rows if r.feature == "score"]
    assert rows and all(r.severity != "alert" and r.detail.get("model_changed") for r in rows)
    same = window_from_decisions(table("p@1", 0.9, 0.99))  # the same model, inputs moved: an alert
    assert any(r.severity == "alert" for r in compare(ref, same).rows if r.feature == "score")
