"""Off-policy evaluation: estimators against hand-computed values, interval coverage on synthetic logs with a
known true policy value, the promotion gate, bad-input errors, and the text/HTML/PNG reports."""

from __future__ import annotations

import html.parser
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kassa.learn.offline import ope, ope_report
from kassa.learn.offline.ope import Estimate, MeanRewardModel, OPEInputError
from tests.partial_writes import disk_full_halfway

Z95 = 1.959963984540054  # standard normal 97.5% quantile

# ------------------------------------------------------------------------------------- a 4-row log
# reward      1     0     1     0
# logged_prob 0.5   0.25  0.5   0.8
# target_prob 1.0   0.5   0.25  0.0
# w = t / l   2     2     0.5   0
R = [1.0, 0.0, 1.0, 0.0]
LP = [0.5, 0.25, 0.5, 0.8]
TP = [1.0, 0.5, 0.25, 0.0]
QL = [0.5, 0.5, 0.5, 0.5]
QT = [0.6, 0.4, 0.5, 0.3]


def test_ips_matches_hand_computation() -> None:
    est = ope.ips(R, LP, TP)
    # w*r = [2, 0, 0.5, 0]; IPS = 2.5 / 4
    assert est.value == pytest.approx(0.625)
    # deviations from 0.625: 1.375, -0.625, -0.125, -0.625; squares sum to 2.6875; sample var 2.6875 / 3
    se = math.sqrt(2.6875 / 3 / 4)
    assert est.std_error == pytest.approx(se)
    assert (est.ci_low, est.ci_high) == (pytest.approx(0.625 - Z95 * se), pytest.approx(0.625 + Z95 * se))
    # ESS = (2 + 2 + 0.5 + 0)^2 / (4 + 4 + 0.25 + 0) = 20.25 / 8.25
    assert est.ess == pytest.approx(20.25 / 8.25)
    assert (est.name, est.n, est.level, est.method) == ("ips", 4, 0.95, "normal")


def test_snips_matches_hand_computation_with_delta_method_interval() -> None:
    est = ope.snips(R, LP, TP)
    # Σ w r / Σ w = 2.5 / 4.5 = 5/9
    assert est.value == pytest.approx(5 / 9)
    # w (r - 5/9) = [8/9, -10/9, 2/9, 0]; squares sum to 168/81; times n/(n-1) = 4/3; / (Σw)^2 = 4.5^2
    se = math.sqrt(168 / 81 * 4 / 3) / 4.5
    assert est.std_error == pytest.approx(se)
    assert est.ci_low == pytest.approx(5 / 9 - Z95 * se)
    assert est.ci_high == pytest.approx(5 / 9 + Z95 * se)


def test_doubly_robust_matches_hand_computation() -> None:
    est = ope.doubly_robust(R, LP, TP, QL, QT)
    # d = q_target + w (r - q_logged) = [0.6 + 2*0.5, 0.4 + 2*(-0.5), 0.5 + 0.5*0.5, 0.3 + 0] = [1.6, -0.6, 0.75, 0.3]
    assert est.value == pytest.approx(2.05 / 4)
    # deviations from 0.5125: 1.0875, -1.1125, 0.2375, -0.2125; squares sum to 2.521875
    assert est.std_error == pytest.approx(math.sqrt(2.521875 / 3 / 4))
    assert est.ess == pytest.approx(20.25 / 8.25)


def test_max_weight_clips_the_importance_weights() -> None:
    # clipped w = [1, 1, 0.5, 0]; IPS = (1 + 0 + 0.5 + 0) / 4; SNIPS = 1.5 / 2.5
    assert ope.ips(R, LP, TP, max_weight=1.0).value == pytest.approx(0.375)
    assert ope.snips(R, LP, TP, max_weight=1.0).value == pytest.approx(0.6)
    assert ope.importance_weights(LP, TP, max_weight=1.0).tolist() == [1.0, 1.0, 0.5, 0.0]
    ev = ope.evaluate_policies(R, LP, {"t": TP}, max_weight=1.0, include_logged=False)
    assert ev.policies["t"].weights is not None and ev.policies["t"].weights.clipped == 2


def test_level_sets_the_interval_width() -> None:
    est95 = ope.ips(R, LP, TP)
    est80 = ope.ips(R, LP, TP, level=0.80)
    # z(0.90) = 1.2815515655; the half-width scales with it
    assert (est80.ci_high - est80.value) == pytest.approx(1.2815515655446004 * est95.std_error)


