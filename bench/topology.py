"""The scale-out topology under open-loop load: N serving processes and the learner, every process counted.

Owns the topology benchmark of issue 13: it starts ``kassa serve --workers N --learner child`` (a supervisor,
N stateless HTTP workers on one port and `kassa learn` as a child: the whole topology on this machine) on
the same generated catalog as `bench/decision_latency.py`, then for each ``--rates`` drives
``POST /v1/decisions`` open-loop, posting every decision's events (impressions, ~10 % accepts) so the
learner joins and learns, then the same load on ``POST /_bench/noop`` of the same server. Latency is timed
from each request's intended send time; CPU is the sum over the supervisor, every worker and the learner
(Linux schedstat of every thread). ``--workers 1,2`` also measures one worker, for the curve from one to
two serving processes. ``--json`` ends with one JSON object holding ``ratio_1000``, ``ratio_2000``,
``cpu_ratio`` and ``errors`` (of the largest worker count); ``--write-docs`` rewrites its section of
docs/benchmarks.md.

Events: one ``POST /v1/events`` per answered decision, holding that decision's impressions (one per shown
offer) and, for ~10 % of decisions, an accept: what the confirmation-page snippet sends for one page view.

Backends: ``--backends embedded`` (the default: SQLite event and decision-record logs, state in process) or
``--backends production``: Redis state (``state.backend: redis``) and learner lease, PostgreSQL metadata (a
fresh database on ``--postgres-url``'s server, dropped after the run) and the JetStream event bus (streams under
a prefix of this run, deleted after it); the learner reads JetStream (``roles.learner_input: jetstream``) when
this build accepts that setting, else its SQLite tail (which then sees the decision records but no events).
Servers at ``--redis-url``, ``--postgres-url`` and ``--nats-url`` (127.0.0.1 by default). ``--settings FILE``
is applied first; the backend settings and ``data_dir`` replace its values.

    python bench/topology.py --workers 1,2 --rates 1000,2000 --duration 20 --json
    python bench/topology.py --backends production --workers 2 --rates 1000,2000 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import yaml

from benchdocs import DOCS, write_section
from decision_latency import (
    ADMIN_KEY,
    PUB_KEY,
    Workload,
    _free_port,
    _r,
    machine_info,
    make_catalog,
    measure_pair,
    run_phase,
    settle,
    summarize_repeat,
    versions,
    wait_ready,
    wait_workers,
)
from kassa.loadtest import ConnectionPool

START, END = "<!-- bench:topology:start -->", "<!-- bench:topology:end -->"


def jetstream_learner_input() -> bool:
    """Whether this build's `kassa learn` reads JetStream (the event-bus part adds `JetStreamInput`)."""
    from kassa.learn.online import inputs

    return hasattr(inputs, "JetStreamInput")


@contextlib.contextmanager
def production_backends(args: argparse.Namespace, tag: str) -> Iterator[dict[str, Any]]:
    """The settings of the production backends for one run, on names of its own: a fresh PostgreSQL
    database, a Redis key prefix and JetStream streams under a prefix; all removed afterwards."""
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    name = f"kassa_topology_{tag}"
    admin = make_url(args.postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    prefix = f"kassa-topology-{tag}"
    stream_prefix = f"ktopo{tag}".replace("_", "")
    cfg: dict[str, Any] = {
        "metadata": {"url": make_url(args.postgres_url).set(database=name).render_as_string(hide_password=False)},
        "state": {"backend": "redis", "redis_url": args.redis_url, "key_prefix": f"{prefix}:state"},
        "events": {"backend": "jetstream", "nats_url": args.nats_url, "prefix": stream_prefix},
        "roles": {"lease": "redis", "redis_url": args.redis_url, "lease_prefix": prefix,
                  "learner_input": "jetstream" if jetstream_learner_input() else "sqlite"},
    }
    try:
        yield cfg
    finally:
        with contextlib.suppress(Exception), psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(args.redis_url)
            for pattern in (f"{prefix}:*",):
                keys = list(client.scan_iter(match=pattern, count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i:i + 1000])
            client.close()
        # on a thread of its own: this runs inside the bench's event loop
        cleanup = threading.Thread(target=lambda: asyncio.run(_delete_streams(args.nats_url, stream_prefix.upper())))
        cleanup.start()
        cleanup.join(30)


async def _delete_streams(url: str, prefix: str) -> None:
    import nats

    try:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    except Exception:
        return
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(prefix):
                await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def topology(args: argparse.Namespace, workers: int) -> AsyncIterator[tuple[int, int, Path]]:
    """Yield ``(port, supervisor pid, data dir)`` of a ready ``kassa serve --workers N --learner child``."""
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="kassa-topology-"))
        root = Path(tmp)
        catalog = root / "catalog.yaml"
        catalog.write_text(yaml.safe_dump(make_catalog(args.offers), sort_keys=False))
        cfg: dict[str, Any] = yaml.safe_load(Path(args.settings).read_text()) if args.settings else {}
        if args.backends == "production":
            backends = stack.enter_context(production_backends(args, f"{os.getpid()}_{workers}"))
            for section, values in backends.items():
                cfg[section] = {**(cfg.get(section) or {}), **values}
        cfg.update({"data_dir": str(root / "data"), "catalog_file": str(catalog)})
        cfg_path = root / "kassa.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        port = _free_port()
        env = {**os.environ, "KASSA_ADMIN_KEY": ADMIN_KEY, "KASSA_PUBLISHABLE_KEY": PUB_KEY,
               "KASSA_SERVER__BENCH_ENDPOINTS": "true"}
        log_path = root / "server.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kassa", "serve", "--settings", str(cfg_path), "--port", str(port),
                 "--workers", str(workers), "--learner", "child"],
                env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            try:
                try:
                    await wait_ready("127.0.0.1", port, proc, args.ready_timeout)
                    await wait_workers(log_path, workers, proc, args.ready_timeout)
                except RuntimeError as exc:
                    sys.stderr.write(f"{exc}\n--- server output ---\n{log_path.read_text(errors='replace')}\n")
                    raise SystemExit(1) from None
                yield port, proc.pid, log_path
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        if args.verbose:
            sys.stderr.write(f"--- server output ---\n{log_path.read_text(errors='replace')}\n")


