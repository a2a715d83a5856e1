"""`kassa evaluate`: off-policy evaluation of a model version on held-out logged decisions.

The unit is a decision's top slot: its logged offer, the logging policy's probability of it and its
joined reward. Each evaluated model re-scores the logged context over the logged candidates (the same
learner lines the live decision built, rebuilt from the log) and gives the probability it would have
put on the logged offer; the estimators in `kassa.learn.offline.ope` turn those into IPS, SNIPS and DR values
with intervals. Each model scores as it would serve (`kassa.learn.serving.loader.load_serving`: the numpy
scorer, with a UCB model's bonus, or VW itself). Re-scoring is the expensive part (one predict per row and
model), so rows are split across worker processes forked after the data is loaded (nothing is pickled but
index ranges).

Held-out by default: when the candidate records its training range, only decisions after it count.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kassa.catalog import CatalogSnapshot
from kassa.decide.policy import pmf_policy
from kassa.learn.offline import ope
from kassa.learn.offline.dataset import LoggedDecisions, logged_shared_line
from kassa.learn.serving.loader import ServingModel, load_serving

# Set in the parent right before forking; the workers read it instead of receiving pickled rows.
_WORK: dict[str, Any] = {}


@dataclass(slots=True)
class Scored:
    target_prob: np.ndarray  # probability of the logged top offer under the model
    q_target: np.ndarray  # reward model's expected value under the model (for DR)


def _row_lines(data: LoggedDecisions, lines: dict[str, str], i: int) -> tuple[list[str], str, list[str]]:
    """Row ``i``'s logged candidates the catalog still describes, its shared line and their action lines (the
    same learner lines the live decision built, rebuilt from the log), in the logged candidates' order."""
    suffixes = data.action_suffixes(i)
    if suffixes is None:
        cands = [c for c in data.candidates[i] if c in lines]
        return cands, logged_shared_line(data.features[i]), [lines[c] for c in cands]
    kept = [(c, suffix) for c, suffix in zip(data.candidates[i], suffixes, strict=True) if c in lines]
    return [c for c, _ in kept], logged_shared_line(data.features[i]), [lines[c] + suffix for c, suffix in kept]


def _row_pmf(model: ServingModel, data: LoggedDecisions, lines: dict[str, str],
             i: int) -> tuple[list[str], list[float]]:
    """The model's probability for each of `_row_lines`' candidates."""
    cands, shared, action_lines = _row_lines(data, lines, i)
    return (cands, model.pmf(shared, action_lines)) if cands else ([], [])