def test_on_policy_is_the_observed_mean_and_equals_ips_with_unit_weights() -> None:
    r = [1.0, 0.0, 0.0, 1.0, 1.0]
    est = ope.on_policy(r)
    assert est.value == pytest.approx(0.6)
    # sample var of [1,0,0,1,1] = (3*0.16 + 2*0.36) / 4 = 0.3
    assert est.std_error == pytest.approx(math.sqrt(0.3 / 5))
    assert est.ess == 5
    same = ope.ips(r, [0.3] * 5, [0.3] * 5)
    assert (same.value, same.std_error) == (pytest.approx(est.value), pytest.approx(est.std_error))


def test_effective_sample_size() -> None:
    assert ope.effective_sample_size([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0)
    assert ope.effective_sample_size([4.0, 0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert ope.effective_sample_size([0.0, 0.0]) == 0.0


def test_ips_and_snips_are_undefined_when_the_policy_never_takes_a_logged_action() -> None:
    for f in (ope.ips, ope.snips):
        est = f(R, LP, [0.0] * 4)
        assert math.isnan(est.value) and not est.defined and est.ess == 0.0
        assert est.to_dict()["value"] is None  # JSON has no NaN
    # DR still has the reward model's value, but the gate refuses a candidate resting on zero weights
    dr = ope.doubly_robust(R, LP, [0.0] * 4, QL, [0.9] * 4)
    assert dr.value == pytest.approx(0.9) and dr.ess == 0.0
    verdict = ope.gate(dr, ope.on_policy(R))
    assert not verdict.passed and "effective sample size 0" in verdict.reason


# ----------------------------------------------------------------------------------- bootstrap


def test_bootstrap_resamples_are_multinomial_counts_of_n_rows() -> None:
    cols = np.column_stack([np.ones(50), np.arange(50.0)])
    sums = ope.bootstrap_sums(cols, 300, seed=3)
    assert sums.shape == (300, 2)
    assert np.all(sums[:, 0] == 50)  # every resample draws exactly n rows
    assert sums[:, 1].mean() == pytest.approx(np.arange(50.0).sum(), rel=0.02)
    assert np.array_equal(sums, ope.bootstrap_sums(cols, 300, seed=3))  # seeded
    assert not np.array_equal(sums, ope.bootstrap_sums(cols, 300, seed=4))


def test_bootstrap_interval_agrees_with_normal_on_a_large_log() -> None:
    rng = np.random.default_rng(7)
    n = 5000
    lp = rng.uniform(0.2, 0.8, n)
    tp = rng.uniform(0.0, 1.0, n)
    r = (rng.random(n) < 0.3).astype(float)
    for f in (ope.ips, ope.snips):
        normal = f(r, lp, tp)
        boot = f(r, lp, tp, method="bootstrap", n_boot=400, seed=1)
        assert boot.method == "bootstrap" and boot.value == normal.value
        assert boot.std_error == pytest.approx(normal.std_error, rel=0.15)
        assert boot.ci_low < boot.value < boot.ci_high
        assert boot.ci_low == pytest.approx(normal.ci_low, abs=normal.std_error * 0.5)


# ---------------------------------------------------------------------- coverage on synthetic logs
# A world with 4 contexts and 3 actions: P(context), P(reward = 1 | context, action), the logging policy
# mu(a | x) and a target policy pi(a | x). True value of pi = Σ_x P(x) Σ_a pi(a|x) P(r=1|x,a).
PX = np.array([0.4, 0.3, 0.2, 0.1])
PR = np.array([[0.10, 0.30, 0.05], [0.40, 0.10, 0.20], [0.25, 0.25, 0.60], [0.05, 0.50, 0.15]])
MU = np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
PI = np.array([[0.1, 0.8, 0.1], [0.8, 0.1, 0.1], [0.05, 0.05, 0.9], [0.1, 0.8, 0.1]])
WORSE = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.45, 0.45, 0.1], [0.8, 0.1, 0.1]])
K = 3


def true_value(policy: np.ndarray) -> float:
    return float((PX[:, None] * policy * PR).sum())


