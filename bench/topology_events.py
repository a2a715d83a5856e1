"""Events through HTTP serving processes into JetStream, and streaming features fresh in Redis (issue 13).

Owns the event half of issue 13's topology targets: >= 20,000 events/s acknowledged through JetStream by 2
HTTP serving processes, with streaming features fresh at P99 <= 250 ms. It starts, on this machine:

- ``kassa serve --workers N --learner external`` with ``events.backend: jetstream`` (a stream prefix of its
  own on the NATS at ``--nats-url``), ``features.online_store: redis`` (a key prefix of its own) and the
  example feature definitions (``customer_activity`` over order events, ``offer_performance`` over
  impressions and accepts), so the serving workers compute no stream views (``features.streaming: auto``);
- ``kassa stream`` on the same settings: it tails the events stream and writes the views' rows to Redis.

Then, for each ``--rates`` (events/s), it posts ``POST /v1/events`` open-loop in batches of ``--batch``
events (what a server-side sender batches: a webhook relay, a backend forwarding its storefront's beacons)
for ``--duration`` s: checkouts of one order event (1-4 items, one of 20,000 customers), three impressions
and an accept for ~10 %. An event is acknowledged when its request answered 2xx, which the server does only
once JetStream acked every event of the batch (or the local spool took it); the events stream's message
count is read back as a check. Every ``--probe-every``-th request also carries an order of a customer never
seen before; the bench polls Redis every ``--probe-poll`` s for that customer's ``customer_activity`` row:
freshness = row first seen − the request's ack (HTTP response) time. Then the same request rate on the
no-op endpoint of the same workers (``--noop``) as the HTTP floor.

``--json`` ends with one JSON object; ``--write-docs`` rewrites its section of docs/benchmarks.md. The
streams and Redis keys are deleted at the end.

    PYTHONPATH=src python bench/topology_events.py --rates 10000,20000 --batch 100 --duration 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import yaml

from benchdocs import DOCS, write_section
from decision_latency import (
    ADMIN_KEY,
    HEADERS,
    PUB_KEY,
    ROOT,
    _free_port,
    _r,
    machine_info,
    make_catalog,
    process_cpu_seconds,
    versions,
    wait_ready,
    wait_workers,
)
from kassa.loadtest import ConnectionPool, run_open_loop

START, END = "<!-- bench:topology_events:start -->", "<!-- bench:topology_events:end -->"
THROUGHPUT_TARGET = 20_000.0
FRESHNESS_TARGET_MS = 250.0
VIEW = "customer_activity"  # the probes' view (examples/features.yaml: order events per customer)


# --------------------------------------------------------------------------- workload
class EventMix:
    """Request bodies of ``batch`` events: checkouts (order, 3 impressions, ~10 % an accept)."""

    def __init__(self, seed: int, offers: list[str], customers: int = 20_000) -> None:
        self.rng = random.Random(seed)
        self.offers = offers
        self.customers = customers
        self.encoder = msgspec.json.Encoder()

    def checkout(self, tag: str, n: int) -> list[dict[str, Any]]:
        rng = self.rng
        cid = f"c-{rng.randrange(self.customers)}"
        items = [{"sku": f"sku-{p}", "product_id": f"prod-{p}", "category": f"cat-{p % 30}", "qty": 1,
                  "price": round(5 + p % 90 * 1.1, 2)} for p in rng.sample(range(2_000), rng.randint(1, 4))]
        total = round(sum(it["price"] for it in items), 2)
        out: list[dict[str, Any]] = [{"event_id": f"{tag}-{n}-o", "type": "order", "customer": {"id": cid},
                                      "order": {"id": f"{tag}-{n}", "total": total, "items": items,
                                                "customer_id": cid}}]
        decision = f"{tag}-d{n}"
        shown = rng.sample(self.offers, 3)
        out += [{"event_id": f"{tag}-{n}-i{j}", "type": "impression", "decision_id": decision, "offer_id": o,
                 "customer": {"id": cid}} for j, o in enumerate(shown)]
        if rng.random() < 0.1:
            out.append({"event_id": f"{tag}-{n}-a", "type": "accept", "decision_id": decision,
                        "offer_id": rng.choice(shown), "value": 10.0, "customer": {"id": cid}})
        return out

    def bodies(self, requests: int, batch: int, tag: str, probe_every: int) -> tuple[list[bytes], dict[int, str]]:
        """``requests`` bodies of ``batch`` events each; every ``probe_every``-th starts with a probe order."""
        bodies, probes = [], {}
        n = 0
        for i in range(requests):
            events: list[dict[str, Any]] = []
            if probe_every and i % probe_every == 0:
                probe = f"probe-{tag}-{i}"
                probes[i] = probe
                events.append({"event_id": f"{probe}-o", "type": "order", "customer": {"id": probe},
                               "order": {"id": probe, "total": 1.0, "items": [], "customer_id": probe}})
            while len(events) < batch:
                events += self.checkout(tag, n)
                n += 1
            bodies.append(self.encoder.encode({"events": events[:batch]}))
        return bodies, probes


# --------------------------------------------------------------------------- processes
@dataclass
class Topology:
    port: int
    serve_pid: int
    stream_pid: int
    settings: dict[str, Any]
    logs: dict[str, Path] = field(default_factory=dict)


def _stop(proc: subprocess.Popen[bytes], sig: int, wait: float) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def topology(args: argparse.Namespace) -> AsyncIterator[Topology]:
    """``kassa serve --workers N`` and ``kassa stream`` on JetStream + Redis; cleans the streams and keys."""
    run = uuid.uuid4().hex[:8]
    prefix = f"evbench{run}"
    with tempfile.TemporaryDirectory(prefix="kassa-topology-events-") as tmp:
        root = Path(tmp)
        catalog = root / "catalog.yaml"
        catalog.write_text(yaml.safe_dump(make_catalog(args.offers), sort_keys=False))
        settings: dict[str, Any] = {
            "data_dir": str(root / "data"),
            "catalog_file": str(catalog),
            "log_level": "warning",
            "events": {"backend": "jetstream", "nats_url": args.nats_url, "prefix": prefix},
            "features": {"online_store": "redis", "redis_url": args.redis_url, "key_prefix": prefix,
                         "definitions_file": str(Path(args.features).resolve())},
            "roles": {"learner": "external"},
        }
        cfg = root / "kassa.yaml"
        cfg.write_text(yaml.safe_dump(settings))
        port = _free_port()
        env = {**os.environ, "KASSA_ADMIN_KEY": ADMIN_KEY, "KASSA_PUBLISHABLE_KEY": PUB_KEY,
               "KASSA_SERVER__BENCH_ENDPOINTS": "true"}
        logs = {"serve": root / "serve.log", "stream": root / "stream.log"}
        procs: list[tuple[subprocess.Popen[bytes], int]] = []
        try:
            with logs["serve"].open("wb") as slog, logs["stream"].open("wb") as tlog:
                serve = subprocess.Popen(
                    [sys.executable, "-m", "kassa", "serve", "--settings", str(cfg), "--port", str(port),
                     "--workers", str(args.workers), "--learner", "external"],
                    env=env, stdout=slog, stderr=subprocess.STDOUT, cwd=ROOT)
                procs.append((serve, signal.SIGTERM))
                try:
                    await wait_ready("127.0.0.1", port, serve, args.ready_timeout)
                    await wait_workers(logs["serve"], args.workers, serve, args.ready_timeout)
                except RuntimeError as exc:
                    raise SystemExit(f"{exc}\n{logs['serve'].read_text(errors='replace')[-3000:]}") from None
                # After serve applied the feature definitions to the metadata database it shares.
                stream = subprocess.Popen(
                    [sys.executable, "-m", "kassa", "stream", "--settings", str(cfg), "--poll", str(args.stream_poll)],
                    env=env, stdout=tlog, stderr=subprocess.STDOUT, cwd=ROOT)
                procs.insert(0, (stream, signal.SIGINT))  # Ctrl-C: it saves its checkpoint and stops
                await asyncio.sleep(2.0)
                if stream.poll() is not None:
                    raise SystemExit(f"kassa stream exited:\n{logs['stream'].read_text(errors='replace')[-3000:]}")
                yield Topology(port, serve.pid, stream.pid, settings, logs)
        finally:
            for proc, sig in procs:
                _stop(proc, sig, 20)
            if args.verbose:
                for name, path in logs.items():
                    if path.exists():
                        sys.stderr.write(f"--- {name} output ---\n{path.read_text(errors='replace')[-5000:]}\n")
            await cleanup(args, prefix)


async def cleanup(args: argparse.Namespace, prefix: str) -> None:
    import nats
    import redis.asyncio as aioredis

    from kassa.events.jetstream import BusConfig

    cfg = BusConfig(url=args.nats_url, prefix=prefix)
    with contextlib.suppress(Exception):
        nc = await nats.connect(args.nats_url)
        js = nc.jetstream()
        for name in (cfg.events_stream, cfg.decisions_stream):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await nc.close()
    client = aioredis.Redis.from_url(args.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 1000):
            await client.delete(*keys[i:i + 1000])
    finally:
        await client.aclose()


async def stream_messages(args: argparse.Namespace, prefix: str) -> int:
    import nats

    from kassa.events.jetstream import BusConfig

    nc = await nats.connect(args.nats_url)
    try:
        info = await nc.jetstream().stream_info(BusConfig(prefix=prefix).events_stream)
        return int(info.state.messages or 0)
    finally:
        await nc.close()


def nats_server_pid() -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if (proc / "comm").read_text().strip() == "nats-server":
                    return int(proc.name)
    return None


# --------------------------------------------------------------------------- one rate
class _Ack(msgspec.Struct):
    accepted: int
    duplicates: int


_decode_ack = msgspec.json.Decoder(_Ack).decode


class ProbeWatch:
    """Polls Redis for the probes' rows; freshness = first seen − ack of the request that carried them."""

    def __init__(self, client: Any, prefix: str, poll: float) -> None:
        from kassa.features.online.redis import row_key

        self.client = client
        self.key = lambda customer: row_key("customer", customer, prefix)
        self.poll = poll
        self.pending: dict[str, float] = {}
        self.latencies: list[float] = []
        self._stop = asyncio.Event()

    def acked(self, customer: str, at: float) -> None:
        self.pending[customer] = at

    async def run(self) -> None:
        while not self._stop.is_set() or self.pending:
            if self.pending:
                names = list(self.pending)
                pipe = self.client.pipeline(transaction=False)
                for name in names:
                    pipe.hexists(self.key(name), VIEW)
                found = await pipe.execute()
                now = time.perf_counter()
                for name, seen in zip(names, found, strict=True):
                    acked = self.pending.pop(name, None) if seen else None
                    if acked is not None:  # (None: given up on by `finish` meanwhile)
                        self.latencies.append(now - acked)
            await asyncio.sleep(self.poll)

    async def finish(self, timeout: float) -> int:
        """Stop once every probe is seen or after ``timeout`` s; returns the probes never seen."""
        deadline = time.perf_counter() + timeout
        while self.pending and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        missing = len(self.pending)
        self.pending.clear()
        self._stop.set()
        return missing


