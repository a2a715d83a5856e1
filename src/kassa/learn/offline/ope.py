"""Off-policy evaluation (OPE): how well a policy *would have* done on decisions another policy made.

Owns the estimators over logged contextual-bandit data — inverse propensity scoring (IPS), self-normalised
IPS (SNIPS) and doubly robust (DR) — with their confidence intervals (normal approximation or a seeded
multinomial bootstrap) and the effective sample size of the importance weights, the batch entry point
`evaluate_policies` (candidate, baseline, uniform-random and the logged policy in one call), a
model-server-free reward model for DR (`MeanRewardModel`), the slate estimators for uniformly logged slates
(`pseudo_inverse` on the whole slate's reward, `slot_ips` on each slot's own, with its cross-fitted reward
model `cross_fit_slot_model`), and the promotion `gate`.

Everything is a pure function of numpy arrays, one value per logged decision (slot):

- ``reward``: the reward observed for the logged action;
- ``logged_prob``: the probability the logging policy gave the logged action (its propensity, in (0, 1]);
- ``target_prob``: the probability the evaluated policy gives that same action in that same context;
- for DR, ``q_logged`` (reward model's prediction for the logged action) and ``q_target`` (the reward
  model's expected value under the evaluated policy, ``sum_a target_prob(a) * q(a)`` over the row's
  candidates).

Nothing loops over rows in Python: 1,000,000 rows evaluate in tens of milliseconds (``bench/ope.py``).
See ``docs/evaluation.md`` for what each estimator assumes and how to read the numbers.

References: Dudík, Langford & Li (2011), *Doubly Robust Policy Evaluation and Learning*, ICML;
Swaminathan & Joachims (2015), *The Self-Normalized Estimator for Counterfactual Learning*, NeurIPS.

>>> import numpy as np
>>> est = ips(np.array([1.0, 0.0, 1.0, 0.0]), np.array([0.5, 0.25, 0.5, 0.8]), np.array([1.0, 0.5, 0.25, 0.0]))
>>> round(est.value, 3), est.n
(0.625, 4)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

Method = Literal["normal", "bootstrap"]
GateRule = Literal["lcb_beats_estimate", "lcb_beats_ucb"]
Estimator = Literal["ips", "snips", "dr"]

ESTIMATORS: tuple[Estimator, ...] = ("ips", "snips", "dr")
ON_POLICY = "on_policy"
LOGGED = "logged"
UNIFORM = "uniform_random"

# Bootstrap resamples are drawn as index arrays of (resamples x rows); keep one chunk near 4M cells
# (~32 MB per int64 array) so 1M-row logs bootstrap a few resamples at a time without a memory spike.
_BOOT_CELLS = 1 << 22
# Weight histogram bins are powers of two, [2^k, 2^(k+1)), from 2^-6 up: fixed edges let policies be
# compared bin by bin, and log spacing shows the heavy right tail that drives the variance.
_HIST_MIN_EXP = -6


class OPEInputError(ValueError):
    """Bad input to an estimator; ``field`` names the offending argument (for CLI/HTTP error mapping)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Estimate:
    """One estimator's estimate of one policy's value (mean reward per logged decision).

    ``name`` is the estimator (``ips``, ``snips``, ``dr`` or ``on_policy``); ``ci_low``/``ci_high`` bound a
    two-sided interval at ``level``; ``ess`` is the effective sample size of the importance weights
    (``n`` for the on-policy mean). ``value`` is NaN when the estimate is undefined (SNIPS with no
    logged action the policy would ever take).
    """

    name: str
    value: float
    ci_low: float
    ci_high: float
    std_error: float
    n: int
    ess: float
    level: float = 0.95
    method: Method = "normal"

    @property
    def defined(self) -> bool:
        return math.isfinite(self.value) and math.isfinite(self.ci_low) and math.isfinite(self.ci_high)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN becomes ``None`` (JSON has no NaN)."""
        return {
            "name": self.name, "value": _num(self.value), "ci_low": _num(self.ci_low),
            "ci_high": _num(self.ci_high), "std_error": _num(self.std_error), "n": self.n,
            "ess": _num(self.ess), "level": self.level, "method": self.method,
        }


@dataclass(frozen=True, slots=True)
class WeightSummary:
    """Diagnostics of one policy's importance weights ``w = target_prob / logged_prob`` (after clipping).

    ``mean`` should be close to 1 when the propensities are right and the target policy only picks actions
    the logger could pick; far from 1 points at wrong propensities or missing overlap. ``hist_counts[i]``
    counts positive weights in ``[2**hist_exponents[i], 2**(hist_exponents[i] + 1))`` (the first bin also
    takes everything smaller); ``zero_count`` counts rows the policy would never choose.
    """

    mean: float
    max: float
    ess: float
    ess_fraction: float
    zero_count: int
    clipped: int
    hist_exponents: tuple[int, ...]
    hist_counts: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": _num(self.mean), "max": _num(self.max), "ess": _num(self.ess),
            "ess_fraction": _num(self.ess_fraction), "zero_count": self.zero_count, "clipped": self.clipped,
            "hist_exponents": list(self.hist_exponents), "hist_counts": list(self.hist_counts),
        }


@dataclass(frozen=True, slots=True)
class PolicyEvaluation:
    """All estimates of one policy. The logged policy has a single ``on_policy`` estimate (its observed
    mean) and no weights; `get` returns that one for any estimator name, so tables can line it up."""

    policy: str
    estimates: dict[str, Estimate]
    weights: WeightSummary | None = None

    def get(self, estimator: str) -> Estimate | None:
        if estimator in self.estimates:
            return self.estimates[estimator]
        return self.estimates.get(ON_POLICY)

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "estimates": {k: e.to_dict() for k, e in self.estimates.items()},
            "weights": self.weights.to_dict() if self.weights is not None else None,
        }


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What `evaluate_policies` returns: every policy's estimates over the same ``n`` logged rows."""

    n: int
    level: float
    method: Method
    max_weight: float | None
    estimators: tuple[str, ...]
    policies: dict[str, PolicyEvaluation] = field(default_factory=dict)
    mean_reward: float = math.nan

    def estimate(self, policy: str, estimator: str) -> Estimate:
        """The ``estimator`` estimate of ``policy`` (the on-policy mean for the logged policy)."""
        if policy not in self.policies:
            raise KeyError(f"no policy {policy!r}; evaluated: {', '.join(self.policies)}")
        est = self.policies[policy].get(estimator)
        if est is None:
            raise KeyError(f"no {estimator!r} estimate for policy {policy!r}; "
                           f"available: {', '.join(self.policies[policy].estimates)}")
        return est

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "level": self.level, "method": self.method, "max_weight": self.max_weight,
            "estimators": list(self.estimators), "mean_reward": _num(self.mean_reward),
            "policies": {name: p.to_dict() for name, p in self.policies.items()},
        }


