"""`CanaryGuard`: compares a canary with whatever serves production and rolls a bad canary back.

A guardrail window belongs to the *comparison* (this canary against this placement's production), not to
a version. The comparison opens when a canary starts serving and closes when it stops (promoted,
archived, rolled back). While it is open, every production version that serves, including each snapshot
the online learner auto-publishes every few seconds, feeds the same production arm, and a reward that
arrives for a decision made during the comparison counts, whichever version made it and however long its
reward window was (600 s by default). Before issue 17 the windows were per version and the learner's
next snapshot dropped production's, so at low traffic or long reward waits the guardrail never fired.

The decision path reports each served decision (version, latency, whether the model failed); the reward
joiner reports each closed top slot (version, reward). Both are O(1) appends into bounded windows. The
check runs on the learning loop's schedule (every registry poll, 1 s), never on a request. Each test is
sequential, so looking every second does not inflate false alarms, and each stops as soon as the
evidence is clear:

- latency: a canary decision "breaches" when it took longer than production's P99 times ``max_p99_ratio``
  plus ``p99_slack_ms``. A healthy canary breaches at most 1% of the time (the P99 definition); Wald's
  SPRT of breach share 1% against ``latency_breach_share`` (10%) rolls back when the likelihood ratio reaches
  1/alpha. A canary 10x slower breaches on every decision, so a handful of decisions settle it, once
  production has ``min_latency_decisions`` for its P99;
- error rate: the same SPRT on the share of canary decisions whose model failed to score, against
  production's share plus ``max_error_rate_increase`` (H0) and plus three times that (H1);
- reward rate: the canary's mean top-slot reward is below production's by more than ``max_reward_drop``
  (relative) *and* the always-valid mixture SPRT (mSPRT, Johari et al., "Always valid inference", 2017;
  normal mixture with its scale at ``max_reward_drop`` of production's mean) rejects "no drop" at alpha,
  once both arms have ``min_rewards``.

alpha is the one-sided tail of ``z`` (2.33 -> 1%), so the significance setting reads as it always did.
A breach archives the canary in the registry with the reason, which is also logged and counted.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kassa.config import CanarySettings

log = logging.getLogger("kassa.learn")

GUARDRAILS = ("latency", "error_rate", "reward")  # the `guardrail` label of a breach, in check order


@dataclass(slots=True)
class _Arm:
    latencies: deque[float]
    errors: deque[int]
    rewards: deque[float]

    @classmethod
    def bounded(cls, n: int) -> _Arm:
        return cls(deque(maxlen=n), deque(maxlen=n), deque(maxlen=n))


@dataclass(slots=True)
class Comparison:
    """One canary against production, from the canary's first serve until it stops serving."""

    placement: str
    canary: str
    canary_arm: _Arm
    production_arm: _Arm
    production_versions: set[str] = field(default_factory=set)  # every version that served production
    evaluations: int = 0


@dataclass(frozen=True, slots=True)
class Breach:
    placement: str
    version: str
    reason: str
    guardrail: str = "reward"  # one of GUARDRAILS


def _p99(values: deque[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)])


