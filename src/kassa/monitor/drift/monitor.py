"""Drift detection: is live traffic still the traffic the model learned from, and does it still pay?

This module owns Kassa's drift statistics, the bounded windows they are computed from, the streaming
monitor a server feeds, its Prometheus metrics and its alert hook:

* **feature drift** per logged feature (`DecisionRecord.features`) between a reference window (the
  previous window, or a fixed one such as the training window) and the live window: the population
  stability index (PSI) for categorical features (strings, booleans; list-valued features such as
  ``cat``, logged joined by ``|``, count each element) and for numeric ones binned at the reference's
  quantiles, plus the two-sample Kolmogorov–Smirnov test for numeric features (statistic and asymptotic
  p-value, our own numpy code). A PSI alert also needs significance (the chi-square approximation of
  PSI): a small window over many categories reaches PSI 0.2 by chance;
* **prediction drift**: PSI and KS of the policy's top-slot probability (`decision_score`), and PSI of
  its first choice (`decision_action`). They alert only when one and the same model served both
  windows: under a model that changed (a continuously learning policy publishes every few seconds)
  predictions move by design, and the rows only warn;
* **reward-rate drift**: the reward per decision, and each offer's reward per impression, against the
  reference rates.

Reward-rate detector: multi-chart CUSUM on the likelihood ratio of a rate change
-------------------------------------------------------------------------------
A stream needs a sequential test: re-running a windowed two-sample test inflates its false alarm rate
with every look, and a window long enough to be safe is slow to notice. CUSUM (Page, 1954) is the
optimal detector of a change of known size (Lorden, 1971; Moustakides, 1986). Each observation ``x``
(a decision's summed reward, or one shown offer's reward) adds the log-likelihood ratio of the changed
rate ``λ1 = (1 − c)·λ0`` against the reference rate ``λ0`` under a Poisson model,
``z = x·ln(λ1/λ0) − (λ1 − λ0)``, and ``S = max(0, S + z)`` alarms when ``S ≥ h``. The size of a real
change is unknown, so each rate runs one chart per size (``reward_changes`` 10/25/50 %, per offer
``offer_changes`` 25/50/75 %) and the charts share the false alarm budget (Lorden and Pollak's
multi-chart CUSUM).

The threshold is calibrated without simulation: whenever ``E₀[e^z] ≤ 1`` under no change, every restart
of a CUSUM is a test whose false crossing has probability at most ``e^-h`` (Ville's inequality), so
``h = ln(ARL₀)`` guarantees an average run length to false alarm of at least ``ARL₀`` observations
(Lorden, 1971). ``E₀[e^z] ≤ 1`` holds exactly for any reward in [0, 1] per observation (``r^x`` is convex
in ``x``, so ``E[r^x] ≤ 1 + p(r − 1) ≤ e^{p(r−1)}``): accepts, clicks, a capped conversion; the charts
of one offer are exact, and the per-decision chart (a sum of slots) is exact up to the correlation
between one decision's slots. Rewards above 1 per slot make it an approximation. All charts of a family
share ``ARL₀`` (Bonferroni: ``h = ln(ARL₀·charts)``). ``λ0`` is estimated from the reference window, so it
is taken ``reference_z`` standard errors on the safe side (lower, for a drop) to keep estimation error
from eating the guarantee. In practice the bound is conservative by an order of magnitude.

Why per offer too: a change of taste hits a few offers hard and leaves the rest alone, so the summed
reward moves by a fraction of what one offer's accept rate does, and the evidence per observation grows
with the square of the change; and a learning policy soon stops showing an offer that stopped working,
so the summed reward's dip is brief. By default only drops alert (``reward_direction="down"``): a
learning policy's reward rises by design, and a rise is not an incident.

Windows are bounded summaries (counts, moments and fixed-size reservoir samples), so a monitor's memory
does not grow with traffic. The live window is tumbling: when it holds ``window`` decisions it is
closed; with ``rolling_reference`` (the default) closed windows become the reference one window behind
(``reference_lag``), so each window is judged against a recent one: a slow trend (a buyer base
maturing, a policy learning) is absorbed, a change is reported when it happens. Features derived from
the clock (``hour``, ``daypart``, ``dow``, ``weekend``) are excluded by default: a window shorter than a
day or a week drifts on them by construction.

Wiring: a `DriftMonitor` per placement is fed decision records (`observe_record`) and closed decisions'
rewards (`observe_joined`) off the request path; a periodic task calls `check`, which updates the
`DriftMetrics` and hands new alerts to the `AlertHook` (a WARNING log line and, optionally, a JSON POST
from the hook's own thread). `window_from_decisions` and `compare` build the same report offline from
the decision log (``kassa drift``), with Welch tests for the reward rows.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from kassa import errors

if TYPE_CHECKING:
    import pyarrow as pa

    from kassa.events.decision_log import DecisionRecord
    from kassa.learn.rewards import JoinedExample

log = logging.getLogger("kassa.drift")

Severity = Literal["ok", "warn", "alert"]
Direction = Literal["down", "up", "both"]
_RANK: dict[str, int] = {"ok": 0, "warn": 1, "alert": 2}
MISSING = "__missing__"
OTHER = "__other__"
EMPTY = "__empty__"
CLOCK_FEATURES = ("hour", "daypart", "dow", "weekend")
SCORE = "score"
ACTION = "action"
REWARD = "reward"
FEATURE_KINDS = ("psi", "psi_binned", "ks")
PREDICTION_KINDS = ("score_psi", "score_ks", "action_psi")
REWARD_KINDS = ("reward_rate", "offer_rate")
# Relative changes the CUSUM banks watch for. The size of a real change is unknown, and a CUSUM tuned to a
# small change is slow to confirm a large one (and the reverse), so each rate gets one chart per size and
# the charts share the false alarm budget (Lorden and Pollak's multi-chart CUSUM).
REWARD_CHANGES = (0.1, 0.25, 0.5)
OFFER_CHANGES = (0.25, 0.5, 0.75)


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class DriftConfig:
    """Thresholds and window sizes. Defaults: PSI ≥ 0.1 warns and ≥ 0.2 alerts when the shift is also
    significant (p < 0.01: a few hundred decisions spread over many categories reach PSI 0.2 by chance);
    KS alerts at p < 0.01 when the statistic is also ≥ ``ks_min_statistic`` (with thousands of rows KS
    finds even a meaningless shift significant; significant but smaller only warns). Invalid values raise
    `kassa.errors.Invalid` naming the field."""

    psi_warn: float = 0.1
    psi_alert: float = 0.2
    psi_p_alert: float = 0.01  # PSI alerts only when also significant (small windows, many categories)
    ks_p_alert: float = 0.01
    ks_min_statistic: float = 0.1
    bins: int = 10  # numeric PSI: bins at the reference's quantiles
    epsilon: float = 1e-4  # PSI smoothing: an empty bin counts as this share
    window: int = 2_000  # decisions per live window
    sample_size: int = 5_000  # reservoir per numeric feature and for scores, per window
    min_samples: int = 500  # fewer decisions (or numeric values) in either window: no feature/score row
    max_features: int = 200  # features tracked per window (memory bound); later ones are ignored
    max_categories: int = 100  # distinct values per categorical feature; the rest count as __other__
    exclude: tuple[str, ...] = CLOCK_FEATURES
    rolling_reference: bool = True  # closed live windows become the reference, ``reference_lag`` behind
    reference_lag: int = 1  # closed windows between the reference and the live window when rolling
    # reward-rate drift
    reward_direction: Direction = "down"
    reward_changes: tuple[float, ...] = REWARD_CHANGES  # relative changes of the reward per decision
    offer_changes: tuple[float, ...] = OFFER_CHANGES  # relative changes of one offer's reward per impression
    arl: float = 1_000_000.0  # average observations between false alarms, per detector family
    reference_z: float = 2.0  # standard errors the reference rate is moved to the safe side
    min_reference_decisions: int = 500  # a reward detector needs this many rewarded decisions...
    min_offer_impressions: int = 200  # ...and an offer detector this many rewarded impressions
    max_offers: int = 100
    reward_p_alert: float = 0.01  # offline `compare`: Welch test level (Bonferroni over offers)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> errors.Invalid:
            return errors.Invalid(f"drift {name} {why}, got {getattr(self, name)!r}", name)

        for name in ("psi_warn", "psi_alert", "epsilon", "ks_min_statistic"):
            if not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if self.psi_warn > self.psi_alert:
            raise bad("psi_warn", f"must not exceed psi_alert ({self.psi_alert})")
        for name in ("psi_p_alert", "ks_p_alert", "reward_p_alert"):
            if not 0 < getattr(self, name) < 1:
                raise bad(name, "must be in (0, 1)")
        for name in ("reward_changes", "offer_changes"):
            changes = getattr(self, name)
            if not changes or not all(isinstance(c, int | float) and 0 < c < 1 for c in changes):
                raise bad(name, "must be one or more relative changes in (0, 1)")
        if self.ks_min_statistic > 1:
            raise bad("ks_min_statistic", "must be <= 1")
        if self.epsilon >= 0.01:
            raise bad("epsilon", "must be < 0.01")
        for name in ("bins", "window", "sample_size", "min_samples", "max_features", "max_categories",
                     "min_reference_decisions", "min_offer_impressions", "max_offers"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.bins < 2:
            raise bad("bins", "must be >= 2")
        if self.min_samples > self.window:
            raise bad("min_samples", f"must not exceed window ({self.window})")
        if not self.arl > 1:
            raise bad("arl", "must be > 1")
        if self.reference_z < 0:
            raise bad("reference_z", "must be >= 0")
        if self.reference_lag not in (0, 1):
            raise bad("reference_lag", "must be 0 or 1")
        if self.reward_direction not in ("down", "up", "both"):
            raise bad("reward_direction", "must be 'down', 'up' or 'both'")


# --------------------------------------------------------------------------- statistics
def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray,
        epsilon: float = 1e-4) -> float:
    """Population stability index of two aligned count (or share) vectors: Σ (a − e)·ln(a / e) over
    shares, each share floored at ``epsilon`` so an empty bin does not make it infinite."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 1 or e.size == 0:
        raise ValueError("psi needs two non-empty count vectors of the same length")
    if e.sum() <= 0 or a.sum() <= 0 or (e < 0).any() or (a < 0).any():
        raise ValueError("psi needs non-negative counts with a positive total on both sides")
    e = np.maximum(e / e.sum(), epsilon)
    a = np.maximum(a / a.sum(), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-square variable with ``df`` degrees of freedom: the regularized upper incomplete
    gamma function Q(df/2, x/2), by its series below a + 1 and its continued fraction above
    (Numerical Recipes §6.2)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if x <= 0:
        return 1.0
    a, z = df / 2.0, x / 2.0
    log_pre = a * math.log(z) - z - math.lgamma(a)
    if z < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(1000):
            ap += 1.0
            term *= z / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, max(0.0, 1.0 - total * math.exp(log_pre)))
    tiny = 1e-300
    b = z + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, max(0.0, math.exp(log_pre) * h))