@dataclass(frozen=True, slots=True)
class GateResult:
    passed: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason}


# --------------------------------------------------------------------------------------------- inputs


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _array(x: ArrayLike, name: str) -> NDArray[np.float64]:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise OPEInputError(f"{name} must be numbers: {exc}", name) from None
    if a.ndim != 1:
        raise OPEInputError(f"{name} must be one-dimensional (one value per logged decision), got shape "
                            f"{a.shape}", name)
    return a


def _first_bad(mask: NDArray[np.bool_]) -> int:
    return int(np.flatnonzero(mask)[0])


def _check_finite(a: NDArray[np.float64], name: str) -> None:
    bad = ~np.isfinite(a)
    if bad.any():
        i = _first_bad(bad)
        raise OPEInputError(f"{name} must be finite: row {i} is {a[i]} ({int(bad.sum())} such rows)", name)


def _check_lengths(arrays: Mapping[str, NDArray[Any]]) -> int:
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    n = next(iter(sizes.values()))
    for name, size in sizes.items():
        if size != n:
            first = next(iter(sizes))
            raise OPEInputError(f"{name} has {size} rows but {first} has {n}; every array needs one value per "
                                "logged decision", name)
    if n == 0:
        raise OPEInputError("no logged rows to evaluate (the arrays are empty)", next(iter(sizes)))
    if n < 2:
        raise OPEInputError("need at least 2 logged rows to estimate a confidence interval", next(iter(sizes)))
    return n


def _check_probs(a: NDArray[np.float64], name: str, *, allow_zero: bool) -> None:
    _check_finite(a, name)
    bad = (a < 0.0 if allow_zero else a <= 0.0) | (a > 1.0)
    if bad.any():
        i = _first_bad(bad)
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise OPEInputError(f"{name} must be in {interval}: row {i} is {a[i]} ({int(bad.sum())} such rows)", name)


