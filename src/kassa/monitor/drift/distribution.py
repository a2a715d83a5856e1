"""Feature and prediction drift: the distribution rows of one window against another.

* **feature drift** per logged feature between a reference window (the previous window, or a fixed one
  such as the training window) and the live window: the population stability index (PSI) for
  categorical features and for numeric ones binned at the reference's quantiles, plus the two-sample
  Kolmogorov–Smirnov test for numeric features. A PSI alert also needs significance (the chi-square
  approximation of PSI): a small window over many categories reaches PSI 0.2 by chance;
* **prediction drift**: PSI and KS of the policy's top-slot probability (`decision_score`), and PSI of
  its first choice (`decision_action`). They alert only when one and the same model served both
  windows: under a model that changed (a continuously learning policy publishes every few seconds)
  predictions move by design, and the rows only warn.

Both the streaming monitor and the offline comparison (``kassa drift``) report these rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from kassa.monitor.drift.config import ACTION, MISSING, SCORE, DriftConfig, Severity
from kassa.monitor.drift.report import DriftRow
from kassa.monitor.drift.statistics import (
    align_categories,
    binned_counts,
    categorical_psi,
    ks_2samp,
    psi,
    psi_p_value,
    quantile_edges,
)
from kassa.monitor.drift.window import Window


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