def simulate(rng: np.random.Generator, trials: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context, logged action, reward) arrays of shape (trials, n), all trials drawn at once."""
    x = rng.choice(len(PX), p=PX, size=(trials, n))
    a = (rng.random((trials, n))[..., None] > np.cumsum(MU[x], axis=-1)).sum(axis=-1)
    r = (rng.random((trials, n)) < PR[x, a]).astype(np.float64)
    return x, a, r


def coverage(level: float, method: ope.Method, trials: int, n: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    x, a, r = simulate(rng, trials, n)
    _, a_fit, r_fit = simulate(rng, trials, n)  # a separate training log for the DR reward model
    truth = true_value(PI)
    all_actions = np.broadcast_to(np.arange(K), (n, K))
    hits = {"ips": 0, "snips": 0, "dr": 0}
    for i in range(trials):
        q = MeanRewardModel.fit(a_fit[i], r_fit[i])
        ev = ope.evaluate_policies(
            r[i], MU[x[i], a[i]], {"pi": PI[x[i], a[i]]}, q_logged=q.predict(a[i]),
            q_targets={"pi": q.expected(all_actions, PI[x[i]])}, level=level, method=method, n_boot=200, seed=i,
        )
        for name in hits:
            est = ev.estimate("pi", name)
            hits[name] += est.ci_low <= truth <= est.ci_high
    return {k: v / trials for k, v in hits.items()}


def test_true_value_of_the_synthetic_world_is_what_the_simulator_produces() -> None:
    # Guards the coverage tests' ground truth: on-policy data from mu averages to the analytic value of mu.
    _, _, r = simulate(np.random.default_rng(0), 20, 20_000)
    assert r.mean() == pytest.approx(true_value(MU), abs=0.003)


def test_normal_intervals_cover_the_true_value_at_the_stated_95_percent_rate() -> None:
    rates = coverage(0.95, "normal", trials=200, n=2000, seed=11)
    for name, rate in rates.items():
        assert 0.90 <= rate <= 0.99, (name, rate)


def test_normal_intervals_cover_at_a_configured_80_percent_level() -> None:
    rates = coverage(0.80, "normal", trials=200, n=2000, seed=12)
    for name, rate in rates.items():
        assert 0.72 <= rate <= 0.88, (name, rate)


def test_bootstrap_intervals_cover_the_true_value_at_about_95_percent() -> None:
    rates = coverage(0.95, "bootstrap", trials=200, n=1000, seed=13)
    for name, rate in rates.items():
        assert 0.90 <= rate <= 0.99, (name, rate)


def test_evaluate_policies_covers_uniform_random_and_the_logged_policy() -> None:
    rng = np.random.default_rng(5)
    x, a, r = simulate(rng, 1, 50_000)
    x, a, r = x[0], a[0], r[0]
    ev = ope.evaluate_policies(r, MU[x, a], {"pi": PI[x, a]}, num_candidates=np.full(x.shape, K))
    assert list(ev.policies) == ["pi", "uniform_random", "logged"]
    uniform = ev.estimate("uniform_random", "snips")
    assert uniform.ci_low <= true_value(np.full((4, K), 1 / K)) <= uniform.ci_high
    logged = ev.estimate("logged", "ips")  # the logged policy's only estimate, whatever is asked
    assert logged.name == "on_policy" and logged.value == pytest.approx(r.mean())
    assert logged.ci_low <= true_value(MU) <= logged.ci_high
    assert "dr" not in ev.policies["pi"].estimates  # no q given, so DR is left out rather than guessed
    w = ev.policies["pi"].weights
    assert w is not None and w.mean == pytest.approx(1.0, abs=0.02)  # right propensities: E[w] = 1
    assert sum(w.hist_counts) + w.zero_count == ev.n


def test_mean_reward_model_shrinks_toward_the_global_mean() -> None:
    # action a: rewards 1, 0 (sum 1, n 2); action b: 1 (sum 1, n 1); global mean 2/3; shrinkage k = 1
    m = MeanRewardModel.fit(["a", "a", "b"], [1.0, 0.0, 1.0], shrinkage=1.0)
    g = 2 / 3
    assert m.predict(["a", "b", "zzz"]).tolist() == pytest.approx([(1 + g) / 3, (1 + g) / 2, g])
    # expected value under per-row probabilities; the padded cell has probability 0
    q = m.expected([["a", "b"], ["b", "a"]], [[0.25, 0.75], [1.0, 0.0]])
    assert q.tolist() == pytest.approx([0.25 * (1 + g) / 3 + 0.75 * (1 + g) / 2, (1 + g) / 2])
    flat = m.expected_ragged(["a", "b", "b"], [0.25, 0.75, 1.0], [2, 1])
    assert flat.tolist() == pytest.approx(q.tolist())


# ---------------------------------------------------------------------------------------- gate


def est(value: float, lo: float, hi: float, name: str = "dr", ess: float = 500.0) -> Estimate:
    return Estimate(name, value, lo, hi, (hi - lo) / (2 * Z95), 1000, ess)


def test_gate_reason_sentences() -> None:
    blocked = ope.gate(est(0.125, 0.112, 0.138), est(0.118, 0.110, 0.126))
    assert not blocked.passed
    assert blocked.reason == "candidate lower bound 0.112 does not beat production estimate 0.118 (margin 0.000)"
    passed = ope.gate(est(0.140, 0.125, 0.155), est(0.118, 0.110, 0.126))
    assert passed.passed
    assert passed.reason == "candidate lower bound 0.125 beats production estimate 0.118 (margin 0.000)"


def test_gate_margin_and_strict_rule() -> None:
    cand, prod = est(0.140, 0.125, 0.155), est(0.118, 0.110, 0.126)
    assert not ope.gate(cand, prod, margin=0.01).passed  # 0.125 <= 0.118 + 0.01
    strict = ope.gate(cand, prod, rule="lcb_beats_ucb")
    assert not strict.passed and "production upper bound 0.126" in strict.reason
    assert ope.gate(est(0.15, 0.13, 0.17), prod, rule="lcb_beats_ucb").passed


def test_gate_refuses_undefined_or_low_ess_candidates() -> None:
    prod = est(0.118, 0.110, 0.126)
    undefined = ope.gate(est(math.nan, math.nan, math.nan, name="snips"), prod)
    assert not undefined.passed and "undefined" in undefined.reason
    thin = ope.gate(est(0.2, 0.19, 0.21, ess=12.0), prod, min_ess=100)
    assert not thin.passed and "effective sample size 12" in thin.reason


def test_gate_blocks_a_worse_candidate_and_admits_a_better_one_on_logged_data() -> None:
    rng = np.random.default_rng(21)
    x, a, r = simulate(rng, 1, 40_000)
    x, a, r = x[0], a[0], r[0]
    assert true_value(PI) > true_value(MU) > true_value(WORSE)  # the world's ground truth
    q = MeanRewardModel.fit(*(arr[0] for arr in simulate(rng, 1, 20_000)[1:]))
    all_actions = np.broadcast_to(np.arange(K), (x.shape[0], K))
    ev = ope.evaluate_policies(
        r, MU[x, a], {"better": PI[x, a], "worse": WORSE[x, a], "production": MU[x, a]},
        q_logged=q.predict(a), q_targets={p: q.expected(all_actions, m[x]) for p, m in
                                           (("better", PI), ("worse", WORSE), ("production", MU))},
    )
    for estimator in ("ips", "snips", "dr"):
        prod = ev.estimate("production", estimator)
        assert ope.gate(ev.estimate("better", estimator), prod).passed, estimator
        verdict = ope.gate(ev.estimate("worse", estimator), prod)
        assert not verdict.passed and "does not beat" in verdict.reason, estimator
        # a candidate that *is* production is never promoted: its lower bound sits below its own estimate
        assert not ope.gate(prod, prod).passed, estimator
    # production as the logged policy's on-policy mean works the same way
    assert ope.gate(ev.estimate("better", "dr"), ev.estimate("logged", "dr")).passed
    assert not ope.gate(ev.estimate("worse", "dr"), ev.estimate("logged", "dr")).passed


# ---------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"reward": [1.0, 0.0, 1.0]}, "logged_prob", "has 4 rows but reward has 3"),
        ({"reward": [], "logged_prob": [], "target_prob": []}, "reward", "no logged rows"),
        ({"reward": [1.0], "logged_prob": [0.5], "target_prob": [0.5]}, "reward", "at least 2"),
        ({"logged_prob": [0.5, 0.0, 0.5, 0.8]}, "logged_prob", "must be in (0, 1]: row 1 is 0.0"),
        ({"logged_prob": [0.5, 1.5, 0.5, 0.8]}, "logged_prob", "row 1 is 1.5"),
        ({"logged_prob": [0.5, math.nan, 0.5, 0.8]}, "logged_prob", "must be finite: row 1"),
        ({"target_prob": [1.0, -0.1, 0.2, 0.0]}, "target_prob", "must be in [0, 1]: row 1"),
        ({"target_prob": [1.0, 1.01, 0.2, 0.0]}, "target_prob", "must be in [0, 1]"),
        ({"reward": [1.0, math.nan, 0.0, math.nan]}, "reward", "reward has NaN at row 1 (2 such rows)"),
        ({"reward": [1.0, math.inf, 0.0, 1.0]}, "reward", "must be finite"),
        ({"reward": [[1.0, 0.0], [1.0, 0.0]]}, "reward", "one-dimensional"),
        ({"reward": ["a", "b", "c", "d"]}, "reward", "must be numbers"),
        ({"level": 1.0}, "level", "between 0 and 1"),
        ({"method": "jackknife"}, "method", "'normal' or 'bootstrap'"),
        ({"max_weight": 0.0}, "max_weight", "positive"),
        ({"method": "bootstrap", "n_boot": 1}, "n_boot", "at least 2"),
    ],
)
def test_estimators_reject_bad_input_with_a_clear_message(kwargs: dict, field: str, message: str) -> None:
    args = {"reward": R, "logged_prob": LP, "target_prob": TP, **kwargs}
    for f in (ope.ips, ope.snips):
        with pytest.raises(OPEInputError) as exc:
            f(**args)
        assert message in str(exc.value) and exc.value.field == field
        assert isinstance(exc.value, ValueError)


def test_doubly_robust_rejects_bad_reward_model_values() -> None:
    with pytest.raises(OPEInputError, match=r"q_target must be finite: row 2"):
        ope.doubly_robust(R, LP, TP, QL, [0.6, 0.4, math.nan, 0.3])
    with pytest.raises(OPEInputError, match=r"q_logged has 3 rows but reward has 4"):
        ope.doubly_robust(R, LP, TP, QL[:3], QT)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_candidates": 0}, "num_candidates must be whole numbers >= 1: row 0 is 0.0"),
        ({"num_candidates": [2, 2.5, 3, 3]}, "row 1 is 2.5"),
        ({"num_candidates": [2, 3]}, "num_candidates has 2 rows but reward has 4"),
        ({"estimators": ["ips", "dm"]}, "unknown estimator 'dm'"),
        ({"estimators": []}, "estimators is empty"),
        ({"estimators": ["dr"], "q_logged": QL}, "no entry for policy 't'"),
        ({"q_targets": {"t": QT}}, "needs q_logged"),
        ({"q_logged": QL, "q_targets": {"other": QT}}, "q_targets has 'other', which is not an evaluated policy"),
        ({"targets": {"logged": TP}}, "'logged' is reserved"),
        ({"targets": {"t": TP[:3]}}, "targets['t'] has 3 rows but reward has 4"),
        ({"targets": {"t": [0.5, 2.0, 0.1, 0.1]}}, "targets['t'] must be in [0, 1]: row 1"),
        ({"targets": {}, "include_logged": False}, "nothing to evaluate"),
    ],
)
def test_evaluate_policies_rejects_bad_input(kwargs: dict, message: str) -> None:
    args = {"targets": {"t": TP}, **kwargs}
    with pytest.raises(OPEInputError) as exc:
        ope.evaluate_policies(R, LP, **args)
    assert message in str(exc.value)


def test_gate_and_reward_model_reject_bad_input() -> None:
    e = est(0.1, 0.09, 0.11)
    with pytest.raises(OPEInputError, match="rule must be"):
        ope.gate(e, e, rule="best_guess")  # type: ignore[arg-type]
    with pytest.raises(OPEInputError, match="margin must be a finite number"):
        ope.gate(e, e, margin=math.nan)
    with pytest.raises(OPEInputError, match="reward has 3 rows but actions has 2"):
        MeanRewardModel.fit(["a", "b"], [1.0, 0.0, 1.0])
    with pytest.raises(OPEInputError, match="shrinkage must be >= 0"):
        MeanRewardModel.fit(["a", "b"], [1.0, 0.0], shrinkage=-1)
    m = MeanRewardModel.fit(["a", "b"], [1.0, 0.0])
    with pytest.raises(OPEInputError, match=r"\(rows, candidates\)"):
        m.expected(["a", "b"], [0.5, 0.5])
    with pytest.raises(OPEInputError, match="lengths must be non-negative and sum to len"):
        m.expected_ragged(["a", "b"], [0.5, 0.5], [1, 2])


def test_one_million_rows_evaluate_well_inside_the_budget() -> None:
    # The budget is 10 s on this machine; this takes well under 1 s, so the bound cannot flake under load.
    rng = np.random.default_rng(0)
    n = 1_000_000
    r = (rng.random(n) < 0.1).astype(float)
    lp = rng.uniform(0.05, 1.0, n)
    t0 = time.perf_counter()
    ev = ope.evaluate_policies(r, lp, {"candidate": rng.random(n), "production": lp}, q_logged=np.full(n, 0.1),
                               q_targets={"candidate": np.full(n, 0.1), "production": np.full(n, 0.1)},
                               num_candidates=rng.integers(1, 20, n))
    assert time.perf_counter() - t0 < 10.0
    assert ev.n == n and ev.estimate("production", "ips").value == pytest.approx(r.mean())


# -------------------------------------------------------------------------------------- reports


@pytest.fixture(scope="module")
def evaluation() -> ope.Evaluation:
    rng = np.random.default_rng(9)
    x, a, r = simulate(rng, 1, 5000)
    x, a, r = x[0], a[0], r[0]
    q = MeanRewardModel.fit(a, r)
    all_actions = np.broadcast_to(np.arange(K), (x.shape[0], K))
    return ope.evaluate_policies(
        r, MU[x, a], {"candidate": PI[x, a], "production": WORSE[x, a]}, q_logged=q.predict(a),
        q_targets={"candidate": q.expected(all_actions, PI[x]), "production": q.expected(all_actions, WORSE[x])},
        num_candidates=K, max_weight=50.0,
    )


VOID_TAGS = frozenset({"meta", "br", "img", "input", "link", "hr", "col", "area", "base", "wbr", "source", "path",
                       "rect", "line", "circle", "use", "polyline", "polygon", "ellipse", "stop", "image"})


class _Checker(html.parser.HTMLParser):
    """Fails on a closing tag that does not close the innermost open element."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        if tag not in VOID_TAGS:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_html_report_parses_and_embeds_every_policy_estimate(evaluation: ope.Evaluation, tmp_path: Path) -> None:
    verdict = ope.gate(evaluation.estimate("candidate", "dr"), evaluation.estimate("production", "dr"))
    path = ope_report.write_html(evaluation, tmp_path / "ope.html", title="OPE <test> & co", gate=verdict)
    page = path.read_text()
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.stack, f"unclosed tags: {checker.stack}"
    assert {"svg", "table", "script"} <= checker.tags
    assert "OPE &lt;test&gt; &amp; co" in page
    data = ope_report.read_report_data(page)
    assert data["gate"] == {"passed": verdict.passed, "reason": verdict.reason}
    policies = data["evaluation"]["policies"]
    assert set(policies) == {"candidate", "production", "uniform_random", "logged"}
    for name, pe in evaluation.policies.items():
        for key, e in pe.estimates.items():
            assert policies[name]["estimates"][key]["value"] == pytest.approx(e.value)
            assert policies[name]["estimates"][key]["ci_low"] == pytest.approx(e.ci_low)
            assert f'data-policy="{name}" data-estimator="{key}"' in page
        if pe.weights is not None:
            assert policies[name]["weights"]["hist_counts"] == list(pe.weights.hist_counts)
    assert json.loads(json.dumps(data)) == data