def _check_options(level: float, method: str, max_weight: float | None, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise OPEInputError(f"level must be between 0 and 1 (e.g. 0.95), got {level}", "level")
    if method not in ("normal", "bootstrap"):
        raise OPEInputError(f"method must be 'normal' or 'bootstrap', got {method!r}", "method")
    if max_weight is not None and not (math.isfinite(max_weight) and max_weight > 0):
        raise OPEInputError(f"max_weight must be a positive number, got {max_weight}", "max_weight")
    if method == "bootstrap" and n_boot < 2:
        raise OPEInputError(f"n_boot must be at least 2 resamples, got {n_boot}", "n_boot")


def _validated(
    reward: ArrayLike, logged_prob: ArrayLike, target_prob: ArrayLike | None = None,
    q_logged: ArrayLike | None = None, q_target: ArrayLike | None = None,
) -> tuple[int, dict[str, NDArray[np.float64]]]:
    arrays = {"reward": _array(reward, "reward"), "logged_prob": _array(logged_prob, "logged_prob")}
    if target_prob is not None:
        arrays["target_prob"] = _array(target_prob, "target_prob")
    if q_logged is not None:
        arrays["q_logged"] = _array(q_logged, "q_logged")
    if q_target is not None:
        arrays["q_target"] = _array(q_target, "q_target")
    n = _check_lengths(arrays)
    r = arrays["reward"]
    if np.isnan(r).any():
        i = _first_bad(np.isnan(r))
        raise OPEInputError(f"reward has NaN at row {i} ({int(np.isnan(r).sum())} such rows); join or drop "
                            "rows without an outcome before evaluating", "reward")
    _check_finite(r, "reward")
    _check_probs(arrays["logged_prob"], "logged_prob", allow_zero=False)
    if "target_prob" in arrays:
        _check_probs(arrays["target_prob"], "target_prob", allow_zero=True)
    for name in ("q_logged", "q_target"):
        if name in arrays:
            _check_finite(arrays[name], name)
    return n, arrays


# ---------------------------------------------------------------------------------------- statistics


def importance_weights(
    logged_prob: ArrayLike, target_prob: ArrayLike, *, max_weight: float | None = None
) -> NDArray[np.float64]:
    """``target_prob / logged_prob``, clipped at ``max_weight`` when given (clipping trades a bias toward
    the logged behaviour for a bounded variance)."""
    _, a = _validated(np.zeros(np.shape(logged_prob)), logged_prob, target_prob)
    _check_options(0.95, "normal", max_weight, 1000)
    return _weights(a["logged_prob"], a["target_prob"], max_weight)


def _weights(logged: NDArray[np.float64], target: NDArray[np.float64], max_weight: float | None) -> NDArray[np.float64]:
    w = target / logged
    if max_weight is not None:
        np.minimum(w, max_weight, out=w)
    return w


def effective_sample_size(weights: ArrayLike) -> float:
    """Kish's effective sample size ``(Σw)² / Σw²``: how many on-policy rows the weighted log is worth.

    Equals ``n`` when all weights are equal and shrinks as a few large weights dominate; 0 when every
    weight is 0 (the evaluated policy never picks a logged action).
    """
    w = np.asarray(weights, dtype=np.float64)
    s2 = float(np.dot(w, w))
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _mean_se(x: NDArray[np.float64]) -> tuple[float, float]:
    n = x.shape[0]
    mean = float(x.mean())
    d = x - mean
    return mean, math.sqrt(float(np.dot(d, d)) / (n - 1) / n)


def _snips_se(w: NDArray[np.float64], r: NDArray[np.float64], value: float, sw: float) -> float:
    # Delta method for the ratio Σwr / Σw: Var ≈ Σ w²(r − V)² / (Σw)², with n/(n−1) as in the sample variance.
    n = w.shape[0]
    u = w * (r - value)
    return math.sqrt(float(np.dot(u, u)) * n / (n - 1)) / sw


def _normal(name: str, value: float, se: float, n: int, ess: float, level: float) -> Estimate:
    half = _z(level) * se
    return Estimate(name, value, value - half, value + half, se, n, ess, level, "normal")


def _boot_estimate(name: str, value: float, reps: NDArray[np.float64], n: int, ess: float, level: float) -> Estimate:
    finite = reps[np.isfinite(reps)]
    if finite.size < 2 or not math.isfinite(value):
        return Estimate(name, value, math.nan, math.nan, math.nan, n, ess, level, "bootstrap")
    alpha = 1.0 - level
    lo, hi = np.quantile(finite, [alpha / 2.0, 1.0 - alpha / 2.0])
    return Estimate(name, value, float(lo), float(hi), float(finite.std(ddof=1)), n, ess, level, "bootstrap")


def bootstrap_sums(columns: NDArray[np.float64], n_boot: int, seed: int | None = 0) -> NDArray[np.float64]:
    """Column sums of ``n_boot`` bootstrap resamples of the rows of ``columns`` (shape ``(n, k)``).

    Each resample is a multinomial draw of row counts (n draws with replacement, equal probabilities),
    taken as ``bincount`` of uniform row indices — the same distribution as ``rng.multinomial`` at a
    fraction of its cost — a chunk of resamples at a time; the sums are one matrix product per chunk.
    Every estimator here is a ratio of column sums, so these sums are all a bootstrap needs, and
    estimators evaluated from one call share resamples (their replicates are paired).
    """
    n, k = columns.shape
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, k), dtype=np.float64)
    chunk = max(1, min(n_boot, _BOOT_CELLS // n))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=b * n)
        idx += np.repeat(np.arange(b, dtype=np.int64) * n, n)
        counts = np.bincount(idx, minlength=b * n).reshape(b, n)
        out[start:start + b] = counts @ columns
    return out


# ---------------------------------------------------------------------------------------- estimators


def _undefined(name: str, n: int, level: float) -> Estimate:
    return Estimate(name, math.nan, math.nan, math.nan, math.nan, n, 0.0, level, "normal")


def _ips_from(w: NDArray[np.float64], r: NDArray[np.float64], level: float) -> Estimate:
    if not w.any():
        # Every weight is 0: the log holds no decision the policy would have made. IPS would say 0 with a
        # zero-width interval, which is no information dressed up as certainty.
        return _undefined("ips", w.shape[0], level)
    value, se = _mean_se(w * r)
    return _normal("ips", value, se, w.shape[0], effective_sample_size(w), level)


def _snips_from(w: NDArray[np.float64], r: NDArray[np.float64], level: float) -> Estimate:
    n = w.shape[0]
    sw = float(w.sum())
    if sw <= 0.0:
        return _undefined("snips", n, level)
    value = float(np.dot(w, r)) / sw
    return _normal("snips", value, _snips_se(w, r, value, sw), n, effective_sample_size(w), level)


def _dr_terms(w: NDArray[np.float64], r: NDArray[np.float64], q_logged: NDArray[np.float64],
              q_target: NDArray[np.float64]) -> NDArray[np.float64]:
    # Per-row DR term: the model's value of the target policy, corrected by the weighted residual of the
    # logged action. Unbiased if either the propensities or the reward model are right.
    return q_target + w * (r - q_logged)


def _dr_from(w: NDArray[np.float64], d: NDArray[np.float64], level: float) -> Estimate:
    value, se = _mean_se(d)
    return _normal("dr", value, se, w.shape[0], effective_sample_size(w), level)


def _single(
    name: str, columns: NDArray[np.float64], value: float, n: int, ess: float, level: float,
    method: Method, n_boot: int, seed: int | None, normal: Estimate,
) -> Estimate:
    if method == "normal":
        return normal
    sums = bootstrap_sums(columns, n_boot, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = sums[:, 0] / sums[:, 1] if name == "snips" else sums[:, 0] / n
    return _boot_estimate(name, value, reps, n, ess, level)


def ips(
    reward: ArrayLike, logged_prob: ArrayLike, target_prob: ArrayLike, *, max_weight: float | None = None,
    level: float = 0.95, method: Method = "normal", n_boot: int = 1000, seed: int | None = 0,
) -> Estimate:
    """Inverse propensity scoring: ``V = mean(w * r)`` with ``w = target_prob / logged_prob``.

    Unbiased when the logged propensities are right and the logging policy gives every action the target
    policy can take a positive probability (overlap). Normal interval: ``V ± z * sd(w r) / sqrt(n)``.
    The value is NaN when every weight is 0 (the policy never takes a logged action).
    """
    _check_options(level, method, max_weight, n_boot)
    n, a = _validated(reward, logged_prob, target_prob)
    w = _weights(a["logged_prob"], a["target_prob"], max_weight)
    est = _ips_from(w, a["reward"], level)
    if method == "normal":
        return est
    return _single("ips", (w * a["reward"])[:, None], est.value, n, est.ess, level, method, n_boot, seed, est)


def snips(
    reward: ArrayLike, logged_prob: ArrayLike, target_prob: ArrayLike, *, max_weight: float | None = None,
    level: float = 0.95, method: Method = "normal", n_boot: int = 1000, seed: int | None = 0,
) -> Estimate:
    """Self-normalised IPS: ``V = Σ w r / Σ w`` (Swaminathan & Joachims 2015).

    Slightly biased (consistent), usually far lower variance than IPS, and always inside the reward range.
    Normal interval by the delta method: ``se = sqrt(Σ w²(r − V)² · n/(n−1)) / Σw``. The value is NaN when
    ``Σw = 0`` (the policy never takes a logged action).
    """
    _check_options(level, method, max_weight, n_boot)
    n, a = _validated(reward, logged_prob, target_prob)
    w = _weights(a["logged_prob"], a["target_prob"], max_weight)
    est = _snips_from(w, a["reward"], level)
    if method == "normal":
        return est
    cols = np.column_stack([w * a["reward"], w])
    return _single("snips", cols, est.value, n, est.ess, level, method, n_boot, seed, est)


def doubly_robust(
    reward: ArrayLike, logged_prob: ArrayLike, target_prob: ArrayLike, q_logged: ArrayLike, q_target: ArrayLike,
    *, max_weight: float | None = None, level: float = 0.95, method: Method = "normal", n_boot: int = 1000,
    seed: int | None = 0,
) -> Estimate:
    """Doubly robust: ``V = mean(q_target + w (r − q_logged))`` (Dudík, Langford & Li 2011).

    Unbiased if the propensities are right (whatever the reward model) or the reward model is right; a
    good model shrinks the variance. Normal interval from the per-row DR terms' standard deviation.
    """
    _check_options(level, method, max_weight, n_boot)
    n, a = _validated(reward, logged_prob, target_prob, q_logged, q_target)
    w = _weights(a["logged_prob"], a["target_prob"], max_weight)
    d = _dr_terms(w, a["reward"], a["q_logged"], a["q_target"])
    est = _dr_from(w, d, level)
    if method == "normal":
        return est
    return _single("dr", d[:, None], est.value, n, est.ess, level, method, n_boot, seed, est)


def on_policy(
    reward: ArrayLike, *, level: float = 0.95, method: Method = "normal", n_boot: int = 1000, seed: int | None = 0
) -> Estimate:
    """The logged policy's own value: the observed mean reward with its interval (every weight is 1)."""
    _check_options(level, method, None, n_boot)
    r = _array(reward, "reward")
    n, a = _validated(r, np.ones_like(r))
    value, se = _mean_se(a["reward"])
    est = _normal(ON_POLICY, value, se, n, float(n), level)
    if method == "normal":
        return est
    return _single(ON_POLICY, a["reward"][:, None], value, n, float(n), level, method, n_boot, seed, est)


def weight_summary(weights: ArrayLike, *, clipped: int = 0) -> WeightSummary:
    """Mean, max, ESS and a power-of-two histogram of importance weights (see `WeightSummary`)."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.shape[0]
    pos = w[w > 0]
    ess = effective_sample_size(w)
    if pos.size:
        exps = np.floor(np.log2(pos)).astype(np.int64)
        top = max(int(exps.max()), 0)
        np.clip(exps, _HIST_MIN_EXP, top, out=exps)
        counts = np.bincount(exps - _HIST_MIN_EXP, minlength=top - _HIST_MIN_EXP + 1)
        exponents = tuple(range(_HIST_MIN_EXP, top + 1))
        wmax = float(pos.max())
    else:
        counts, exponents, wmax = np.zeros(0, dtype=np.int64), (), 0.0
    return WeightSummary(
        mean=float(w.mean()) if n else math.nan, max=wmax, ess=ess, ess_fraction=ess / n if n else math.nan,
        zero_count=int(n - pos.size), clipped=clipped, hist_exponents=exponents,
        hist_counts=tuple(int(c) for c in counts),
    )


# ------------------------------------------------------------------------------------ several policies


def evaluate_policies(
    reward: ArrayLike,
    logged_prob: ArrayLike,
    targets: Mapping[str, ArrayLike],
    *,
    q_logged: ArrayLike | None = None,
    q_targets: Mapping[str, ArrayLike] | None = None,
    num_candidates: ArrayLike | int | None = None,
    include_logged: bool = True,
    estimators: Iterable[str] | None = None,
    level: float = 0.95,
    method: Method = "normal",
    max_weight: float | None = None,
    n_boot: int = 1000,
    seed: int | None = 0,
    reward_range: tuple[float, float] | None = None,
) -> Evaluation:
    """Estimate several target policies on the same log in one pass.

    ``reward_range`` (low, high): every policy's value lies in it, so intervals are clipped to it (issue 14:
    a normal interval on ESS 5 read [-0.09, 1.75] for rewards in [0, 1]).

    ``targets`` maps a policy name (e.g. ``"candidate"``, ``"production"``) to its ``target_prob`` array.
    ``num_candidates`` (an int or one int per row: how many actions each decision chose among) adds
    ``"uniform_random"`` with ``target_prob = 1 / num_candidates``. ``include_logged`` adds ``"logged"``:
    the on-policy mean of the observed rewards (the logging policy evaluated on its own data).

    ``estimators`` defaults to IPS and SNIPS, plus DR for each policy whose ``q_targets[name]`` is given
    (with ``q_logged``); asking for ``"dr"`` explicitly makes a missing ``q_targets`` entry an error. With
    ``method="bootstrap"`` all policies share the same resamples.
    """
    _check_options(level, method, max_weight, n_boot)
    n, a = _validated(reward, logged_prob, q_logged=q_logged)
    r, lp = a["reward"], a["logged_prob"]
    q_targets = dict(q_targets or {})
    reserved = [name for name, used in ((LOGGED, include_logged), (UNIFORM, num_candidates is not None))
                if used and name in targets]
    if reserved:
        raise OPEInputError(f"target policy name {reserved[0]!r} is reserved for the built-in policy of that name",
                            "targets")
    if not targets and num_candidates is None and not include_logged:
        raise OPEInputError("nothing to evaluate: give targets, num_candidates or include_logged=True", "targets")

    probs: dict[str, NDArray[np.float64]] = {}
    for name, tp in targets.items():
        arr = _array(tp, f"targets[{name!r}]")
        _check_lengths({"reward": r, f"targets[{name!r}]": arr})
        _check_probs(arr, f"targets[{name!r}]", allow_zero=True)
        probs[name] = arr
    if num_candidates is not None:
        probs[UNIFORM] = 1.0 / _num_candidates(num_candidates, n)

    explicit = estimators is not None
    wanted = tuple(dict.fromkeys(estimators)) if estimators is not None else ESTIMATORS
    unknown = [e for e in wanted if e not in ESTIMATORS]
    if unknown:
        raise OPEInputError(f"unknown estimator {unknown[0]!r}; choose from {', '.join(ESTIMATORS)}", "estimators")
    if not wanted:
        raise OPEInputError("estimators is empty; choose from ips, snips, dr", "estimators")
    extra = [k for k in q_targets if k not in probs]
    if extra:
        raise OPEInputError(f"q_targets has {extra[0]!r}, which is not an evaluated policy "
                            f"({', '.join(probs) or 'none'})", "q_targets")
    qt: dict[str, NDArray[np.float64]] = {}
    if "dr" in wanted:
        for name in probs:
            if name in q_targets:
                if q_logged is None:
                    raise OPEInputError("doubly robust needs q_logged (the reward model's prediction for the "
                                        "logged action) along with q_targets", "q_logged")
                arr = _array(q_targets[name], f"q_targets[{name!r}]")
                _check_lengths({"reward": r, f"q_targets[{name!r}]": arr})
                _check_finite(arr, f"q_targets[{name!r}]")
                qt[name] = arr
            elif explicit:
                raise OPEInputError(f"doubly robust was asked for but q_targets has no entry for policy {name!r}",
                                    "q_targets")

    policies: dict[str, PolicyEvaluation] = {}
    columns: list[NDArray[np.float64]] = []
    # (policy, estimator, value, ess, numerator column, denominator column or -1 for "divide by n")
    boot_plan: list[tuple[str, str, float, float, int, int]] = []

    def col(x: NDArray[np.float64]) -> int:
        columns.append(x)
        return len(columns) - 1

    for name, tp in probs.items():
        w = tp / lp
        clipped = int(np.count_nonzero(w > max_weight)) if max_weight is not None else 0
        if max_weight is not None:
            np.minimum(w, max_weight, out=w)
        ests: dict[str, Estimate] = {}
        wr = w * r
        if "ips" in wanted:
            ests["ips"] = _ips_from(w, r, level)
        if "snips" in wanted:
            ests["snips"] = _snips_from(w, r, level)
        if name in qt:
            ests["dr"] = _dr_from(w, _dr_terms(w, r, a["q_logged"], qt[name]), level)
        if method == "bootstrap":
            i_wr = col(wr) if ("ips" in ests or "snips" in ests) else -1
            if "ips" in ests:
                boot_plan.append((name, "ips", ests["ips"].value, ests["ips"].ess, i_wr, -1))
            if "snips" in ests:
                boot_plan.append((name, "snips", ests["snips"].value, ests["snips"].ess, i_wr, col(w)))
            if "dr" in ests:
                d = _dr_terms(w, r, a["q_logged"], qt[name])
                boot_plan.append((name, "dr", ests["dr"].value, ests["dr"].ess, col(d), -1))
        policies[name] = PolicyEvaluation(name, ests, weight_summary(w, clipped=clipped))

    if include_logged:
        value, se = _mean_se(r)
        policies[LOGGED] = PolicyEvaluation(LOGGED, {ON_POLICY: _normal(ON_POLICY, value, se, n, float(n), level)})
        if method == "bootstrap":
            boot_plan.append((LOGGED, ON_POLICY, value, float(n), col(r), -1))

    if method == "bootstrap" and boot_plan:
        sums = bootstrap_sums(np.column_stack(columns), n_boot, seed)
        for name, est_name, value, ess, num, den in boot_plan:
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = sums[:, num] / (sums[:, den] if den >= 0 else n)
            policies[name].estimates[est_name] = _boot_estimate(est_name, value, reps, n, ess, level)

    if reward_range is not None:
        for pe in policies.values():
            for key, est in pe.estimates.items():
                if est.defined:
                    pe.estimates[key] = _clamped(est, reward_range)
    return Evaluation(n=n, level=level, method=method, max_weight=max_weight, estimators=wanted,
                      policies=policies, mean_reward=float(r.mean()))


def _num_candidates(num_candidates: ArrayLike | int, n: int) -> NDArray[np.float64]:
    k = _array(np.broadcast_to(np.asarray(num_candidates), (n,)) if np.ndim(num_candidates) == 0 else num_candidates,
               "num_candidates")
    _check_lengths({"reward": np.empty(n), "num_candidates": k})
    _check_finite(k, "num_candidates")
    bad = (k < 1) | (k != np.floor(k))
    if bad.any():
        i = _first_bad(bad)
        raise OPEInputError(f"num_candidates must be whole numbers >= 1: row {i} is {k[i]}", "num_candidates")
    return k


# -------------------------------------------------------------------------------------- reward model


@dataclass(frozen=True, slots=True)
class MeanRewardModel:
    """The simplest reward model DR can use without a model server: each action's mean logged reward,
    shrunk toward the global mean, ``q(a) = (Σ r_a + k · mean) / (n_a + k)`` with ``k = shrinkage``.

    It ignores the context, so it is a weak model — but DR stays unbiased with a wrong model as long as
    the propensities are right; a better ``q`` only narrows the interval. Fit it on rows *outside* the
    evaluation window (e.g. the training window before it), so the same rows do not both fit ``q`` and
    score it. Unseen actions predict the global mean. Actions may be ints or strings.

    >>> m = MeanRewardModel.fit(["a", "a", "b"], [1.0, 0.0, 1.0], shrinkage=0.0)
    >>> m.predict(["a", "b", "c"]).tolist()
    [0.5, 1.0, 0.6666666666666666]
    """

    actions: NDArray[Any]
    means: NDArray[np.float64]
    counts: NDArray[np.int64]
    global_mean: float
    shrinkage: float

    @classmethod
    def fit(cls, actions: ArrayLike, reward: ArrayLike, *, shrinkage: float = 10.0) -> MeanRewardModel:
        acts = np.asarray(actions)
        r = _array(reward, "reward")
        if acts.ndim != 1:
            raise OPEInputError(f"actions must be one-dimensional, got shape {acts.shape}", "actions")
        _check_lengths({"actions": acts, "reward": r})
        _check_finite(r, "reward")
        if not (math.isfinite(shrinkage) and shrinkage >= 0):
            raise OPEInputError(f"shrinkage must be >= 0, got {shrinkage}", "shrinkage")
        keys, inverse, counts = np.unique(acts, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse.ravel(), weights=r, minlength=keys.shape[0])
        g = float(r.mean())
        means = (sums + shrinkage * g) / (counts + shrinkage)
        return cls(keys, means, counts.astype(np.int64), g, float(shrinkage))

    def predict(self, actions: ArrayLike) -> NDArray[np.float64]:
        """``q(a)`` for each action (any shape); unseen actions get the global mean."""
        acts = np.asarray(actions)
        flat = acts.ravel()
        pos = np.searchsorted(self.actions, flat)
        np.clip(pos, 0, self.actions.shape[0] - 1, out=pos)
        found = self.actions[pos] == flat
        out = np.where(found, self.means[pos], self.global_mean)
        return out.reshape(acts.shape).astype(np.float64)

    def expected(self, actions: ArrayLike, probs: ArrayLike) -> NDArray[np.float64]:
        """``Σ_a probs[i, a] · q(actions[i, a])`` per row: ``q_target`` for DR.

        ``actions`` and ``probs`` are ``(n, k)``: each row's candidates and the policy's probability of each.
        Rows with fewer candidates pad with any action of the same type and probability 0.
        """
        acts = np.asarray(actions)
        p = np.asarray(probs, dtype=np.float64)
        if acts.ndim != 2 or p.shape != acts.shape:
            raise OPEInputError(f"actions and probs must both be (rows, candidates); got {acts.shape} and {p.shape}",
                                "probs")
        _check_finite(p.ravel(), "probs")
        return np.einsum("ij,ij->i", p, self.predict(acts))

    def expected_ragged(self, actions: ArrayLike, probs: ArrayLike, lengths: ArrayLike) -> NDArray[np.float64]:
        """`expected` for rows with different numbers of candidates, given flat: row ``i``'s candidates are
        the next ``lengths[i]`` entries of ``actions`` (and their probabilities of ``probs``)."""
        acts = np.asarray(actions)
        p = _array(probs, "probs")
        k = np.asarray(lengths, dtype=np.int64)
        if acts.ndim != 1 or acts.shape != p.shape:
            raise OPEInputError(f"actions and probs must be flat and equally long; got {acts.shape} and {p.shape}",
                                "probs")
        if k.ndim != 1 or (k < 0).any() or int(k.sum()) != acts.shape[0]:
            raise OPEInputError(f"lengths must be non-negative and sum to len(actions) = {acts.shape[0]}", "lengths")
        _check_finite(p, "probs")
        rows = np.repeat(np.arange(k.shape[0]), k)
        return np.bincount(rows, weights=p * self.predict(acts), minlength=k.shape[0]).astype(np.float64, copy=False)


# --------------------------------------------------------------------------------------------- slates


def _uniform_slate_gram_pinv(m: int, slots: int) -> NDArray[np.float64]:
    """Pseudo-inverse of Gamma = E[1_s 1_s^T] over (slot, item) indicators when slates of ``slots`` are drawn
    uniformly without replacement from ``m`` items: the same item in the same slot 1/m, two different items
    in two different slots 1/(m(m-1)), anything else 0. The reference `uniform_slate_weights` is checked
    against (the estimator uses the closed form)."""
    same_slot = np.eye(slots, dtype=bool)
    same_item = np.eye(m, dtype=bool)
    g = np.where(same_slot[:, None, :, None] & same_item[None, :, None, :], 1.0 / m, 0.0)
    g += np.where(~same_slot[:, None, :, None] & ~same_item[None, :, None, :], 1.0 / (m * (m - 1)), 0.0)
    pinv = np.asarray(np.linalg.pinv(g.reshape(slots * m, slots * m), hermitian=True), dtype=np.float64)
    return pinv


def uniform_slate_weights(target_slates: NDArray[np.int64], logged_slates: NDArray[np.int64],
                          n_candidates: NDArray[np.int64]) -> NDArray[np.float64]:
    """Each row's pseudo-inverse weight ``1_t^T Gamma^+ 1_s`` under uniform logging, in closed form.

    Gamma lies in the algebra spanned by ``I_l x I_m``, ``I_l x J_m``, ``J_l x I_m`` and ``J_l x J_m`` (J all
    ones), whose common eigenspaces are products of ``P = J/n`` and ``Q = I - J/n``. Its eigenvalues there
    are ``1/(m-1)`` on ``Q x Q``, ``0`` on ``Q x P``, ``(m-l)/(m(m-1))`` on ``P x Q`` and ``l/m`` on ``P x P``,
    so ``Gamma^+ = (m-1) Q x Q + m(m-1)/(m-l) P x Q + (m/l) P x P``. With ``d`` the slots where the logged
    slate shows the target's item and ``a`` the (slot, slot') pairs with ``t_slot == s_slot'`` (``d``
    included)::

        w = (m - 1) (d - a/l) + m (m - 1) / (m - l) * (a - l^2/m) / l + 1

    The same numbers as `_uniform_slate_gram_pinv` (``tests/test_decision_quality.py`` checks it), in O(l^2)
    per row instead of a (l m)^2 pseudo-inverse per candidate count; ``E[w] = 1`` over logged slates.
    """
    slots = target_slates.shape[1]
    m = n_candidates.astype(np.float64)
    d = (target_slates == logged_slates).sum(axis=1)
    a = (target_slates[:, :, None] == logged_slates[:, None, :]).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        pq = np.where(m > slots, m * (m - 1.0) / (m - slots), 0.0)  # m == l: P x Q is Gamma's null space too
    return (m - 1.0) * (d - a / slots) + pq * (a - slots**2 / m) / slots + 1.0


def _slate_inputs(reward: ArrayLike, target_slates: ArrayLike, logged_slates: ArrayLike, n_candidates: ArrayLike | int
                  ) -> tuple[NDArray[np.float64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Checked slate inputs: (reward, target slates, logged slates, each row's candidate count)."""
    r = _array(reward, "reward")
    t = np.asarray(target_slates, dtype=np.int64)
    s_ = np.asarray(logged_slates, dtype=np.int64)
    if t.ndim != 2 or t.shape != s_.shape or t.shape[0] != r.shape[0]:
        raise OPEInputError("target_slates and logged_slates must be (n, slots) like reward (n,)", "target_slates")
    n, slots = t.shape
    k = _num_candidates(n_candidates, n).astype(np.int64)
    if n and ((k < slots) | (k < 2)).any():
        raise OPEInputError("n_candidates must be at least the number of slots and 2", "n_candidates")
    if n and (t.min() < 0 or s_.min() < 0 or (t.max(axis=1) >= k).any() or (s_.max(axis=1) >= k).any()):
        raise OPEInputError("slate entries must be candidate indices below n_candidates", "target_slates")
    return r, t, s_, k


