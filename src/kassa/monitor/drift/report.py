"""Drift reports: `DriftRow`, one statistic of one feature, prediction or reward rate with its severity,
and `DriftReport`, one check's rows with its JSON form (metrics, webhook, ``kassa drift --json``) and
plain-text table (``kassa drift``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from kassa.monitor.drift.config import SEVERITY_RANK, Severity

PREDICTION_KINDS = ("score_psi", "score_ks", "action_psi")
REWARD_KINDS = ("reward_rate", "offer_rate")


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
            if SEVERITY_RANK[r.severity] > SEVERITY_RANK[worst]:
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
        rows = sorted(self.rows, key=lambda r: (-SEVERITY_RANK[r.severity], r.group, r.kind, r.feature))
        lines = [f"drift {self.placement}: reference {self.reference_n:,} decisions, live {self.live_n:,}; "
                 f"{len(self.alerts)} alert(s), {len(self.warnings)} warning(s)",
                 f"{'severity':<8}  {'kind':<11}  {'feature':<28}  {'statistic':>9}  {'p-value':>9}"]
        for r in rows:
            p = "" if r.p_value is None else f"{r.p_value:.2e}" if r.p_value < 1e-3 else f"{r.p_value:.4f}"
            lines.append(f"{r.severity:<8}  {r.kind:<11}  {r.feature[:28]:<28}  {r.statistic:>9.4f}  {p:>9}")
        return "\n".join(lines)
