"""One load-generator process: its share of the open-loop schedule, its own keep-alive pool.

Owns :class:`WorkerSpec` and :func:`worker_process` (the ``multiprocessing`` target). Every worker
derives the same global schedule (seeded arrival times and request types) and takes every
``workers``-th request, so N processes together send exactly the one schedule. The protocol with the
parent over a ``Pipe``: the worker opens its pool and idle connections, sends one request of each
type as a pre-flight check and a few warm-up decisions (which also seed the decisions later beacons
refer to), answers ``("ready", i, info)``, waits for ``("start", t0_wall)``, runs, streams
``("progress", i, {...})`` twice a second, and ends with ``("result", i, {...})`` — raw per-request
arrays the parent turns into histograms — or ``("error", i, traceback)``. A ``("stop", None)`` during the
run (the parent's Ctrl-C) ends the send loop early: the result then holds the requests sent so far and
``stopped_at``. Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and the
parent, not each worker, decides what an interrupted run keeps.

Send loop: request ``j`` is handed to the pool at its intended time whether or not earlier requests
have come back (a stalled server makes concurrency grow, never pauses the schedule). Latency runs
from the intended time to the last response byte; a request sent up to half a millisecond early (the
event loop's timers tick in milliseconds) is timed from its actual send. Send lag (actual minus
intended send time) is recorded per request: it is how the parent knows the generator kept up.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import numpy as np

from kassa.loadtest.client import ConnectionPool, RequestTimeout
from kassa.loadtest.idle import IdleHolder
from kassa.loadtest.mix import (
    ACCEPT,
    CLICK,
    DECISION,
    FEATURE_PUSH,
    IMPRESSION,
    NOOP,
    RequestFactory,
    assign_types,
)
from kassa.loadtest.profiles import REQUEST_TYPES, Payload
from kassa.loadtest.schedule import arrival_offsets

NOT_DONE, CONN_ERROR, TIMEOUT = 0, -1, -2
_TICK = 0.001  # event-loop timer resolution (epoll_wait and libuv both count milliseconds)
_EARLY = _TICK / 2  # how far ahead of its intended time a request may go out
_FD_MARGIN = 64


@dataclass
class WorkerSpec:
    """Everything one worker process needs (picklable)."""

    index: int
    workers: int
    host: str
    port: int
    base_path: str
    rate: float
    duration: float
    ramp: float
    schedule: str
    seed: int
    fractions: dict[str, float]
    payload: dict[str, Any]
    key: str | None
    secret_key: str | None
    webhook_secret: str | None
    connections: int
    idle: int
    idle_refresh: float
    timeout: float
    drain_timeout: float
    tag: str
    warmup_decisions: int = 8
    progress_interval: float = 0.5
    # Test hooks: make the generator itself late, to prove such a run is flagged invalid.
    debug_stall_at: float | None = None  # seconds into the run: block this process's loop...
    debug_stall_seconds: float = 0.0  # ...for this long
    debug_burn_us: float = 0.0  # burn this much CPU per request sent (a starved generator)


def raise_fd_limit(needed: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit towards ``needed`` (up to the hard limit); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if want > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    return soft, hard


def worker_process(spec: WorkerSpec, conn: Connection) -> None:
    """``multiprocessing`` target: run the worker, report any failure to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the run (module docstring)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
            asyncio.run(_Worker(spec, conn).main())
        else:
            uvloop.run(_Worker(spec, conn).main())
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", spec.index, traceback.format_exc()))
    finally:
        conn.close()


