"""The dashboard's overview numbers, read from the process's own Prometheus registry.

Nothing here is counted twice: decisions, their latency histogram, fallbacks and problem responses are
the samples ``/metrics`` exposes. A counter gives totals, not a rate, so `RateMeter` keeps the totals it
saw at each dashboard read (the overview refreshes every few seconds) and turns the last minute of them
into decisions per second; until it has two reads it uses the average since the process started. (The
overview's charts over time come from the decision log instead.) Quantiles come from the histogram
buckets, interpolated inside a bucket the way PromQL's ``histogram_quantile`` does, so they are as
coarse as the buckets (0.5 ms at the low end).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry


@dataclass(slots=True)
class PlacementTraffic:
    placement: str
    decisions: int = 0
    fallbacks: int = 0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    @property
    def fallback_share(self) -> float:
        return self.fallbacks / self.decisions if self.decisions else 0.0

    def quantile(self, q: float) -> float | None:
        return bucket_quantile(q, self.buckets)


@dataclass(slots=True)
class Traffic:
    """One read of the registry."""

    decisions: int
    fallbacks: int
    problems: dict[str, int]  # HTTP status -> problem responses
    placements: dict[str, PlacementTraffic]
    buckets: dict[float, float]
    per_second: float
    per_second_over: float = 0.0  # the seconds `per_second` averages over (the last minute, or more)

    @property
    def fallback_share(self) -> float:
        return self.fallbacks / self.decisions if self.decisions else 0.0

    @property
    def error_share(self) -> float:
        """Problem responses (any 4xx/5xx) per answered API request (decisions + problem responses)."""
        errors = sum(self.problems.values())
        return errors / (self.decisions + errors) if self.decisions + errors else 0.0

    @property
    def server_error_share(self) -> float:
        errors = sum(n for status, n in self.problems.items() if status.startswith("5"))
        total = self.decisions + sum(self.problems.values())
        return errors / total if total else 0.0

    def quantile(self, q: float) -> float | None:
        return bucket_quantile(q, self.buckets)


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile (seconds) of a cumulative histogram; None without observations."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return prev_bound  # above the last finite bucket: its bound is the best lower estimate
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 1.0)
        prev_bound, prev_count = bound, count
    return prev_bound


class RateMeter:
    """Decision totals seen at each read, kept for ``keep_seconds``, turned into a rate."""

    def __init__(self, keep_seconds: float = 600.0, window_seconds: float = 60.0) -> None:
        self.keep_seconds = keep_seconds
        self.window_seconds = window_seconds
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, now: float, total: int, started_at: float) -> float:
        return self.read(now, total, started_at)[0]

    def read(self, now: float, total: int, started_at: float) -> tuple[float, float]:
        """(decisions per second, the seconds that rate is over): the window, or longer when reads are sparse."""
        with self._lock:
            samples = self._samples
            if not samples and started_at:
                samples.append((started_at, 0))
            samples.append((now, total))
            while len(samples) > 2 and samples[0][0] < now - self.keep_seconds:
                samples.popleft()
            # the oldest sample inside the window (or the newest before it, when reads are sparse)
            base = samples[0]
            for t, n in samples:
                if t >= now - self.window_seconds:
                    break
                base = (t, n)
            dt = now - base[0]
            return ((total - base[1]) / dt if dt > 0 else 0.0), max(dt, 0.0)


def read_traffic(registry: CollectorRegistry, meter: RateMeter, started_at: float,
                 now: float | None = None) -> Traffic:
    now = time.time() if now is None else now
    placements: dict[str, PlacementTraffic] = {}
    problems: dict[str, int] = {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == "kassa_decisions_total":
                p = placements.setdefault(s.labels["placement"], PlacementTraffic(s.labels["placement"]))
                p.decisions += int(s.value)
                if s.labels.get("fallback") == "true":
                    p.fallbacks += int(s.value)
            elif s.name == "kassa_decision_seconds_bucket":
                p = placements.setdefault(s.labels["placement"], PlacementTraffic(s.labels["placement"]))
                bound = float(s.labels["le"])
                p.buckets[bound] = p.buckets.get(bound, 0.0) + s.value
            elif s.name == "kassa_http_errors_total":
                problems[s.labels["status"]] = problems.get(s.labels["status"], 0) + int(s.value)
    buckets: dict[float, float] = {}
    for p in placements.values():
        for bound, count in p.buckets.items():
            buckets[bound] = buckets.get(bound, 0.0) + count
    decisions = sum(p.decisions for p in placements.values())
    rate, over = meter.read(now, decisions, started_at)
    return Traffic(decisions, sum(p.fallbacks for p in placements.values()), problems, placements, buckets, rate,
                   over)