def test_text_table_lists_every_policy_and_estimator(evaluation: ope.Evaluation) -> None:
    verdict = ope.GateResult(False, "candidate lower bound 0.1 does not beat production estimate 0.2 (margin 0.000)")
    text = ope_report.render_text(evaluation, gate=verdict, width=110)
    for label in ("candidate", "production", "uniform random", "logged (on-policy)", "IPS", "SNIPS", "DR",
                  "on-policy mean", "95% CI"):
        assert label in text
    assert f"{evaluation.estimate('candidate', 'dr').value:.4f}" in text
    assert "gate BLOCKED: candidate lower bound 0.1 does not beat" in text
    assert "\x1b[" not in text  # plain text, no colour codes


def test_text_table_prints_brackets_in_names_literally() -> None:
    ev = ope.evaluate_policies(R, LP, {"[bold]v2[/bold]": TP})
    text = ope_report.render_text(ev, width=110)
    assert "[bold]v2[/bold]" in text  # not swallowed as Rich markup


def test_png_report_is_written(evaluation: ope.Evaluation, tmp_path: Path) -> None:
    from PIL import Image

    path = ope_report.write_png(evaluation, tmp_path / "plots" / "ope.png", title="OPE")
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
        assert width > 1200 and height > 600
        # not a blank canvas: the interval bars and histogram put plenty of non-white pixels on it
        gray = np.asarray(im.convert("L"))
        assert (gray < 200).mean() > 0.01


