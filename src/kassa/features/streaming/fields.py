"""One field of a stream view: its plan (`FieldPlan`: the slots of its statistic in a bucket, its
coercion, its empty value) and the reader that computes its value from the live buckets of its window.

Readers see the buckets newest first, so ``last`` and ``last_n_distinct`` stop at the first buckets that
answer. Under the bucket definition of the exactness contract (`kassa.features.streaming.aggregator`)
count, min, max, last and last_n_distinct are exact; sum and mean are floating-point sums (exact up to
rounding; exact for integers). The slot layout the readers rely on is set by
`kassa.features.streaming.plan`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INF = math.inf


@dataclass(slots=True)
class FieldPlan:
    name: str
    agg: str
    off: int  # first slot of its statistic in the bucket
    n: int
    coerce: Callable[[Any], Any]
    empty: Any  # value of an empty window
    read: Callable[[FieldPlan, list[list[Any]], dict[int, tuple[int, float, float, float]]], Any] = field(
        init=False
    )

    def __post_init__(self) -> None:
        self.read = _READERS[self.agg]


# Readers of one field over the live buckets of its window, newest bucket first (one function per
# aggregate: this runs for every field of every written row). Fields of one numeric statistic share one
# pass over the buckets through ``stats``.
Stats = dict[int, tuple[int, float, float, float]]


def _num(off: int, live: list[list[Any]], stats: Stats) -> tuple[int, float, float, float]:
    st = stats.get(off)
    if st is None:
        if len(live) == 1:
            b = live[0]
            st = (b[off], b[off + 1], b[off + 2], b[off + 3])
        else:
            c, parts, lo, hi = 0, [], INF, -INF
            for b in live:
                n = b[off]
                if n:
                    c += n
                    parts.append(b[off + 1])
                    if b[off + 2] < lo:
                        lo = b[off + 2]
                    if b[off + 3] > hi:
                        hi = b[off + 3]
            st = (c, math.fsum(parts), lo, hi)
        stats[off] = st
    return st


def _read_count(fp: FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    off = fp.off
    c = live[0][off] if len(live) == 1 else sum(b[off] for b in live)
    return fp.coerce(c) if c else fp.empty


def _read_sum(fp: FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    return fp.coerce(_num(fp.off, live, stats)[1]) if live else fp.empty


def _read_mean(fp: FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    c, total, _, _ = _num(fp.off, live, stats)
    return fp.coerce(total / c) if c else fp.empty


def _read_min(fp: FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    c, _, lo, _ = _num(fp.off, live, stats)
    return fp.coerce(lo) if c else fp.empty


def _read_max(fp: FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    c, _, _, hi = _num(fp.off, live, stats)
    return fp.coerce(hi) if c else fp.empty


def _read_last(fp: FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    # Bucket k only holds times in [k w, (k + 1) w): the newest bucket with a value has the latest one.
    off = fp.off
    for b in live:
        cur = b[off]
        if cur is not None:
            return fp.coerce(cur[1])
    return fp.empty


def _read_lnd(fp: FieldPlan, live: list[list[Any]], stats: Stats) -> Any:
    off, n = fp.off, fp.n
    merged: dict[Any, tuple[float, int, int]] = {}
    for b in live:
        d = b[off]
        if d:
            if len(merged) >= n:
                break  # an older bucket can only add values older than the n already found
            for x, stamp in d.items():
                prev = merged.get(x)
                if prev is None or stamp > prev:
                    merged[x] = stamp
    if not merged:
        return fp.empty
    return fp.coerce(sorted(merged, key=merged.__getitem__, reverse=True)[:n])


_READERS: dict[str, Callable[[FieldPlan, list[list[Any]], Stats], Any]] = {
    "count": _read_count,
    "sum": _read_sum,
    "mean": _read_mean,
    "min": _read_min,
    "max": _read_max,
    "last": _read_last,
    "last_n_distinct": _read_lnd,
}