def _clamped(est: Estimate, reward_range: tuple[float, float] | None) -> Estimate:
    """The estimate and its interval inside ``reward_range``, where every policy's value lies. The value too:
    a DR estimate of -0.0005 was printed beside its clipped interval [0.0000, 0.0889], and an IPS estimate
    past the largest reward beside an interval ending there; the clamped value is never further from the
    truth. The standard error is left as computed."""
    if reward_range is None:
        return est
    lo, hi = reward_range
    return replace(est, value=min(max(est.value, lo), hi), ci_low=min(max(est.ci_low, lo), hi),
                   ci_high=max(min(est.ci_high, hi), lo))


def pseudo_inverse(reward: ArrayLike, target_slates: ArrayLike, logged_slates: ArrayLike,
                   n_candidates: ArrayLike | int, level: float = 0.95,
                   reward_range: tuple[float, float] | None = None) -> Estimate:
    """A slate policy's value by the pseudo-inverse estimator (Swaminathan et al., "Off-policy evaluation for
    slate recommendation", NeurIPS 2017): unbiased when a slate's reward is additive over its (slot, item)
    pairs, whatever the target, from logs of a policy that fills slots uniformly without replacement
    (Kassa's ``uniform`` policy). Each row's weight is ``theta_pi^T Gamma^+ 1_s``: the target slate's
    indicator times the pseudo-inverse of the logging policy's slot-item second moment, times the logged
    slate's indicator.

    ``reward``: (n,) the whole slate's reward. ``target_slates`` / ``logged_slates``: (n, slots) candidate
    indices (0 .. ``n_candidates`` - 1) the deterministic target would show / the logging policy showed.
    ``n_candidates``: one number for every row, or (n,) each row's own (a retrieved candidate set varies per
    decision; a logged row's count is ``len(candidates)``, and its logged slot-1 probability is 1 over it).
    Gamma is the *joint* inclusion moment of the whole slate, not the per-slot conditional probabilities
    the decision log records (1/m, 1/(m-1), 1/(m-2)): weighting each slot by those is not this estimator.
    ``tests/test_decision_quality.py`` and ``bench/slate_ope.py`` check it against simulators' ground truth.
    """
    r, t, s_, k = _slate_inputs(reward, target_slates, logged_slates, n_candidates)
    w = uniform_slate_weights(t, s_, k)
    value, se = _mean_se(w * r)
    est = _normal("pseudo_inverse", value, se, r.shape[0], effective_sample_size(np.abs(w)), level)
    return _clamped(est, reward_range)


