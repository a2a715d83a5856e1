"""HDR histograms of latency, in microseconds, from 1 µs to one hour at 3 significant digits.

Owns the helpers around ``hdrh``: building a histogram from an array of latencies (recorded as
value/count pairs, so a million samples cost a few thousand calls), the summary percentiles the
report and the JSON quote, and the percentile curve (the classic HDR "percentile distribution",
denser towards the tail). HDR reports the highest value equivalent to a bucket, so a reported
percentile is never below the true one: rounding errs on the pessimistic side.
"""

from __future__ import annotations

import math

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
DIGITS = 3
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
# A per-type percentile with fewer latencies than this beyond it is marked in the report's tables: it is the slowest
# few of a small sample (the P99.9 of 2 accepts is the slower one), not the type's tail. The summary's own rule for
# its SLO percentiles is `runner._too_few_latencies`.
MIN_BEYOND = 10


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def from_seconds(values: np.ndarray, hist: HdrHistogram | None = None) -> HdrHistogram:
    """Record ``values`` (seconds; NaNs skipped) into ``hist`` (a new one by default)."""
    hist = hist if hist is not None else new_histogram()
    v = values[~np.isnan(values)]
    if v.size:
        us = np.clip(np.ceil(v * 1e6), LOWEST_US, HIGHEST_US).astype(np.int64)
        uniq, counts = np.unique(us, return_counts=True)
        for value, count in zip(uniq.tolist(), counts.tolist(), strict=True):
            hist.record_value(value, count)
    return hist


def value_at_percentile(hist: HdrHistogram, q: float) -> int:
    """The ``q`` percentile by nearest rank, ``ceil(q/100 x n)``-th smallest (µs, highest equivalent value).

    hdrh rounds the rank to the nearest count instead, one below whenever ``q/100 x n`` has a fraction under
    a half: the P99.9 of 507 latencies was the second slowest, below the slowest its rank names.
    """
    n = hist.get_total_count()
    rank = max(1, math.ceil(q / 100.0 * n - 1e-9))
    return int(hist.get_value_at_percentile(100.0 * rank / n))  # hdrh's int(rank + 0.5) is the rank itself


def thin_percentiles(n: int) -> list[str]:
    """The keys of `PERCENTILES` that fewer than `MIN_BEYOND` of ``n`` latencies lie beyond (nearest rank)."""
    return [k for k, q in PERCENTILES.items() if n and n - math.ceil(q / 100.0 * n - 1e-9) < MIN_BEYOND]


def supported_percentile(n: int) -> float:
    """The highest percentile ``n`` latencies say anything about, ``100 x (1 - 1/n)``: beyond it is the maximum."""
    return 100.0 * (1.0 - 1.0 / n) if n else 0.0


def summary_ms(hist: HdrHistogram, exact_max_s: float | None = None) -> dict[str, float | None]:
    """p50/p90/p99/p999/max/mean in milliseconds (``None`` when nothing was recorded)."""
    if hist.get_total_count() == 0:
        return {**{k: None for k in PERCENTILES}, "max": None, "mean": None}
    out: dict[str, float | None] = {k: round(value_at_percentile(hist, q) / 1e3, 3) for k, q in PERCENTILES.items()}
    out["max"] = round(exact_max_s * 1e3, 3) if exact_max_s is not None else round(hist.get_max_value() / 1e3, 3)
    out["mean"] = round(hist.get_mean_value() / 1e3, 3)
    return out


def percentile_curve(hist: HdrHistogram, ticks_per_half_distance: int = 4,
                     up_to: float = 100.0) -> list[list[float]]:
    """``[[percentile, ms], ...]`` from 0 to ``up_to`` (100: the maximum), denser towards the tail (for the report's
    curve). A request type's curve stops at `supported_percentile` of its sample: 2 accepts drawn to 99.99 %
    showed the slower of them as a tail."""
    if hist.get_total_count() == 0:
        return []
    points: list[list[float]] = []
    for it in hist.get_percentile_iterator(ticks_per_half_distance):
        pct = float(it.percentile_level_iterated_to)
        if pct >= up_to:
            break
        points.append([round(pct, 6), round(it.value_iterated_to / 1e3, 3)])
    if up_to >= 100.0:
        points.append([100.0, round(hist.get_max_value() / 1e3, 3)])
    else:
        points.append([round(up_to, 6), round(value_at_percentile(hist, up_to) / 1e3, 3)])
    return points


def exact_percentiles_ms(values_s: np.ndarray, qs: tuple[float, ...] = (50.0, 99.0)) -> list[float | None]:
    """Exact percentiles of a small sample (the per-second timeline), in ms."""
    v = values_s[~np.isnan(values_s)]
    if not v.size:
        return [None for _ in qs]
    return [round(float(x) * 1e3, 3) for x in np.percentile(v, qs)]


def merge(hists: list[HdrHistogram]) -> HdrHistogram:
    total = new_histogram()
    for h in hists:
        total.add(h)
    return total
