"""The policy table: every policy a placement can name, and everything that differs between them, in one place.

A row says whether the policy learns, the Vowpal Wabbit arguments of its exploration, how slots after the
first are sampled from the first slot's distribution, and whether the numpy scorer reproduces its
exploration rule (ADR 0005) or VW itself must serve it. The placement schema, the decision engine, the
online learner and the numpy scorer all read this table, so a new policy is one new class here (or in any
module that calls `register`) and nothing else::

    @register
    class Greedy(PlacementPolicy):
        name = "greedy"
        vw_flag = "first"

        def vw_exploration(self, placement): return "--first 1"
        def explore(self, scores, spec): ...

The module imports nothing of Kassa's, so the lowest layer (``schemas``) may read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

LaterSlots = Literal["greedy", "renormalise"]
OptionReader = Callable[[str, float], float]  # (VW option name, default) -> its value in a model's arguments


class UnsupportedModel(Exception):
    """The VW settings include something the numpy scorer does not reproduce; serve with VW."""


class PlacementPolicy:
    """One row of the table. Subclasses set the class attributes and override the methods that differ.

    ``learns``: served from a learned model once the placement has enough rewarded decisions (the baseline
    serves before); a policy that does not learn serves its own ranking and its log only feeds training.
    ``later_slots``: how slots 2+ follow from slot 1's distribution (see `kassa.decide.policy.PmfPolicy`).
    ``vw_flag``: the VW option that names this exploration in a model's arguments; the policy without one
    is what a model with none of the flags is read as.
    ``numpy_scorer``: `kassa.learn.serving.linear.LinearModel` reproduces `explore`; False means VW serves.
    ``uses_counts``: the learner keeps per-weight counts of what it learned and exports them with the weights
    (`kassa.learn.serving.bonus`); the scorer adds an uncertainty bonus from them before `explore`.
    """

    name: ClassVar[str]
    learns: ClassVar[bool] = True
    later_slots: ClassVar[LaterSlots] = "greedy"
    vw_flag: ClassVar[str | None] = None
    numpy_scorer: ClassVar[bool] = True
    uses_counts: ClassVar[bool] = False

    def vw_exploration(self, placement: Any) -> str:
        """The exploration part of the VW arguments for a placement (a `kassa.schemas.Placement`)."""
        raise NotImplementedError(f"policy {self.name!r} does not learn")

    def scorer_settings(self, opt: OptionReader, counter: int | None) -> dict[str, float]:
        """The exploration settings this policy reads differently from the defaults, taken from a model's VW
        arguments (fields of `kassa.learn.serving.sidecar.LinearSpec`); raise `UnsupportedModel` when the
        numpy scorer would not reproduce the model."""
        return {}

    def explore(self, scores: Sequence[float], spec: Any) -> list[float]:
        """VW's exploration rule on its cost estimates (lower is better), in double precision."""
        raise UnsupportedModel(f"the numpy scorer does not reproduce {self.name!r}")


_TABLE: dict[str, PlacementPolicy] = {}