class _Worker:
    def __init__(self, spec: WorkerSpec, conn: Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.warnings: list[str] = []
        self.stop_requested = False

    async def main(self) -> None:
        spec = self.spec
        idle_share = spec.idle
        soft, hard = raise_fd_limit(idle_share + 4 * spec.connections + _FD_MARGIN)
        if idle_share + 4 * spec.connections + _FD_MARGIN > soft:
            capped = max(0, soft - 4 * spec.connections - _FD_MARGIN)
            self.warnings.append(
                f"worker {spec.index}: RLIMIT_NOFILE allows {soft} open files (hard limit {hard}); "
                f"idle connections capped at {capped} of {idle_share}"
            )
            idle_share = capped

        offsets = arrival_offsets(spec.rate, spec.duration, spec.schedule, spec.seed, spec.ramp)  # type: ignore[arg-type]
        n_total = len(offsets)
        types_all = assign_types(spec.fractions, n_total, spec.seed)
        self.uids = np.arange(spec.index, n_total, spec.workers, dtype=np.int64)
        self.offsets = offsets[spec.index :: spec.workers]
        self.types = types_all[spec.index :: spec.workers]
        rng = np.random.default_rng(spec.seed * 1_000_003 + spec.index)
        payload = msgspec.convert(spec.payload, Payload)
        self.customers = rng.integers(0, payload.customers, size=len(self.offsets) * payload.feature_push.rows + 1)

        pool = ConnectionPool(spec.host, spec.port, spec.connections, max_size=4 * spec.connections)
        await pool.start()
        self.pool = pool
        self.factory = RequestFactory(
            payload, pool.build, tag=spec.tag + f"w{spec.index}", seed=spec.seed + spec.index, key=spec.key,
            secret_key=spec.secret_key, webhook_secret=spec.webhook_secret, host=f"{spec.host}:{spec.port}",
            base_path=spec.base_path,
        )
        idle = IdleHolder(spec.host, spec.port, idle_share, spec.idle_refresh, seed=spec.seed + spec.index)
        t_idle = time.perf_counter()
        if idle_share:
            await idle.open()
        idle_open_s = time.perf_counter() - t_idle
        preflight = await self.preflight()
        self.conn.send(("ready", spec.index, {
            "preflight": preflight, "idle": idle.stats(), "idle_open_seconds": round(idle_open_s, 3),
            "fd_limit": [soft, hard], "warnings": self.warnings, "scheduled": len(self.offsets),
        }))
        loop = asyncio.get_running_loop()
        msg = await loop.run_in_executor(None, self.conn.recv)
        if msg[0] != "start":
            await idle.close()
            await pool.close()
            return
        idle.mark(reset=True)
        # A full collection in the middle of the run would stall the send loop for tens of ms on a big
        # heap (thousands of idle connections): collect now, keep what exists out of later collections.
        gc.collect()
        gc.freeze()

        def on_message() -> None:
            with contextlib.suppress(EOFError, OSError):
                if self.conn.recv()[0] == "stop":
                    self.stop_requested = True

        loop.add_reader(self.conn.fileno(), on_message)
        try:
            result = await self.run(msg[1], idle)
            result["idle"] = idle.stats()
        finally:
            loop.remove_reader(self.conn.fileno())
            await idle.close()
            await pool.close()
            gc.unfreeze()
        result["warnings"] = self.warnings
        self.conn.send(("result", spec.index, result))

    # ------------------------------------------------------------------ pre-flight
    def build(self, code: int, uid: int, k: int) -> bytes:
        f = self.factory
        if code in (DECISION, NOOP):
            return f.decision(uid, int(self.customers[k]), code)
        if code in (IMPRESSION, CLICK, ACCEPT):
            return f.beacon(code, uid)
        if code == FEATURE_PUSH:
            rows = f.payload.feature_push.rows
            return f.feature_push(tuple(int(c) for c in self.customers[k * rows : k * rows + rows]))
        return f.webhook(uid, int(self.customers[k]))

    async def _one(self, data: bytes) -> tuple[int, bytes]:
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

        def done(status: int, body: bytes, exc: BaseException | None) -> None:
            if not fut.done():
                fut.set_result((status, body) if exc is None else (0, repr(exc).encode()))

        self.pool.send(data, done, self.spec.timeout)
        return await fut

    async def preflight(self) -> dict[str, Any]:
        """One request of each type in the mix (decisions first: beacons need one); status and a snippet."""
        out: dict[str, Any] = {}
        codes = sorted({REQUEST_TYPES.index(t) for t in self.spec.fractions})
        decisions = self.spec.warmup_decisions if DECISION in codes else 0
        warm_uid = -1_000_000 * (self.spec.index + 1)  # outside the schedule's uids
        for k in range(decisions):
            status, body = await self._one(self.factory.decision(warm_uid - k, int(self.customers[0]), DECISION))
            if 200 <= status < 300:
                with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                    self.factory.on_decision(warm_uid - k, body)
            if k == 0:
                out["decision"] = {"status": status, "body": body[:4000].decode(errors="replace")}
        for code in codes:
            if code == DECISION:
                continue
            status, body = await self._one(self.build(code, warm_uid - 500 - code, 0))
            out[REQUEST_TYPES[code]] = {"status": status, "body": body[:4000].decode(errors="replace")}
        return out

    # ------------------------------------------------------------------ the measured run
    async def run(self, t0_wall: float, idle: IdleHolder) -> dict[str, Any]:
        spec = self.spec
        offsets, types, uids = self.offsets, self.types, self.uids
        n = len(offsets)
        send_t = np.full(n, np.nan)
        done_t = np.full(n, np.nan)
        status = np.zeros(n, dtype=np.int16)
        took = np.full(n, np.nan, dtype=np.float32)
        first_errors: dict[str, str] = {}
        completed: list[int] = []
        counters = {"outstanding": 0, "max_outstanding": 0, "remaining": n, "callback_errors": 0}
        loop = asyncio.get_running_loop()
        all_done = loop.create_future()
        perf = time.perf_counter
        finished = False
        factory = self.factory
        build = self.build
        send = self.pool.send
        timeout = spec.timeout

        def make_callback(j: int, code: int) -> Any:
            def callback(st: int, body: bytes, exc: BaseException | None) -> None:
                if finished:
                    return
                done_t[j] = perf()
                counters["outstanding"] -= 1
                completed.append(j)
                if exc is None:
                    status[j] = st
                    if 200 <= st < 300:
                        if code == DECISION:
                            try:
                                took[j] = factory.on_decision(int(uids[j]), body)
                            except (msgspec.DecodeError, msgspec.ValidationError) as err:
                                counters["callback_errors"] += 1
                                first_errors.setdefault("unreadable decision", f"{err}: {body[:200]!r}")
                    else:
                        first_errors.setdefault(f"{REQUEST_TYPES[code]} http {st}", body[:300].decode(errors="replace"))
                else:
                    status[j] = TIMEOUT if isinstance(exc, RequestTimeout) else CONN_ERROR
                    first_errors.setdefault(f"{REQUEST_TYPES[code]} {type(exc).__name__}", str(exc)[:300])
                counters["remaining"] -= 1
                if counters["remaining"] == 0 and not all_done.done():
                    all_done.set_result(None)

            return callback

        if n == 0:
            all_done.set_result(None)
        t0 = perf() + (t0_wall - time.time())
        sent = 0
        progress = loop.create_task(self._progress(t0, send_t, done_t, status, offsets, completed, idle,
                                                   lambda: sent))
        stall_at = spec.debug_stall_at
        burn = spec.debug_burn_us / 1e6
        cpu0 = time.process_time()
        with contextlib.suppress(asyncio.CancelledError):
            delay = t0 - perf()
            if delay > 0:
                await asyncio.sleep(delay)
        while sent < n and not self.stop_requested:
            now = perf() - t0
            if stall_at is not None and now >= stall_at:
                stall_at = None
                time.sleep(spec.debug_stall_seconds)  # test hook: the generator itself stops
                now = perf() - t0
            while sent < n and offsets[sent] <= now + _EARLY:
                code = int(types[sent])
                data = build(code, int(uids[sent]), sent)
                counters["outstanding"] += 1
                if counters["outstanding"] > counters["max_outstanding"]:
                    counters["max_outstanding"] = counters["outstanding"]
                send_t[sent] = perf()
                send(data, make_callback(sent, code), timeout)
                sent += 1
                if burn:
                    end = perf() + burn
                    while perf() < end:
                        pass
                now = perf() - t0
            if sent < n and not self.stop_requested:
                # Never ask for less than a tick: uvloop truncates sub-millisecond timers to zero,
                # which would turn this loop into a busy-wait that steals the server's CPU.
                await asyncio.sleep(max(_TICK, offsets[sent] - (perf() - t0) - _EARLY))
        last_send = perf()
        stopped_at = last_send - t0 if sent < n else None
        if sent < n:  # stopped early: the requests never sent are no part of the run
            n = sent
            offsets, types, uids = offsets[:n], types[:n], uids[:n]
            send_t, done_t, status, took = send_t[:n], done_t[:n], status[:n], took[:n]
            counters["remaining"] -= len(self.offsets) - n
            if counters["remaining"] <= 0 and not all_done.done():
                all_done.set_result(None)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(all_done), spec.drain_timeout)
        finished = True
        end_t = perf()
        cpu = time.process_time() - cpu0
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress

        undone = np.isnan(done_t)
        status[undone & (status == NOT_DONE)] = TIMEOUT
        intended_abs = offsets + t0
        # Outstanding at the end: a lower bound (the drain deadline), counted as a timeout.
        done_filled = np.where(undone, end_t, done_t)
        latency = done_filled - np.minimum(intended_abs, np.where(np.isnan(send_t), intended_abs, send_t))
        return {
            "uid": uids,
            "type": types,
            "intended": offsets,
            "send_lag": (send_t - intended_abs).astype(np.float32),
            "latency": latency,
            "done": (done_filled - t0).astype(np.float64),
            "status": status,
            "took_ms": took,
            "sent": sent,
            "scheduled": n,
            "stopped_at": stopped_at,
            "send_seconds": last_send - t0,
            "wall_seconds": end_t - t0,
            "cpu_seconds": cpu,
            "max_outstanding": counters["max_outstanding"],
            "callback_errors": counters["callback_errors"],
            "first_errors": first_errors,
            "orphan_beacons": factory.orphans,
            "pool_connect_errors": self.pool.connect_errors,
        }

    async def _progress(self, t0: float, send_t: np.ndarray, done_t: np.ndarray, status: np.ndarray,
                        offsets: np.ndarray, completed: list[int], idle: IdleHolder, sent: Any) -> None:
        """Twice a second: what was sent and answered since the last report, for the live view."""
        perf = time.perf_counter
        cpu_last, t_last = time.process_time(), perf()
        while True:
            await asyncio.sleep(self.spec.progress_interval)
            idx = np.array(completed, dtype=np.int64)
            completed.clear()
            lat = (done_t[idx] - (offsets[idx] + t0)) if idx.size else np.empty(0)
            st = status[idx]
            errors = int(((st < 200) | (st >= 300)).sum()) if idx.size else 0
            n_sent = sent()
            now = perf()
            lag = now - t0 - offsets[n_sent] if n_sent < len(offsets) and offsets[n_sent] < now - t0 else 0.0
            cpu = time.process_time()
            idle.mark()
            with contextlib.suppress(OSError):
                self.conn.send(("progress", self.spec.index, {
                    "t": now - t0, "sent": n_sent, "answered": int(idx.size), "errors": errors,
                    "lat_ms": (lat * 1e3).astype(np.float32), "behind_ms": max(0.0, lag * 1e3),
                    "cpu_util": (cpu - cpu_last) / max(1e-9, now - t_last), "idle_held": idle.held,
                    "outstanding": self.pool.busy + self.pool.queued,
                }))
            cpu_last, t_last = cpu, now
