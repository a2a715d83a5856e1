"""`Scoreboard`: what happened to every simulated checkout, and the numbers the demo reports.

Workers record each checkout once (slice, accepts, the true expected accepts of what was shown,
server and client latency, explored, model version). The live view reads sliding-window figures; the
final result compares the slices over the last N checkouts of the run (by checkout order), where the
policy has had time to learn, plus over the whole run.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kassa.demo.simulator import SLICES, Checkout


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def ratio_interval(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> tuple[float, float] | None:
    """A 95 % interval of mean(a) / mean(b) (per-checkout accepts of two slices): the delta method on the log of
    the ratio, ``var(log mean) ~ s^2 / (n mean^2)`` for each side. None while either side has fewer than two
    checkouts or no accept (the log is undefined)."""
    if len(a) < 2 or len(b) < 2:
        return None
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ma, mb = float(xa.mean()), float(xb.mean())
    if ma <= 0 or mb <= 0:
        return None
    v = float(xa.var(ddof=1)) / (len(xa) * ma * ma) + float(xb.var(ddof=1)) / (len(xb) * mb * mb)
    centre, half = float(np.log(ma / mb)), z * float(np.sqrt(v))
    return float(np.exp(centre - half)), float(np.exp(centre + half))


@dataclass(frozen=True, slots=True)
class SliceRates:
    checkouts: int
    accepts: int
    rate: float | None  # accepts per checkout
    expected: float | None  # true expected accepts per checkout of what was shown (no sampling noise)


class Scoreboard:
    def __init__(self, checkouts: Sequence[Checkout], window: int = 2_000) -> None:
        n = len(checkouts)
        self.total = n
        self.slices = [c.slice for c in checkouts]
        self.accepts: list[int] = [0] * n
        self.expected: list[float] = [0.0] * n
        self.finished = [False] * n
        self.server_ms: dict[str, list[float]] = {s: [] for s in SLICES}
        self.client_ms: dict[str, list[float]] = {s: [] for s in SLICES}
        self.window = window
        self._recent: deque[tuple[str, int, bool]] = deque(maxlen=window)
        self._recent_server: deque[float] = deque(maxlen=window)
        self._recent_client: deque[float] = deque(maxlen=window)
        self._throughput: deque[tuple[float, int]] = deque(maxlen=64)
        self.done = 0
        self._slice_done = dict.fromkeys(SLICES, 0)  # running totals: the live view reads these 4x/s
        self._slice_accepts = dict.fromkeys(SLICES, 0)
        self.explored = 0
        self.fallbacks = 0
        self.model_version = "-"
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._lock = threading.Lock()

    def record(self, c: Checkout, accepts: int, expected: float, server_ms: float, client_ms: float,
               explored: bool, fallback: bool, model_version: str) -> None:
        with self._lock:
            i = c.index
            self.accepts[i] = accepts
            self.expected[i] = expected
            self.finished[i] = True
            self.server_ms[c.slice].append(server_ms)
            self.client_ms[c.slice].append(client_ms)
            self.done += 1
            self._slice_done[c.slice] += 1
            self._slice_accepts[c.slice] += accepts
            self.fallbacks += fallback
            self._recent.append((c.slice, accepts, explored))
            if c.slice == "policy":
                self.explored += explored
                self.model_version = model_version
                self._recent_server.append(server_ms)
                self._recent_client.append(client_ms)

    # ------------------------------------------------------------------ live figures
    def elapsed(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started

    def sample(self) -> None:
        """Note the progress now; the driving loop calls this a few times a second."""
        now = time.monotonic()
        with self._lock:
            self._throughput.append((now, self.done))
            while len(self._throughput) > 2 and now - self._throughput[0][0] > 5.0:
                self._throughput.popleft()

    def decisions_per_s(self) -> float:
        """Throughput over the last few seconds of samples."""
        with self._lock:
            if len(self._throughput) < 2:
                return 0.0
            (t0, d0), (t1, d1) = self._throughput[0], self._throughput[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def window_rates(self) -> dict[str, SliceRates]:
        with self._lock:
            recent = list(self._recent)
        out = {}
        for s in SLICES:
            rewards = [a for sl, a, _ in recent if sl == s]
            out[s] = SliceRates(len(rewards), sum(rewards), sum(rewards) / len(rewards) if rewards else None, None)
        return out

    def overall_rates(self) -> dict[str, float | None]:
        with self._lock:
            return {s: self._slice_accepts[s] / n if (n := self._slice_done[s]) else None for s in SLICES}

    def window_explored(self) -> float | None:
        with self._lock:
            flags = [e for sl, _, e in self._recent if sl == "policy"]
        return sum(flags) / len(flags) if flags else None

    def window_latency(self) -> tuple[float, float, float, float]:
        with self._lock:
            server, client = list(self._recent_server), list(self._recent_client)
        return (percentile(server, 50), percentile(server, 99), percentile(client, 50), percentile(client, 99))

    # ------------------------------------------------------------------ final figures
    def rates(self, start: int = 0) -> dict[str, SliceRates]:
        """Per-slice rates over the finished checkouts with index >= ``start``."""
        with self._lock:
            out = {}
            for s in SLICES:
                idx = [i for i in range(start, self.total) if self.finished[i] and self.slices[i] == s]
                accepts = sum(self.accepts[i] for i in idx)
                expected = sum(self.expected[i] for i in idx)
                out[s] = SliceRates(len(idx), accepts, accepts / len(idx) if idx else None,
                                    expected / len(idx) if idx else None)
        return out

    def slice_accepts(self, start: int = 0) -> dict[str, list[int]]:
        """Per slice, the accepts of each finished checkout with index >= ``start``."""
        with self._lock:
            out: dict[str, list[int]] = {s: [] for s in SLICES}
            for i in range(start, self.total):
                if self.finished[i]:
                    out[self.slices[i]].append(self.accepts[i])
        return out

    def result(self, seed: int, last: int = 5_000) -> dict[str, Any]:
        """The demo's JSON summary (the ``--json`` line) but for what the run adds: the production model
        version at the end, the learned examples and the policy (`kassa.demo.run`)."""
        # A run stopped early (Ctrl-C) ends at its last finished checkout: the plan's last `last` held none of
        # them, and the summary compared empty slices ("-").
        with self._lock:
            end = next((i + 1 for i in range(self.total - 1, -1, -1) if self.finished[i]), 0)
        start = max(0, end - last)
        tail, whole = self.rates(start), self.rates(0)
        seconds = self.elapsed()
        pol, rnd, sta = (tail[s].rate for s in SLICES)
        per = self.slice_accepts(start)

        def r(x: float | None, digits: int = 4) -> float | None:
            return None if x is None else round(x, digits)

        def interval(other: str) -> list[float] | None:
            ci = ratio_interval(per["policy"], per[other])
            return None if ci is None else [round(ci[0], 3), round(ci[1], 3)]

        return {
            "checkouts": self.done,
            "last_window": end - start,
            "policy_reward_rate": r(pol),
            "random_reward_rate": r(rnd),
            "best_static_reward_rate": r(sta),
            "lift_vs_random": r(ratio(pol, rnd), 3),
            "lift_vs_static": r(ratio(pol, sta), 3),
            # 95 % intervals of the two lifts (the control slices are small: ~10 % of checkouts each)
            "lift_vs_random_95": interval("random"),
            "lift_vs_static_95": interval("static"),
            # A run no longer than the window compares the learner's cold start too (it starts from nothing)
            "window_is_whole_run": start == 0,
            "policy_reward_rate_overall": r(whole["policy"].rate),
            "random_reward_rate_overall": r(whole["random"].rate),
            "best_static_reward_rate_overall": r(whole["static"].rate),
            # The same comparison without the buyers' coin flips: the true expected accepts of what
            # each slice showed (the simulator knows them). Much less noisy on the 10% control slices.
            "policy_expected_rate": r(tail["policy"].expected),
            "random_expected_rate": r(tail["random"].expected),
            "best_static_expected_rate": r(tail["static"].expected),
            "slice_checkouts": {s: tail[s].checkouts for s in SLICES},
            "p50_ms": r(percentile(self.server_ms["policy"], 50), 3),
            "p99_ms": r(percentile(self.server_ms["policy"], 99), 3),
            "client_p50_ms": r(percentile(self.client_ms["policy"], 50), 3),
            "client_p99_ms": r(percentile(self.client_ms["policy"], 99), 3),
            "decisions_per_s": r(self.done / seconds if seconds > 0 else 0.0, 1),
            "seconds": r(seconds, 2),
            "explored_share": r(self.explored / max(1, len(self.server_ms["policy"])), 4),
            "fallbacks": self.fallbacks,
            "seed": seed,
        }