def _score_range(model_path: str, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    data: LoggedDecisions = _WORK["data"]
    lines: dict[str, str] = _WORK["lines"]
    q: dict[str, float] = _WORK["q"]
    q_default: float = _WORK["q_default"]
    model = load_serving(Path(model_path), "eval")  # what would serve it (a UCB model's bonus included)
    n = end - start
    target = np.zeros(n)
    q_target = np.zeros(n)
    for j, i in enumerate(range(start, end)):
        logged = data.chosen[i][0]
        if logged not in lines:
            continue
        cands, pmf = _row_pmf(model, data, lines, i)
        if not cands:
            continue
        total = 0.0
        for c, p in zip(cands, pmf, strict=True):
            if c == logged:
                target[j] = p
            total += p * q.get(c, q_default)
        q_target[j] = total
    return target, q_target


def _over_rows(fn: Callable[[str, int, int], Any], model_path: Path, n: int, workers: int,
               progress: Callable[[int, int], None] | None) -> Iterator[tuple[int, int, Any]]:
    """``fn(model_path, a, b)`` over rows ``[0, n)`` (the caller has filled `_WORK`): in this process below
    20,000 rows or with one worker, else in chunks on forked workers. Yields ``(a, b, result)`` in row order
    and reports progress as chunks finish."""
    if workers <= 1 or n < 20_000:
        result = fn(str(model_path), 0, n)
        if progress:
            progress(n, n)
        yield 0, n, result
        return
    load_serving(Path(model_path), "eval")  # exports a missing sidecar here, not in every worker at once
    chunk = max(5_000, n // (workers * 8))
    ranges = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    done = 0
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        futures = {pool.submit(fn, str(model_path), a, b): (a, b) for a, b in ranges}
        for fut in futures:
            a, b = futures[fut]
            result = fut.result()
            done += b - a
            if progress:
                progress(done, n)
            yield a, b, result


def score(model_path: Path, data: LoggedDecisions, snap: CatalogSnapshot, q: dict[str, float], q_default: float,
          workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> Scored:
    n = len(data)
    _WORK.update(data=data, lines=snap.action_lines, q=q, q_default=q_default)
    try:
        target = np.zeros(n)
        q_target = np.zeros(n)
        for a, b, (t, qt) in _over_rows(_score_range, model_path, n, workers or min(os.cpu_count() or 1, 4),
                                        progress):
            target[a:b] = t
            q_target[a:b] = qt
        return Scored(target, q_target)
    finally:
        _WORK.clear()


# Below this ESS the gate refuses: a normal interval is not to be trusted on a handful of effective rows
# (issue 14: the bar for a candidate was an estimate on ESS 5 with a 95 % interval of [-0.09, 1.75]).
MIN_ESS = 100.0


def top_slot_reward_model(data: LoggedDecisions, reward: np.ndarray) -> tuple[ope.MeanRewardModel, np.ndarray]:
    """DR's reward model (each offer's mean top-slot reward over the window's decisions) and each row's logged
    top offer; ``reward`` is `LoggedDecisions.top_slot`'s."""
    logged_actions = np.array([c[0] for c in data.chosen], dtype=object)
    return ope.MeanRewardModel.fit(logged_actions, reward), logged_actions


def reward_range(reward: np.ndarray) -> tuple[float, float] | None:
    """What every policy's value lies in (the logged rewards' range, with 0): intervals are clipped to it."""
    return (min(0.0, float(reward.min())), max(0.0, float(reward.max()))) if len(reward) else None


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
    q_model, logged_actions = top_slot_reward_model(data, reward)
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
        level=level, max_weight=max_weight, reward_range=reward_range(reward))
    verdict = None
    if baseline is not None:
        verdict = ope.gate(evaluation.estimate(candidate[0], estimator), evaluation.estimate(baseline[0], estimator),
                           margin, rule, min_ess=min_ess)
    return evaluation, verdict



# ---------------------------------------------------------------------------------------------- slates
# `kassa evaluate --slate`: the whole slate's reward (every shown slot), by the pseudo-inverse estimator.

class NoUniformRows(ValueError):
    """No logged decision of the window qualifies for the pseudo-inverse estimator."""


@dataclass(slots=True)
class UniformSlates:
    """The rows a uniform slate policy logged, as PI reads them: each row's logged slate as candidate indices,
    its number of candidates and its whole slate's reward (and each slot's, for `ope.slot_ips`); and how many
    rows were left out, and why."""

    rows: list[int]
    logged: np.ndarray  # (n, slots) candidate indices
    n_candidates: np.ndarray  # (n,)
    reward: np.ndarray  # (n,) sum over the shown slots
    left_out: dict[str, int]
    slot_reward: np.ndarray  # (n, slots) each shown slot's reward


def uniform_slate_rows(data: LoggedDecisions, slots: int) -> UniformSlates:
    """Rows whose ``slots`` shown offers a uniform slate policy drew: slot ``j``'s logged probability is
    ``1/(m - j)`` with ``m`` the row's number of logged candidates (Kassa's ``policy: uniform``). Others are
    left out and counted: a fallback answer, another number of shown offers, other probabilities (a learned
    or baseline policy), a shown offer not among the candidates, fewer than 2 candidates."""
    left = {"fallback": 0, "other_slot_count": 0, "not_uniform": 0, "shown_not_candidate": 0, "too_few_candidates": 0}
    rows: list[int] = []
    logged: list[list[int]] = []
    m: list[int] = []
    reward: list[list[float]] = []
    for i in range(len(data)):
        cands, shown, probs = data.candidates[i], data.chosen[i], data.chosen_probabilities[i]
        if data.fallback[i]:
            left["fallback"] += 1
            continue
        if len(shown) != slots:
            left["other_slot_count"] += 1
            continue
        k = len(cands)
        if k < 2:
            left["too_few_candidates"] += 1
            continue
        if any(abs(p * (k - j) - 1.0) > 1e-6 for j, p in enumerate(probs)):
            left["not_uniform"] += 1
            continue
        pos = {c: j for j, c in enumerate(cands)}
        if any(o not in pos for o in shown):
            left["shown_not_candidate"] += 1
            continue
        rows.append(i)
        logged.append([pos[o] for o in shown])
        m.append(k)
        reward.append(data.rewards[i])
    per_slot = np.asarray(reward, dtype=np.float64).reshape(len(rows), slots)
    return UniformSlates(rows, np.asarray(logged, dtype=np.int64).reshape(len(rows), slots),
                         np.asarray(m, dtype=np.int64), per_slot.sum(axis=1), left, per_slot)


def slot_keys(data: LoggedDecisions, rows: list[int], slates: np.ndarray) -> np.ndarray:
    """The key `ope.cross_fit_slot_model` groups each slate item by: its logged retrieval signals (why and how
    strongly it was retrieved, its rank bucket included) when the decision logged them, else its offer id."""
    out = []
    for i, slate in zip(rows, slates, strict=True):
        cands, sig = data.candidates[i], data.signals[i] if i < len(data.signals) else None
        out.append([sig[c] if sig else cands[c] for c in slate])
    return np.asarray(out, dtype=str).reshape(slates.shape)


def _slate_range(model_path: str, start: int, end: int) -> np.ndarray:
    """The model's deterministic slate on rows ``_WORK["rows"][start:end]``: its ``slots`` most probable
    candidates, most probable first (ties by the model's costs, else in logged-candidate order: the live
    greedy order of `kassa.decide.policy.PmfPolicy`), as indices into the row's logged candidates; -1 where the
    catalog no longer describes enough of them."""
    data: LoggedDecisions = _WORK["data"]
    lines: dict[str, str] = _WORK["lines"]
    rows: list[int] = _WORK["rows"]
    slots: int = _WORK["slots"]
    model = load_serving(Path(model_path), "eval")  # what would serve it (a UCB model's bonus included)
    out = np.full((end - start, slots), -1, dtype=np.int64)
    for j, i in enumerate(rows[start:end]):
        cands, shared, action_lines = _row_lines(data, lines, i)
        if len(cands) < slots:
            continue
        pos = {c: k for k, c in enumerate(data.candidates[i])}
        order = pmf_policy(model, shared, action_lines, "greedy").order[:slots]
        out[j] = [pos[cands[k]] for k in order]
    return out


def slates(model_path: Path, data: LoggedDecisions, snap: CatalogSnapshot, rows: list[int], slots: int,
           workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """`_slate_range` over ``rows``, split across forked workers like `score`."""
    n = len(rows)
    _WORK.update(data=data, lines=snap.action_lines, rows=rows, slots=slots)
    try:
        out = np.full((n, slots), -1, dtype=np.int64)
        for a, b, part in _over_rows(_slate_range, model_path, n, workers or min(os.cpu_count() or 1, 4),
                                     progress):
            out[a:b] = part
        return out
    finally:
        _WORK.clear()


@dataclass(slots=True)
class SlateEvaluation:
    evaluation: ope.Evaluation  # PI per model, the logged policy's observed mean slate reward
    gate: ope.GateResult | None
    slots: int
    considered: int  # rows of the window
    left_out: dict[str, int]  # rows not evaluated, by reason

    def to_dict(self) -> dict[str, Any]:
        return {"slots": self.slots, "rows": self.evaluation.n, "considered": self.considered,
                "left_out": dict(self.left_out), "evaluation": self.evaluation.to_dict(),
                "gate": self.gate.to_dict() if self.gate else None}


def evaluate_slates(
    data: LoggedDecisions,
    snap: CatalogSnapshot,
    candidate: tuple[str, Path],
    baseline: tuple[str, Path] | None,
    slots: int,
    level: float = 0.95,
    margin: float = 0.0,
    rule: ope.GateRule = "lcb_beats_estimate",
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    min_ess: float = MIN_ESS,
) -> SlateEvaluation:
    """The pseudo-inverse estimate of each model's whole-slate reward (its greedy top-``slots`` ranking over
    each row's logged candidates, no exploration) on the rows a uniform slate policy logged, beside the
    per-slot doubly robust estimate (`ope.slot_ips` with `cross_fit_slot_model` keyed by `slot_keys`: a
    narrower interval, under the stronger assumption that a slot's reward depends on its own offer alone) and
    the logged policy's observed mean slate reward; the gate's verdict of candidate vs baseline on the PI
    estimates (refused below ``min_ess``). Raises `NoUniformRows` when no row qualifies."""
    found = uniform_slate_rows(data, slots)
    if not found.rows:
        reasons = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in found.left_out.items() if v)
        raise NoUniformRows(
            f"none of the {len(data):,} decisions was logged by a uniform slate policy showing {slots} offers "
            f"({reasons}); the pseudo-inverse estimator needs uniformly logged slates (slot j's probability "
            "1/(m - j) over m candidates), e.g. traffic of a placement with `policy: uniform`")
    left = dict(found.left_out)
    targets: dict[str, np.ndarray] = {}
    for name, path in [candidate] + ([baseline] if baseline else []):
        cb = (lambda i, n, name=name: progress(f"slates {name}", i, n)) if progress else None
        targets[name] = slates(path, data, snap, found.rows, slots, workers, cb)
    keep = np.ones(len(found.rows), dtype=bool)
    for t in targets.values():
        keep &= (t >= 0).all(axis=1)
    left["unscorable"] = int((~keep).sum())  # the catalog no longer describes enough of the candidates
    if not keep.any():
        raise NoUniformRows(f"none of the {len(found.rows):,} uniformly logged decisions has {slots} candidates "
                            "the catalog still describes; the model cannot rank them")
    if keep.sum() < 2:  # one row was an OPEInputError traceback ("need at least 2 logged rows"), as the top slot's
        reasons = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in left.items() if v)
        raise NoUniformRows(
            f"only 1 of the {len(data):,} decisions was logged by a uniform slate policy showing {slots} offers that "
            f"the model can rank ({reasons or 'none left out'}); an interval needs at least 2: widen the window "
            "(--since, or train with --holdout 0.2 to keep decisions for it)")
    r, rs = found.reward[keep], found.slot_reward[keep]
    logged, m = found.logged[keep], found.n_candidates[keep]
    rows = [row for row, k in zip(found.rows, keep, strict=True) if k]
    reward_range = (min(0.0, float(r.min())), max(0.0, float(r.max())))
    logged_keys = slot_keys(data, rows, logged)
    policies: dict[str, ope.PolicyEvaluation] = {}
    for name, t in targets.items():
        est = ope.pseudo_inverse(r, t[keep], logged, m, level, reward_range)
        g_t, g_l = ope.cross_fit_slot_model(rs, logged_keys, slot_keys(data, rows, t[keep]))
        slot = ope.slot_ips(rs, t[keep], logged, m, level, reward_range, g_target=g_t, g_logged=g_l)
        policies[name] = ope.PolicyEvaluation(name, {"pseudo_inverse": est, "slot_dr": slot})
    policies[ope.LOGGED] = ope.PolicyEvaluation(ope.LOGGED, {ope.ON_POLICY: ope.on_policy(r, level=level)})
    evaluation = ope.Evaluation(int(r.shape[0]), level, "normal", None, ("pseudo_inverse", "slot_dr"), policies,
                                float(r.mean()))
    verdict = None
    if baseline is not None:
        verdict = ope.gate(evaluation.estimate(candidate[0], "pseudo_inverse"),
                           evaluation.estimate(baseline[0], "pseudo_inverse"), margin, rule, min_ess=min_ess)
    return SlateEvaluation(evaluation, verdict, slots, len(data), left)
