"""Arrival schedules: when each request of an open-loop run is *meant* to be sent.

Owns :func:`arrival_offsets`. A schedule is fixed (evenly spaced) or Poisson (exponential gaps, what
independent shoppers produce), with an optional linear ramp from 10 % of the rate up to the full
rate. Both are built by time-rescaling: arrival ``i`` of a unit-rate process (``u_i = i`` for fixed,
a cumulative sum of unit exponentials for Poisson) is mapped through the inverse of the cumulative
rate ``Λ(t)``, which makes a ramped Poisson schedule an exact non-homogeneous Poisson process.
Offsets are seeded, so every worker process derives the same global schedule and takes its share.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

Schedule = Literal["fixed", "poisson"]
RAMP_START = 0.1  # a ramp starts at this fraction of the rate (from 0 the first gap would be huge)


def expected_count(rate: float, duration: float, ramp: float = 0.0) -> float:
    """``Λ(ramp + duration)``: how many requests a schedule holds on average."""
    return rate * (duration + ramp * (1.0 + RAMP_START) / 2.0)


def _invert(u: np.ndarray, rate: float, ramp: float) -> np.ndarray:
    """Times ``t`` with ``Λ(t) = u`` for a linear ramp ``RAMP_START·rate → rate`` over ``ramp`` s, then ``rate``."""
    if ramp <= 0:
        return u / rate
    f0 = RAMP_START
    in_ramp_total = rate * ramp * (1.0 + f0) / 2.0
    out = np.empty_like(u)
    r = u <= in_ramp_total
    a = (1.0 - f0) * rate / (2.0 * ramp)  # Λ(t) = a t² + b t on the ramp
    b = f0 * rate
    out[r] = (-b + np.sqrt(b * b + 4.0 * a * u[r])) / (2.0 * a)
    out[~r] = ramp + (u[~r] - in_ramp_total) / rate
    return out


def arrival_offsets(
    rate: float,
    duration: float,
    schedule: Schedule = "fixed",
    seed: int = 0,
    ramp: float = 0.0,
) -> np.ndarray:
    """Intended send times in seconds from the start, all ``< ramp + duration``.

    ``rate`` is the steady rate (requests/s) reached after ``ramp`` seconds and held for
    ``duration`` seconds. The first request is at 0.
    """
    if rate <= 0 or duration < 0 or ramp < 0 or duration + ramp <= 0:
        return np.empty(0)
    end = ramp + duration
    total = expected_count(rate, duration, ramp)
    if schedule == "fixed":
        u = np.arange(math.ceil(total - 1e-9), dtype=np.float64)
    elif schedule == "poisson":
        rng = np.random.default_rng(seed)
        # Draw comfortably more unit gaps than needed, then cut at the end.
        n = int(total + 6 * math.sqrt(total) + 16)
        u = np.cumsum(rng.exponential(1.0, n))
        while u[-1] < total:
            u = np.concatenate([u, u[-1] + np.cumsum(rng.exponential(1.0, n))])
        u = u - u[0]  # first request at t0, like the fixed schedule
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    t = _invert(u, rate, ramp)
    return t[t < end]