def test_a_png_report_stopped_while_drawing_leaves_the_previous_one(evaluation: ope.Evaluation, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # `kassa evaluate --png` drew straight into the file: a Ctrl-C or SIGTERM while Matplotlib wrote it (tens of ms)
    # left half a PNG where the last run's report had been.
    from matplotlib.figure import Figure

    path = ope_report.write_png(evaluation, tmp_path / "ope.png", title="OPE")
    before = path.read_bytes()

    def stopped_halfway(self: Figure, target: Any, **kw: Any) -> None:
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(before[:100])
        else:
            target.write(before[:100])
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", stopped_halfway)
    with pytest.raises(KeyboardInterrupt):
        ope_report.write_png(evaluation, path, title="OPE")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ope.png"]


def test_an_html_report_that_fails_halfway_leaves_the_previous_one(evaluation: ope.Evaluation, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # `kassa evaluate --report` wrote the page with one write_text straight into the file: a full disk, Ctrl-C or
    # SIGTERM half-way left half a page where the last run's report had been.
    path = ope_report.write_html(evaluation, tmp_path / "ope.html", title="OPE")
    before = path.read_bytes()
    disk_full_halfway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        ope_report.write_html(evaluation, path, title="OPE, the next run")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["ope.html"]


def test_read_report_data_rejects_a_page_without_data() -> None:
    with pytest.raises(ValueError, match="kassa-ope-data"):
        ope_report.read_report_data("<html><body>nothing</body></html>")


def test_text_table_at_80_columns_keeps_versions_apart() -> None:
    """On a default 80-column console (a pipe, CI) two versions of one placement were both cut to
    "order_confi…"; their names fold onto a second line instead."""
    ev = ope.evaluate_policies(R, LP, {"order_confirmation@4": TP, "order_confirmation@3": TP})
    text = ope_report.render_text(ev, width=80)
    assert "…" not in text.split("\n", 3)[3]  # no cell is cut (the title line aside)
    joined = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert "order_confirmation@4" in joined and "order_confirmation@3" in joined


def test_png_header_keeps_a_long_gate_reason_inside_the_figure() -> None:
    # The gate's "sample too small" reason ran past the right edge of the PNG ("...too uncertain to promot"):
    # versions' names as long as the demo's push the header right, beside the interval panels' labels.
    rng = np.random.default_rng(9)
    x, a, r = simulate(rng, 1, 2000)
    x, a, r = x[0], a[0], r[0]
    evaluation = ope.evaluate_policies(r, MU[x, a], {"order_confirmation@47": PI[x, a],
                                                     "order_confirmation@46": WORSE[x, a]}, num_candidates=K)
    reason = ("candidate effective sample size 18 is below the minimum 100; the estimate is too uncertain to "
              "promote")
    fig = ope_report.figure(evaluation, title="order_confirmation@47 vs order_confirmation@46 on 3,195 decisions",
                            gate=ope.GateResult(False, reason))
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(150)  # write_png's: text is wider there than at the figure's 100 dpi
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    texts = [t for ax in fig.axes for t in ax.texts if t.get_text()]
    gate_text = [t for t in texts if "Promotion gate blocked" in t.get_text()]
    assert gate_text and "promote" in " ".join(gate_text[0].get_text().split())
    for t in texts:
        box = t.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, (t.get_text(), box.x1, fig.bbox.x1)


def test_html_table_says_n_a_once_for_an_undefined_interval() -> None:
    # the HTML estimates table read "[n/a, n/a]" where the text table reads "n/a"
    ev = ope.evaluate_policies(R, LP, {"never": [0.0, 0.0, 0.0, 0.0]})
    page = ope_report.render_html(ev, title="OPE")
    assert "[n/a, n/a]" not in page and "<td>n/a</td>" in page