def psi_p_value(value: float, n_reference: int, n_live: int, bins: int) -> float:
    """Approximate p-value of a PSI under no drift: PSI is the symmetrised Kullback–Leibler divergence,
    and ``PSI·n₁n₂/(n₁+n₂)`` is asymptotically the chi-square homogeneity statistic with ``bins − 1``
    degrees of freedom."""
    if bins < 2 or n_reference < 1 or n_live < 1:
        return 1.0
    return chi2_sf(value * n_reference * n_live / (n_reference + n_live), bins - 1)


def categorical_psi(reference: Mapping[str, float], live: Mapping[str, float], epsilon: float = 1e-4) -> float:
    """PSI over the union of the categories of two count tables."""
    keys = sorted(set(reference) | set(live))
    return psi([reference.get(k, 0) for k in keys], [live.get(k, 0) for k in keys], epsilon)


def align_categories(reference: Mapping[str, float], live: Mapping[str, float]) -> tuple[dict[str, float],
                                                                                         dict[str, float]]:
    """Make two capped count tables comparable: once a window has run out of room (it counts values it
    did not keep under ``__other__``), a value the other window kept but it did not is folded into the
    other window's ``__other__`` too, so both tables mean the same by it."""
    ref, cur = dict(reference), dict(live)
    capped = [(table, other) for table, other in ((ref, cur), (cur, ref)) if OTHER in table]
    for table, other in capped:
        for k in [k for k in other if k not in table and k != OTHER]:
            other[OTHER] = other.get(OTHER, 0) + other.pop(k)
    return ref, cur


