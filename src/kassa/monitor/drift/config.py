"""Drift vocabulary and thresholds: severities, reward directions, the names of the special features
(``score``, ``action``, ``reward``) and category values (``__missing__``, ``__other__``, ``__empty__``), and
`DriftConfig`, the thresholds and window sizes every drift module reads.

Features derived from the clock (``hour``, ``daypart``, ``dow``, ``weekend``) are excluded by default
(``DriftConfig.exclude``): a window shorter than a day or a week drifts on them by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kassa import errors

Severity = Literal["ok", "warn", "alert"]
Direction = Literal["down", "up", "both"]
SEVERITY_RANK: dict[str, int] = {"ok": 0, "warn": 1, "alert": 2}
MISSING = "__missing__"
OTHER = "__other__"
EMPTY = "__empty__"
CLOCK_FEATURES = ("hour", "daypart", "dow", "weekend")
SCORE = "score"
ACTION = "action"
REWARD = "reward"
# Relative changes the CUSUM banks watch for. The size of a real change is unknown, and a CUSUM tuned to a
# small change is slow to confirm a large one (and the reverse), so each rate gets one chart per size and
# the charts share the false alarm budget (Lorden and Pollak's multi-chart CUSUM).
REWARD_CHANGES = (0.1, 0.25, 0.5)
OFFER_CHANGES = (0.25, 0.5, 0.75)


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
