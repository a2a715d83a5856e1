"""`kassa evaluate --shadow`: how a shadow model would have done, read from its own decision log.

A shadow version (`kassa.learn.shadow.ShadowScorer`) writes, under ``<data_dir>/shadow/decisions/`` and with
the served decision's ``decision_id``, its whole first-slot distribution over the served decision's candidates
(``candidates``/``probabilities``, the same order) and the ranking it would have shown (``chosen``). Joined
with the served decisions and their rewards (`kassa.learn.offline.dataset.load_logged`), each row gives the
shadow's probability of the offer actually shown first, so IPS, SNIPS and DR (`ope.evaluate_policies`, with
the reward model of `kassa evaluate`) need no re-scoring and no model artifact: a shadow whose artifact is
gone still evaluates, and the numbers are those of the model exactly as it scored live.

Informational only: nothing is written to the registry (no gate verdict); promotion still goes through
`kassa evaluate --candidate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kassa.events.decision_log import read_decisions
from kassa.learn.offline import ope
from kassa.learn.offline.dataset import LoggedDecisions
from kassa.learn.offline.evaluate import reward_range, top_slot_reward_model


def read_shadow_log(data_dir: Path, placement: str, since: float | None, until: float | None) -> pa.Table:
    """The shadow log's decisions of ``placement`` in ``[since, until)`` (empty when no shadow scored)."""
    return read_decisions(Path(data_dir) / "shadow", placement, since, until)


@dataclass(slots=True)
class ShadowVersionReport:
    """One shadow version on the window: what it scored, how often it agreed with what was served, and the
    off-policy estimates of its top-slot reward beside the served policy's mean on the same decisions."""

    version: str
    scored: int  # its rows in the shadow log
    evaluated: int  # of those, the ones whose served decision is closed (the estimates' rows)
    open: int  # scored, but no closed served reward (its window is open, it is not logged, or no usable pmf)
    missed: int  # closed served decisions between its first and last scored one that it did not score (dropped)
    outside: int  # closed served decisions before its first or after its last scored one (not in shadow then)
    first_ts: float
    last_ts: float
    agreement: float  # share of evaluated rows whose shadow top offer is the one served first
    greedy_agreement: float  # share whose most probable candidate is the served distribution's most probable
    evaluation: ope.Evaluation | None  # None below 2 evaluated rows (an interval needs 2)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "scored": self.scored, "evaluated": self.evaluated, "open": self.open,
                "missed": self.missed, "outside": self.outside, "first_ts": self.first_ts, "last_ts": self.last_ts,
                "agreement": _num(self.agreement), "greedy_agreement": _num(self.greedy_agreement),
                "evaluation": self.evaluation.to_dict() if self.evaluation is not None else None}


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _argmax(candidates: list[str], probs: list[float] | None) -> str | None:
    if not candidates or not probs:
        return None
    return candidates[int(np.argmax(probs))]


def evaluate_shadow(data: LoggedDecisions, shadow: pa.Table, level: float = 0.95,
                    max_weight: float | None = None) -> list[ShadowVersionReport]:
    """Each shadow version of ``shadow`` (`read_shadow_log`) on ``data`` (the same placement's closed served
    decisions, `load_logged`), in the order the versions first scored."""
    cols = {name: shadow.column(name).to_pylist() for name in
            ("decision_id", "ts", "model_version", "candidates", "probabilities", "chosen")}
    reward, logged_prob, _ = data.top_slot()
    # an estimate needs 2 rows (so does the reward model's fit): below that, only the counts
    model = top_slot_reward_model(data, reward) if len(data) >= 2 else None
    span = reward_range(reward)
    served = {did: i for i, did in enumerate(data.decision_ids)}
    by_version: dict[str, list[int]] = {}
    for k, version in enumerate(cols["model_version"]):
        by_version.setdefault(version, []).append(k)
    reports = []
    for version, ks in by_version.items():
        rows: list[int] = []  # served row of each evaluated shadow row
        target: list[float] = []
        flat_actions: list[str] = []
        flat_probs: list[float] = []
        lengths: list[int] = []
        agree = greedy = 0
        seen: set[str] = set()
        for k in ks:
            did = cols["decision_id"][k]
            if did in seen:  # one decision scored twice (a replayed shadow request): counted once
                continue
            seen.add(did)
            i = served.get(did)
            if i is None:
                continue
            cands = cols["candidates"][k] or []
            probs = [min(max(float(p), 0.0), 1.0) for p in (cols["probabilities"][k] or [])]
            if len(probs) != len(cands):  # no probability per candidate: nothing to weigh with (counted open)
                continue
            shown = data.chosen[i][0]
            rows.append(i)
            target.append(probs[cands.index(shown)] if shown in cands else 0.0)
            flat_actions += cands
            flat_probs += probs
            lengths.append(len(cands))
            own = cols["chosen"][k] or []
            agree += bool(own) and own[0] == shown
            greedy += _argmax(cands, probs) == _argmax(data.candidates[i], data.probabilities[i])
        times = [cols["ts"][k] for k in ks]
        first, last = min(times), max(times)
        unscored = [data.ts[i] for i, did in enumerate(data.decision_ids) if did not in seen]
        missed = sum(first <= t <= last for t in unscored)
        n = len(rows)
        evaluation = None
        if n >= 2 and model is not None:
            q_model, logged_actions = model
            idx = np.asarray(rows, dtype=np.int64)
            q_target = q_model.expected_ragged(np.array(flat_actions, dtype=object), np.asarray(flat_probs), lengths)
            evaluation = ope.evaluate_policies(
                reward[idx], logged_prob[idx], {version: np.asarray(target)},
                q_logged=q_model.predict(logged_actions[idx]), q_targets={version: q_target}, level=level,
                max_weight=max_weight, reward_range=span)
        reports.append(ShadowVersionReport(
            version, len(seen), n, len(seen) - n, missed, len(unscored) - missed, first, last,
            agree / n if n else math.nan, greedy / n if n else math.nan, evaluation))
    return reports
