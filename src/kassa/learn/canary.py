"""`CanaryGuard`: compares a canary with production over a sliding window and rolls a bad canary back.

The decision path reports each served decision (version, latency, whether the model failed); the reward
joiner reports each closed top slot (version, reward). Both are O(1) appends into bounded windows. The
check runs on the learning loop's schedule, never on a request:

- reward rate: the canary's mean top-slot reward is below production's by more than ``max_reward_drop``
  (relative) *and* the gap is significant (one-sided z-test at ``z``), so noise alone does not roll back;
- error rate: the share of the canary's decisions where its model failed to score exceeds production's
  by more than ``max_error_rate_increase``;
- latency: the canary's P99 ``took_ms`` exceeds production's P99 times ``max_p99_ratio`` plus
  ``p99_slack_ms`` (the slack keeps sub-millisecond jitter from counting).

A breach archives the canary in the registry with the reason, which is also logged and counted.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from kassa.config import CanarySettings

log = logging.getLogger("kassa.learn")


@dataclass(slots=True)
class _Window:
    latencies: deque = field(default_factory=deque)
    errors: deque = field(default_factory=deque)
    rewards: deque = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class Breach:
    placement: str
    version: str
    reason: str


def _p99(values: deque) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)])


def _mean_var(values: deque) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return 0.0, 0.0
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, var


class CanaryGuard:
    def __init__(self, settings: CanarySettings | None = None) -> None:
        self.settings = settings or CanarySettings()
        self._windows: dict[tuple[str, str], _Window] = {}

    def _window(self, placement: str, version: str) -> _Window:
        key = (placement, version)
        w = self._windows.get(key)
        if w is None:
            n = self.settings.window_decisions
            w = self._windows[key] = _Window(deque(maxlen=n), deque(maxlen=n), deque(maxlen=n))
        return w

    def served(self, placement: str, version: str, took_ms: float, failed: bool) -> None:
        w = self._window(placement, version)
        w.latencies.append(took_ms)
        w.errors.append(1 if failed else 0)

    def rewarded(self, placement: str, version: str, reward: float) -> None:
        key = (placement, version)
        w = self._windows.get(key)
        if w is not None:  # only versions that serve are tracked
            w.rewards.append(reward)

    def forget(self, placement: str, keep: set[str]) -> None:
        for key in [k for k in self._windows if k[0] == placement and k[1] not in keep]:
            del self._windows[key]

    def check(self, placement: str, production: str, canary: str) -> Breach | None:
        """The first guardrail the canary breaches against production, or None."""
        s = self.settings
        c = self._windows.get((placement, canary))
        p = self._windows.get((placement, production))
        if c is None or p is None or len(c.latencies) < s.min_decisions or len(p.latencies) < s.min_decisions:
            return None
        c_err = sum(c.errors) / len(c.errors)
        p_err = sum(p.errors) / len(p.errors)
        if c_err - p_err > s.max_error_rate_increase:
            return Breach(placement, canary, f"error rate {c_err:.2%} vs production {p_err:.2%} "
                                             f"(allowed +{s.max_error_rate_increase:.2%})")
        c_p99, p_p99 = _p99(c.latencies), _p99(p.latencies)
        if c_p99 > p_p99 * s.max_p99_ratio + s.p99_slack_ms:
            return Breach(placement, canary, f"P99 latency {c_p99:.2f} ms vs production {p_p99:.2f} ms "
                                             f"(allowed {s.max_p99_ratio:g}x + {s.p99_slack_ms:g} ms)")
        if len(c.rewards) >= s.min_rewards and len(p.rewards) >= s.min_rewards:
            c_mean, c_var = _mean_var(c.rewards)
            p_mean, p_var = _mean_var(p.rewards)
            gap = p_mean - c_mean
            se = math.sqrt(c_var / len(c.rewards) + p_var / len(p.rewards))
            if p_mean > 0 and gap > s.max_reward_drop * p_mean and (se == 0 or gap / se > s.z):
                return Breach(placement, canary, f"reward rate {c_mean:.4f} vs production {p_mean:.4f} over "
                                                 f"{len(c.rewards)}/{len(p.rewards)} rewarded decisions "
                                                 f"(drop {gap / p_mean:.1%} > {s.max_reward_drop:.0%}, "
                                                 f"z={gap / se if se else float('inf'):.2f})")
        return None

    def enforce(self, serving: Mapping[str, tuple[str | None, str | None]],
                rollback: Callable[[Breach], None]) -> list[Breach]:
        """Check every placement's (production, canary) pair; roll back each breaching canary."""
        out = []
        for placement, (production, canary) in serving.items():
            if production is None or canary is None:
                continue
            breach = self.check(placement, production, canary)
            if breach is not None:
                log.warning("canary guardrail: rolling back %s: %s", breach.version, breach.reason)
                rollback(breach)
                out.append(breach)
        return out
