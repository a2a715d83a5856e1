"""Retrieval signals: why and how strongly a candidate product was retrieved, as learner features.

`ProductRetriever.retrieve_scored` measures, for every candidate, its co-purchase confidence with this order
(the largest, over the order's products b, of co-purchases(b, q) / (orders with b + a prior): a smoothed
P(q | b)) and its co-purchases with the order, the buyer's purchase count, days since their last purchase and
how due a replenishment is, its popularity (global and recent), the sources that found it and its rank in the
merged list. This module owns turning those numbers into (a) the merged retrieval score (the product
placements' baseline ranking) and (b) the namespace ``r`` appended to the candidate's action line, which the
model learns linearly (not crossed with the context: "a due repeat purchase converts" holds for every buyer).
The merged score itself is a feature (``sc``, on a 1/64 grid), so the model starts from the baseline's order
and learns corrections to it; the numeric signals are log- or ratio-scaled (``lc`` log2 co-purchases, ``cf``
a probability, ``hc`` log count, ``ds`` log2 days). How due a repeat purchase is comes as ``due`` (early, yes,
late, lapsed), finer as ``dr`` (time since the last purchase over the buyer's mean interval, 10 buckets) and
crossed with the purchase count as ``hd`` (log2 count bucket x ``dr`` bucket): a linear model cannot otherwise
tell a due habit bought ten times from a product bought twice by chance.

Hot path: every value is quantised to a small grid and the candidate's whole suffix is cached by that grid
key, so a candidate costs a few dict lookups and no float formatting; suffixes are built for the returned
candidates only (the policy's ``policy_candidates``), not for every merged one.

Score weights (issue 14, bench/quality.py's product world, 5 seeds, last half of 6,000 checkouts, greedy
top 3 on logged candidates with the simulator's acceptance probabilities): the earlier merge (co-purchase
share of the order's strongest neighbour x 0.8, any past purchase count / (count + 2), popularity x 0.25)
reached 0.90-0.95x the bench's plain co-purchase-count heuristic; ranking by raw summed co-purchases
1.00x; by the confidence above 1.02x (its sum over the order's products 0.91x: popular products co-occur
with everything). A one-off past purchase converted at 0.01-0.08 there, a due repeat purchase at ~0.2, so a
product bought once weighs W_ONCE of a habit; a habit that is due still outranks a strong complement (the
issue's grocery replay: the buyer's most-bought products 0.21 against 0.0765 for co-purchase order).

History strength by closeness to the buyer's interval (bench/quality.py's product world once calibrated to that
replay and on simulated days, 5 seeds, last half of 6,000 checkouts): with the earlier due classes (x1.5 within
[0.75, 3] of the mean interval, x0.5 outside) the baseline served 0.44-0.47 expected accepts, below the bench's
"due repeat" heuristic (0.54-0.57: repeat purchases by |since / mean - 1|); with W_DUE x (1 - |r - 1|) it serves
0.51-0.53 (offline greedy top 3: 0.55 against the heuristic's 0.53 on the same stream).
"""

from __future__ import annotations

import math

# Bit flags of the sources that found a candidate.
CO_PURCHASE = 1
HISTORY = 2
POPULAR = 4

# Merged score = co-purchase confidence + W_LOG_CO * log(1 + co-purchases) + history strength
#                + W_POP * popularity share.
# Co-purchase confidence: the largest, over this order's products b, of co-purchases(b, q) / (orders with b
# + CONF_PRIOR), a smoothed P(q | b); the prior keeps a product seen once with b from outranking a complement.
CONF_PRIOR = 20.0
W_LOG_CO = 0.03
W_POP = 0.01  # a tie-break: popular-only candidates below anything with evidence for this order or buyer
# History strength: count / (count + 2), scaled by how due it is: W_DUE x (1 - |r - 1|) where r is the time since
# the last purchase over the buyer's mean repeat interval (so W_DUE when exactly due, 0 at r <= 0 or r >= 2),
# never below W_ONCE. A product bought once (no interval yet) weighs W_ONCE (a habit needs repeat purchases: in
# bench/quality.py one-off purchases converted at 0.01-0.08); bought twice within one occasion, 1.
W_DUE = 3.0
W_ONCE = 0.1

