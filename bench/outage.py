"""Redis outage under load: SIGKILL the online store's Redis mid-run and measure what buyers would see.

Owns the degraded-mode benchmark of issue 15. It starts a throwaway ``redis-server`` on a free port
(never the shared one) and ``kassa serve`` with the Redis online store and feature views that every
decision reads (push + stream, so order events write Redis too). After a no-op baseline at the same rate
(``POST /_bench/noop``), it drives ``POST /v1/decisions`` open-loop at ``--rate`` and ``POST /v1/events``
(order events) at ``--event-rate`` for ``--before`` + ``--down`` + ``--after`` seconds, SIGKILLs Redis
``--before`` seconds in and restarts it (empty) ``--down`` seconds later. Latency is timed from each
request's intended send time. Reported per phase (up, down, recovered): P50/P99/max, 5xx, other errors,
the share of decisions answered with ``fallback: true``; the recovery time (restart to the last fallback
decision); and the server's log volume while Redis was down. ``--json`` ends the output with one JSON
object, ``--write-docs`` refreshes the section of ``docs/benchmarks.md``.

    python bench/outage.py --rate 400 --event-rate 20 --down 10 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import yaml

from benchdocs import DOCS, write_section
from decision_latency import Workload, _free_port, machine_info, make_catalog, versions, wait_ready
from kassa.loadtest import ConnectionPool, OpenLoopResult, run_open_loop

ADMIN_KEY = "bench-admin"
PUB_KEY = "bench-pub"
HEADERS = f"Authorization: Bearer {PUB_KEY}\r\nContent-Type: application/json\r\n".encode()
START, END = "<!-- bench:outage:start -->", "<!-- bench:outage:end -->"

FEATURES = {
    "entities": [{"name": "customer", "join_key": "customer_id"}, {"name": "session", "join_key": "session_id"}],
    "views": [
        {"name": "customer_signals", "kind": "push", "entity": "customer", "ttl": "30d",
         "fields": [{"name": "segment", "dtype": "str", "default": "unknown", "max_length": 32}]},
        {"name": "customer_activity", "kind": "stream", "entity": "customer", "ttl": "30d",
         "source": {"events": ["order"]},
         "fields": [{"name": "orders_1h", "dtype": "int", "agg": "count", "window": "1h", "default": 0},
                    {"name": "spend_7d", "dtype": "float", "agg": "sum", "of": "order.total", "window": "7d",
                     "default": 0.0}]},
    ],
}


# --------------------------------------------------------------------------- the throwaway Redis
class Redis:
    """Our own redis-server on ``port``: `kill` SIGKILLs this process only (by pid), `start` restarts it."""

    def __init__(self, port: int, workdir: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise SystemExit("redis-server is not on PATH; the outage bench starts (and kills) its own")
        self.server, self.port, self.workdir = server, port, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)
        client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@contextlib.asynccontextmanager
async def kassa_with_redis(args: argparse.Namespace, root: Path) -> AsyncIterator[tuple[int, Redis, Path]]:
    """Yield ``(port, redis, server_log)`` of a ready ``kassa serve`` on a throwaway Redis."""
    redis = Redis(_free_port(), root)
    redis.start()
    catalog_path = root / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(make_catalog(args.offers), sort_keys=False))
    features_path = root / "features.yaml"
    features_path.write_text(yaml.safe_dump(FEATURES, sort_keys=False))
    cfg_path = root / "kassa.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "data_dir": str(root / "data"), "catalog_file": str(catalog_path),
        "features": {"online_store": "redis", "redis_url": f"redis://127.0.0.1:{redis.port}/0",
                     "definitions_file": str(features_path)},
    }))
    port = _free_port()
    env = {**os.environ, "KASSA_ADMIN_KEY": ADMIN_KEY, "KASSA_PUBLISHABLE_KEY": PUB_KEY,
           "KASSA_SERVER__BENCH_ENDPOINTS": "true"}
    log_path = root / "server.log"
    try:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kassa", "serve", "--config", str(cfg_path), "--port", str(port)],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            try:
                try:
                    await wait_ready("127.0.0.1", port, proc, args.ready_timeout)
                except RuntimeError as exc:
                    sys.stderr.write(f"{exc}\n--- server output ---\n{log_path.read_text(errors='replace')}\n")
                    raise SystemExit(1) from None
                yield port, redis, log_path
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
    finally:
        redis.kill()


# --------------------------------------------------------------------------- the run
def order_events(n: int, customers: int, tag: str) -> list[bytes]:
    enc = msgspec.json.Encoder()
    now = time.time()
    return [enc.encode({"events": [{
        "event_id": f"{tag}-{i}", "type": "order", "customer": {"id": f"cust-{i % customers:05d}"},
        "order": {"id": f"{tag}-{i}", "total": 20.0 + i % 50, "created_at": now,
                  "items": [{"sku": f"sku-{i % 2000:05d}", "category": "cat-01", "price": 20.0}]}}]})
        for i in range(n)]


def _pct(lat: np.ndarray, q: float) -> float | None:
    lat = lat[~np.isnan(lat)]
    return round(float(np.percentile(lat, q)) * 1000, 2) if lat.size else None


def recovery_seconds(intended: np.ndarray, fallback: np.ndarray, status: np.ndarray, kill: float,
                     restart: float) -> float:
    """Seconds from the restart until decisions fall back no more often than before the kill.

    A fallback also happens when a decision runs past its latency budget (a loaded machine), so "the last
    fallback after the restart" would measure CPU noise; instead: the first moment from which a 1 s window
    of decisions has a fallback share at most that of the up phase (plus 2 points).
    """
    answered = status == 200
    up = answered & (intended < kill)
    normal = float(fallback[up].mean()) + 0.02 if up.any() else 0.02
    t = restart
    end = float(np.nanmax(intended))
    while t + 1.0 <= end:
        window = answered & (intended >= t) & (intended < t + 1.0)
        if window.any() and float(fallback[window].mean()) <= normal:
            return t - restart
        t += 0.1
    return float("inf")


def per_second_p99(res: OpenLoopResult) -> list[float | None]:
    """P99 of each second of the run by intended send time: shows where in the outage the tail sits."""
    seconds = int(np.nanmax(res.intended)) + 1 if res.intended.size else 0
    return [_pct(res.latency[(res.intended >= s) & (res.intended < s + 1)], 99) for s in range(seconds)]


def phase_stats(res: OpenLoopResult, fallback: np.ndarray, lo: float, hi: float) -> dict[str, Any]:
    sel = (res.intended >= lo) & (res.intended < hi)
    status = res.status[sel]
    lat = res.latency[sel]
    answered = status > 0
    return {
        "requests": int(sel.sum()),
        "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
        "max_ms": round(float(np.nanmax(lat)) * 1000, 2) if np.isfinite(lat).any() else None,
        "5xx": int(((status >= 500) & (status < 600)).sum()),
        "other_errors": int((~answered).sum() + ((status >= 400) & (status < 500)).sum()),
        "fallback_share": round(float(fallback[sel][answered].mean()), 4) if answered.any() else None,
    }


async def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kassa-outage-") as tmp:
        root = Path(tmp)
        async with kassa_with_redis(args, root) as (port, redis, log_path):
            pool = await ConnectionPool("127.0.0.1", port, args.connections, max_size=4 * args.connections).start()
            events_pool = await ConnectionPool("127.0.0.1", port, args.event_connections).start()
            workload = Workload(args.seed, customers=args.customers)
            try:
                log(f"warm-up {args.warmup:.0f} s, then no-op baseline {args.baseline:.0f} s at {args.rate:.0f}/s")
                warm = workload.decision_bodies(int(args.rate * args.warmup) + 1, "warm")
                await run_open_loop(lambda i: ("POST", "/v1/decisions", warm[i]), args.rate, args.warmup, pool,
                                    headers=HEADERS, timeout=args.timeout)
                noop = await run_open_loop(lambda i: ("POST", "/_bench/noop", warm[i % len(warm)]), args.rate,
                                           args.baseline, pool, headers=HEADERS, timeout=args.timeout)
                total = args.before + args.down + args.after
                bodies = workload.decision_bodies(int(args.rate * total) + 1, "run")
                events = order_events(int(args.event_rate * total) + 1, args.customers, "ev")
                fallback = np.zeros(len(bodies), dtype=bool)

                def on_decision(i: int, status: int, body: bytes) -> None:
                    fallback[i] = status == 200 and b'"fallback":true' in body

                marks: dict[str, float] = {}

                async def chaos(t0: float) -> None:
                    await asyncio.sleep(max(0.0, t0 + args.before - time.perf_counter()))
                    marks["log_at_kill"] = log_path.stat().st_size
                    marks["lines_at_kill"] = log_path.read_bytes().count(b"\n")
                    redis.kill()
                    marks["kill"] = time.perf_counter() - t0
                    log(f"SIGKILLed redis at {marks['kill']:.1f} s")
                    await asyncio.sleep(max(0.0, t0 + args.before + args.down - time.perf_counter()))
                    marks["log_at_restart"] = log_path.stat().st_size
                    marks["lines_at_restart"] = log_path.read_bytes().count(b"\n")
                    await asyncio.to_thread(redis.start)
                    marks["restart"] = time.perf_counter() - t0
                    log(f"redis back at {marks['restart']:.1f} s")

                log(f"run: {total:.0f} s at {args.rate:.0f} decisions/s + {args.event_rate:.0f} events/s; "
                    f"Redis down from {args.before:.0f} s for {args.down:.0f} s")
                t0 = time.perf_counter()
                dec, ev, _ = await asyncio.gather(
                    run_open_loop(lambda i: ("POST", "/v1/decisions", bodies[i]), args.rate, total, pool,
                                  on_decision, headers=HEADERS, timeout=args.timeout),
                    run_open_loop(lambda i: ("POST", "/v1/events", events[i]), args.event_rate, total, events_pool,
                                  headers=HEADERS, timeout=args.timeout),
                    chaos(t0),
                )
                lines_end = log_path.read_bytes().count(b"\n")
            finally:
                await pool.close()
                await events_pool.close()
            kill, restart = marks["kill"], marks["restart"]
            n = min(len(fallback), len(dec.intended))
            recovery = recovery_seconds(dec.intended[:n], fallback[:n], dec.status[:n], kill, restart)
            down_log = int(marks["log_at_restart"] - marks["log_at_kill"])
            down_lines = int(marks["lines_at_restart"] - marks["lines_at_kill"])
            raw_log = log_path.read_bytes()
            server_log = raw_log.decode(errors="replace")
            down_text = raw_log[int(marks["log_at_kill"]):int(marks["log_at_restart"])].decode(errors="replace")

    fb = fallback[:n]
    return {
        "bench": "outage",
        "date": dt.date.today().isoformat(),
        "machine": machine_info(),
        "versions": versions(),
        "config": {"rate": args.rate, "event_rate": args.event_rate, "before_s": args.before, "down_s": args.down,
                   "after_s": args.after, "connections": args.connections, "offers": args.offers},
        "noop_baseline": {"p50_ms": noop.latency_ms.get("p50"), "p99_ms": noop.latency_ms.get("p99"),
                          "errors": noop.http_errors + noop.connection_errors + noop.timeouts},
        "kill_at_s": round(kill, 2), "restart_at_s": round(restart, 2),
        "decisions": {
            "up": phase_stats(dec, fb, 0.0, kill),
            "down": phase_stats(dec, fb, kill, restart),
            "recovered": phase_stats(dec, fb, restart + args.recovery_limit, float("inf")),
        },
        "events": {
            "up": phase_stats(ev, np.zeros(len(ev.status), dtype=bool), 0.0, kill),
            "down": phase_stats(ev, np.zeros(len(ev.status), dtype=bool), kill, restart),
            "after": phase_stats(ev, np.zeros(len(ev.status), dtype=bool), restart, float("inf")),
        },
        "decision_p99_ms_by_second": per_second_p99(dec),
        "recovery_s": round(recovery, 2),
        "log_while_down": {"bytes": down_log, "lines": down_lines},
        "log_total_lines": lines_end,
        "generator_behind": bool(dec.generator_behind),
        "generator_lag_p99_ms": round(dec.lag_p99_ms, 2),
        "server_log_tail": server_log[-1500:] if args.verbose else None,
        "server_log_while_down": down_text if args.verbose else None,
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median P99 while down, carrying every run's headline numbers (never one lucky run)."""
    ordered = sorted(runs, key=lambda r: r["decisions"]["down"]["p99_ms"] or float("inf"))
    res = dict(ordered[len(ordered) // 2])
    res["repeats"] = [{
        "down_p99_ms": r["decisions"]["down"]["p99_ms"], "up_p99_ms": r["decisions"]["up"]["p99_ms"],
        "noop_p99_ms": r["noop_baseline"]["p99_ms"], "recovery_s": r["recovery_s"],
        "log_lines_while_down": r["log_while_down"]["lines"], "generator_lag_p99_ms": r["generator_lag_p99_ms"],
        "5xx": sum(p["5xx"] for k in ("decisions", "events") for p in r[k].values()),
    } for r in runs]
    return res


def verdict(res: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    d = res["decisions"]
    return {
        "no_5xx": all(r["5xx"] == 0 for r in res["repeats"]),  # in every run, not only the median one
        "p99_down_ok": d["down"]["p99_ms"] is not None and d["down"]["p99_ms"] <= args.p99_target_ms,
        "recovered_in_time": res["recovery_s"] <= args.recovery_limit,
        "log_bounded": res["log_while_down"]["lines"] <= args.max_log_lines,
    }


# --------------------------------------------------------------------------- output
def render_table(res: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title=f"Redis SIGKILLed for {res['config']['down_s']:.0f} s under {res['config']['rate']:.0f} "
                    f"decisions/s + {res['config']['event_rate']:.0f} events/s")
    for col in ("requests", "phase", "P50 ms", "P99 ms", "max ms", "5xx", "other errors", "fallback"):
        t.add_column(col, justify="right")
    for kind in ("decisions", "events"):
        for phase, p in res[kind].items():
            t.add_row(kind, phase, str(p["p50_ms"]), str(p["p99_ms"]), str(p["max_ms"]), str(p["5xx"]),
                      str(p["other_errors"]), "" if kind == "events" else f"{(p['fallback_share'] or 0):.1%}")
    return t


def docs_section(res: dict[str, Any]) -> str:
    d, e, c = res["decisions"], res["events"], res["config"]
    v = res["verdict"]
    reps = "\n".join(f"| {i + 1} | {r['up_p99_ms']} | {r['down_p99_ms']} | {r['noop_p99_ms']} | {r['recovery_s']} | "
                     f"{r['log_lines_while_down']} | {r['5xx']} | {r['generator_lag_p99_ms']} |"
                     for i, r in enumerate(res["repeats"]))
    rows = "\n".join(
        f"| {kind} | {phase} | {p['requests']:,} | {p['p50_ms']} | {p['p99_ms']} | {p['max_ms']} | {p['5xx']} | "
        f"{p['other_errors']} | {'' if kind == 'events' else format(p['fallback_share'] or 0, '.1%')} |"
        for kind, phases in (("decisions", d), ("events", e)) for phase, p in phases.items())
    return f"""{START}
## Redis outage (`bench/outage.py`)

{res['date']}, {res['machine']['cpu']} ({res['machine']['cores']} cores, shared), one `kassa serve` worker on
the Redis online store (a throwaway `redis-server`), open-loop {c['rate']:.0f} decisions/s +
{c['event_rate']:.0f} order events/s from one client process. Redis was SIGKILLed {res['kill_at_s']} s into
the run and restarted (empty) {c['down_s']:.0f} s later. "recovered" starts 5 s after the restart.
No-op baseline at the same rate: P50 {res['noop_baseline']['p50_ms']} ms, P99 {res['noop_baseline']['p99_ms']} ms.

| kind | phase | requests | P50 ms | P99 ms | max ms | 5xx | other errors | fallback |
|---|---|---:|---:|---:|---:|---:|---:|---:|
{rows}

All {len(res['repeats'])} runs (the table is the median one by P99 while down):

| run | P99 up ms | P99 down ms | no-op P99 ms | recovery s | log lines while down | 5xx | generator lag P99 ms |
|---:|---:|---:|---:|---:|---:|---:|---:|
{reps}

Recovery (restart → decisions fall back no more than before the kill): **{res['recovery_s']} s**.
Server log while Redis was down: {res['log_while_down']['lines']} lines,
{res['log_while_down']['bytes']:,} bytes (issue 15, before the breaker: 4,001 warnings with tracebacks,
12.9 MB, P99 104 ms). Targets: 0 5xx {'✔' if v['no_5xx'] else '✘'}, P99 while down
≤ 20 ms {'✔' if v['p99_down_ok'] else '✘'}, recovery ≤ 5 s {'✔' if v['recovered_in_time'] else '✘'},
bounded log {'✔' if v['log_bounded'] else '✘'}. The load generator shares the 2 cores with the server: a send lag
P99 above 1 ms (last column) means some requests left late, and latency is counted from the intended time.

`python bench/outage.py --rate {c['rate']:.0f} --event-rate {c['event_rate']:.0f} --down {c['down_s']:.0f} --write-docs`
{END}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=400.0, help="decisions per second (default 400)")
    p.add_argument("--event-rate", type=float, default=20.0, help="order events per second (default 20)")
    p.add_argument("--before", type=float, default=10.0, help="seconds of load before the kill")
    p.add_argument("--down", type=float, default=10.0, help="seconds Redis stays dead")
    p.add_argument("--after", type=float, default=15.0, help="seconds of load after the restart")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--baseline", type=float, default=5.0, help="seconds of the no-op baseline")
    p.add_argument("--offers", type=int, default=50)
    p.add_argument("--customers", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--event-connections", type=int, default=8)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--ready-timeout", type=float, default=30.0)
    p.add_argument("--p99-target-ms", type=float, default=20.0)
    p.add_argument("--recovery-limit", type=float, default=5.0)
    p.add_argument("--max-log-lines", type=int, default=200,
                   help="server log lines while down counted as bounded (before: 4,001 warnings with tracebacks)")
    p.add_argument("--repeats", type=int, default=3, help="whole runs (fresh server and Redis each); medians")
    p.add_argument("--json", action="store_true", help="end the output with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS.name}")
    p.add_argument("--verbose", action="store_true", help="include the server log's tail in the JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(stderr=False)

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        runner = asyncio.run
    else:
        runner = uvloop.run
    runs = []
    for r in range(args.repeats):
        log(f"repeat {r + 1} of {args.repeats}")
        runs.append(runner(bench(args, log)))
    res = median_run(runs)
    res["verdict"] = verdict(res, args)
    console.print(render_table(res))
    console.print(res["verdict"], f"recovery {res['recovery_s']} s", res["log_while_down"])
    if args.write_docs:
        write_section(docs_section(res), START, END)
        log(f"wrote {DOCS}")
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 0 if all(res["verdict"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