def _mean_var(values: deque[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, var


def alpha_of(z: float) -> float:
    """The one-sided tail probability of a standard normal beyond ``z``."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def sprt_llr(hits: int, n: int, p0: float, p1: float) -> float:
    """Wald's log-likelihood ratio of ``hits`` successes in ``n`` Bernoulli trials, share p1 against p0."""
    p0 = min(max(p0, 1e-9), 1 - 1e-9)
    p1 = min(max(p1, p0 + 1e-9), 1 - 1e-9)
    return hits * math.log(p1 / p0) + (n - hits) * math.log((1 - p1) / (1 - p0))


def msprt_lr(gap: float, variance: float, tau2: float) -> float:
    """The normal-mixture likelihood ratio of an observed mean difference ``gap`` with ``variance``
    (mixing prior N(0, tau2)); rejecting when it reaches 1/alpha is valid however often one looks."""
    if variance <= 0:
        return math.inf if gap > 0 else 1.0
    exponent = gap * gap * tau2 / (2 * variance * (variance + tau2))
    return math.sqrt(variance / (variance + tau2)) * math.exp(min(exponent, 700.0))


class CanaryGuard:
    def __init__(self, settings: CanarySettings | None = None) -> None:
        self.settings = settings or CanarySettings()
        self.alpha = alpha_of(self.settings.z)
        self._comparisons: dict[str, Comparison] = {}  # placement -> the open comparison

    # ------------------------------------------------------------------ lifecycle (the learning loop)
    def track(self, placement: str, production: str | None, canary: str | None) -> None:
        """What serves ``placement`` now. A new canary opens a comparison; no canary closes it; a new
        production version joins the open comparison's production arm."""
        comp = self._comparisons.get(placement)
        if canary is None:
            self._comparisons.pop(placement, None)
            return
        if comp is None or comp.canary != canary:
            n = self.settings.window_decisions
            comp = self._comparisons[placement] = Comparison(placement, canary, _Arm.bounded(n), _Arm.bounded(n))
        if production is not None:
            comp.production_versions.add(production)

    def comparison(self, placement: str) -> Comparison | None:
        return self._comparisons.get(placement)

    # ------------------------------------------------------------------ observations (O(1))
    def served(self, placement: str, version: str, took_ms: float, failed: bool) -> None:
        comp = self._comparisons.get(placement)
        if comp is None:
            return  # the loop opens the comparison when it sees the serving set (at most a poll later)
        if version == comp.canary:
            arm = comp.canary_arm
        else:
            arm = comp.production_arm
            comp.production_versions.add(version)
        arm.latencies.append(took_ms)
        arm.errors.append(1 if failed else 0)

    def rewarded(self, placement: str, version: str, reward: float) -> None:
        comp = self._comparisons.get(placement)
        if comp is None:
            return
        if version == comp.canary:
            comp.canary_arm.rewards.append(reward)
        elif version in comp.production_versions:
            comp.production_arm.rewards.append(reward)

    # ------------------------------------------------------------------ the tests
    def check(self, placement: str) -> Breach | None:
        """The first guardrail the open comparison's canary breaches, or None."""
        comp = self._comparisons.get(placement)
        if comp is None:
            return None
        comp.evaluations += 1
        c, p = comp.canary_arm, comp.production_arm
        return (self._latency(comp, c, p) or self._errors(comp, c, p) or self._reward(comp, c, p))

    def _latency(self, comp: Comparison, c: _Arm, p: _Arm) -> Breach | None:
        s = self.settings
        if len(p.latencies) < s.min_latency_decisions or not c.latencies:
            return None
        p_p99 = _p99(p.latencies)
        limit = p_p99 * s.max_p99_ratio + s.p99_slack_ms
        slow = sum(1 for v in c.latencies if v > limit)
        llr = sprt_llr(slow, len(c.latencies), 0.01, s.latency_breach_share)
        if llr < math.log(1 / self.alpha):
            return None
        return Breach(comp.placement, comp.canary,
                      f"P99 latency {_p99(c.latencies):.2f} ms vs production {p_p99:.2f} ms: {slow} of "
                      f"{len(c.latencies)} canary decisions over the allowed {limit:.2f} ms "
                      f"({s.max_p99_ratio:g}x + {s.p99_slack_ms:g} ms; SPRT at alpha {self.alpha:.3g})",
                      "latency")

    def _errors(self, comp: Comparison, c: _Arm, p: _Arm) -> Breach | None:
        s = self.settings
        if len(p.errors) < s.min_latency_decisions or not c.errors:
            return None
        c_fail, p_err = sum(c.errors), sum(p.errors) / len(p.errors)
        p0 = p_err + s.max_error_rate_increase
        llr = sprt_llr(c_fail, len(c.errors), p0, p0 + 2 * s.max_error_rate_increase)
        if llr < math.log(1 / self.alpha):
            return None
        return Breach(comp.placement, comp.canary,
                      f"error rate {c_fail / len(c.errors):.2%} vs production {p_err:.2%} "
                      f"(allowed +{s.max_error_rate_increase:.2%}; SPRT at alpha {self.alpha:.3g})", "error_rate")

    def _reward(self, comp: Comparison, c: _Arm, p: _Arm) -> Breach | None:
        s = self.settings
        if len(c.rewards) < s.min_rewards or len(p.rewards) < s.min_rewards:
            return None
        c_mean, c_var = _mean_var(c.rewards)
        p_mean, p_var = _mean_var(p.rewards)
        gap = p_mean - c_mean
        if p_mean <= 0 or gap <= s.max_reward_drop * p_mean:
            return None
        variance = c_var / len(c.rewards) + p_var / len(p.rewards)
        lr = msprt_lr(gap, variance, (s.max_reward_drop * p_mean) ** 2)
        if lr < 1 / self.alpha:
            return None
        return Breach(comp.placement, comp.canary,
                      f"reward rate {c_mean:.4f} vs production {p_mean:.4f} over {len(c.rewards)}/"
                      f"{len(p.rewards)} rewarded decisions (drop {gap / p_mean:.1%} > {s.max_reward_drop:.0%}, "
                      f"mSPRT likelihood ratio {lr:.3g} >= {1 / self.alpha:.0f})", "reward")

    def enforce(self, rollback: Callable[[Breach], None],
                evaluated: Callable[[str, str], None] | None = None) -> list[Breach]:
        """Check every open comparison; roll back each breaching canary (and close its comparison).
        ``evaluated(placement, outcome)`` hears each check: ``pass`` or the breached guardrail."""
        out = []
        for placement in list(self._comparisons):
            breach = self.check(placement)
            if evaluated is not None:
                evaluated(placement, breach.guardrail if breach else "pass")
            if breach is not None:
                log.warning("canary guardrail: rolling back %s: %s", breach.version, breach.reason)
                rollback(breach)
                self._comparisons.pop(placement, None)
                out.append(breach)
        return out
