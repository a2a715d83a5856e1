"""Batch retraining: a new candidate model for a placement from its logged decisions and joined rewards.

Every shown slot of every closed decision becomes one contextual-bandit example: the shared context line
rebuilt from the logged feature vector, the shown offer's action line, the reward as a cost and the
logged probability of that slot. VW's ``cb_explore_adf`` weights each example by the inverse of that
probability (importance weighting), so offers the logging policy rarely showed count for what they
represent. Examples are written to a text file once and learned by VW's own C++ parser
(``Workspace(... -d file).run_parser()``): ~500k examples/s here against ~15k/s through per-example Python
calls. The trained file is registered as a ``candidate`` with its data range, row count and metrics;
`kassa evaluate` decides whether it may serve.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vowpalwabbit

from kassa import policies, schemas
from kassa.catalog import CatalogSnapshot
from kassa.features.featurize import slot_suffix
from kassa.learn.offline.dataset import LoggedDecisions, load_logged, logged_shared_line
from kassa.learn.online.learner import DEFAULT_LEARNING_RATE, RewardScale, vw_args
from kassa.learn.registry import ModelRegistry, ModelVersion
from kassa.learn.serving.bonus import WeightCounts
from kassa.learn.serving.sidecar import export_ucb, spec_from_args

log = logging.getLogger("kassa.learn")


@dataclass(slots=True)
class TrainResult:
    version: ModelVersion | None
    decisions: int
    examples: int
    skipped_offers: int
    pending: int
    mean_reward: float
    train_loss: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version.version if self.version else None, "decisions": self.decisions,
                "examples": self.examples, "skipped_unknown_offers": self.skipped_offers,
                "pending_decisions": self.pending, "mean_reward": self.mean_reward,
                "train_loss": self.train_loss, "seconds": round(self.seconds, 2)}


def write_examples(data: LoggedDecisions, snap: CatalogSnapshot, path: Path,
                   progress: Callable[[int, int], None] | None = None,
                   scale: float = 1.0, counts: WeightCounts | None = None) -> tuple[int, int, float]:
    """Write VW text examples for every shown slot, rewards divided by ``scale`` (the placement's
    `RewardScale`, as the online learner does); returns (examples, skipped offers, raw reward sum). With
    ``counts`` (a UCB placement), each example is also counted there, as the online learner counts it."""
    lines = snap.action_lines
    inv = 1.0 / scale
    examples = skipped = 0
    reward_sum = 0.0
    n = len(data)
    with open(path, "w", buffering=1 << 20) as f:
        write = f.write
        for i in range(n):
            shared = logged_shared_line(data.features[i])
            for slot, (offer_id, prob, reward) in enumerate(zip(data.chosen[i], data.chosen_probabilities[i],
                                                                data.rewards[i], strict=True)):
                action = lines.get(offer_id)
                if action is None:
                    skipped += 1  # the offer left the catalog: its features are unknown now
                    continue
                p = prob if prob > 1e-4 else 1e-4
                action += data.action_suffix(i, offer_id) + slot_suffix(slot)  # as served; position (learning)
                write(f"{shared}\n0:{-reward * inv:.6g}:{p:.6g}{action}\n\n")
                if counts is not None:
                    counts.add(shared, action)
                examples += 1
                reward_sum += reward
            if progress is not None and i % 10_000 == 0:
                progress(i, n)
    if progress is not None:
        progress(n, n)
    return examples, skipped, reward_sum


def _ucb_counts(placement: schemas.Placement, args: str) -> WeightCounts | None:
    """Empty counts for a UCB placement's examples (`kassa.policies.UCB`), over the scorer settings of its VW
    arguments (read from a workspace: the arguments' short options are VW's to expand)."""
    if not policies.uses_counts(placement.policy):
        return None
    ws = vowpalwabbit.Workspace(args, enable_logging=False)
    try:
        spec = spec_from_args(ws.get_arguments(), 0)
    finally:
        ws.finish()
    return WeightCounts(spec, half_life=float(placement.ucb_half_life))


def train_placement(
    data_dir: Path,
    registry: ModelRegistry,
    snap: CatalogSnapshot,
    placement: schemas.Placement,
    schema_hash: str,
    since: float | None = None,
    until: float | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    extra_args: str = "",
    passes: int = 1,
    progress: Callable[[str, int, int], None] | None = None,
    holdout: float = 0.0,
) -> TrainResult:
    """Train on the closed decisions in ``[since, until)``. With ``holdout`` the newest share of them is
    left out and the recorded training range ends where it starts, so `kassa evaluate` scores the
    candidate on decisions it never saw."""
    t0 = time.perf_counter()

    def product_key(offer_id: str) -> str | None:
        offer = snap.offers.get(offer_id)
        return (offer.product_id or offer.sku) if offer is not None else None

    load_progress = (lambda i, n: progress("join rewards", i, n)) if progress else None
    data = load_logged(data_dir, placement, product_key, since, until, load_progress)
    if holdout > 0.0 and len(data) > 1:
        data, held = data.split(holdout)
        until = held.ts[0] if len(held) else until
    if len(data) == 0:
        return TrainResult(None, 0, 0, 0, data.pending, 0.0, None, time.perf_counter() - t0)
    args = vw_args(placement, learning_rate, extra_args)
    with tempfile.TemporaryDirectory(prefix="kassa-train-") as tmp:
        examples_path = Path(tmp) / "examples.vw"
        write_progress = (lambda i, n: progress("write examples", i, n)) if progress else None
        scale = RewardScale.of(placement.reward, data.rewards)
        counts = _ucb_counts(placement, args)
        examples, skipped, reward_sum = write_examples(data, snap, examples_path, write_progress, scale.scale,
                                                       counts)
        if examples == 0:
            return TrainResult(None, len(data), 0, skipped, data.pending, 0.0, None, time.perf_counter() - t0)
        if progress:
            progress("learn", 0, examples)
        model_path = Path(tmp) / "model.vw"
        extra = f" --passes {passes} -c -k" if passes > 1 else ""
        ws = vowpalwabbit.Workspace(f"{args} -d {examples_path} -f {model_path}{extra}", enable_logging=False)
        try:
            ws.run_parser()
            weighted = ws.get_weighted_examples()
            loss = ws.get_sum_loss() / weighted if weighted else None
        finally:
            ws.finish()  # writes -f
        if counts is not None:  # the sidecar with the counts, beside the file the registry stores
            export_ucb(model_path, placement.ucb_alpha, counts.nonzero())
        if progress:
            progress("learn", examples, examples)
        production = registry.versions(placement.id, ["production"], limit=1)
        ts = data.ts
        mean_reward = reward_sum / examples
        mv = registry.register(
            placement.id, model_path, schema_hash=schema_hash, learner_args=args, source="batch",
            parent=production[0].version if production else None,
            # train_until is exclusive, as `--until` is: just after the last decision trained on. Its own time
            # put that decision into `kassa evaluate`'s default window (from train_until on), scored as unseen.
            train_since=since if since is not None else ts[0],
            train_until=until if until is not None else math.nextafter(ts[-1], math.inf),
            rows=len(data),
            metrics={**scale.state(), "holdout": holdout, "examples": examples,
                     "mean_reward": mean_reward, "train_loss": loss, "rewarded_decisions": len(data),
                     "learned": examples, "skipped_unknown_offers": skipped,
                     "pending_decisions": data.pending},
            reason=f"batch retrain on {len(data)} decisions", actor="train",
        )
    return TrainResult(mv, len(data), examples, skipped, data.pending, mean_reward, loss, time.perf_counter() - t0)
