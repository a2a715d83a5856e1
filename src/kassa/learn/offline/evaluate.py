"""`kassa evaluate`: off-policy evaluation of a model version on held-out logged decisions.

The unit is a decision's top slot: its logged offer, the logging policy's probability of it and its
joined reward. Each evaluated model re-scores the logged context over the logged candidates (the same
learner lines the live decision built, rebuilt from the log) and gives the probability it would have
put on the logged offer; the estimators in `kassa.learn.offline.ope` turn those into IPS, SNIPS and DR values
with intervals. Re-scoring is the expensive part (one VW predict per row and model), so rows are split
across worker processes forked after the data is loaded (nothing is pickled but index ranges).

Held-out by default: when the candidate records its training range, only decisions after it count.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kassa.catalog import CatalogSnapshot
from kassa.learn.offline import ope
from kassa.learn.offline.dataset import LoggedDecisions, logged_shared_line
from kassa.learn.serving.vw import VWModel

# Set in the parent right before forking; the workers read it instead of receiving pickled rows.
_WORK: dict[str, Any] = {}


@dataclass(slots=True)
class Scored:
    target_prob: np.ndarray  # probability of the logged top offer under the model
    q_target: np.ndarray  # reward model's expected value under the model (for DR)


def _score_range(model_path: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    data: LoggedDecisions = _WORK["data"]
    lines: dict[str, str] = _WORK["lines"]
    q: dict[str, float] = _WORK["q"]
    q_default: float = _WORK["q_default"]
    model = VWModel(Path(model_path), "eval")
    n = end - start
    target = np.zeros(n)
    q_target = np.zeros(n)
    for j, i in enumerate(range(start, end)):
        cands = [c for c in data.candidates[i] if c in lines]
        logged = data.chosen[i][0]
        if not cands or logged not in lines:
            continue
        pmf = model.pmf(logged_shared_line(data.features[i]), [lines[c] + data.action_suffix(i, c) for c in cands])
        total = 0.0
        for c, p in zip(cands, pmf, strict=True):
            if c == logged:
                target[j] = p
            total += p * q.get(c, q_default)
        q_target[j] = total
    return target, q_target


def score(model_path: Path, data: LoggedDecisions, snap: CatalogSnapshot, q: dict[str, float], q_default: float,
          workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> Scored:
    n = len(data)
    workers = workers or min(os.cpu_count() or 1, 4)
    _WORK.update(data=data, lines=snap.action_lines, q=q, q_default=q_default)
    try:
        if workers <= 1 or n < 20_000:
            target, q_target = _score_range(str(model_path), 0, n)
            if progress:
                progress(n, n)
            return Scored(target, q_target)
        chunk = max(5_000, n // (workers * 8))
        ranges = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
        target = np.zeros(n)
        q_target = np.zeros(n)
        done = 0
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            futures = {pool.submit(_score_range, str(model_path), a, b): (a, b) for a, b in ranges}
            for fut in futures:
                a, b = futures[fut]
                t, qt = fut.result()
                target[a:b] = t
                q_target[a:b] = qt
                done += b - a
                if progress:
                    progress(done, n)
        return Scored(target, q_target)
    finally:
        _WORK.clear()


# Below this ESS the gate refuses: a normal interval is not to be trusted on a handful of effective rows
# (issue 14: the bar for a candidate was an estimate on ESS 5 with a 95 % interval of [-0.09, 1.75]).
MIN_ESS = 100.0


@dataclass(slots=True)
class EvaluationRun:
    evaluation: ope.Evaluation
    gate: ope.GateResult | None
    rows: int
    since: float | None
    until: float | None
    seconds: float
    candidate: str
    baseline: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "baseline": self.baseline, "rows": self.rows, "since": self.since,
                "until": self.until, "seconds": round(self.seconds, 2), "evaluation": self.evaluation.to_dict(),
                "gate": self.gate.to_dict() if self.gate else None}


def evaluate_models(
    data: LoggedDecisions,
    snap: CatalogSnapshot,
    candidate: tuple[str, Path],
    baseline: tuple[str, Path] | None,
    estimator: str = "snips",
    level: float = 0.95,
    margin: float = 0.0,
    rule: ope.GateRule = "lcb_beats_estimate",
    max_weight: float | None = None,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    min_ess: float = MIN_ESS,
) -> tuple[ope.Evaluation, ope.GateResult | None]:
    """Estimates for the candidate, the baseline (production), uniform-random and the logged policy,
    and the gate's verdict of candidate vs baseline. Intervals are clipped to the logged rewards' range
    (with 0); the gate refuses a candidate whose ESS is below ``min_ess``."""
    reward, logged_prob, n_cands = data.top_slot()
    logged_actions = np.array([c[0] for c in data.chosen], dtype=object)
    q_model = ope.MeanRewardModel.fit(logged_actions, reward)
    offers = sorted(snap.action_lines)
    q_values = q_model.predict(np.array(offers, dtype=object)) if offers else np.zeros(0)
    q = {o: float(v) for o, v in zip(offers, q_values, strict=True)}
    q_default = float(q_model.predict(np.array(["\x00unseen"], dtype=object))[0])
    q_logged = q_model.predict(logged_actions)
    targets: dict[str, np.ndarray] = {}
    q_targets: dict[str, np.ndarray] = {}
    for name, path in [candidate] + ([baseline] if baseline else []):
        cb = (lambda i, n, name=name: progress(f"score {name}", i, n)) if progress else None
        scored = score(path, data, snap, q, q_default, workers, cb)
        targets[name] = scored.target_prob
        q_targets[name] = scored.q_target
    # uniform-random's DR term: the mean q over each row's candidates
    q_targets[ope.UNIFORM] = np.array([np.mean([q.get(c, q_default) for c in cands]) if cands else q_default
                                       for cands in data.candidates])
    evaluation = ope.evaluate_policies(
        reward, logged_prob, targets, q_logged=q_logged, q_targets=q_targets, num_candidates=n_cands,
        level=level, max_weight=max_weight,
        reward_range=(min(0.0, float(reward.min())), max(0.0, float(reward.max()))) if len(reward) else None)
    verdict = None
    if baseline is not None:
        verdict = ope.gate(evaluation.estimate(candidate[0], estimator), evaluation.estimate(baseline[0], estimator),
                           margin, rule, min_ess=min_ess)
    return evaluation, verdict

