"""Policies: turn an eligible candidate set into ranked slots, with the probability of every choice.

Every policy speaks one verb, ``slot_pmf(remaining) -> probabilities``; `fill_slots` samples the slots
one after another without replacement and logs each slot's conditional probability, which is exactly
the propensity the learner and off-policy evaluation need. A new policy is one new small class.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(slots=True)
class Ranking:
    chosen: list[int]  # indices into the candidate list, in slot order
    probabilities: list[float]  # the probability with which each slot's candidate was chosen
    scores: list[float]  # the policy's score for each chosen candidate
    explored: bool  # some slot took a candidate other than that slot's greedy choice


class Policy(Protocol):
    def scores(self) -> Sequence[float]: ...
    def slot_pmf(self, remaining: list[int]) -> list[float]: ...
    def sample(self, chosen: set[int], u: float) -> tuple[int, float, int]:
        """Draw the next slot given the ``chosen`` ones and a uniform ``u``: (pick, its probability,
        that slot's greedy pick). Must agree with `slot_pmf` (tests check both)."""
        ...


def _first_free(order: Sequence[int], chosen: set[int]) -> int:
    for i in order:
        if i not in chosen:
            return i
    raise ValueError("no candidate left")


class PmfPolicy:
    """A learner's distribution over candidates, for the first slot and, derived from it, the rest.

    ``later="renormalise"`` (softmax): later slots rescale the remaining mass, i.e. Plackett-Luce.
    ``later="greedy"`` (squareCB, ε-greedy): these put almost all mass on one greedy action and spread
    a thin exploration tail; rescaling the tail would make slots 2+ nearly uniform. Instead each later
    slot keeps the remaining actions' own probabilities and gives the mass of the removed ones to the
    best remaining action, so later slots exploit and explore like the first.

    ``costs`` (the model's estimates the pmf came from, lower is better) order the actions the pmf ties:
    ε-greedy and UCB give every action but the best the same ε/k, and without them slots 2+ went to the
    first-listed candidates, not the next best.
    """

    def __init__(self, pmf: Sequence[float], later: str = "renormalise",
                 costs: Sequence[float] | None = None) -> None:
        self.pmf = pmf
        self.later = later
        self.n = len(pmf)
        if costs is None:
            self.order = sorted(range(self.n), key=pmf.__getitem__, reverse=True)
        else:  # by cost, then (stably) by probability: two sorts on C-level keys, no tuple per action
            self.order = sorted(range(self.n), key=costs.__getitem__)
            self.order.sort(key=pmf.__getitem__, reverse=True)
        self._rank: dict[int, int] | None = None  # action -> place in `order`, built when `slot_pmf` needs it

    def scores(self) -> Sequence[float]:
        return self.pmf

    def slot_pmf(self, remaining: list[int]) -> list[float]:
        pmf = self.pmf
        weights = [pmf[i] for i in remaining]
        total = sum(weights)
        if total <= 0:
            return [1.0 / len(remaining)] * len(remaining)
        if self.later == "greedy" and len(remaining) < self.n:
            rank = self._rank  # the greedy pick of `sample`: the first remaining action in `order`
            if rank is None:
                rank = self._rank = {a: r for r, a in enumerate(self.order)}
            best = min(range(len(remaining)), key=lambda j: rank[remaining[j]])
            weights[best] += 1.0 - total
            return weights
        return [w / total for w in weights]

    def sample(self, chosen: set[int], u: float) -> tuple[int, float, int]:
        pmf = self.pmf
        greedy = _first_free(self.order, chosen)
        total = 1.0 - sum(pmf[i] for i in chosen) if chosen else sum(pmf)
        if total <= 1e-12:  # nothing left with mass: uniform over the rest
            free = [i for i in range(self.n) if i not in chosen]
            pick = free[min(int(u * len(free)), len(free) - 1)]
            return pick, 1.0 / len(free), greedy
        renorm = not chosen or self.later != "greedy"
        scale = 1.0 / total if renorm else 1.0
        extra = 0.0 if renorm else 1.0 - total  # mass of placed candidates, given to the greedy one
        acc = 0.0
        last = greedy
        for i in range(self.n):
            if i in chosen:
                continue
            w = pmf[i] * scale + (extra if i == greedy else 0.0)
            acc += w
            last = i
            if u < acc:
                return i, w, greedy
        return last, pmf[last] * scale + (extra if last == greedy else 0.0), greedy


def pmf_policy(model: Any, shared: str, action_lines: list[str], later: str) -> PmfPolicy:
    """A served model's `PmfPolicy` over these candidates, its ties ordered by the model's costs when it gives
    them (`kassa.learn.serving.linear.LinearModel.ranked`; VW itself gives probabilities only)."""
    ranked = getattr(model, "ranked", None)
    if ranked is not None:
        pmf, costs = ranked(shared, action_lines)
        return PmfPolicy(pmf, later, costs)
    return PmfPolicy(model.pmf(shared, action_lines), later)


class GreedyEpsilonPolicy:
    """Best remaining candidate by a fixed score with probability 1-ε, else uniform (the baseline)."""

    def __init__(self, scores: Sequence[float], epsilon: float) -> None:
        self._scores = scores
        self.epsilon = min(max(epsilon, 0.0), 1.0)
        # Stable: ties keep candidate order, so the greedy pick is the first of the best.
        self.order = sorted(range(len(scores)), key=lambda i: -scores[i])

    def scores(self) -> Sequence[float]:
        return self._scores

    def slot_pmf(self, remaining: list[int]) -> list[float]:
        n = len(remaining)
        share = self.epsilon / n
        probs = [share] * n
        best = max(range(n), key=lambda j: self._scores[remaining[j]])
        probs[best] += 1.0 - self.epsilon
        return probs

    def sample(self, chosen: set[int], u: float) -> tuple[int, float, int]:
        greedy = _first_free(self.order, chosen)
        n_free = len(self._scores) - len(chosen)
        share = self.epsilon / n_free
        if u < 1.0 - self.epsilon:
            return greedy, 1.0 - self.epsilon + share, greedy
        j = min(int((u - (1.0 - self.epsilon)) / self.epsilon * n_free), n_free - 1) if self.epsilon else 0
        pick = [i for i in range(len(self._scores)) if i not in chosen][j]
        return pick, share + (1.0 - self.epsilon if pick == greedy else 0.0), greedy


class UniformPolicy:
    def __init__(self, n: int) -> None:
        self.n = n
        self._scores = [1.0 / n] * n if n else []

    def scores(self) -> Sequence[float]:
        return self._scores

    def slot_pmf(self, remaining: list[int]) -> list[float]:
        return [1.0 / len(remaining)] * len(remaining)

    def sample(self, chosen: set[int], u: float) -> tuple[int, float, int]:
        free = [i for i in range(self.n) if i not in chosen]
        pick = free[min(int(u * len(free)), len(free) - 1)]
        return pick, 1.0 / len(free), pick  # uniform has no greedy choice: never "explored"


def fill_slots(policy: Policy, n_candidates: int, slots: int, rng: random.Random | None = None) -> Ranking:
    """Sample up to ``slots`` distinct candidates; each slot's probability is conditional on the ones
    before it (sampling without replacement)."""
    rand = (rng or random).random
    scores = policy.scores()
    chosen: list[int] = []
    chosen_set: set[int] = set()
    probs: list[float] = []
    explored = False
    for _ in range(min(slots, n_candidates)):
        pick, prob, greedy = policy.sample(chosen_set, rand())
        if pick != greedy:
            explored = True
        chosen.append(pick)
        chosen_set.add(pick)
        probs.append(prob)
    return Ranking(chosen, probs, [float(scores[i]) for i in chosen], explored)