def quantile_edges(reference: Sequence[float] | np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (duplicates dropped, so ties make fewer bins)."""
    ref = np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        raise ValueError("quantile_edges needs a non-empty reference")
    return np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))


def binned_counts(values: Sequence[float] | np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts per bin; bin i holds edges[i-1] < x <= edges[i] (first and last bins open-ended)."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)


def binned_psi(reference: Sequence[float] | np.ndarray, live: Sequence[float] | np.ndarray, bins: int = 10,
               epsilon: float = 1e-4) -> float:
    """PSI of a numeric feature over ``bins`` bins cut at the reference's quantiles."""
    edges = quantile_edges(reference, bins)
    return psi(binned_counts(reference, edges), binned_counts(live, edges), epsilon)


def kolmogorov_sf(lam: float) -> float:
    """P(K > lam) for the Kolmogorov distribution: the alternating series for lam ≥ 1.18, and the
    Jacobi-theta form (fast for small lam) below it."""
    if lam <= 0:
        return 1.0
    if lam < 1.18:
        # 1 - sqrt(2π)/lam · Σ exp(-(2j-1)²π²/(8 lam²)); five terms reach double precision here.
        w = math.pi**2 / (8.0 * lam * lam)
        s = sum(math.exp(-((2 * j - 1) ** 2) * w) for j in range(1, 6))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / lam * s))
    s = 0.0
    for j in range(1, 101):
        term = math.exp(-2.0 * j * j * lam * lam)
        s += term if j % 2 else -term
        if term < 1e-17:
            break
    return min(1.0, max(0.0, 2.0 * s))


def ks_2samp(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov–Smirnov test: (D, asymptotic two-sided p-value).

    D is the largest gap between the two empirical CDFs. The p-value is the Kolmogorov distribution's
    tail at ``(√n_e + 0.12 + 0.11/√n_e)·D`` with ``n_e = nm/(n+m)`` (Stephens' small-sample correction,
    as in Numerical Recipes §14.3); it is slightly conservative when the data have ties.
    """
    x = np.sort(np.asarray(a, dtype=np.float64))
    y = np.sort(np.asarray(b, dtype=np.float64))
    n, m = x.size, y.size
    if n == 0 or m == 0:
        raise ValueError("ks_2samp needs two non-empty samples")
    grid = np.concatenate([x, y])
    cdf_x = np.searchsorted(x, grid, side="right") / n
    cdf_y = np.searchsorted(y, grid, side="right") / m
    d = float(np.max(np.abs(cdf_x - cdf_y)))
    en = math.sqrt(n * m / (n + m))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def _normal_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def welch_z(mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int) -> float:
    """z statistic of mean_b − mean_a (Welch's standard error; normal approximation for large n)."""
    se = math.sqrt(max(var_a, 0.0) / n_a + max(var_b, 0.0) / n_b)
    if se == 0:
        return 0.0 if mean_a == mean_b else math.copysign(math.inf, mean_b - mean_a)
    return (mean_b - mean_a) / se


def cusum_threshold(arl: float, detectors: int = 1) -> float:
    """CUSUM threshold h = ln(ARL₀·detectors): at least ``arl`` observations between false alarms per
    detector family (Lorden's bound, Bonferroni over ``detectors``)."""
    if arl <= 1 or detectors < 1:
        raise ValueError("arl must be > 1 and detectors >= 1")
    return math.log(arl * detectors)


class RateCusum:
    """One-sided CUSUM for a change of a non-negative rate from ``baseline`` by the factor ``1 ∓ change``.

    ``update(x)`` adds the Poisson log-likelihood ratio ``x·ln(λ1/λ0) − (λ1 − λ0)`` and returns whether
    the statistic has reached ``threshold``. Once alarmed it stays alarmed until ``reset``.

    >>> c = RateCusum(baseline=0.2, change=0.5, threshold=cusum_threshold(1e4), direction="down")
    >>> any(c.update(0.0) for _ in range(200))  # a rate of 0.2 fell to 0: found within ~100 zeros
    True
    """

    __slots__ = ("_a", "_b", "alarmed", "alarmed_after", "baseline", "change", "direction", "n", "statistic",
                 "threshold")

    def __init__(self, baseline: float, change: float, threshold: float, direction: Literal["down", "up"]) -> None:
        if not 0 < change < 1:
            raise ValueError("change must be in (0, 1)")
        if threshold <= 0:
            raise ValueError("threshold must be > 0")
        self.change = change
        self.direction = direction
        self.threshold = threshold
        self.statistic = 0.0
        self.n = 0
        self.alarmed = False
        self.alarmed_after: int | None = None  # observations until the alarm
        self.baseline = 0.0
        self._a = self._b = 0.0
        self.rebase(baseline)

    def rebase(self, baseline: float) -> None:
        """A new reference rate; the statistic carries over (a change in progress stays in progress)."""
        self.baseline = max(baseline, 1e-9)
        ratio = 1.0 - self.change if self.direction == "down" else 1.0 + self.change
        self._a = math.log(ratio)
        self._b = (ratio - 1.0) * self.baseline

    def update(self, x: float) -> bool:
        self.n += 1
        s = self.statistic + x * self._a - self._b
        self.statistic = s if s > 0.0 else 0.0
        if not self.alarmed and self.statistic >= self.threshold:
            self.alarmed = True
            self.alarmed_after = self.n
        return self.alarmed

    def reset(self) -> None:
        self.statistic = 0.0
        self.n = 0
        self.alarmed = False
        self.alarmed_after = None


# --------------------------------------------------------------------------- bounded windows
class _Reservoir:
    """Uniform sample of at most ``size`` values of a stream (Vitter's algorithm R)."""

    __slots__ = ("rng", "sample", "seen", "size")

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.rng = rng
        self.sample: list[float] = []
        self.seen = 0

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.sample) < self.size:
            self.sample.append(x)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.sample[j] = x

    def array(self) -> np.ndarray:
        return np.asarray(self.sample, dtype=np.float64)


class _Moments:
    __slots__ = ("n", "sq", "sum")

    def __init__(self) -> None:
        self.n = 0
        self.sum = 0.0
        self.sq = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.sum += x
        self.sq += x * x

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else 0.0

    @property
    def var(self) -> float:
        if self.n < 2:
            return 0.0
        return max(0.0, (self.sq - self.sum * self.sum / self.n) / (self.n - 1))


FeatureKind = Literal["categorical", "numeric"]


class _Feature:
    __slots__ = ("counts", "kind", "present", "sample")

    def __init__(self, kind: FeatureKind, sample: _Reservoir | None) -> None:
        self.kind = kind
        self.present = 0
        self.counts: dict[str, int] = {}
        self.sample = sample


def _kind_of(value: Any) -> FeatureKind:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "categorical"
    return "numeric"


def _tokens(value: Any) -> list[str]:
    """A categorical value's tokens: a list-valued feature (logged joined by ``|``, see
    `kassa.events.decision_log.loggable_features`) counts each of its elements."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str):
        return value.split("|") if "|" in value else [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tokens(v)] or [EMPTY]
    return [str(value)]


def decision_score(probabilities: Sequence[float] | None) -> float | None:
    """The policy's top-slot probability: the largest probability of the first slot's pmf."""
    if not probabilities:
        return None
    return float(max(probabilities))


def decision_action(candidates: Sequence[str] | None, probabilities: Sequence[float] | None) -> str | None:
    """The policy's first choice: the candidate with the largest first-slot probability (not the sampled
    one, so exploration does not blur it)."""
    if not candidates or not probabilities or len(candidates) != len(probabilities):
        return None
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return candidates[best]


class Window:
    """Bounded summary of one window of decisions and outcomes: per-feature counts and reservoir
    samples, a reservoir of scores, and reward moments per decision and per offer."""

    def __init__(self, config: DriftConfig | None = None, seed: int = 0) -> None:
        self.config = config or DriftConfig()
        self._rng = random.Random(seed)
        self._exclude = frozenset(self.config.exclude)
        self.decisions = 0
        self.features: dict[str, _Feature] = {}
        self.scores = _Reservoir(self.config.sample_size, self._rng)
        self.actions = _Feature("categorical", None)  # the policy's first choice per decision
        self.versions: dict[str, int] = {}  # model versions that served the window's decisions
        self.rewards = _Moments()  # one value per closed decision: its summed reward
        self.offers: dict[str, _Moments] = {}  # one value per shown offer: its reward

    def add_decision(self, features: Mapping[str, Any], score: float | None = None,
                     action: str | None = None, version: str | None = None) -> None:
        """One decision: its logged features, top-slot probability, first choice (see `decision_score`
        and `decision_action`) and the model version that served it."""
        cfg = self.config
        self.decisions += 1
        if version is not None:
            versions = self.versions
            if version in versions:
                versions[version] += 1
            elif len(versions) < cfg.max_categories:
                versions[version] = 1
            else:
                versions[OTHER] = versions.get(OTHER, 0) + 1
        if score is not None and math.isfinite(score):
            self.scores.add(float(score))
        if action is not None:
            self.actions.present += 1
            self._count(self.actions, action)
        for name, value in features.items():
            if value is None or name in self._exclude:
                continue
            f = self.features.get(name)
            if f is None:
                if len(self.features) >= cfg.max_features:
                    continue
                kind = _kind_of(value)
                f = self.features[name] = _Feature(
                    kind, _Reservoir(cfg.sample_size, self._rng) if kind == "numeric" else None)
            if f.kind == "numeric":
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    continue  # a value of another type than the feature's first one: not comparable
                f.present += 1
                f.sample.add(float(value))  # type: ignore[union-attr]
                continue
            f.present += 1
            for tok in _tokens(value):
                self._count(f, tok)

    def _count(self, f: _Feature, token: str) -> None:
        counts = f.counts
        if token in counts:
            counts[token] += 1
        elif len(counts) < self.config.max_categories:
            counts[token] = 1
        else:
            counts[OTHER] = counts.get(OTHER, 0) + 1

    def add_outcome(self, rewards: Sequence[tuple[str, float]]) -> None:
        """One closed decision: ``(offer_id, reward)`` for each offer it showed."""
        total = 0.0
        for offer_id, reward in rewards:
            total += reward
            m = self.offers.get(offer_id)
            if m is None:
                if len(self.offers) >= self.config.max_offers:
                    continue
                m = self.offers[offer_id] = _Moments()
            m.add(reward)
        self.rewards.add(total)

    def category_counts(self, name: str) -> dict[str, int]:
        """The feature's value counts, with decisions that lacked it counted as ``__missing__``
        (``action``: the policy's first choices)."""
        f = self.actions if name == ACTION else self.features.get(name)
        counts = dict(f.counts) if f is not None else {}
        missing = self.decisions - (f.present if f is not None else 0)
        if missing > 0:
            counts[MISSING] = counts.get(MISSING, 0) + missing
        return counts

    @property
    def size_bound(self) -> int:
        """Values held, whatever the traffic: reservoirs, category counts and offer moments."""
        held = len(self.scores.sample) + len(self.offers) + len(self.actions.counts) + len(self.versions)
        for f in self.features.values():
            held += len(f.counts) + (len(f.sample.sample) if f.sample is not None else 0)
        return held


# --------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class DriftRow:
    """One statistic of a report. ``kind``: ``psi`` (categorical feature), ``psi_binned`` and ``ks``
    (numeric feature), ``score_psi`` and ``score_ks`` (top-slot probability), ``action_psi`` (the policy's
    first choice), ``reward_rate`` (reward per decision; statistic: the CUSUM over its threshold in a
    monitor, the relative change in `compare`) and ``offer_rate`` (one offer's reward per impression;
    ``feature`` is the offer id)."""

    feature: str
    kind: str
    statistic: float
    p_value: float | None
    severity: Severity
    reference_n: int
    live_n: int
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> Literal["feature", "prediction", "reward"]:
        if self.kind in PREDICTION_KINDS:
            return "prediction"
        if self.kind in REWARD_KINDS:
            return "reward"
        return "feature"

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "kind": self.kind, "statistic": _num(self.statistic),
                "p_value": _num(self.p_value), "severity": self.severity, "reference_n": self.reference_n,
                "live_n": self.live_n, **({"detail": {k: _num(v) for k, v in self.detail.items()}}
                                          if self.detail else {})}