def register(cls: type[PlacementPolicy]) -> type[PlacementPolicy]:
    """Add a policy to the table (a class decorator). A name may be registered once."""
    if cls.name in _TABLE:
        raise ValueError(f"policy {cls.name!r} is already registered")
    _TABLE[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a policy (for tests that register one of their own)."""
    _TABLE.pop(name, None)


def get(name: str) -> PlacementPolicy:
    try:
        return _TABLE[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (known: {', '.join(_TABLE)})") from None


def names() -> list[str]:
    return list(_TABLE)


def learns(name: str) -> bool:
    policy = _TABLE.get(name)
    return policy is not None and policy.learns


def uses_counts(name: str) -> bool:
    policy = _TABLE.get(name)
    return policy is not None and policy.uses_counts


def from_vw_options(opts: Mapping[str, list[str]]) -> PlacementPolicy:
    """The policy whose exploration a model's VW options name (the one without a flag when none does)."""
    default = None
    for policy in _TABLE.values():
        if not policy.learns or policy.uses_counts:  # marked by its sidecar's counts, not by VW's options
            continue
        if policy.vw_flag is None:
            default = default or policy
        elif policy.vw_flag in opts:
            return policy
    if default is None:
        raise UnsupportedModel("no policy reads these VW options")
    return default


def _argmin(s: Sequence[float]) -> tuple[float, int]:
    lo = min(s)
    return lo, list(s).index(lo)  # the first of equal minima, as VW's ranking by (score, action) does


# --------------------------------------------------------------------------- the rows

@register
class SquareCB(PlacementPolicy):
    """SquareCB (Foster & Rakhlin 2020): probability inverse to the cost gap, scaled by ``gamma``, which
    grows with the examples learned (so the model exploits sooner as it learns). Kassa's default."""

    name = "squarecb"
    vw_flag = "squarecb"

    def vw_exploration(self, placement: Any) -> str:
        return f"--squarecb --gamma_scale {placement.gamma_scale}"

    def scorer_settings(self, opt: OptionReader, counter: int | None) -> dict[str, float]:
        if counter is None:
            raise UnsupportedModel("squarecb model without its example counter")
        return {"counter": int(counter)}

    def explore(self, scores: Sequence[float], spec: Any) -> list[float]:
        import numpy as np  # float32 rounding as VW computes gamma

        k = len(scores)
        lo, best = _argmin(scores)
        gamma = float(np.float32(spec.gamma_scale) * np.float32(float(spec.counter) ** spec.gamma_exponent))
        p = [1.0 / (k + gamma * (x - lo)) for x in scores]
        p[best] = 0.0
        p[best] = 1.0 - sum(p)
        return p


@register
class EpsilonGreedy(PlacementPolicy):
    """ε-greedy: the best action gets 1 − ε (shared among ties), every action ε / k."""

    name = "epsilon"
    vw_flag = None  # VW's default exploration for cb_explore_adf

    def vw_exploration(self, placement: Any) -> str:
        return f"--epsilon {placement.exploration}"

    def scorer_settings(self, opt: OptionReader, counter: int | None) -> dict[str, float]:
        return {"epsilon": opt("epsilon", 0.05)}

    def explore(self, scores: Sequence[float], spec: Any) -> list[float]:
        k = len(scores)
        lo, _ = _argmin(scores)
        eps = spec.epsilon
        tied = list(scores).count(lo)
        return [eps / k + ((1.0 - eps) / tied if x == lo else 0.0) for x in scores]


@register
class Softmax(PlacementPolicy):
    """Softmax over negated costs with inverse temperature λ; later slots renormalise (Plackett–Luce)."""

    name = "softmax"
    later_slots = "renormalise"
    vw_flag = "softmax"

    def vw_exploration(self, placement: Any) -> str:
        return f"--softmax --lambda {placement.softmax_lambda}"

    def scorer_settings(self, opt: OptionReader, counter: int | None) -> dict[str, float]:
        if opt("epsilon", 0.0) != 0.0:
            raise UnsupportedModel("softmax with an epsilon floor")
        return {}

    def explore(self, scores: Sequence[float], spec: Any) -> list[float]:
        lo, _ = _argmin(scores)
        e = [math.exp(-spec.lam * (x - lo)) for x in scores]
        total = sum(e)
        return [x / total for x in e]


@register
class UCB(EpsilonGreedy):
    """Optimism under uncertainty (ADR 0010): each offer's estimate plus ``ucb_alpha`` x its uncertainty
    bonus, ``sqrt(sum over its hashed weights of x^2 / (1 + n))`` with ``n`` the sum of ``x^2`` that weight
    has learned, then ε-greedy on that with ``ucb_epsilon`` (so every candidate keeps a logged propensity
    for off-policy evaluation): `explore` and `scorer_settings` are ε-greedy's, applied to the optimistic
    costs (the scorer subtracts the bonus first). VW learns the same regression as for ε-greedy
    (``--epsilon``, which is all its arguments show); the learner keeps the counts and exports them in the
    model's sidecar, whose policy then says ``ucb`` (a sidecar rebuilt from the VW file alone serves as
    ε-greedy)."""

    name = "ucb"
    vw_flag = None  # its models' VW arguments are ε-greedy's; `from_vw_options` keeps reading them as that
    uses_counts = True

    def vw_exploration(self, placement: Any) -> str:
        return f"--epsilon {placement.ucb_epsilon}"


@register
class Baseline(PlacementPolicy):
    """The placement's baseline ranking (value, popularity or listed order) with ε exploration; no model."""

    name = "baseline"
    learns = False
    numpy_scorer = False


@register
class Uniform(PlacementPolicy):
    """Uniformly random slots: the logging policy that makes off-policy evaluation easiest; no model."""

    name = "uniform"
    learns = False
    numpy_scorer = False