_GRID = 8  # popularity shares are quantised to eighths
# Co-purchase confidence and the merged score are what the ranking turns on: a finer grid (1/64), so a
# positive weight on ``sc`` alone reproduces the baseline's order and the model learns a correction to it.
_FINE = 64
_CF = [""] + [f"cf:{i / _FINE:.4g} cfb={min(int(math.log2(_FINE / i)), 6)}" for i in range(1, _FINE + 1)]
_PG = [""] + [f"pg:{i / _GRID:g}" for i in range(1, _GRID + 1)]
_PR = [""] + [f"pr:{i / _GRID:g}" for i in range(1, _GRID + 1)]
_MAX_COUNT = 32
_HC = [""] + [f"hc:{math.log1p(c):.3g}" for c in range(1, _MAX_COUNT + 1)]
_LC = [""] + [f"lc:{b / 2:g}" for b in range(1, 17)]  # log2(1 + co-purchases) in halves, capped at 8
_MAX_SC = 4  # the merged score's grid ends here (a due habit alone is worth up to W_DUE)
_SC = [""] + [f"sc:{b / _FINE:.4g}" for b in range(1, _MAX_SC * _FINE + 1)]
_DS = [f"ds={b}" for b in range(12)]  # log2(1 + days since last purchase), capped
_DUE = {0: "due=early", 1: "due=yes", 2: "due=late", 3: "due=lapsed"}
# How due, finer: time since the last purchase over the buyer's mean repeat interval, in buckets whose upper
# bounds are _DR_BOUNDS (the last open); and that bucket crossed with the purchase count's log2 bucket (``hd``),
# since a due product bought ten times is a habit and one bought twice may be chance (the model is linear in |r).
_DR_BOUNDS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0)
_DR = [f"dr={b}" for b in range(len(_DR_BOUNDS) + 1)]
_HD = [[f"hd={c}_{b}" for b in range(len(_DR_BOUNDS) + 1)] for c in range(5)]
_SRC = ["", "s_co", "s_hi", "s_co s_hi", "s_po", "s_co s_po", "s_hi s_po", "s_co s_hi s_po"]
_RK = [f"rk={b}" for b in range(12)]  # log2(1 + rank) bucket


def _q(share: float, grid: int = _GRID) -> int:
    if share <= 0.0:
        return 0
    i = int(share * grid + 0.5)
    return i if i <= grid else grid


def due_class(since: float, mean: float) -> int:
    """0 early, 1 due, 2 late, 3 lapsed: time since the last purchase against the mean repeat interval."""
    r = since / mean
    if r < 0.75:
        return 0
    if r <= 1.5:
        return 1
    if r <= 3.0:
        return 2
    return 3


def ratio_bucket(since: float, mean: float) -> int:
    """The `_DR_BOUNDS` bucket of time since the last purchase over the mean repeat interval."""
    r = since / mean
    for b, bound in enumerate(_DR_BOUNDS):
        if r < bound:
            return b
    return len(_DR_BOUNDS)


def history_strength(count: float, since: float, mean: float) -> float:
    """How strongly the buyer's own history recommends a product (0 when never bought): ``count`` purchases,
    ``since`` seconds since the last, ``mean`` their mean repeat interval (0 when none is known)."""
    if count <= 0:
        return 0.0
    s = count / (count + 2.0)
    if count < 2.0:
        return s * W_ONCE
    if mean <= 0.0:
        return s
    off = abs(since / mean - 1.0)
    return s * max(W_DUE * (1.0 - off), W_ONCE)


def score(conf: float, co: float, hist: float, pg: float) -> float:
    """The merged retrieval score (see the module docstring): ``conf`` co-purchase confidence, ``co``
    co-purchases with this order (decayed orders), ``hist`` `history_strength`, ``pg`` popularity share."""
    return conf + W_LOG_CO * math.log1p(co) + hist + W_POP * pg


def quantise(sources: int, conf: float, co: float, count: float, days: float, due: int, pg: float, pr: float,
             merged: float, ratio: int = -1) -> tuple[int, ...]:
    """A candidate's signals on the token grid (the key of its cached suffix). ``count`` 0 means not in the
    buyer's history; ``due`` (`due_class`) and ``ratio`` (`ratio_bucket`) -1 mean no repeat interval known."""
    lc = int(2.0 * math.log2(1.0 + co) + 0.5) if co > 0.0 else 0
    sc = int(merged * _FINE + 0.5) if merged > 0.0 else 0
    lc, sc, cf = min(lc, 16), min(sc, _MAX_SC * _FINE), _q(conf, _FINE)
    if count > 0:
        hc = int(count) if count < _MAX_COUNT else _MAX_COUNT
        ds = int(math.log2(1.0 + days)) if days > 0.0 else 0
        return sources, cf, lc, hc, ds if ds < 12 else 11, due, _q(pg), _q(pr), sc, ratio
    return sources, cf, lc, 0, 0, -1, _q(pg), _q(pr), sc, -1


_SUFFIXES: dict[tuple[int, ...], str] = {}


def suffix(key: tuple[int, ...], rank: int) -> str:
    """The ``|r`` namespace of one candidate from its `quantise` key and its rank in the merged list; built
    once per distinct key and looked up after (the grid has a few thousand keys in practice)."""
    full = (*key, rank.bit_length() if rank < 2048 else 11)
    line = _SUFFIXES.get(full)
    if line is None:
        if len(_SUFFIXES) >= 100_000:
            _SUFFIXES.clear()
        line = _SUFFIXES[full] = _build(full)
    return line


def _build(full: tuple[int, ...]) -> str:
    sources, cf, lc, hc, ds, due, pg, pr, sc, ratio, rk = full
    parts = [" |r", _SRC[sources], _RK[rk]]
    if cf:
        parts.append(_CF[cf])
    if lc:
        parts.append(_LC[lc])
    if hc:
        parts += [_HC[hc], _DS[ds]]
        if due >= 0:
            parts.append(_DUE[due])
        if ratio >= 0:
            parts += [_DR[ratio], _HD[min(hc.bit_length() - 1, 4)][ratio]]
    if pg:
        parts.append(_PG[pg])
    if pr:
        parts.append(_PR[pr])
    if sc:
        parts.append(_SC[sc])
    return " ".join(parts)