def _num(x: Any) -> Any:
    # Six significant digits, not decimals: a p-value of 7e-9 must not print as 0.
    if isinstance(x, float):
        return float(f"{x:.6g}") if math.isfinite(x) else None
    return x


@dataclass(frozen=True)
class DriftReport:
    placement: str
    checked_at: float
    reference_n: int  # decisions in the reference window
    live_n: int  # decisions in the compared live window
    rows: list[DriftRow]

    @property
    def severity(self) -> Severity:
        worst: Severity = "ok"
        for r in self.rows:
            if _RANK[r.severity] > _RANK[worst]:
                worst = r.severity
        return worst

    @property
    def alerts(self) -> list[DriftRow]:
        return [r for r in self.rows if r.severity == "alert"]

    @property
    def warnings(self) -> list[DriftRow]:
        return [r for r in self.rows if r.severity == "warn"]

    def to_dict(self) -> dict[str, Any]:
        return {"placement": self.placement, "checked_at": round(self.checked_at, 3),
                "reference_n": self.reference_n, "live_n": self.live_n, "severity": self.severity,
                "alerts": len(self.alerts), "warnings": len(self.warnings),
                "rows": [r.to_dict() for r in self.rows]}

    def table(self) -> str:
        """Plain-text table, worst first."""
        rows = sorted(self.rows, key=lambda r: (-_RANK[r.severity], r.group, r.kind, r.feature))
        lines = [f"drift {self.placement}: reference {self.reference_n:,} decisions, live {self.live_n:,}; "
                 f"{len(self.alerts)} alert(s), {len(self.warnings)} warning(s)",
                 f"{'severity':<8}  {'kind':<11}  {'feature':<28}  {'statistic':>9}  {'p-value':>9}"]
        for r in rows:
            p = "" if r.p_value is None else f"{r.p_value:.2e}" if r.p_value < 1e-3 else f"{r.p_value:.4f}"
            lines.append(f"{r.severity:<8}  {r.kind:<11}  {r.feature[:28]:<28}  {r.statistic:>9.4f}  {p:>9}")
        return "\n".join(lines)


