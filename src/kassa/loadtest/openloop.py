"""Open-loop load: send on a fixed schedule, time every request from when it *should* have gone out.

Owns :func:`run_open_loop` and :class:`OpenLoopResult`. Request ``i`` has an intended send time
``t0 + i / rate`` (or Poisson arrivals) and is handed to the pool at that time whether or not
earlier requests have come back, so a server stall makes concurrency grow instead of pausing the
generator. Latency runs from the intended send time to the last response byte, which keeps the
requests that *would* have been sent during a stall in the distribution (no coordinated omission).

The generator's own punctuality is measured too (send lag = actual hand-off minus intended time).
Event-loop timers have 1 ms granularity (``epoll_wait``), so the generator wakes up to half a
millisecond early and sends whatever is due within that half millisecond; a request that goes out
early is timed from its actual send time instead, so being early never shortens a latency. A run
whose send-lag p99 exceeds 1 ms, or that could not send every scheduled request, is flagged
``generator_behind`` and marked invalid: its latencies describe the client, not the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kassa.loadtest.client import ConnectionPool, RequestTimeout
from kassa.loadtest.schedule import arrival_offsets as schedule_offsets

MakeRequest = Callable[[int], tuple[str, str, bytes]]
OnResponse = Callable[[int, int, bytes], None]

# Status codes recorded for requests without an HTTP response.
NOT_DONE = 0
CONN_ERROR = -1
TIMEOUT = -2

_TICK = 0.001  # event-loop timer resolution (epoll_wait and libuv both count milliseconds)
_EARLY = _TICK / 2  # how far ahead of its intended time a request may go out
_MAX_LAG_P99 = 0.001
_PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


@dataclass
class OpenLoopResult:
    """Outcome of one open-loop run. Times are in milliseconds unless the name says otherwise."""

    rate: float
    duration: float
    schedule: str
    scheduled: int  # requests the schedule called for
    sent: int  # requests handed to the pool
    completed: int  # requests with an HTTP response (any status)
    ok: int  # 2xx responses
    http_errors: int  # non-2xx responses
    connection_errors: int
    timeouts: int  # request timeout, or still outstanding when the drain timeout ran out
    callback_errors: int  # on_response raised
    first_callback_error: str | None
    status_counts: dict[int, int]
    latency_ms: dict[str, float]  # p50/p90/p99/p999/max/mean over responses of any status
    achieved_rate: float  # responses per second over the send window
    send_rate: float  # requests handed to the pool per second
    lag_p99_ms: float
    lag_max_ms: float
    max_outstanding: int  # peak requests in flight or queued: grows when the server stalls
    client_cpu_us_per_request: float  # generator process CPU (all threads) per request sent
    generator_behind: bool
    wall_seconds: float
    # Per-request raw data (seconds relative to t0; NaN where not applicable).
    intended: np.ndarray = field(repr=False)
    send_lag: np.ndarray = field(repr=False)
    latency: np.ndarray = field(repr=False)
    status: np.ndarray = field(repr=False)

    @property
    def valid(self) -> bool:
        return not self.generator_behind

    @property
    def errors(self) -> int:
        return self.http_errors + self.connection_errors + self.timeouts

    def summary(self) -> dict[str, Any]:
        """JSON-friendly figures (no per-request arrays)."""
        return {
            "rate": self.rate,
            "duration": self.duration,
            "schedule": self.schedule,
            "scheduled": self.scheduled,
            "sent": self.sent,
            "completed": self.completed,
            "ok": self.ok,
            "errors": self.errors,
            "http_errors": self.http_errors,
            "connection_errors": self.connection_errors,
            "timeouts": self.timeouts,
            "callback_errors": self.callback_errors,
            "first_callback_error": self.first_callback_error,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "latency_ms": self.latency_ms,
            "achieved_rate": round(self.achieved_rate, 2),
            "send_rate": round(self.send_rate, 2),
            "lag_p99_ms": round(self.lag_p99_ms, 4),
            "lag_max_ms": round(self.lag_max_ms, 4),
            "max_outstanding": self.max_outstanding,
            "client_cpu_us_per_request": round(self.client_cpu_us_per_request, 2),
            "generator_behind": self.generator_behind,
            "valid": self.valid,
            "wall_seconds": round(self.wall_seconds, 3),
        }


def arrival_offsets(
    rate: float, duration: float, schedule: Literal["fixed", "poisson"] = "fixed", seed: int = 0
) -> np.ndarray:
    """Intended send times in seconds from the start, all ``< duration`` (see :mod:`kassa.loadtest.schedule`)."""
    return schedule_offsets(rate, duration, schedule, seed)


async def run_open_loop(
    make_request: MakeRequest,
    rate: float,
    duration: float,
    pool: ConnectionPool,
    on_response: OnResponse | None = None,
    schedule: Literal["fixed", "poisson"] = "fixed",
    seed: int = 0,
    *,
    headers: bytes = b"",
    timeout: float = 5.0,
    drain_timeout: float = 5.0,
    max_lag_p99: float = _MAX_LAG_P99,
) -> OpenLoopResult:
    """Drive ``pool`` open-loop at ``rate`` requests/s for ``duration`` seconds.

    ``make_request(i)`` returns ``(method, path, body)`` for request ``i``; it runs at send time,
    so keep it cheap (pre-build bodies). ``headers`` is a pre-encoded header block sent with every
    request. ``on_response(i, status, body)`` runs for every HTTP response (any status) inside the
    client's ``data_received``. Each request times out after ``timeout`` s; the run returns at the
    latest ``drain_timeout`` s after the last send, counting what is still outstanding as timeouts.
    """
    offsets = arrival_offsets(rate, duration, schedule, seed)
    n = len(offsets)
    send_t = np.full(n, np.nan)
    done_t = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)
    counters = {"outstanding": 0, "max_outstanding": 0, "callback_errors": 0, "remaining": n}
    all_done = asyncio.get_running_loop().create_future()
    perf = time.perf_counter
    finished = False  # after the drain, late callbacks must not touch the result arrays
    callback_failures: list[str] = []

    def make_callback(i: int) -> Callable[[int, bytes, BaseException | None], None]:
        def callback(code: int, body: bytes, exc: BaseException | None) -> None:
            if finished:
                return
            done_t[i] = perf()
            counters["outstanding"] -= 1
            if exc is None:
                status[i] = code
                if on_response is not None:
                    try:
                        on_response(i, code, body)
                    except Exception as cb_exc:
                        counters["callback_errors"] += 1
                        if not callback_failures:
                            callback_failures.append(f"request {i}: {cb_exc!r}")
            else:
                status[i] = TIMEOUT if isinstance(exc, RequestTimeout) else CONN_ERROR
            counters["remaining"] -= 1
            if counters["remaining"] == 0 and not all_done.done():
                all_done.set_result(None)

        return callback

    if n == 0:
        all_done.set_result(None)
    build = pool.build
    send = pool.send
    cpu0 = time.process_time()
    t0 = perf() + 0.002  # a little slack so request 0 is not late by construction
    sent = 0
    while sent < n:
        now = perf() - t0
        while sent < n and offsets[sent] <= now + _EARLY:
            method, path, body = make_request(sent)
            data = build(method, path, body, headers)
            counters["outstanding"] += 1
            if counters["outstanding"] > counters["max_outstanding"]:
                counters["max_outstanding"] = counters["outstanding"]
            send_t[sent] = perf()
            send(data, make_callback(sent), timeout)
            sent += 1
            now = perf() - t0
        if sent < n:
            # Never ask for less than a tick: uvloop truncates sub-millisecond timers to zero,
            # which would turn this loop into a busy-wait that steals the server's CPU.
            await asyncio.sleep(max(_TICK, offsets[sent] - (perf() - t0) - _EARLY))
    last_send = perf()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(all_done), drain_timeout)
    finished = True
    cpu = time.process_time() - cpu0
    wall = perf() - t0

    # Whatever is still outstanding counts as a timeout.
    undone = np.isnan(done_t)
    status[undone & (status == NOT_DONE)] = TIMEOUT

    intended_abs = offsets + t0
    send_lag = send_t - intended_abs
    # Timed from the intended time, or from the actual send when the generator was early.
    latency = done_t - np.minimum(intended_abs, send_t)
    responded = status > 0
    lat_ms = latency[responded] * 1e3
    if lat_ms.size:
        pct = np.percentile(lat_ms, list(_PERCENTILES.values()))
        latency_ms = {k: round(float(v), 4) for k, v in zip(_PERCENTILES, pct, strict=True)}
        latency_ms["max"] = round(float(lat_ms.max()), 4)
        latency_ms["mean"] = round(float(lat_ms.mean()), 4)
    else:
        latency_ms = {k: math.nan for k in (*_PERCENTILES, "max", "mean")}

    lags = send_lag[~np.isnan(send_lag)]
    lag_p99 = float(np.percentile(lags, 99)) if lags.size else 0.0
    lag_max = float(lags.max()) if lags.size else 0.0
    codes, counts = np.unique(status[responded], return_counts=True)
    status_counts = {int(c): int(k) for c, k in zip(codes, counts, strict=True)}
    ok = int(((status >= 200) & (status < 300)).sum())
    completed = int(responded.sum())
    span = max(last_send - t0, duration)
    return OpenLoopResult(
        rate=rate,
        duration=duration,
        schedule=schedule,
        scheduled=n,
        sent=sent,
        completed=completed,
        ok=ok,
        http_errors=completed - ok,
        connection_errors=int((status == CONN_ERROR).sum()),
        timeouts=int((status == TIMEOUT).sum()),
        callback_errors=counters["callback_errors"],
        first_callback_error=callback_failures[0] if callback_failures else None,
        status_counts=status_counts,
        latency_ms=latency_ms,
        achieved_rate=completed / span if span > 0 else 0.0,
        send_rate=sent / span if span > 0 else 0.0,
        lag_p99_ms=lag_p99 * 1e3,
        lag_max_ms=lag_max * 1e3,
        max_outstanding=counters["max_outstanding"],
        client_cpu_us_per_request=cpu / sent * 1e6 if sent else 0.0,
        generator_behind=lag_p99 > max_lag_p99 or sent < n,
        wall_seconds=wall,
        intended=offsets,
        send_lag=send_lag,
        latency=latency,
        status=status,
    )
