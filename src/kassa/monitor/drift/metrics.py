"""Prometheus metrics of drift (``kassa_drift_*``): the last check's statistics per placement and
feature, the reward CUSUMs and rates, the worst severity, and counters of checks and alerts.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from kassa.monitor.drift.config import SEVERITY_RANK
from kassa.monitor.drift.report import DriftReport, DriftRow


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
        self.severity.labels(p).set(SEVERITY_RANK[report.severity])
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