def _psi_row(feature: str, kind: str, value: float, n_ref: int, n_live: int, bins: int, cfg: DriftConfig,
             detail: dict[str, Any] | None = None) -> DriftRow:
    p = psi_p_value(value, n_ref, n_live, bins)
    if value >= cfg.psi_alert and p < cfg.psi_p_alert:
        severity: Severity = "alert"
    elif value >= cfg.psi_warn:
        severity = "warn"
    else:
        severity = "ok"
    return DriftRow(feature, kind, value, p, severity, n_ref, n_live, {"bins": bins, **(detail or {})})


def _categorical_row(feature: str, kind: str, reference: Mapping[str, float], live: Mapping[str, float],
                     n_ref: int, n_live: int, cfg: DriftConfig, detail: dict[str, Any] | None = None) -> DriftRow:
    ref, cur = align_categories(reference, live)
    value = categorical_psi(ref, cur, cfg.epsilon)
    return _psi_row(feature, kind, value, n_ref, n_live, len(set(ref) | set(cur)), cfg, detail)


def _ks_severity(d: float, p: float, cfg: DriftConfig) -> Severity:
    if p < cfg.ks_p_alert:
        return "alert" if d >= cfg.ks_min_statistic else "warn"
    return "ok"


def _numeric_psi(ref: np.ndarray, cur: np.ndarray, ref_present: int, live_present: int, n_ref: int, n_live: int,
                 cfg: DriftConfig) -> tuple[float, int]:
    """PSI of a numeric feature at the reference's quantiles; bin shares come from the samples, and a
    missing bin (decisions without the feature) is added at its true share, so a feature that stops
    arriving shows up as drift too. Returns (PSI, bins)."""
    edges = quantile_edges(ref, cfg.bins)
    rc = binned_counts(ref, edges) / max(ref.size, 1) * ref_present
    lc = binned_counts(cur, edges) / cur.size * live_present if cur.size else np.zeros(len(edges) + 1)
    if n_ref - ref_present or n_live - live_present:
        rc, lc = np.append(rc, n_ref - ref_present), np.append(lc, n_live - live_present)
    return psi(rc, lc, cfg.epsilon), len(rc)


def distribution_rows(reference: Window, live: Window) -> list[DriftRow]:
    """Feature and prediction rows (PSI, KS) of ``live`` against ``reference``."""
    cfg = reference.config
    rows: list[DriftRow] = []
    if min(reference.decisions, live.decisions) < cfg.min_samples:
        return rows
    rn, ln = reference.decisions, live.decisions
    for name in sorted(set(reference.features) | set(live.features)):
        rf, lf = reference.features.get(name), live.features.get(name)
        rp = rf.present if rf is not None else 0
        lp = lf.present if lf is not None else 0
        if rf is not None and lf is not None and rf.kind != lf.kind:
            # The feature changed type (say a number became a string): compare the types themselves.
            rows.append(_categorical_row(name, "psi", {rf.kind: rp, MISSING: rn - rp}, {lf.kind: lp, MISSING: ln - lp},
                                         rn, ln, cfg, {"reference_type": rf.kind, "live_type": lf.kind}))
            continue
        kind = rf.kind if rf is not None else lf.kind  # type: ignore[union-attr]
        if kind != "numeric":
            rows.append(_categorical_row(name, "psi", reference.category_counts(name), live.category_counts(name),
                                         rn, ln, cfg))
            continue
        ref = rf.sample.array() if rf is not None and rf.sample is not None else np.empty(0)
        cur = lf.sample.array() if lf is not None and lf.sample is not None else np.empty(0)
        if ref.size < cfg.min_samples:
            # Too few reference values to cut bins (a feature that appeared, or is mostly absent):
            # compare how often it is present at all.
            value = psi([rp, rn - rp], [lp, ln - lp], cfg.epsilon)
            rows.append(_psi_row(name, "psi_binned", value, rn, ln, 2, cfg, {"presence": True}))
        else:
            value, bins = _numeric_psi(ref, cur, rp, lp, rn, ln, cfg)
            rows.append(_psi_row(name, "psi_binned", value, rn, ln, bins, cfg))
        if min(ref.size, cur.size) >= cfg.min_samples:
            d, p = ks_2samp(ref, cur)
            rows.append(DriftRow(name, "ks", d, p, _ks_severity(d, p, cfg), ref.size, cur.size))
    predictions: list[DriftRow] = []
    rs, ls = reference.scores.array(), live.scores.array()
    if min(rs.size, ls.size) >= cfg.min_samples:
        value, bins = _numeric_psi(rs, ls, rs.size, ls.size, rs.size, ls.size, cfg)
        predictions.append(_psi_row(SCORE, "score_psi", value, rs.size, ls.size, bins, cfg))
        d, p = ks_2samp(rs, ls)
        predictions.append(DriftRow(SCORE, "score_ks", d, p, _ks_severity(d, p, cfg), rs.size, ls.size))
    if min(reference.actions.present, live.actions.present) >= cfg.min_samples:
        predictions.append(_categorical_row(ACTION, "action_psi", reference.category_counts(ACTION),
                                            live.category_counts(ACTION), rn, ln, cfg))
    if model_changed(reference, live):
        # Predictions are evidence of drifting inputs only under one fixed model; a model that changed
        # (a continuously learning policy publishes every few seconds) changes them by design.
        predictions = [replace(r, severity="warn", detail={**r.detail, "model_changed": True})
                       if r.severity == "alert" else r for r in predictions]
    return rows + predictions


def model_changed(reference: Window, live: Window) -> bool:
    """Whether the two windows were not served by one and the same model version throughout (unknown
    versions count as unchanged)."""
    if not reference.versions and not live.versions:
        return False
    return not (len(reference.versions) == 1 and reference.versions.keys() == live.versions.keys())


