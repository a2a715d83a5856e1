"""One-off drift comparisons from the decision log (what ``kassa drift`` prints): `window_from_decisions`
builds a window from logged decisions and their known rewards, and `compare` reports the feature and
prediction rows of `kassa.monitor.drift.distribution` plus windowed reward rows, Welch tests of the
reward per decision and of each offer's reward per impression (Bonferroni over offers). The streaming
monitor judges reward rates with CUSUM instead (`kassa.monitor.drift.cusum`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from kassa.monitor.drift.config import REWARD, Direction, DriftConfig, Severity
from kassa.monitor.drift.distribution import distribution_rows
from kassa.monitor.drift.report import DriftReport, DriftRow
from kassa.monitor.drift.statistics import normal_cdf, welch_z
from kassa.monitor.drift.window import Moments, Window, decision_action, decision_score

if TYPE_CHECKING:
    import pyarrow as pa


def _welch_row(feature: str, kind: str, ref: Moments, cur: Moments, change: float, alpha: float,
               direction: Direction) -> DriftRow:
    z = welch_z(ref.mean, ref.var, ref.n, cur.mean, cur.var, cur.n)
    if direction == "down":
        p = normal_cdf(z)
    elif direction == "up":
        p = 1.0 - normal_cdf(z)
    else:
        p = 2.0 * min(normal_cdf(z), 1.0 - normal_cdf(z))
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
    cands = table.column("candidates").to_pylist()
    versions = table.column("model_version").to_pylist()
    for decision_id, fj, pr, cs, version in zip(ids, feats, probs, cands, versions, strict=True):
        # With the serving version, as the live monitor records it: a model that learned between the two windows
        # changes the score and first choice by design, and `distribution_rows` then only warns (issue 14:
        # `kassa drift` alerted on `score` while the model was simply learning).
        window.add_decision(_features_json.decode(fj), decision_score(pr), decision_action(cs, pr), version)
        if rewards is not None:
            outcome = rewards.get(decision_id)
            if outcome is not None:
                window.add_outcome(outcome)
    return window
