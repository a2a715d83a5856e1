"""`OnlineLearner`: one placement's Vowpal Wabbit contextual bandit, learning joined examples and writing
numbered snapshots (each with its numpy-serving sidecar, exported from the live weights).

Learning uses the two-line form (shared + the chosen action with its label): with ``cb_type mtr`` (squarecb's
default) VW updates only the chosen action's regressor, so the other actions add nothing but parse cost.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import vowpalwabbit

from kassa import policies, schemas
from kassa.learn.serving.sidecar import UnsupportedModel, export_live, model_counter, sidecar_path

log = logging.getLogger("kassa.learn")

_LT = vowpalwabbit.LabelType.CONTEXTUAL_BANDIT


def vw_args(placement: schemas.Placement, learning_rate: float = 0.5, extra: str = "") -> str:
    """The VW arguments of a placement's learner: its policy's exploration (`kassa.policies`); placements
    whose policy does not learn get squareCB's, Kassa's default, so a model is ready when they switch."""
    policy = policies.get(placement.policy)
    explore = (policy if policy.learns else policies.get("squarecb")).vw_exploration(placement)
    return f"--cb_explore_adf {explore} -q co -l {learning_rate} -b 20 --quiet {extra}".strip()


class OnlineLearner:
    """One placement's learner: learns joined examples and writes numbered snapshots."""

    def __init__(self, placement: schemas.Placement, model_dir: Path, learning_rate: float = 0.5,
                 extra_args: str = "") -> None:
        self.placement_id = placement.id
        self.dir = model_dir / placement.id
        self.dir.mkdir(parents=True, exist_ok=True)
        self.args = vw_args(placement, learning_rate, extra_args)
        latest = latest_snapshot(self.dir)
        self.seq = latest[0] if latest else 0
        self.learned = int(latest[2].get("learned", 0)) if latest else 0
        self.rewarded_decisions = int(latest[2].get("rewarded_decisions", 0)) if latest else 0
        init = f" -i {latest[1]}" if latest and latest[2].get("args") == self.args else ""
        if latest and not init:
            self.learned = self.rewarded_decisions = 0  # settings changed: start a fresh model
        self.workspace = vowpalwabbit.Workspace(self.args + init, enable_logging=False)
        # VW's squarecb example counter (sets its exploration); the serving copy needs it.
        self.counter = model_counter(latest[1]) if init and latest else 0
        self.learned_since_snapshot = 0
        self.reward_sum = 0.0

    def restart_from(self, path: Path, meta: dict | None = None) -> None:
        """Continue from another model's weights (a promoted or restored version) with this
        learner's settings; counters follow that model's metadata."""
        workspace = vowpalwabbit.Workspace(f"{self.args} -i {path}", enable_logging=False)
        old, self.workspace = self.workspace, workspace
        old.finish()
        self.counter = model_counter(path)
        meta = meta or {}
        self.learned = int(meta.get("learned", self.learned))
        self.rewarded_decisions = int(meta.get("rewarded_decisions", self.rewarded_decisions))
        self.learned_since_snapshot = 0

    def learn(self, shared: str, action: str, reward: float, probability: float) -> None:
        # VW minimises cost; rewards are negated. Probabilities are floored to keep weights bounded.
        p = probability if probability > 1e-4 else 1e-4
        ex = self.workspace.parse([shared, f"0:{-reward:.6g}:{p:.6g}{action}"], _LT)
        try:
            self.workspace.learn(ex)
        finally:
            self.workspace.finish_example(ex)
        self.counter += 1
        self.learned += 1
        self.learned_since_snapshot += 1
        self.reward_sum += reward

    def snapshot(self, keep: int = 5) -> tuple[Path, str]:
        self.seq += 1
        path = self.dir / f"{self.seq:08d}.vw"
        tmp = path.with_suffix(".tmp")
        self.workspace.save(str(tmp))
        os.replace(tmp, path)
        try:  # the serving copy, from the weights in memory (no second load)
            export_live(self.workspace, self.counter, path)
        except UnsupportedModel as why:
            log.info("%s is served by VW itself: %s", path.name, why)
        meta = {"seq": self.seq, "args": self.args, "learned": self.learned,
                "rewarded_decisions": self.rewarded_decisions, "created_at": time.time()}
        path.with_suffix(".json").write_text(json.dumps(meta))
        self.learned_since_snapshot = 0
        for old in sorted(self.dir.glob("*.vw"))[:-keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)
            sidecar_path(old).unlink(missing_ok=True)
        return path, version_name(self.placement_id, self.seq)


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
