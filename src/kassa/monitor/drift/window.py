"""Bounded windows: what a drift monitor keeps of a window of decisions and their outcomes.

Windows are bounded summaries (counts, moments and fixed-size reservoir samples), so a monitor's memory
does not grow with traffic: per logged feature (`DecisionRecord.features`) a count table (categorical
features: strings, booleans; list-valued features such as ``cat``, logged joined by ``|``, count each
element) or a reservoir sample (numeric features), a reservoir of the policy's top-slot probabilities
(`decision_score`), counts of its first choices (`decision_action`) and of the model versions that
served, and reward moments per decision and per offer. Caps (``max_features``, ``max_categories``,
``max_offers``, ``sample_size`` in `DriftConfig`) bound each part.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from kassa.monitor.drift.config import ACTION, EMPTY, MISSING, OTHER, DriftConfig


class _Reservoir:
    """Uniform sample of at most ``size`` values of a stream (Vitter's algorithm R)."""

    __slots__ = ("rng", "sample", "seen", "size")

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.rng = rng
        self.sample: list[float] = []
        self.seen = 0

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.sample) < self.size:
            self.sample.append(x)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.sample[j] = x

    def array(self) -> np.ndarray:
        return np.asarray(self.sample, dtype=np.float64)


class Moments:
    __slots__ = ("n", "sq", "sum")

    def __init__(self) -> None:
        self.n = 0
        self.sum = 0.0
        self.sq = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.sum += x
        self.sq += x * x

    @property
    def mean(self) -> float:
        return self.sum / self.n if self.n else 0.0

    @property
    def var(self) -> float:
        if self.n < 2:
            return 0.0
        return max(0.0, (self.sq - self.sum * self.sum / self.n) / (self.n - 1))


FeatureKind = Literal["categorical", "numeric"]


class _Feature:
    __slots__ = ("counts", "kind", "present", "sample")

    def __init__(self, kind: FeatureKind, sample: _Reservoir | None) -> None:
        self.kind = kind
        self.present = 0
        self.counts: dict[str, int] = {}
        self.sample = sample


def _kind_of(value: Any) -> FeatureKind:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "categorical"
    return "numeric"


def _tokens(value: Any) -> list[str]:
    """A categorical value's tokens: a list-valued feature (logged joined by ``|``, see
    `kassa.events.decision_log.loggable_features`) counts each of its elements."""
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, str):
        return value.split("|") if "|" in value else [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tokens(v)] or [EMPTY]
    return [str(value)]


def decision_score(probabilities: Sequence[float] | None) -> float | None:
    """The policy's top-slot probability: the largest probability of the first slot's pmf."""
    if not probabilities:
        return None
    return float(max(probabilities))


def decision_action(candidates: Sequence[str] | None, probabilities: Sequence[float] | None) -> str | None:
    """The policy's first choice: the candidate with the largest first-slot probability (not the sampled
    one, so exploration does not blur it)."""
    if not candidates or not probabilities or len(candidates) != len(probabilities):
        return None
    best = max(range(len(probabilities)), key=probabilities.__getitem__)
    return candidates[best]


class Window:
    """Bounded summary of one window of decisions and outcomes: per-feature counts and reservoir
    samples, a reservoir of scores, and reward moments per decision and per offer."""

    def __init__(self, config: DriftConfig | None = None, seed: int = 0) -> None:
        self.config = config or DriftConfig()
        self._rng = random.Random(seed)
        self._exclude = frozenset(self.config.exclude)
        self.decisions = 0
        self.features: dict[str, _Feature] = {}
        self.scores = _Reservoir(self.config.sample_size, self._rng)
        self.actions = _Feature("categorical", None)  # the policy's first choice per decision
        self.versions: dict[str, int] = {}  # model versions that served the window's decisions
        self.rewards = Moments()  # one value per closed decision: its summed reward
        self.offers: dict[str, Moments] = {}  # one value per shown offer: its reward

    def add_decision(self, features: Mapping[str, Any], score: float | None = None,
                     action: str | None = None, version: str | None = None) -> None:
        """One decision: its logged features, top-slot probability, first choice (see `decision_score`
        and `decision_action`) and the model version that served it."""
        cfg = self.config
        self.decisions += 1
        if version is not None:
            versions = self.versions
            if version in versions:
                versions[version] += 1
            elif len(versions) < cfg.max_categories:
                versions[version] = 1
            else:
                versions[OTHER] = versions.get(OTHER, 0) + 1
        if score is not None and math.isfinite(score):
            self.scores.add(float(score))
        if action is not None:
            self.actions.present += 1
            self._count(self.actions, action)
        for name, value in features.items():
            if value is None or name in self._exclude:
                continue
            f = self.features.get(name)
            if f is None:
                if len(self.features) >= cfg.max_features:
                    continue
                kind = _kind_of(value)
                f = self.features[name] = _Feature(
                    kind, _Reservoir(cfg.sample_size, self._rng) if kind == "numeric" else None)
            if f.kind == "numeric":
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    continue  # a value of another type than the feature's first one: not comparable
                f.present += 1
                f.sample.add(float(value))  # type: ignore[union-attr]
                continue
            f.present += 1
            for tok in _tokens(value):
                self._count(f, tok)

    def _count(self, f: _Feature, token: str) -> None:
        counts = f.counts
        if token in counts:
            counts[token] += 1
        elif len(counts) < self.config.max_categories:
            counts[token] = 1
        else:
            counts[OTHER] = counts.get(OTHER, 0) + 1

    def add_outcome(self, rewards: Sequence[tuple[str, float]]) -> None:
        """One closed decision: ``(offer_id, reward)`` for each offer it showed."""
        total = 0.0
        for offer_id, reward in rewards:
            total += reward
            m = self.offers.get(offer_id)
            if m is None:
                if len(self.offers) >= self.config.max_offers:
                    continue
                m = self.offers[offer_id] = Moments()
            m.add(reward)
        self.rewards.add(total)

    def category_counts(self, name: str) -> dict[str, int]:
        """The feature's value counts, with decisions that lacked it counted as ``__missing__``
        (``action``: the policy's first choices)."""
        f = self.actions if name == ACTION else self.features.get(name)
        counts = dict(f.counts) if f is not None else {}
        missing = self.decisions - (f.present if f is not None else 0)
        if missing > 0:
            counts[MISSING] = counts.get(MISSING, 0) + missing
        return counts

    @property
    def size_bound(self) -> int:
        """Values held, whatever the traffic: reservoirs, category counts and offer moments."""
        held = len(self.scores.sample) + len(self.offers) + len(self.actions.counts) + len(self.versions)
        for f in self.features.values():
            held += len(f.counts) + (len(f.sample.sample) if f.sample is not None else 0)
        return held