def _welch_row(feature: str, kind: str, ref: _Moments, cur: _Moments, change: float, alpha: float,
               direction: Direction) -> DriftRow:
    z = welch_z(ref.mean, ref.var, ref.n, cur.mean, cur.var, cur.n)
    if direction == "down":
        p = _normal_cdf(z)
    elif direction == "up":
        p = 1.0 - _normal_cdf(z)
    else:
        p = 2.0 * min(_normal_cdf(z), 1.0 - _normal_cdf(z))
    rel = cur.mean / ref.mean - 1.0 if ref.mean > 0 else 0.0
    big = (rel <= -change and direction != "up") or (rel >= change and direction != "down")
    severity: Severity = ("alert" if big else "warn") if p < alpha else "ok"
    return DriftRow(feature, kind, rel, min(1.0, p), severity, ref.n, cur.n,
                    {"method": "welch", "reference_rate": ref.mean, "live_rate": cur.mean})


def reward_rows(reference: Window, live: Window) -> list[DriftRow]:
    """Windowed reward rows for one-off comparisons: Welch tests of the reward per decision and of each
    offer's reward per impression (Bonferroni over offers). The streaming monitor uses CUSUM instead."""
    cfg = reference.config
    rows: list[DriftRow] = []
    if min(reference.rewards.n, live.rewards.n) >= cfg.min_reference_decisions:
        rows.append(_welch_row(REWARD, "reward_rate", reference.rewards, live.rewards, min(cfg.reward_changes),
                               cfg.reward_p_alert, cfg.reward_direction))
    offers = [o for o in sorted(reference.offers) if o in live.offers
              and min(reference.offers[o].n, live.offers[o].n) >= cfg.min_offer_impressions
              and reference.offers[o].sum > 0]
    for o in offers:
        rows.append(_welch_row(o, "offer_rate", reference.offers[o], live.offers[o], min(cfg.offer_changes),
                               cfg.reward_p_alert / len(offers), cfg.reward_direction))
    return rows


def compare(reference: Window, live: Window, placement: str = "", now: float | None = None) -> DriftReport:
    """A one-off drift report of ``live`` against ``reference`` (what ``kassa drift`` prints)."""
    rows = distribution_rows(reference, live) + reward_rows(reference, live)
    return DriftReport(placement, time.time() if now is None else now, reference.decisions, live.decisions, rows)


_features_json = msgspec.json.Decoder(dict[str, Any])


def window_from_decisions(table: pa.Table, rewards: Mapping[str, Sequence[tuple[str, float]]] | None = None,
                          config: DriftConfig | None = None, seed: int = 0) -> Window:
    """A window from decision-log rows (`kassa.events.decision_log.read_decisions`); ``rewards`` maps a
    decision id to ``(offer_id, reward)`` per shown offer for the decisions whose rewards are known."""
    window = Window(config, seed)
    ids = table.column("decision_id").to_pylist()
    feats = table.column("features_json").to_pylist()
    probs = table.column("probabilities").to_pylist()
    for decision_id, fj, pr in zip(ids, feats, probs, strict=True):
        window.add_decision(_features_json.decode(fj), decision_score(pr))
        if rewards is not None:
            outcome = rewards.get(decision_id)
            if outcome is not None:
                window.add_outcome(outcome)
    return window