def _learned(log_path: Path) -> int:
    import re

    found = re.findall(r"\((\d+) examples learned\)", log_path.read_text(errors="replace"))
    return max((int(n) for n in found), default=0)


async def measure(args: argparse.Namespace, workers: int, log: Any) -> dict[str, Any]:
    workload = Workload(args.seed, args.customers, args.accept_rate)
    out: dict[str, Any] = {"workers": workers, "rates": {}}
    async with topology(args, workers) as (port, pid, log_path):
        pool = await ConnectionPool("127.0.0.1", port, args.connections, max_size=4 * args.connections).start()
        events_pool = await ConnectionPool("127.0.0.1", port, args.event_connections).start()
        try:
            for rate in args.rates:
                args.rate = rate
                n = int(rate * max(args.duration, args.warmup) * 1.2) + 100
                if args.warmup > 0:
                    log(f"{workers} worker(s), {rate:g}/s: warm-up {args.warmup:g} s")
                    bodies = workload.decision_bodies(n, f"w{workers}-{rate:g}-warm")
                    for path in ("/v1/decisions", "/_bench/noop"):
                        await run_phase(pool, events_pool, workload, bodies, path, args, args.warmup)
                        await settle(events_pool, args.settle)
                bodies = workload.decision_bodies(n, f"w{workers}-{rate:g}")
                dec, noop = await measure_pair(pool, events_pool, workload, bodies, args, pid,
                                               f"{workers} worker(s), {rate:g}/s, {args.duration:g} s each", log)
                res = summarize_repeat(dec, noop)
                res.pop("decisions", None)
                res.pop("noop", None)
                per_dec, per_noop = res["server_cpu_us_per_decision"], res["server_cpu_us_per_noop"]
                res["cpu_ratio"] = _r(per_dec / per_noop) if per_dec and per_noop else None
                for name, ph in (("decisions", dec), ("noop", noop)):
                    if ph.first_error:
                        log(f"  first {name} error: {ph.first_error}")
                if dec.events.first_error:
                    log(f"  first events error: {dec.events.first_error}")
                out["rates"][f"{rate:g}"] = res
                log(f"  p99 {res['client_p99_ms']} ms vs no-op {res['noop_client_p99_ms']} ms (ratio "
                    f"{res['p99_ratio_to_noop']}); CPU {per_dec} vs {per_noop} µs; errors {res['errors']}"
                    f"+{res['event_errors']}; {'valid' if res['valid'] else 'INVALID (generator behind)'}")
        finally:
            await pool.close()
            await events_pool.close()
        await asyncio.sleep(3.0)
        out["learned"] = _learned(log_path)  # the learner's last snapshot: it learned under this load
    return out


