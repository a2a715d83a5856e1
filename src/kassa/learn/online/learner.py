"""`OnlineLearner`: one placement's Vowpal Wabbit contextual bandit, learning joined examples and writing
numbered snapshots (each with its numpy-serving sidecar, exported from the live weights).

Rewards reach VW on a known scale (`RewardScale`, ADR 0010): divided by the largest fixed event weight, or
for value-weighted rewards by the mean non-zero reward seen so far, so a typical outcome is worth about 1.
Without it a value-weighted placement fed costs down to -30 and squareCB's gamma, which is tuned for costs
in [-1, 0], turned the policy nearly greedy (issue 14: mean slot-1 probability 0.98).

Learning uses the two-line form (shared + the chosen action with its label): with ``cb_type mtr`` (squarecb's
default) VW updates only the chosen action's regressor, so the other actions add nothing but parse cost. The
label's probability is 1, so that update is a plain (not importance-weighted) regression (`OnlineLearner.learn`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zipfile
from pathlib import Path

import pylibvw
import vowpalwabbit

from kassa import policies, schemas
from kassa.learn.online.ridge import SUFFIX as RIDGE_SUFFIX
from kassa.learn.online.ridge import RidgeRefit
from kassa.learn.serving.bonus import WeightCounts
from kassa.learn.serving.sidecar import (
    LinearSpec,
    SidecarError,
    UnsupportedModel,
    export_live,
    model_counter,
    read_sidecar_counts,
    sidecar_path,
    spec_from_args,
)

log = logging.getLogger("kassa.learn")

# VW -l of every learner unless settings say otherwise (`learn.learning_rate` has the same default); 0.5 before
# ADR 0010's offer-world addendum
DEFAULT_LEARNING_RATE = 0.1

_learn_multi = pylibvw.vw.learn_multi
_finish_multi = pylibvw.vw._finish_example_multi_ex


def vw_args(placement: schemas.Placement, learning_rate: float = DEFAULT_LEARNING_RATE, extra: str = "") -> str:
    """The VW arguments of a placement's learner: its policy's exploration (`kassa.policies`); placements
    whose policy does not learn get squareCB's, Kassa's default, so a model is ready when they switch."""
    policy = policies.get(placement.policy)
    explore = (policy if policy.learns else policies.get("squarecb")).vw_exploration(placement)
    return f"--cb_explore_adf {explore} -q co -q bk --ignore_linear b -l {learning_rate} -b 20 --quiet {extra}".strip()


class RewardScale:
    """What a placement's rewards are divided by before VW sees them (see the module docstring).

    Fixed weights only (accept 1, click 0.1): the largest weight, so a typical outcome is 1 as before.
    With ``value`` weights: the mean absolute non-zero reward seen so far (1 until the first one), so a
    typical outcome is again about 1 whatever the store's currency and basket size. The cap is not the
    divisor: it clips outliers and is usually far above a typical reward (a cap of 50 made an accept worth
    0.02 and squareCB explored most of the time).
    """

    def __init__(self, definition: schemas.RewardDefinition, mean: float = 0.0, n: int = 0) -> None:
        numeric = [abs(w) for w in definition.weights.values() if w != "value"]
        self.by_value = any(w == "value" for w in definition.weights.values())
        self.fixed = 1.0 if self.by_value or not numeric or max(numeric) <= 0 else max(numeric)
        self.mean = mean
        self.n = n

    @property
    def scale(self) -> float:
        return self.mean if self.by_value and self.n and self.mean > 0 else self.fixed

    def __call__(self, reward: float) -> float:
        if self.by_value and reward != 0.0:
            self.n += 1
            self.mean += (abs(reward) - self.mean) / self.n
        return reward / self.scale

    def state(self) -> dict[str, float]:
        return {"reward_scale": self.scale, "reward_scale_mean": self.mean, "reward_scale_n": self.n}

    @classmethod
    def restore(cls, definition: schemas.RewardDefinition, meta: dict) -> RewardScale:
        return cls(definition, float(meta.get("reward_scale_mean", 0.0)), int(meta.get("reward_scale_n", 0)))

    @classmethod
    def of(cls, definition: schemas.RewardDefinition, rewards: list[list[float]]) -> RewardScale:
        """The scale batch training uses: the same rule over the logged rewards."""
        nonzero = [abs(r) for rs in rewards for r in rs if r != 0.0]
        return cls(definition, sum(nonzero) / len(nonzero) if nonzero else 0.0, len(nonzero))


class OnlineLearner:
    """One placement's learner: learns joined examples and writes numbered snapshots."""

    def __init__(self, placement: schemas.Placement, model_dir: Path, learning_rate: float = DEFAULT_LEARNING_RATE,
                 extra_args: str = "") -> None:
        self.placement_id = placement.id
        self.dir = model_dir / placement.id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = vw_args(placement, learning_rate, extra_args)
        latest = latest_snapshot(self.dir)
        self.seq = latest[0] if latest else 0
        self.learned = int(latest[2].get("learned", 0)) if latest else 0
        self.rewarded_decisions = int(latest[2].get("rewarded_decisions", 0)) if latest else 0
        # the lineage's sum of learned rewards (raw, before the reward scale): with `rewarded_decisions`, what
        # an operator (or a fault test) compares with the logs to see every reward joined once
        self.reward_sum = float(latest[2].get("reward_sum", 0.0)) if latest else 0.0
        self.ucb_alpha = placement.ucb_alpha if policies.uses_counts(placement.policy) else None
        # the same VW arguments and the same kind of model (a UCB model's counts come with its weights)
        same = latest is not None and latest[2].get("args") == self.args and \
            latest[2].get("ucb", False) == (self.ucb_alpha is not None)
        init = f" -i {latest[1]}" if latest and same else ""
        if latest and not init:
            self.learned = self.rewarded_decisions = 0  # settings changed: start a fresh model
            self.reward_sum = 0.0
        self.workspace = vowpalwabbit.Workspace(self.args + init, enable_logging=False)
        # VW's squarecb example counter (sets its exploration); the serving copy needs it.
        self.counter = model_counter(latest[1]) if init and latest else 0
        self.learned_since_snapshot = 0
        self.definition = placement.reward
        self.scale = RewardScale.restore(placement.reward, latest[2] if init and latest else {})
        self.counts: WeightCounts | None = None
        if self.ucb_alpha is not None:
            spec = spec_from_args(self.workspace.get_arguments(), 0)
            self.counts = _counts_of(latest[1] if init and latest else None, spec, float(placement.ucb_half_life))
        self.ridge: RidgeRefit | None = None
        if placement.regression == "ridge":
            try:
                ridge_spec = spec_from_args(self.workspace.get_arguments(), 0)
            except UnsupportedModel as why:
                log.warning("%s: regression ridge needs a model the linear scorer reproduces (%s); VW's online "
                            "regression serves", placement.id, why)
            else:
                self.ridge = _ridge_of(latest[1] if init and latest else None, ridge_spec,
                                       float(placement.ridge_half_life))

    def restart_from(self, path: Path, meta: dict | None = None) -> None:
        """Continue from another model's weights (a promoted or restored version) with this
        learner's settings; counters follow that model's metadata."""
        workspace = vowpalwabbit.Workspace(f"{self.args} -i {path}", enable_logging=False)
        old, self.workspace = self.workspace, workspace
        old.finish()
        self.counter = model_counter(path)
        if self.counts is not None:
            self.counts = _counts_of(Path(path), self.counts.spec, self.counts.half_life)
        if self.ridge is not None:  # another lineage's weights: the exact fit starts again from its next examples
            self.ridge = RidgeRefit(self.ridge.spec, half_life=self.ridge.half_life)
        meta = meta or {}
        self.learned = int(meta.get("learned", self.learned))
        self.rewarded_decisions = int(meta.get("rewarded_decisions", self.rewarded_decisions))
        self.reward_sum = float(meta.get("reward_sum", self.reward_sum))
        if "reward_scale_n" in meta:
            self.scale = RewardScale.restore(self.definition, meta)
        self.learned_since_snapshot = 0

    def learn(self, shared: str, action: str, reward: float, probability: float) -> None:
        """Learn one shown offer's outcome. VW minimises cost: rewards are normalised, then negated.

        ``probability`` (what the offer was shown with) is not an importance weight here: the label carries 1,
        so the chosen action's regressor learns its reward unweighted, as SquareCB's regression oracle
        assumes (VW's ``--cb_type dm``, which ``--squarecb`` refuses; ``mtr`` with probability 1 is the same
        update). Weighted by 1/p, one explored offer shown at p ~ 0.005 moved its estimate 200 times as far
        as a chosen one, and the policy chased those jumps: ADR 0010's addendum on the offer world. (This
        also covers the product placements' earlier clip of weights at 20.)

        pylibvw's own parse/learn/finish on the native examples: pyvw's `parse` wraps each line in a Python
        `Example` (label-type lookups, attributes) that learning never reads; same model bytes
        (tests/test_linear.py), ~9 instead of ~15 µs per example, 3 examples per decision in `kassa learn`."""
        del probability  # kept in the signature: callers pass what was logged
        ws = self.workspace
        cost = f"{-self.scale(reward):.6g}"  # the label as VW reads it; the exact fit learns the same number
        ec = ws._parse(f"{shared}\n0:{cost}:1{action}")
        try:
            _learn_multi(ws, ec)
        finally:
            _finish_multi(ws, ec)
        if self.counts is not None:
            self.counts.add(shared, action)
        if self.ridge is not None:
            self.ridge.add(shared, action, float(cost))
        self.counter += 1
        self.learned += 1
        self.learned_since_snapshot += 1
        self.reward_sum += reward

    def snapshot(self, keep: int = 5) -> tuple[Path, str]:
        self.seq += 1
        path = self.dir / f"{self.seq:08d}.vw"
        tmp = path.with_suffix(".tmp")
        exact = self.ridge is not None and self.ridge.apply(self.workspace)
        self.workspace.save(str(tmp))
        os.replace(tmp, path)
        try:  # the serving copy, from the weights in memory (no second load)
            ucb = None if self.counts is None or self.ucb_alpha is None else (self.ucb_alpha, self.counts.nonzero())
            export_live(self.workspace, self.counter, path, ucb)
        except UnsupportedModel as why:
            log.info("%s is served by VW itself: %s", path.name, why)
        meta = {"seq": self.seq, "args": self.args, "learned": self.learned,
                "rewarded_decisions": self.rewarded_decisions, "reward_sum": self.reward_sum, "created_at": time.time(),
                "ucb": self.counts is not None, **self.scale.state()}
        if self.ridge is not None:
            self.ridge.save(path.with_suffix(RIDGE_SUFFIX))
            meta.update(regression="ridge", ridge_exact=exact, ridge_terms=len(self.ridge.terms))
        path.with_suffix(".json").write_text(json.dumps(meta))
        self.learned_since_snapshot = 0
        for old in sorted(self.dir.glob("*.vw"))[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
            sidecar_path(old).unlink(missing_ok=True)
            old.with_suffix(RIDGE_SUFFIX).unlink(missing_ok=True)
        return path, version_name(self.placement_id, self.seq)


def _counts_of(model: Path | None, spec: LinearSpec, half_life: float) -> WeightCounts:
    """A UCB learner's counts, continued from ``model``'s sidecar when it has them (else from zero, logged)."""
    if model is None:
        return WeightCounts(spec, half_life=half_life)
    try:
        counts = read_sidecar_counts(sidecar_path(model))[3]
    except SidecarError as why:
        counts = None
        log.warning("UCB counts of %s unreadable (%s): counting again from zero", model.name, why)
    else:
        if counts is None:
            log.warning("%s has no UCB counts (not a UCB model): counting from zero", model.name)
    return WeightCounts(spec, counts, half_life)


def _ridge_of(model: Path | None, spec: LinearSpec, half_life: float) -> RidgeRefit:
    """A ridge learner's normal equations, continued from ``model``'s when it saved them (else from zero)."""
    saved = None if model is None else model.with_suffix(RIDGE_SUFFIX)
    if saved is None or not saved.exists():
        return RidgeRefit(spec, half_life=half_life)
    try:
        return RidgeRefit.load(saved, spec, half_life=half_life)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as why:
        log.warning("ridge state of %s unreadable (%s): fitting again from the next examples", model, why)
        return RidgeRefit(spec, half_life=half_life)


def version_name(placement_id: str, seq: int) -> str:
    return f"{placement_id}@{seq}"


_SNAP = re.compile(r"^(\d{8})\.vw$")


def latest_snapshot(directory: Path) -> tuple[int, Path, dict] | None:
    """The newest complete snapshot in a placement's model folder (model file and its metadata)."""
    if not directory.exists():
        return None
    for path in sorted(directory.glob("*.vw"), reverse=True):
        m = _SNAP.match(path.name)
        meta_path = path.with_suffix(".json")
        if m and meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                continue
            return int(m.group(1)), path, meta
    return None