# --------------------------------------------------------------------------- metrics and alerts
class DriftMetrics:
    """Prometheus metrics of every placement's drift monitor; create once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.psi = Gauge("kassa_drift_psi", "PSI of a feature (or 'score') against the reference window",
                         ["placement", "feature"], registry=r)
        self.ks = Gauge("kassa_drift_ks", "Kolmogorov-Smirnov statistic of a numeric feature (or 'score')",
                        ["placement", "feature"], registry=r)
        self.ks_p = Gauge("kassa_drift_ks_p_value", "KS asymptotic p-value", ["placement", "feature"], registry=r)
        self.reward = Gauge("kassa_drift_reward_cusum", "Reward-rate CUSUM statistic over its threshold "
                            "(1 = alarm); feature is 'reward' or an offer id", ["placement", "feature"], registry=r)
        self.rate = Gauge("kassa_drift_reward_rate", "Reward per decision", ["placement", "window"], registry=r)
        self.severity = Gauge("kassa_drift_severity", "Worst severity of the last check (0 ok, 1 warn, 2 alert)",
                              ["placement"], registry=r)
        self.alerts = Counter("kassa_drift_alerts", "Drift alerts raised", ["placement", "kind"], registry=r)
        self.checks = Counter("kassa_drift_checks", "Drift checks run", ["placement"], registry=r)

    def record(self, report: DriftReport, new_alerts: Sequence[DriftRow]) -> None:
        p = report.placement
        self.checks.labels(p).inc()
        self.severity.labels(p).set(_RANK[report.severity])
        for row in report.rows:
            if row.kind in ("psi", "psi_binned", "score_psi", "action_psi"):
                self.psi.labels(p, row.feature).set(row.statistic)
            elif row.kind in ("ks", "score_ks"):
                self.ks.labels(p, row.feature).set(row.statistic)
                self.ks_p.labels(p, row.feature).set(row.p_value if row.p_value is not None else 1.0)
            elif row.detail.get("method") == "cusum":
                self.reward.labels(p, row.feature).set(row.statistic)
                if row.kind == "reward_rate":
                    self.rate.labels(p, "reference").set(float(row.detail.get("reference_rate", 0.0)))
                    self.rate.labels(p, "live").set(float(row.detail.get("live_rate", 0.0)))
        for row in new_alerts:
            self.alerts.labels(p, row.group).inc()


ALERT_MESSAGE = "kassa drift alert: placement=%s kind=%s feature=%s statistic=%.6g p_value=%s"


class AlertHook:
    """Says so when drift alerts: one WARNING log line per new alert (``ALERT_MESSAGE``, stable for log
    alerting) and, with ``webhook_url``, a JSON POST of the report from the hook's own thread. ``notify``
    never blocks and never raises: a full queue drops the POST, and a failed POST is logged."""

    def __init__(self, webhook_url: str | None = None, timeout: float = 5.0, max_pending: int = 100,
                 logger: logging.Logger | None = None) -> None:
        if webhook_url is not None and not webhook_url.startswith(("http://", "https://")):
            raise errors.Invalid(f"drift webhook URL must be http:// or https://, got {webhook_url!r}",
                                 "webhook_url")
        if not timeout > 0:
            raise errors.Invalid(f"drift webhook timeout must be > 0 seconds, got {timeout!r}", "timeout")
        self.webhook_url = webhook_url
        self.timeout = timeout
        self.log = logger or log
        self.posted = 0
        self.failed = 0
        self.dropped = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def notify(self, report: DriftReport, alerts: Sequence[DriftRow]) -> None:
        if not alerts:
            return
        for row in alerts:
            p = "none" if row.p_value is None else f"{row.p_value:.3g}"
            self.log.warning(ALERT_MESSAGE, report.placement, row.kind, row.feature, row.statistic, p)
        if self.webhook_url is None:
            return
        payload = {"event": "kassa.drift.alert", "placement": report.placement,
                   "alerts": [r.to_dict() for r in alerts], "report": report.to_dict()}
        self._ensure_thread()
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.dropped += 1
            self.log.warning("drift webhook queue full: dropped an alert for %s", report.placement)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="kassa-drift-webhook", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        import httpx  # only a process with a webhook configured pays for the import

        with httpx.Client(timeout=self.timeout) as client:
            while True:
                payload = self._queue.get()
                try:
                    if payload is None:
                        return
                    self._post(client, payload)
                finally:
                    self._queue.task_done()

    def _post(self, client: Any, payload: dict[str, Any]) -> None:
        try:
            resp = client.post(self.webhook_url, json=payload)
        except Exception as exc:  # a webhook outage must never reach the monitor
            self.failed += 1
            self.log.warning("drift webhook POST to %s failed: %s", self.webhook_url, exc)
            return
        if resp.status_code >= 300:
            self.failed += 1
            self.log.warning("drift webhook POST to %s failed: HTTP %d", self.webhook_url, resp.status_code)
        else:
            self.posted += 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until queued POSTs are done (for tests and shutdown); True when the queue drained."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                return
            thread.join(timeout)


# --------------------------------------------------------------------------- the streaming monitor
class DriftMonitor:
    """Drift of one placement's live traffic, fed incrementally, checked periodically.

    Feed it off the request path (``observe_record`` from the decision-log tap, ``observe_joined`` or
    ``observe_outcome`` when rewards close) and call ``check`` from a periodic task. Memory is bounded by
    the config (three windows of reservoirs and counts, at most ``max_offers`` offer detectors), whatever
    the traffic. Thread-safe: one lock, held briefly by ``observe_*``.

    Without an explicit reference (``set_reference``), the first full live window becomes it. With
    ``rolling_reference`` (the default) closed windows replace it as they close, ``reference_lag`` windows
    behind the live one, so each window is judged against a recent one; without it the reference stays
    (say, the serving model's training window) and reward detectors stay alarmed until ``rebase``.
    """

    def __init__(self, placement: str, config: DriftConfig | None = None, reference: Window | None = None,
                 metrics: DriftMetrics | None = None, hook: AlertHook | None = None, seed: int = 0) -> None:
        self.placement = placement
        self.config = config or DriftConfig()
        self.metrics = metrics
        self.hook = hook
        self._seed = seed
        self._lock = threading.Lock()
        self.reference: Window | None = None
        self.live = self._new_window()
        self.last_live: Window | None = None  # the last closed live window
        self.windows_closed = 0
        self._reward: list[RateCusum] = []
        self._offers: dict[str, list[RateCusum]] = {}
        self._offer_h = 1.0
        self._active: set[tuple[str, str]] = set()  # (kind, feature) alerting at the last check
        self.alerts_raised = 0
        if reference is not None:
            self.set_reference(reference)

    def _new_window(self) -> Window:
        self._seed += 1
        return Window(self.config, self._seed)

    # -- feeding (cheap; called for every decision and every closed decision)
    def observe_decision(self, features: Mapping[str, Any], score: float | None = None,
                         action: str | None = None, version: str | None = None) -> None:
        with self._lock:
            self.live.add_decision(features, score, action, version)
            if self.live.decisions >= self.config.window:
                self._close_window()

    def observe_record(self, record: DecisionRecord) -> None:
        """A logged decision of this placement (others are ignored)."""
        if record.placement == self.placement:
            self.observe_decision(record.features, decision_score(record.probabilities),
                                  decision_action(record.candidates, record.probabilities), record.model_version)

    def observe_outcome(self, rewards: Sequence[tuple[str, float]]) -> None:
        """One closed decision: ``(offer_id, reward)`` per offer shown."""
        with self._lock:
            self.live.add_outcome(rewards)
            total = 0.0
            for offer_id, reward in rewards:
                total += reward
                for c in self._offers.get(offer_id, ()):
                    c.update(reward)
            for c in self._reward:
                c.update(total)

    def observe_joined(self, examples: Iterable[JoinedExample]) -> None:
        """Closed decisions as the reward joiner emits them (one example per shown slot, a decision's
        slots together); examples of other placements are ignored."""
        current: str | None = None
        outcome: list[tuple[str, float]] = []
        for ex in examples:
            if ex.placement != self.placement:
                continue
            if ex.decision_id != current:
                if outcome:
                    self.observe_outcome(outcome)
                current, outcome = ex.decision_id, []
            outcome.append((ex.offer_id, ex.reward))
        if outcome:
            self.observe_outcome(outcome)

    # -- references
    def set_reference(self, reference: Window) -> None:
        """Compare against ``reference`` from now on (e.g. the training window of the serving model);
        every detector restarts from its rates."""
        with self._lock:
            self.reference = reference
            self._active.clear()
            self._arm(reset=True)

    def rebase(self) -> None:
        """Accept the present as normal: the newest window with enough decisions becomes the reference and
        every detector restarts (after an alert was handled, or a new model was promoted)."""
        with self._lock:
            newest = self.live if self.live.decisions >= self.config.min_samples or self.last_live is None \
                else self.last_live
            self.reference = newest
            if newest is self.live:
                self.last_live = self.live
                self.live = self._new_window()
            self._active.clear()
            self._arm(reset=True)

    def _directions(self) -> tuple[Literal["down", "up"], ...]:
        d = self.config.reward_direction
        return ("down", "up") if d == "both" else (d,)

    def _baseline(self, m: _Moments, direction: str) -> float:
        se = math.sqrt(m.var / m.n) if m.n > 1 else 0.0
        shift = self.config.reference_z * se
        return max(m.mean - shift, 1e-9) if direction == "down" else m.mean + shift

    def _bank(self, m: _Moments, changes: Sequence[float], threshold: float) -> list[RateCusum]:
        return [RateCusum(self._baseline(m, d), c, threshold, d) for d in self._directions() for c in changes]

    def _arm(self, reset: bool) -> None:
        """(Re)create the reward detectors from the reference's rates; statistics carry over unless reset."""
        ref = self.reference
        cfg = self.config
        if reset:
            self._reward, self._offers = [], {}
        if ref is None:
            return
        dirs = len(self._directions())
        if ref.rewards.n >= cfg.min_reference_decisions and ref.rewards.mean > 0:
            h = cusum_threshold(cfg.arl, dirs * len(cfg.reward_changes))
            if not self._reward:
                self._reward = self._bank(ref.rewards, cfg.reward_changes, h)
            else:
                for c in self._reward:
                    c.rebase(self._baseline(ref.rewards, c.direction))
        eligible = {o: m for o, m in ref.offers.items() if m.n >= cfg.min_offer_impressions and m.sum > 0}
        for o in list(self._offers):
            if o not in eligible and not any(c.alarmed for c in self._offers[o]):
                del self._offers[o]  # no longer shown enough to judge
        h = self._offer_h = cusum_threshold(cfg.arl, max(1, len(eligible) * dirs * len(cfg.offer_changes)))
        for o, m in eligible.items():
            bank = self._offers.get(o)
            if bank is None:
                self._offers[o] = self._bank(m, cfg.offer_changes, h)
                continue
            for c in bank:
                c.rebase(self._baseline(m, c.direction))
                c.threshold = h

    def _close_window(self) -> None:
        closed = self.live
        self.live = self._new_window()
        self.windows_closed += 1
        if self.reference is None:
            self.reference = closed
            self._arm(reset=True)
        elif self.config.rolling_reference:
            # Always roll, alerts or not, so a change is reported when it happens and then becomes the new
            # normal (a frozen reference would make every later window drift from it, and every detector
            # alert). The reference lags one window behind the live one: a change that lands late in a
            # window is still judged against the window before it for one more full window, instead of
            # against a reference it has half contaminated.
            previous = self.last_live
            self.reference = previous if self.config.reference_lag and previous is not None else closed
            alarmed_reward = any(c.alarmed for c in self._reward)
            alarmed = [o for o, bank in self._offers.items() if any(c.alarmed for c in bank)]
            self._arm(reset=False)
            # A rate that alarmed has had its say: its detectors restart from the newest window (the new
            # level) instead of alarming again at the same change against the lagged reference.
            cfg = self.config
            if alarmed_reward:
                self._reward = self._bank(closed.rewards, cfg.reward_changes, self._reward[0].threshold) \
                    if closed.rewards.n >= cfg.min_reference_decisions and closed.rewards.mean > 0 else []
            for o in alarmed:
                m = closed.offers.get(o)
                if m is not None and m.n >= cfg.min_offer_impressions and m.sum > 0:
                    self._offers[o] = self._bank(m, cfg.offer_changes, self._offer_h)
                else:
                    self._offers.pop(o, None)
        self.last_live = closed

    # -- checking
    def check(self, now: float | None = None) -> DriftReport:
        """Compare the live window with the reference; update metrics; notify the hook of new alerts."""
        cfg = self.config
        with self._lock:
            ref = self.reference
            live = self.live if self.live.decisions >= cfg.min_samples or self.last_live is None else self.last_live
            rows = distribution_rows(ref, live) if ref is not None and ref is not live else []
            rows += self._reward_rows(ref)
            report = DriftReport(self.placement, time.time() if now is None else now,
                                 ref.decisions if ref is not None else 0, live.decisions, rows)
            alerting = {(r.kind, r.feature) for r in report.alerts}
            new = [r for r in report.alerts if (r.kind, r.feature) not in self._active]
            self._active = alerting
            self.alerts_raised += len(new)
        if self.metrics is not None:
            self.metrics.record(report, new)
        if self.hook is not None and new:
            self.hook.notify(report, new)
        return report

    def _reward_rows(self, ref: Window | None) -> list[DriftRow]:
        rows: list[DriftRow] = []
        if ref is None:
            return rows

        def row(feature: str, kind: str, bank: list[RateCusum], ref_m: _Moments, live_m: _Moments | None
                ) -> DriftRow:
            worst = max(bank, key=lambda c: (c.alarmed, c.statistic / c.threshold))
            ratio = worst.statistic / worst.threshold
            severity: Severity = "alert" if worst.alarmed else "warn" if ratio >= 0.5 else "ok"
            detail: dict[str, Any] = {"method": "cusum", "direction": worst.direction, "change": worst.change,
                                      "reference_rate": ref_m.mean, "baseline": worst.baseline,
                                      "threshold": worst.threshold, "observations": worst.n}
            if live_m is not None and live_m.n:
                detail["live_rate"] = live_m.mean
            if worst.alarmed_after is not None:
                detail["alarmed_after"] = worst.alarmed_after
            return DriftRow(feature, kind, 1.0 if worst.alarmed else ratio, None, severity, ref_m.n,
                            live_m.n if live_m is not None else 0, detail)

        if self._reward:
            rows.append(row(REWARD, "reward_rate", self._reward, ref.rewards, self.live.rewards))
        for o in sorted(self._offers):
            rows.append(row(o, "offer_rate", self._offers[o], ref.offers.get(o, _Moments()), self.live.offers.get(o)))
        return rows

    @property
    def memory_bound(self) -> int:
        """Values held by the monitor's windows and detectors (for tests of the memory bound)."""
        held = sum(w.size_bound for w in (self.reference, self.live, self.last_live) if w is not None)
        return held + len(self._reward) + sum(len(cs) for cs in self._offers.values())


# --------------------------------------------------------------------------- one process's monitors
class DriftWatch:
    """Every placement's `DriftMonitor` in one serving process, with the shared metrics and alert hook.

    Fed off the request path: decision records from the decision-log writer's thread as each batch is
    written, closed decisions from the learning task; `check` runs on the learning task's schedule."""

    def __init__(self, registry: CollectorRegistry, webhook_url: str | None = None,
                 config: DriftConfig | None = None) -> None:
        self.metrics = DriftMetrics(registry)
        self.hook = AlertHook(webhook_url)
        self.config = config or DriftConfig()
        self.monitors: dict[str, DriftMonitor] = {}
        self._lock = threading.Lock()
        self.last_reports: dict[str, DriftReport] = {}

    def monitor(self, placement: str) -> DriftMonitor:
        m = self.monitors.get(placement)
        if m is None:
            with self._lock:
                m = self.monitors.get(placement)
                if m is None:
                    m = self.monitors[placement] = DriftMonitor(placement, self.config, metrics=self.metrics,
                                                                hook=self.hook)
        return m

    def observe_records(self, records: Iterable[DecisionRecord]) -> None:
        for record in records:
            if not record.fallback:
                self.monitor(record.placement).observe_record(record)

    def observe_joined(self, examples: Sequence[JoinedExample]) -> None:
        placements = {ex.placement for ex in examples}
        for placement in placements:
            self.monitor(placement).observe_joined(examples)

    def check(self, now: float | None = None) -> list[DriftReport]:
        reports = [m.check(now) for m in list(self.monitors.values())]
        for r in reports:
            self.last_reports[r.placement] = r
        return reports

    def rebase(self, placement: str) -> None:
        m = self.monitors.get(placement)
        if m is not None:
            m.rebase()

    def close(self) -> None:
        self.hook.close()
