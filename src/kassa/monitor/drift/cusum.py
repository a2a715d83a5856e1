"""The reward-rate detector: multi-chart CUSUM on the likelihood ratio of a rate change.

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

This module owns one chart (`RateCusum`) and its threshold (`cusum_threshold`); the banks of charts per
rate are armed and rolled by `kassa.monitor.drift.monitor.DriftMonitor`.
"""

from __future__ import annotations

import math
from typing import Literal


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
