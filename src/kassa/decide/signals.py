"""Retrieval signals: why and how strongly a candidate product was retrieved, as learner features.

`ProductRetriever.retrieve_scored` measures, for every candidate, its co-purchase strength with this order,
the buyer's purchase count, days since their last purchase and how due a replenishment is, its popularity
(global and recent), the sources that found it and its rank in the merged list. This module owns turning
those numbers into (a) the merged retrieval score (the product placements' baseline ranking) and (b) the
namespace ``r`` appended to the candidate's action line, which the model learns linearly (not crossed with
the context: "a due repeat purchase converts" holds for every buyer).

Hot path: every value is quantised to a small grid and the candidate's whole suffix is cached by that grid
key, so a candidate costs a few dict lookups and no float formatting. Measured in process (10,000 products,
60,000 orders, retrieval 50/50/50 of 150, best of 7 runs of 3,000 decisions on a shared 2-core host):
``retrieve`` 47-73 µs per call, ``retrieve_scored`` 206-235 µs; a whole baseline decision 289 µs before,
448 µs after (ADR 0010). Most of the difference is Python work per candidate (~1.4 µs over ~100).

Score weights: a due repeat purchase is the strongest signal in grocery-like data (the issue's replay: the
buyer's own most-bought products hit ~0.21 vs 0.0765 for co-purchase order and 0.0525 for popularity), so a
habit (several purchases, due now) outranks everything; a single past purchase weighs 0.33 and one bought
too recently half of that, below a strong co-purchase (0.8). In bench/quality.py's product world (seed 1,
3,000 checkouts) the earlier weights (count / (count + 1), co-purchase 0.6, no "early" discount) put
one-off purchases above complements: the baseline served 0.336 expected accepts per checkout, 0.383 with
these. The learned model sees the signals themselves, so a store whose buyers behave otherwise is not
bound to these weights once a learned snapshot passes the publish guard.
"""

from __future__ import annotations

import math

# Bit flags of the sources that found a candidate.
CO_PURCHASE = 1
HISTORY = 2
POPULAR = 4

# Merged score = W_HISTORY * history strength + W_CO * co-purchase share + W_POP * popularity share.
W_HISTORY = 1.0
W_CO = 0.8
W_POP = 0.25
# History strength: count / (count + 2) (one purchase 0.33, a habit approaches 1), scaled by how due it is.
DUE_BOOST = 1.5  # within [0.75, 3] x the buyer's mean repeat interval
LAPSED = 0.5  # past 3 x: the habit has likely lapsed
EARLY = 0.5  # before 0.75 x: bought too recently to be wanted again now

_GRID = 8  # numeric shares are quantised to eighths
_CP = [""] + [f"cp:{i / _GRID:g}" for i in range(1, _GRID + 1)]
_PG = [""] + [f"pg:{i / _GRID:g}" for i in range(1, _GRID + 1)]
_PR = [""] + [f"pr:{i / _GRID:g}" for i in range(1, _GRID + 1)]
_MAX_COUNT = 32
_HC = [""] + [f"hc:{math.log1p(c):.3g}" for c in range(1, _MAX_COUNT + 1)]
_DS = [f"ds={b}" for b in range(12)]  # log2(1 + days since last purchase), capped
_DUE = {0: "due=early", 1: "due=yes", 2: "due=late", 3: "due=lapsed"}
_SRC = ["", "s_co", "s_hi", "s_co s_hi", "s_po", "s_co s_po", "s_hi s_po", "s_co s_hi s_po"]
_RK = [f"rk={b}" for b in range(12)]  # log2(1 + rank) bucket


def _q(share: float) -> int:
    if share <= 0.0:
        return 0
    i = int(share * _GRID + 0.5)
    return i if i <= _GRID else _GRID


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


def history_strength(count: float, due: int) -> float:
    """How strongly the buyer's own history recommends a product (0 when never bought)."""
    if count <= 0:
        return 0.0
    s = count / (count + 2.0)
    if due in (1, 2):
        s *= DUE_BOOST
    elif due == 3:
        s *= LAPSED
    elif due == 0:
        s *= EARLY
    return s


def score(cp: float, hist: float, pg: float) -> float:
    return W_HISTORY * hist + W_CO * cp + W_POP * pg


def quantise(sources: int, cp: float, count: float, days: float, due: int, pg: float, pr: float
             ) -> tuple[int, ...]:
    """A candidate's signals on the token grid (the key of its cached suffix). ``count`` 0 means not in the
    buyer's history; ``due`` -1 means no repeat interval known."""
    if count > 0:
        hc = int(count) if count < _MAX_COUNT else _MAX_COUNT
        ds = int(math.log2(1.0 + days)) if days > 0.0 else 0
        return sources, _q(cp), hc, ds if ds < 12 else 11, due, _q(pg), _q(pr)
    return sources, _q(cp), 0, 0, -1, _q(pg), _q(pr)


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
    sources, cp, hc, ds, due, pg, pr, rk = full
    parts = [" |r", _SRC[sources], _RK[rk]]
    if cp:
        parts.append(_CP[cp])
    if hc:
        parts += [_HC[hc], _DS[ds]]
        if due >= 0:
            parts.append(_DUE[due])
    if pg:
        parts.append(_PG[pg])
    if pr:
        parts.append(_PR[pr])
    return " ".join(parts)