def slot_ips(slot_reward: ArrayLike, target_slates: ArrayLike, logged_slates: ArrayLike,
             n_candidates: ArrayLike | int, level: float = 0.95, reward_range: tuple[float, float] | None = None, *,
             g_target: ArrayLike | None = None, g_logged: ArrayLike | None = None) -> Estimate:
    """A slate policy's value from each slot's own reward: ``Σ_j mean(m 1[s_j = t_j] r_j)`` under uniform
    logging (slot ``j`` shows any given candidate with probability ``1/m``), or, given a reward model, the doubly
    robust ``Σ_j mean(g_j(t_j) + m 1[s_j = t_j] (r_j - g_j(s_j)))`` (``"slot_dr"``).

    It assumes more than `pseudo_inverse`: the reward credited to slot ``j`` depends on the item in slot ``j``
    alone (position bias allowed; no item changing another slot's reward), where PI only needs the slate's
    total to be additive over (slot, item). Kassa credits every reward to the offer an event names (or the
    product an order bought), so the slot-level rewards are in the decision log. In exchange it leaves out the
    other slots' reward noise that PI's weights multiply: on ``bench/slate_ope.py``'s product world (rare
    accepts, ~10 candidates, 3 slots) its interval is ~0.7x PI's, i.e. half the rows for the same width.

    ``slot_reward``: (n, slots) what each logged slot earned. ``target_slates`` / ``logged_slates`` /
    ``n_candidates`` as for `pseudo_inverse`. ``g_target`` / ``g_logged``: (n, slots) a reward model's value of
    the target's / the logged item in each slot, not fitted on the row it scores (`cross_fit_slot_model`);
    unbiased however wrong it is. The interval is normal over the per-row sums; ``ess`` is the mean over slots
    of the Kish effective sample size of the slot's weights (about ``n / m``: rows showing the target's item).
    """
    rs = np.asarray(slot_reward, dtype=np.float64)
    if rs.ndim != 2 or rs.shape != np.shape(target_slates):
        raise OPEInputError("slot_reward must be (n, slots) like target_slates", "slot_reward")
    _check_finite(rs.ravel(), "slot_reward")
    r, t, s_, k = _slate_inputs(rs.sum(axis=1), target_slates, logged_slates, n_candidates)
    w = k[:, None] * (t == s_)
    if (g_target is None) != (g_logged is None):
        raise OPEInputError("g_target and g_logged go together", "g_target")
    name = "slot_ips"
    terms = w * rs
    if g_target is not None and g_logged is not None:
        gt, gl = np.asarray(g_target, dtype=np.float64), np.asarray(g_logged, dtype=np.float64)
        if gt.shape != rs.shape or gl.shape != rs.shape:
            raise OPEInputError("g_target and g_logged must be (n, slots) like slot_reward", "g_target")
        _check_finite(gt.ravel(), "g_target")
        _check_finite(gl.ravel(), "g_logged")
        name, terms = "slot_dr", gt + w * (rs - gl)
    value, se = _mean_se(terms.sum(axis=1))
    ess = float(np.mean([effective_sample_size(w[:, j]) for j in range(w.shape[1])])) if w.size else 0.0
    return _clamped(_normal(name, value, se, r.shape[0], ess, level), reward_range)


