"""Policies: turn an eligible candidate set into ranked slots, with the probability of every choice.

Every policy speaks one verb, ``slot_pmf(remaining) -> probabilities``; `fill_slots` samples the slots
one after another without replacement and logs each slot's conditional probability, which is exactly
the propensity the learner and off-policy evaluation need. A new policy is one new small class.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Ranking:
    chosen: list[int]  # indices into the candidate list, in slot order
    probabilities: list[float]  # the probability with which each slot's candidate was chosen
    scores: list[float]  # the policy's score for each chosen candidate
    explored: bool  # some slot took a candidate other than that slot's greedy choice


class Policy(Protocol):
    def scores(self) -> Sequence[float]: ...
    def slot_pmf(self, remaining: list[int]) -> list[float]: ...


class PmfPolicy:
    """A learner's distribution over candidates, for the first slot and, derived from it, the rest.

    ``later="renormalise"`` (softmax): later slots rescale the remaining mass, i.e. Plackett-Luce.
    ``later="greedy"`` (squareCB, ε-greedy): these put almost all mass on one greedy action and spread
    a thin exploration tail; rescaling the tail would make slots 2+ nearly uniform. Instead each later
    slot keeps the remaining actions' own probabilities and gives the mass of the removed ones to the
    best remaining action, so later slots exploit and explore like the first.
    """

    def __init__(self, pmf: Sequence[float], later: str = "renormalise") -> None:
        self.pmf = pmf
        self.later = later
        self.n = len(pmf)

    def scores(self) -> Sequence[float]:
        return self.pmf

    def slot_pmf(self, remaining: list[int]) -> list[float]:
        pmf = self.pmf
        weights = [pmf[i] for i in remaining]
        total = sum(weights)
        if total <= 0:
            return [1.0 / len(remaining)] * len(remaining)
        if self.later == "greedy" and len(remaining) < self.n:
            best = max(range(len(weights)), key=weights.__getitem__)
            weights[best] += 1.0 - total
            return weights
        return [w / total for w in weights]


class GreedyEpsilonPolicy:
    """Best remaining candidate by a fixed score with probability 1-ε, else uniform (the baseline)."""

    def __init__(self, scores: Sequence[float], epsilon: float) -> None:
        self._scores = scores
        self.epsilon = min(max(epsilon, 0.0), 1.0)

    def scores(self) -> Sequence[float]:
        return self._scores

    def slot_pmf(self, remaining: list[int]) -> list[float]:
        n = len(remaining)
        share = self.epsilon / n
        probs = [share] * n
        best = max(range(n), key=lambda j: self._scores[remaining[j]])
        probs[best] += 1.0 - self.epsilon
        return probs


class UniformPolicy:
    def __init__(self, n: int) -> None:
        self._scores = [1.0 / n] * n if n else []

    def scores(self) -> Sequence[float]:
        return self._scores

    def slot_pmf(self, remaining: list[int]) -> list[float]:
        return [1.0 / len(remaining)] * len(remaining)


def fill_slots(policy: Policy, n_candidates: int, slots: int, rng: random.Random | None = None) -> Ranking:
    """Sample up to ``slots`` distinct candidates; each slot's probability is conditional on the ones
    before it (sampling without replacement)."""
    rand = (rng or random).random
    remaining = list(range(n_candidates))
    scores = policy.scores()
    chosen: list[int] = []
    probs: list[float] = []
    explored = False
    for _ in range(min(slots, n_candidates)):
        pmf = policy.slot_pmf(remaining)
        u = rand()
        acc = 0.0
        pick = len(pmf) - 1
        for j, p in enumerate(pmf):
            acc += p
            if u < acc:
                pick = j
                break
        greedy = max(range(len(pmf)), key=pmf.__getitem__)
        if pmf[pick] < pmf[greedy]:
            explored = True
        chosen.append(remaining[pick])
        probs.append(pmf[pick])
        del remaining[pick]
    return Ranking(chosen, probs, [float(scores[i]) for i in chosen], explored)