def _pct(xs: list[float], q: float) -> float | None:
    return _r(float(np.percentile(np.asarray(xs) * 1000, q))) if xs else None


async def measure_rate(args: argparse.Namespace, top: Topology, rate: float, mix: EventMix, tag: str,
                       log: Any, with_noop: bool = True) -> dict[str, Any]:
    import redis.asyncio as aioredis

    prefix = top.settings["events"]["prefix"]
    req_rate = rate / args.batch
    n = int(req_rate * args.duration * 1.2) + 10
    t_build = time.perf_counter()
    bodies, probes = mix.bodies(n, args.batch, tag, args.probe_every)
    log(f"{rate:g} events/s = {req_rate:g} requests/s of {args.batch}: built {n} bodies in "
        f"{time.perf_counter() - t_build:.1f} s")
    client = aioredis.Redis.from_url(args.redis_url)
    watch = ProbeWatch(client, prefix, args.probe_poll)
    acked = {"accepted": 0, "duplicates": 0, "requests": 0}
    first_error: list[str] = []

    def on_response(i: int, status: int, body: bytes) -> None:
        if 200 <= status < 300:
            ack = _decode_ack(body)
            acked["accepted"] += ack.accepted
            acked["duplicates"] += ack.duplicates
            acked["requests"] += 1
            probe = probes.get(i)
            if probe is not None:
                watch.acked(probe, time.perf_counter())
        elif not first_error:
            first_error.append(f"{status} {body[:300]!r}")

    pool = await ConnectionPool("127.0.0.1", top.port, args.connections, max_size=4 * args.connections).start()
    nats_pid = nats_server_pid()
    try:
        before = await stream_messages(args, prefix)
        poller = asyncio.create_task(watch.run())
        cpu0 = {name: process_cpu_seconds(pid) for name, pid in
                (("serve", top.serve_pid), ("stream", top.stream_pid), ("nats", nats_pid))}
        load0 = os.getloadavg()
        res = await run_open_loop(lambda i: ("POST", "/v1/events", bodies[i]), req_rate, args.duration, pool,
                                  on_response=on_response, headers=HEADERS, timeout=args.timeout,
                                  max_lag_p99=args.max_lag_ms / 1e3)
        cpu1 = {name: process_cpu_seconds(pid) for name, pid in
                (("serve", top.serve_pid), ("stream", top.stream_pid), ("nats", nats_pid))}
        missing = await watch.finish(args.probe_timeout)
        await poller
        after = await stream_messages(args, prefix)
        load1 = os.getloadavg()
        noop = None
        if args.noop and with_noop:
            await asyncio.sleep(args.settle)
            noop = await run_open_loop(lambda i: ("POST", "/_bench/noop", bodies[i]), req_rate, args.duration, pool,
                                       headers=HEADERS, timeout=args.timeout, max_lag_p99=args.max_lag_ms / 1e3)
    finally:
        await pool.close()
        await client.aclose()
    events = acked["accepted"] + acked["duplicates"]
    cpu = {k: (None if cpu0[k] is None or cpu1[k] is None else cpu1[k] - cpu0[k]) for k in cpu0}
    out = {
        "target_events_per_s": rate,
        "requests_per_s": req_rate,
        "batch": args.batch,
        "requests_sent": res.sent,
        "requests_ok": res.ok,
        "errors": res.errors,
        "first_error": first_error[0] if first_error else None,
        "events_acked": events,
        "events_acked_per_s": round(events / args.duration),  # per second of the offered window
        # over the whole run, from the first send to the last answer (a server falling behind answers late)
        "events_acked_per_wall_s": round(events / max(res.wall_seconds, args.duration)),
        "wall_seconds": _r(res.wall_seconds),
        "duplicates": acked["duplicates"],
        "stream_messages_added": after - before,
        "request_p50_ms": _r(res.latency_ms["p50"]),
        "request_p99_ms": _r(res.latency_ms["p99"]),
        "generator_lag_p99_ms": _r(res.lag_p99_ms),
        "valid": res.valid,
        "probes": len(watch.latencies) + missing,
        "probes_missing": missing,
        "freshness_p50_ms": _pct(watch.latencies, 50),
        "freshness_p99_ms": _pct(watch.latencies, 99),
        "freshness_max_ms": _pct(watch.latencies, 100),
        "cpu_us_per_event": {k: (None if v is None or not events else _r(v / events * 1e6, 2)) for k, v in cpu.items()},
        "cpu_cores": {k: (None if v is None else _r(v / args.duration, 2)) for k, v in cpu.items()},
        "load_average": [round(x, 2) for x in load0],
        "load_average_after": [round(x, 2) for x in load1],
    }
    if noop is not None:
        out["noop_request_p50_ms"] = _r(noop.latency_ms["p50"])
        out["noop_request_p99_ms"] = _r(noop.latency_ms["p99"])
        out["noop_errors"] = noop.errors
    log(f"  acked {out['events_acked_per_s']:,}/s ({out['events_acked_per_wall_s']:,}/s over "
        f"{res.wall_seconds:.1f} s; {events:,} events, {out['stream_messages_added']:,} added to the "
        f"stream), errors {res.errors}, request p99 {out['request_p99_ms']} ms; freshness p50 "
        f"{out['freshness_p50_ms']} p99 {out['freshness_p99_ms']} ms ({missing} of {out['probes']} probes never seen);"
        f" CPU cores {out['cpu_cores']}; load {out['load_average'][0]}")
    return out