def cross_fit_slot_model(slot_reward: ArrayLike, logged_keys: ArrayLike, target_keys: ArrayLike, *,
                         folds: int = 2, shrinkage: float = 10.0,
                         seed: int = 0) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The per-slot reward model `slot_ips` takes for its doubly robust form, cross-fitted: per slot ``j`` a
    `MeanRewardModel` of the slot's own reward by the shown item's key (e.g. its logged retrieval signals, or
    its offer id), shrunk toward the slot's mean; each row's ``(g_target, g_logged)``, both (n, slots), come
    from the models fitted on the other folds (rows assigned to ``folds`` folds at random by ``seed``), so no
    row scores a model it fitted.

    ``slot_reward``: (n, slots). ``logged_keys`` / ``target_keys``: (n, slots) the key of the item the logged /
    the target slate shows in each slot.
    """
    rs = np.asarray(slot_reward, dtype=np.float64)
    lk, tk = np.asarray(logged_keys), np.asarray(target_keys)
    if rs.ndim != 2 or lk.shape != rs.shape or tk.shape != rs.shape:
        raise OPEInputError("slot_reward, logged_keys and target_keys must all be (n, slots)", "slot_reward")
    if folds < 2:
        raise OPEInputError(f"folds must be >= 2, got {folds}", "folds")
    _check_finite(rs.ravel(), "slot_reward")
    n, slots = rs.shape
    fold = np.random.default_rng(seed).permutation(n) % folds
    g_t, g_l = np.zeros((n, slots)), np.zeros((n, slots))
    for f in range(folds):
        fit, score = fold != f, fold == f
        if not fit.any() or not score.any():
            continue
        for j in range(slots):
            model = MeanRewardModel.fit(lk[fit, j], rs[fit, j], shrinkage=shrinkage)
            g_t[score, j] = model.predict(tk[score, j])
            g_l[score, j] = model.predict(lk[score, j])
    return g_t, g_l


# --------------------------------------------------------------------------------------------- gate


def _fmt(x: float) -> str:
    return f"{x:.3f}" if x == 0 or abs(x) >= 0.01 else f"{x:.3g}"


def gate(
    candidate: Estimate, production: Estimate, margin: float = 0.0,
    rule: GateRule = "lcb_beats_estimate", *, min_ess: float = 0.0,
) -> GateResult:
    """May the candidate replace production? A plain-sentence reason either way, for the CLI to print.

    - ``lcb_beats_estimate`` (default): the candidate's lower confidence bound must exceed production's
      point estimate plus ``margin``.
    - ``lcb_beats_ucb`` (stricter): it must exceed production's *upper* bound plus ``margin``.

    ``min_ess`` also blocks a candidate whose importance weights leave fewer effective rows than that
    (a tiny ESS makes a normal interval untrustworthy). An undefined estimate never passes.
    """
    if rule not in ("lcb_beats_estimate", "lcb_beats_ucb"):
        raise OPEInputError(f"rule must be 'lcb_beats_estimate' or 'lcb_beats_ucb', got {rule!r}", "rule")
    if not math.isfinite(margin):
        raise OPEInputError(f"margin must be a finite number, got {margin}", "margin")
    if not candidate.defined:
        return GateResult(False, f"candidate {candidate.name} estimate is undefined (no logged decision the "
                                 "candidate would also have made); it cannot be promoted")
    if not production.defined:
        return GateResult(False, f"production {production.name} estimate is undefined; nothing to compare the "
                                 "candidate against")
    if candidate.name != ON_POLICY and candidate.ess <= 0.0:
        return GateResult(False, f"candidate {candidate.name} estimate rests on no logged decision the candidate "
                                 "would also have made (effective sample size 0); it cannot be promoted")
    if candidate.ess < min_ess:
        return GateResult(False, f"candidate effective sample size {candidate.ess:.0f} is below the minimum "
                                 f"{min_ess:.0f}; the estimate is too uncertain to promote")
    if rule == "lcb_beats_estimate":
        ref, what = production.value, "production estimate"
    else:
        ref, what = production.ci_high, "production upper bound"
    passed = candidate.ci_low > ref + margin
    verb = "beats" if passed else "does not beat"
    return GateResult(passed, f"candidate lower bound {_fmt(candidate.ci_low)} {verb} {what} {_fmt(ref)} "
                              f"(margin {_fmt(margin)})")
