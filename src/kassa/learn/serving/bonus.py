"""UCB's counts (`kassa.policies.UCB`, ADR 0010): how much each hashed weight has learned.

For every example the learner learns (the shown offer's action line with the request's shared line), each of
its action-dependent terms (the action's own features and every interaction with at least one side in the
action line; VW's weights for them are what tell offers apart) adds ``x^2`` to its weight's count ``n``. The
scorer's bonus for an action is ``sqrt(sum over the same terms of x^2 / (1 + n))``: large for an offer (or an
offer in a context) seldom learned, shrinking as its weights learn. It is the diagonal of a ridge regression's
uncertainty, which `bench/offer_reference.py --explore linucb --bonus diagonal` and `bench/offer_vw_ucb.py`
measured before this was built.

Terms of the shared line alone are left out on both sides: they are the same for every action, so they
would add the same to each bonus and change no ranking.
"""

from __future__ import annotations

import numpy as np

from kassa.learn.serving.hashing import Hashing, hashing
from kassa.learn.serving.sidecar import Counts, LinearSpec
from kassa.learn.serving.terms import LineCache, action_terms


def example_terms(hashing_: Hashing, spec: LinearSpec, shared: str, action: str,
                  cache: LineCache | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The weight indices (masked to the table) and squared values of one example's action-dependent terms,
    as `kassa.learn.serving.linear.LinearModel.scores` crosses them (an index may repeat)."""
    idx, val = action_terms(hashing_, spec, shared, action, cache)
    return idx, np.square(val)


class WeightCounts:
    """The learner's counts for one placement: a dense table over the model's hashed weights. With a
    ``half_life`` (in learned examples) older examples count for less, so the bonus grows back for what has not
    been learned lately (after a drift, the offers the policy stopped showing are tried again)."""

    def __init__(self, spec: LinearSpec, counts: Counts | None = None, half_life: float = 0.0) -> None:
        self.spec = spec  # the model's hashing width and interactions, which say what a term is
        self._stored = np.zeros(1 << spec.bits, dtype=np.float64)  # the counts are _stored x _scale
        self._scale = 1.0
        self.half_life = half_life
        self._decay = 0.5 ** (1.0 / half_life) if half_life > 0 else 1.0
        self._hashing = hashing(spec.bits)
        self._lines: LineCache = {}
        if counts is not None and counts[0].size:
            self._stored[counts[0].astype(np.intp) & ((1 << spec.bits) - 1)] = counts[1]

    @property
    def n(self) -> np.ndarray:
        return self._stored * self._scale

    def add(self, shared: str, action: str) -> None:
        if self._decay < 1.0:  # every count decays by one step (kept as one scale: the new terms weigh more)
            self._scale *= self._decay
            if self._scale < 1e-100:
                self._stored *= self._scale
                self._scale = 1.0
        idx, val = example_terms(self._hashing, self.spec, shared, action, self._lines)
        np.add.at(self._stored, idx, val / self._scale)

    def nonzero(self) -> Counts:
        index = np.flatnonzero(self._stored)
        return index.astype(np.uint32), (self._stored[index] * self._scale).astype(np.float32)