async def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    runs = [await measure(args, w, log) for w in args.workers]
    top = runs[-1]["rates"]

    def pick(rate: float, key: str) -> Any:
        r = top.get(f"{rate:g}")
        return None if r is None else r[key]

    cpu_ratios = [r["cpu_ratio"] for r in top.values() if r["cpu_ratio"] is not None]
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {
        "benchmark": "topology",
        "workers": args.workers,
        "rates": args.rates,
        "duration": args.duration,
        "warmup": args.warmup,
        "offers": args.offers,
        "backends": args.backends,
        "settings": _describe_backends(args),
        "ratio_1000": pick(1000, "p99_ratio_to_noop"),
        "ratio_2000": pick(2000, "p99_ratio_to_noop"),
        "cpu_ratio": max(cpu_ratios) if cpu_ratios else None,
        "errors": sum(r["errors"] + r["event_errors"] for run in runs for r in run["rates"].values()),
        "valid": all(r["valid"] for run in runs for r in run["rates"].values()),
        "load_average": [round(x, 2) for x in load],
        "runs": runs,
        "machine": machine_info(),
        "python": platform.python_version(),
        "versions": versions(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _describe_backends(args: argparse.Namespace) -> str:
    if args.backends == "production":
        learner = "JetStream" if jetstream_learner_input() else "its SQLite tail (no events: not wired in this build)"
        text = f"production (Redis state and lease, PostgreSQL metadata, JetStream events; the learner reads {learner})"
    else:
        text = "embedded (SQLite logs)"
    return f"{text}, settings {args.settings}" if args.settings else text


def docs_section(res: dict[str, Any]) -> str:
    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    m = res["machine"]
    cmd = (f"python bench/topology.py --workers {','.join(map(str, res['workers']))} --rates "
           f"{','.join(f'{r:g}' for r in res['rates'])} --duration {res['duration']:g} --warmup {res['warmup']:g}"
           + (f" --backends {res['backends']}" if res.get("backends", "embedded") != "embedded" else ""))
    rows = []
    for run in res["runs"]:
        for rate, r in run["rates"].items():
            rows.append(
                f"| {run['workers']} | {rate} | {fmt(r['client_p50_ms'])} | {fmt(r['client_p99_ms'])} | "
                f"{fmt(r['noop_client_p99_ms'])} | {fmt(r['p99_ratio_to_noop'])} | "
                f"{fmt(r['server_cpu_us_per_decision'])} | {fmt(r['server_cpu_us_per_noop'])} | "
                f"{fmt(r['cpu_ratio'])} | {r['errors']}+{r['event_errors']} | "
                f"{fmt(r['generator_lag_p99_ms'])} | {'yes' if r['valid'] else 'no'} |")
    table = "\n".join(rows)
    learned = ", ".join(f"{run['workers']} worker(s): {run['learned']:,}" for run in res["runs"])
    return f"""{START}
## Topology: serving workers and the learner

`{cmd}` on {m["cpu"]} ({m["cores"]} cores), Python {res["python"]}; generator and every process of the
topology on the same machine; load average at the end {res["load_average"]}; {res["date"]}.

`kassa serve --workers N --learner child`: a supervisor, N stateless HTTP workers on one port and `kassa
learn` as a child process; backends: {res["settings"]}. Each decision is followed by its events; the learner
joins and learns them (examples learned by the last snapshot: {learned}). CPU per request counts every
process (supervisor, workers, learner). The no-op phase runs on the same server at the same rate.

| workers | rate/s | p50 ms | p99 ms | no-op p99 ms | p99 ratio | CPU µs/decision | CPU µs/no-op | CPU ratio \
| errors (+events) | gen. lag p99 ms | valid |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|
{table}

Summary (largest worker count): ratio at 1,000/s **{fmt(res["ratio_1000"])}** (target ≤ 3), at 2,000/s
**{fmt(res["ratio_2000"])}** (target ≤ 5), CPU ratio **{fmt(res["cpu_ratio"])}** (target ≤ 2), errors
{res["errors"]}; {"all phases valid" if res["valid"] else "**some phases invalid: the generator fell behind**"}.
{END}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="2", help="comma-separated worker counts to measure (default 2)")
    p.add_argument("--rates", default="1000,2000", help="comma-separated decisions per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per endpoint and rate")
    p.add_argument("--settings", help="Kassa settings file for the server; data_dir and --backends replace values")
    p.add_argument("--backends", choices=["embedded", "production"], default="embedded",
                   help="embedded (SQLite logs, state in process) or production (Redis state and lease, PostgreSQL "
                   "metadata, JetStream events)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
                   help="a PostgreSQL server (any database on it): the run creates and drops a database of its own")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--offers", type=int, default=50)
    p.add_argument("--customers", type=int, default=5_000)
    p.add_argument("--accept-rate", type=float, default=0.1)
    p.add_argument("--schedule", choices=["fixed", "poisson"], default="fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--event-connections", type=int, default=8)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--max-lag-ms", type=float, default=1.0, help="generator send-lag p99 above this: invalid")
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--json", action="store_true", help="end the output with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS.name}")
    p.add_argument("--verbose", action="store_true", help="print the server's output at the end")
    args = p.parse_args(argv)
    args.workers = [int(w) for w in str(args.workers).split(",")]
    args.rates = [float(r) for r in str(args.rates).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        res = asyncio.run(bench(args, log))
    else:
        res = uvloop.run(bench(args, log))
    if args.write_docs:
        write_section(docs_section(res), START, END, DOCS)
        log(f"wrote {DOCS}")
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