async def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    offers = [o["id"] for o in make_catalog(args.offers)["offers"]]
    mix = EventMix(args.seed, offers, args.customers)
    load_start = [round(x, 2) for x in os.getloadavg()]
    results = []
    async with topology(args) as top:
        log(f"kassa serve --workers {args.workers} on :{top.port} and kassa stream ready "
            f"(prefix {top.settings['events']['prefix']})")
        if args.warmup > 0:
            log(f"warm-up: {args.warmup:g} s at {args.rates[0] / 2:g} events/s")
            saved = args.duration
            args.duration = args.warmup
            await measure_rate(args, top, args.rates[0] / 2, mix, "warm", log, with_noop=False)
            args.duration = saved
        for k in range(args.repeats):
            for rate in args.rates:
                r = await measure_rate(args, top, rate, mix, f"r{k}-{rate:g}", log)
                r["repeat"] = k + 1
                results.append(r)
                await asyncio.sleep(args.settle)
    by_rate: dict[str, Any] = {}
    for rate in args.rates:
        rs = [r for r in results if r["target_events_per_s"] == rate]

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            vals = [r[key] for r in rs if r.get(key) is not None]
            return _r(statistics.median(vals)) if vals else None

        by_rate[f"{rate:g}"] = {key: med(key) for key in (
            "events_acked_per_s", "events_acked_per_wall_s", "request_p99_ms", "freshness_p50_ms",
            "freshness_p99_ms", "noop_request_p99_ms")}
    best = max(results, key=lambda r: r["events_acked_per_wall_s"]) if results else None
    met = [r for r in results if r["events_acked_per_wall_s"] >= THROUGHPUT_TARGET and r["errors"] == 0
           and r["probes_missing"] == 0 and r["freshness_p99_ms"] is not None
           and r["freshness_p99_ms"] <= FRESHNESS_TARGET_MS]
    return {
        "benchmark": "topology_events",
        "workers": args.workers,
        "rates": args.rates,
        "batch": args.batch,
        "duration": args.duration,
        "repeats": args.repeats,
        "stream_poll": args.stream_poll,
        "probe_poll": args.probe_poll,
        "features": args.features,
        "met": bool(met),
        "best_events_acked_per_s": best["events_acked_per_wall_s"] if best else None,
        "by_rate": by_rate,
        "runs": results,
        "errors": sum(r["errors"] for r in results),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(),
        "python": platform.python_version(),
        "versions": versions(),
        "nats_server": nats_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def nats_version() -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["nats-server", "--version"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or out.stderr.strip()
    return None


def docs_section(res: dict[str, Any]) -> str:
    def fmt(x: float | None, nd: int = 1) -> str:
        return "–" if x is None else f"{x:,.{nd}f}"

    m = res["machine"]
    cmd = (f"python bench/topology_events.py --workers {res['workers']} --rates "
           f"{','.join(f'{r:g}' for r in res['rates'])} --batch {res['batch']} --duration {res['duration']:g} "
           f"--repeats {res['repeats']}")
    rows = []
    for r in res["runs"]:
        cpu = r["cpu_us_per_event"]
        rows.append(
            f"| {r['repeat']} | {r['target_events_per_s']:,.0f} | **{r['events_acked_per_s']:,}** | "
            f"{r['events_acked_per_wall_s']:,} ({r['wall_seconds']:.1f} s) | {r['stream_messages_added']:,} | "
            f"{r['errors']} | {fmt(r['request_p50_ms'])} / {fmt(r['request_p99_ms'])} | "
            f"{fmt(r.get('noop_request_p99_ms'))} | {fmt(r['freshness_p50_ms'])} / **{fmt(r['freshness_p99_ms'])}** | "
            f"{r['probes'] - r['probes_missing']}/{r['probes']} | {fmt(cpu['serve'])} | {fmt(cpu['stream'])} | "
            f"{fmt(cpu['nats'])} | {r['load_average'][0]:.1f} | {'yes' if r['valid'] else 'no'} |")
    table = "\n".join(rows)
    verdict = "**met** in at least one run above" if res["met"] else "**not met** in these runs"
    return f"""{START}
## Events through HTTP serving processes into JetStream (`bench/topology_events.py`, issue 13)

`{cmd}` on {m["cpu"]} ({m["cores"]} cores), Python {res["python"]}, {res["nats_server"] or "nats-server"} and
Redis on the same machine, generator too; load average {res["load_average_start"]} at the start,
{res["load_average_end"]} at the end (a VM shared with other sessions' test suites); {res["date"]}.

`kassa serve --workers {res["workers"]} --learner external` on `events.backend: jetstream` and the Redis online
store with `{res["features"]}` applied, and `kassa stream` (poll {res["stream_poll"] * 1000:g} ms) tailing the events
stream into Redis. `POST /v1/events` open-loop in batches of **{res["batch"]} events** (what a server-side sender
batches: a webhook relay, a backend forwarding its storefront's beacons; the snippet itself sends 3-4), each
checkout an order, three impressions and an accept for ~10 %. An event counts as acknowledged when its request
answered 2xx: the worker answers once JetStream acked every event of the batch. "Acked events/s" divides them
by the offered window, "per wall s" by the time from the first send to the last answer (lower when the workers
fell behind and answered after the window). "Added" is the events stream's message count after minus before.
Freshness: every few requests carry an order of a new customer; the bench polls Redis every
{res["probe_poll"] * 1000:g} ms for that customer's `customer_activity` row and times it from the request's
response. CPU per event: the serve processes (supervisor and workers), `kassa stream`, and nats-server (shared
with other sessions, so an upper bound). The no-op column is the same request rate on `POST /_bench/noop` of
the same workers.

| run | target events/s | acked events/s | per wall s (wall) | added to stream | errors | request p50 / p99 ms \
| no-op p99 ms | freshness p50 / p99 ms | probes seen | CPU µs/event serve | stream | nats | load (1 min) | valid |
|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|:---:|
{table}

Targets: >= {THROUGHPUT_TARGET:,.0f} events/s acknowledged by {res["workers"]} serving processes with freshness
P99 <= {FRESHNESS_TARGET_MS:g} ms: {verdict} (best {fmt(res["best_events_acked_per_s"], 0)} events/s acknowledged
per wall second). "valid" is the generator keeping its schedule (send-lag P99 within the limit). To be
measured again on a quieter machine.
{END}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rates", default="10000,20000", help="comma-separated events per second")
    p.add_argument("--batch", type=int, default=100, help="events per POST /v1/events")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--offers", type=int, default=50)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--features", default=str(Path("examples") / "features.yaml"))
    p.add_argument("--probe-every", type=int, default=10, help="every N-th request carries a probe order")
    p.add_argument("--probe-poll", type=float, default=0.005, help="seconds between Redis polls for probes")
    p.add_argument("--probe-timeout", type=float, default=30.0, help="wait this long for the last probes")
    p.add_argument("--stream-poll", type=float, default=0.02, help="kassa stream --poll")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--no-noop", dest="noop", action="store_false", help="skip the no-op phase")
    p.add_argument("--max-lag-ms", type=float, default=5.0, help="generator send-lag p99 above this: invalid")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--json", action="store_true", help="end the output with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS.name}")
    p.add_argument("--verbose", action="store_true", help="print the processes' output at the end")
    p.add_argument("--docs-from", metavar="FILE", help="write the docs section from a saved --json output, run nothing")
    args = p.parse_args(argv)
    args.rates = [float(r) for r in str(args.rates).split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.docs_from:  # the JSON object is the last line of a --json run's output
        saved = json.loads(Path(args.docs_from).read_text().strip().splitlines()[-1])
        write_section(docs_section(saved), START, END, DOCS)
        log(f"wrote {DOCS}")
        return 0
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
