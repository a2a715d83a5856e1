"""Decision latency under open-loop load, against a no-op endpoint on the same server as baseline.

Owns the decision-latency benchmark: it starts ``kassa serve`` in a subprocess on a generated
catalog (or targets ``--url``), drives ``POST /v1/decisions`` open-loop at ``--rate`` per second
while feeding ``POST /v1/events`` (impressions and ~10 % accepts) for every decision so the
learner works too, then drives the same load at ``POST /_bench/noop``. Latency is timed from each
request's intended send time (no coordinated omission); the server-side figure is the ``took_ms``
of each decision response. Medians across ``--repeats`` are reported; ``--json`` ends the output
with one JSON object, ``--write-docs`` refreshes the section of ``docs/benchmarks.md``.

``--backends embedded,redis`` compares the backends (issue 13: Redis P99 <= 1.3x embedded): for ``--runs``
rounds, every ``--rates`` on a fresh server per backend (``--state``: embedded, or the shared state and the
online store on Redis), the backends' order alternating; medians per rate and backend, each with its no-op
baseline, and its own section of docs/benchmarks.md.

    python bench/decision_latency.py --rate 500 --duration 30 --repeats 3 --json
    python bench/decision_latency.py --backends embedded,redis --rates 600,1000 --runs 3 \
        --features examples/features.yaml --duration 20 --json --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np
import yaml

from benchdocs import DOCS, write_section
from kassa.loadtest import ConnectionPool, OpenLoopResult, run_open_loop

PLACEMENT = "order_confirmation"
ADMIN_KEY = "bench-admin"
PUB_KEY = "bench-pub"
HEADERS = f"Authorization: Bearer {PUB_KEY}\r\nContent-Type: application/json\r\n".encode()
START, END = "<!-- bench:decision_latency:start -->", "<!-- bench:decision_latency:end -->"
CMP_START, CMP_END = "<!-- bench:decision_backends:start -->", "<!-- bench:decision_backends:end -->"
ROOT = Path(__file__).resolve().parent.parent

KINDS = ["partner", "subscription", "warranty", "discount", "product"]
CATEGORIES = [f"cat-{k:02d}" for k in range(30)]
COUNTRIES = ["US", "US", "US", "CA", "GB", "DE", "FR", "AU", "NL", "SE"]
DEVICES = ["mobile", "mobile", "desktop", "tablet"]
LOCALES = ["en-US", "en-GB", "de-DE", "fr-FR", "en-CA", "sv-SE"]
TIMEZONES = ["America/New_York", "America/Los_Angeles", "Europe/London", "Europe/Berlin", "Australia/Sydney"]
REFERRERS = ["google", "direct", "email", "instagram", "tiktok"]
PLATFORMS = ["shopify", "woocommerce", "custom"]


# --------------------------------------------------------------------------- workload
def make_catalog(n_offers: int, seed: int = 7) -> dict[str, Any]:
    """``n_offers`` always-eligible offers of mixed kinds, ~10 features each, one placement."""
    rng = random.Random(seed)
    offers = []
    for k in range(n_offers):
        kind = KINDS[k % len(KINDS)]
        category = rng.choice(CATEGORIES)
        offer: dict[str, Any] = {
            "id": f"offer-{k:03d}",
            "kind": kind,
            "title": f"Bench offer {k} ({kind})",
            "value": round(rng.uniform(0.5, 25.0), 2),
            "content": {"headline": f"Offer {k}: something you will like", "cta": "Add"},
            "category": category,
            "features": {
                "brand_tier": rng.randint(1, 3),
                "margin": round(rng.uniform(0.05, 0.6), 3),
                "price_point": round(rng.uniform(2.0, 80.0), 2),
                "popularity": round(rng.random(), 3),
                "rating": round(rng.uniform(3.0, 5.0), 1),
                "discount_pct": rng.choice([0, 5, 10, 15, 20]),
                "is_new": rng.random() < 0.2,
                "region": rng.choice(["na", "eu", "global"]),
                "tier": rng.choice(["basic", "plus", "premium"]),
                "category_group": category[:5],
            },
        }
        if kind == "product":
            # Not one of the skus the generated orders contain, so never excluded as already bought.
            offer["sku"] = f"offer-sku-{k:03d}"
            offer["product_id"] = f"offer-prod-{k:03d}"
        offers.append(offer)
    placement = {
        "id": PLACEMENT,
        "slots": 3,
        "offers": [o["id"] for o in offers],
        "policy": "squarecb",
        "reward": {"wait_seconds": 2},
    }
    return {"offers": offers, "placements": [placement]}


class Workload:
    """Seeded decision request bodies and the event batches that follow their responses."""

    def __init__(self, seed: int, customers: int = 5_000, accept_rate: float = 0.1) -> None:
        self.rng = random.Random(seed)
        self.customers = customers
        self.accept_rate = accept_rate
        self.encoder = msgspec.json.Encoder()

    def decision_bodies(self, n: int, tag: str) -> list[bytes]:
        """``n`` request bodies; ``tag`` keeps order ids unique across phases."""
        rng = self.rng
        now = time.time()
        bodies = []
        for i in range(n):
            customer = f"cust-{rng.randrange(self.customers):05d}"
            items: list[dict[str, Any]] = []
            for _ in range(rng.randint(1, 4)):
                product = rng.randrange(2_000)
                items.append(
                    {
                        "sku": f"sku-{product:05d}",
                        "product_id": f"prod-{product:05d}",
                        "category": rng.choice(CATEGORIES),
                        "qty": rng.choice([1, 1, 1, 2, 3]),
                        "price": round(rng.uniform(3.0, 150.0), 2),
                    }
                )
            total = round(sum(it["price"] * it["qty"] for it in items), 2)
            body = {
                "placement": PLACEMENT,
                "customer": {"id": customer},
                "session_id": f"sess-{tag}-{i}",
                "order": {
                    "id": f"order-{tag}-{i}",
                    "platform": rng.choice(PLATFORMS),
                    "currency": "USD",
                    "total": total,
                    "ship_country": rng.choice(COUNTRIES),
                    "items": items,
                    "created_at": now,
                    "customer_id": customer,
                },
                "context": {
                    "device": rng.choice(DEVICES),
                    "locale": rng.choice(LOCALES),
                    "timezone": rng.choice(TIMEZONES),
                    "referrer": rng.choice(REFERRERS),
                },
            }
            bodies.append(self.encoder.encode(body))
        return bodies

    def events_for(self, decision: _Decision) -> bytes | None:
        events = [
            {"event_id": f"{decision.decision_id}-imp-{o.offer_id}", "type": "impression",
             "decision_id": decision.decision_id, "offer_id": o.offer_id}
            for o in decision.offers
        ]  # fmt: skip
        if not events:
            return None
        if self.rng.random() < self.accept_rate:
            chosen = self.rng.choice(decision.offers).offer_id
            events.append({"event_id": f"{decision.decision_id}-acc", "type": "accept",
                           "decision_id": decision.decision_id, "offer_id": chosen})  # fmt: skip
        return self.encoder.encode({"events": events})


class _Shown(msgspec.Struct):
    offer_id: str


class _Decision(msgspec.Struct):
    """The fields of a DecisionResponse the bench reads (msgspec skips the rest)."""

    decision_id: str
    offers: list[_Shown]
    took_ms: float


_decode_decision = msgspec.json.Decoder(_Decision).decode


# --------------------------------------------------------------------------- one phase
@dataclass
class EventStats:
    sent: int = 0
    ok: int = 0
    http_errors: int = 0
    connection_errors: int = 0
    timeouts: int = 0
    first_error: str | None = None

    @property
    def errors(self) -> int:
        return self.http_errors + self.connection_errors + self.timeouts


@dataclass
class Phase:
    result: OpenLoopResult
    server_ms: np.ndarray = field(default_factory=lambda: np.empty(0))
    events: EventStats = field(default_factory=EventStats)
    first_error: str | None = None
    server_cpu: float | None = None  # server process CPU seconds over the phase (all threads)

    def server_cpu_us_per_request(self) -> float | None:
        return None if self.server_cpu is None or not self.result.sent else self.server_cpu / self.result.sent * 1e6

    def server_pct(self, q: float) -> float:
        took = self.server_ms[~np.isnan(self.server_ms)]
        return float(np.percentile(took, q)) if took.size else float("nan")


async def run_phase(
    pool: ConnectionPool,
    events_pool: ConnectionPool | None,
    workload: Workload,
    bodies: list[bytes],
    path: str,
    args: argparse.Namespace,
    duration: float,
) -> Phase:
    """One open-loop run at ``path``; for decisions, also posts the events of every response."""
    took = np.full(len(bodies), np.nan)
    stats = EventStats()
    phase_errors: list[str] = []
    is_decision = path == "/v1/decisions"

    def on_event(status: int, body: bytes, exc: BaseException | None) -> None:
        if exc is not None:
            if isinstance(exc, TimeoutError):
                stats.timeouts += 1
            else:
                stats.connection_errors += 1
            stats.first_error = stats.first_error or repr(exc)
        elif 200 <= status < 300:
            stats.ok += 1
        else:
            stats.http_errors += 1
            stats.first_error = stats.first_error or f"{status} {body[:300]!r}"

    def on_response(i: int, status: int, body: bytes) -> None:
        if status >= 300:
            if not phase_errors:
                phase_errors.append(f"{path} -> {status} {body[:300]!r}")
            return
        if not is_decision:
            return
        decision = _decode_decision(body)
        took[i] = decision.took_ms
        if events_pool is not None:
            batch = workload.events_for(decision)
            if batch is not None:
                stats.sent += 1
                events_pool.send(events_pool.build("POST", "/v1/events", batch, HEADERS), on_event, 10.0)

    result = await run_open_loop(
        lambda i: ("POST", path, bodies[i]),
        args.rate,
        duration,
        pool,
        on_response=on_response,
        schedule=args.schedule,
        seed=args.seed,
        headers=HEADERS,
        timeout=args.timeout,
        max_lag_p99=args.max_lag_ms / 1e3,
    )
    return Phase(result, took, stats, phase_errors[0] if phase_errors else None)


async def settle(events_pool: ConnectionPool | None, pause: float, limit: float = 15.0) -> None:
    """Wait for every posted event batch to be answered (at most ``limit`` s), then ``pause`` s."""
    deadline = time.monotonic() + limit
    while events_pool is not None and (events_pool.busy or events_pool.queued) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(pause)


async def settle_cpu(pid: int | None, at_least: float = 3.0, quiet: float = 0.15, limit: float = 30.0) -> float:
    """Wait ``at_least`` s (the bench catalog's 2 s reward window and the learner's settle), then until the
    server's processes use under ``quiet`` of a core over half a second (their idle background is a few %), at
    most ``limit`` s; returns the seconds waited."""
    started = time.monotonic()
    await asyncio.sleep(at_least)
    while pid is not None and time.monotonic() - started < limit:
        before = process_cpu_seconds(pid)
        await asyncio.sleep(0.5)
        after = process_cpu_seconds(pid)
        if before is None or after is None or (after - before) / 0.5 < quiet:
            break
    return time.monotonic() - started


# --------------------------------------------------------------------------- server
def process_cpu_seconds(pid: int | None) -> float | None:
    """CPU time of every thread of ``pid`` and of its child processes (HTTP workers, a learner child):
    Linux schedstat, exact, unlike tick-sampled utime."""
    if pid is None:
        return None
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):  # a thread may exit while we read
                total += int((task / "schedstat").read_text().split()[0])
                for child in (task / "children").read_text().split():
                    total += int((process_cpu_seconds(int(child)) or 0.0) * 1e9)
    except OSError:
        return None
    return total / 1e9


async def measure_pair(pool: ConnectionPool, events_pool: ConnectionPool | None, workload: Workload,
                       bodies: list[bytes], args: argparse.Namespace, pid: int | None, label: str,
                       log: Callable[[str], None]) -> tuple[Any, Any]:
    """One phase of decisions (with their events), then one of no-ops at the same rate, each charged the
    server CPU it used (``server_cpu``). Shared by this bench and ``bench/topology.py``."""
    log(f"{label}: decisions")
    cpu0 = process_cpu_seconds(pid)
    dec = await run_phase(pool, events_pool, workload, bodies, "/v1/decisions", args, args.duration)
    # Let the events and the learning they trigger finish, so neither spills into the no-op phase (its
    # latency and CPU) and the decision phase is charged for them: the last decisions close a reward window
    # after the phase, and a learner at a lower priority (`roles.learner_nice`) may be behind by then.
    await settle(events_pool, args.settle)
    await settle_cpu(pid)
    cpu1 = process_cpu_seconds(pid)
    log(f"{label}: no-op")
    noop = await run_phase(pool, None, workload, bodies, "/_bench/noop", args, args.duration)
    cpu2 = process_cpu_seconds(pid)
    await asyncio.sleep(args.settle)
    dec.server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    noop.server_cpu = None if cpu1 is None or cpu2 is None else cpu2 - cpu1
    return dec, noop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def kassa_server(args: argparse.Namespace) -> AsyncIterator[tuple[str, int, int | None]]:
    """Yield ``(host, port, pid)`` of a ready Kassa: ``--url`` (pid None), or a subprocess we start."""
    if args.url:
        parts = urlsplit(args.url)
        if parts.scheme != "http":
            raise SystemExit("--url must be http://host:port (the load client speaks plain HTTP/1.1)")
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        await wait_ready(host, port, None, args.ready_timeout)
        yield host, port, None
        return

    with tempfile.TemporaryDirectory(prefix="kassa-bench-") as tmp:
        root = Path(tmp)
        catalog_path = root / "catalog.yaml"
        catalog_path.write_text(yaml.safe_dump(make_catalog(args.offers), sort_keys=False))
        cfg_path = root / "kassa.yaml"
        cfg: dict[str, Any] = {"data_dir": str(root / "data"), "catalog_file": str(catalog_path)}
        features: dict[str, Any] = {}
        if args.features:
            features["definitions_file"] = str(Path(args.features).resolve())
        port = _free_port()
        prefix = f"kassa-bench-{os.getpid()}-{port}"
        if args.state == "redis":  # "redis" backends: the shared state and the online store both on Redis
            features.update(online_store="redis", redis_url=args.redis_url, key_prefix=f"{prefix}-features")
        if features:
            cfg["features"] = features
        cfg_path.write_text(yaml.safe_dump(cfg))
        env = {
            **os.environ,
            "KASSA_ADMIN_KEY": ADMIN_KEY,
            "KASSA_PUBLISHABLE_KEY": PUB_KEY,
            "KASSA_SERVER__BENCH_ENDPOINTS": "true",
            # per-buyer / per-request state: embedded (default) or a Redis shared by every process
            "KASSA_STATE__BACKEND": args.state,
            "KASSA_STATE__REDIS_URL": args.redis_url,
            "KASSA_STATE__KEY_PREFIX": prefix,
        }
        log_path = root / "server.log"
        with log_path.open("wb") as log:
            # Output goes to a file, not a pipe nobody reads: a full pipe would stall the server.
            proc = subprocess.Popen(
                [sys.executable, "-m", "kassa", "serve", "--settings", str(cfg_path), "--port", str(port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,  # feature definitions name their sources relative to the repository
            )
            try:
                try:
                    await wait_ready("127.0.0.1", port, proc, args.ready_timeout)
                except RuntimeError as exc:
                    sys.stderr.write(f"{exc}\n--- server output ---\n{log_path.read_text(errors='replace')}\n")
                    raise SystemExit(1) from None
                yield "127.0.0.1", port, proc.pid
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        if args.verbose:
            sys.stderr.write(f"--- server output ---\n{log_path.read_text(errors='replace')}\n")
        if args.state == "redis":  # the run's keys (pending decisions live a day past their window), features too
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = [k for pattern in (f"{prefix}:*", f"{prefix}-features:*")
                    for k in client.scan_iter(match=pattern, count=1000)]
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i:i + 1000])
            client.close()


async def wait_ready(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"kassa serve exited with code {proc.returncode} before it was ready")
        try:
            async with ConnectionPool(host, port, size=1, connect_timeout=1.0) as probe:
                status, body = await probe.request("GET", "/readyz", timeout=2.0)
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except (OSError, TimeoutError) as exc:
            last = repr(exc)
        await asyncio.sleep(0.2)
    raise RuntimeError(f"kassa not ready on {host}:{port} after {timeout:.0f} s (last: {last})")


async def wait_workers(log_path: Path, workers: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """Until every worker of `kassa serve --workers N` has started (uvicorn's "Application startup complete" in
    the server's log, once per worker). `/readyz` answers as soon as the first worker does; a generator that
    opens its keep-alive connections then puts all of them on that worker (with either `roles.balance`), and
    the phase measures one worker with the other idle."""
    deadline = time.monotonic() + timeout
    started = 0
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"kassa serve exited with code {proc.returncode} before its workers started")
        started = log_path.read_text(errors="replace").count("Application startup complete")
        if started >= workers:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{started} of {workers} workers started after {timeout:.0f} s (see {log_path})")


# --------------------------------------------------------------------------- main
def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform()}


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("kassa", "uvicorn", "vowpalwabbit", "starlette", "uvloop", "msgspec"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _r(x: float, nd: int = 3) -> float | None:
    return None if x != x else round(x, nd)  # NaN -> null in the JSON


async def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    workload = Workload(args.seed, args.customers, args.accept_rate)
    n_per_phase = int(args.rate * max(args.duration, args.warmup) * 1.2) + 100  # Poisson can overshoot
    async with kassa_server(args) as (host, port, pid):
        pool = await ConnectionPool(host, port, args.connections, max_size=4 * args.connections).start()
        events_pool = None if args.no_events else await ConnectionPool(host, port, args.event_connections).start()
        try:
            if args.warmup > 0:
                log(f"warm-up: {args.warmup:g} s of decisions, then of no-ops, at {args.rate:g}/s")
                bodies = workload.decision_bodies(n_per_phase, "warmup")
                for path in ("/v1/decisions", "/_bench/noop"):
                    phase = await run_phase(pool, events_pool, workload, bodies, path, args, args.warmup)
                    await settle(events_pool, args.settle)
                    if phase.result.ok == 0:
                        raise SystemExit(f"warm-up: no successful response from {path}: {phase.first_error}")
            repeats = []
            for rep in range(args.repeats):
                bodies = workload.decision_bodies(n_per_phase, f"r{rep}")
                dec, noop = await measure_pair(pool, events_pool, workload, bodies, args, pid,
                                               f"repeat {rep + 1}/{args.repeats}", log)
                repeats.append(summarize_repeat(dec, noop))
                for name, ph in (("decisions", dec), ("noop", noop)):
                    if ph.first_error:
                        log(f"  first {name} error: {ph.first_error}")
                    if ph.result.first_callback_error:
                        log(f"  {name}: could not read a response: {ph.result.first_callback_error}")
                if dec.events.first_error:
                    log(f"  first events error: {dec.events.first_error}")
        finally:
            await pool.close()
            if events_pool is not None:
                await events_pool.close()

    def med(key: str) -> float | None:
        vals = [r[key] for r in repeats if r[key] is not None]
        return _r(statistics.median(vals)) if vals else None

    return {
        "benchmark": "decision_latency",
        "rate": args.rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "schedule": args.schedule,
        "offers": args.offers,
        "connections": args.connections,
        "target": args.url or "subprocess",
        "client_p50_ms": med("client_p50_ms"),
        "client_p99_ms": med("client_p99_ms"),
        "client_p999_ms": med("client_p999_ms"),
        "server_p50_ms": med("server_p50_ms"),
        "server_p99_ms": med("server_p99_ms"),
        "noop_client_p50_ms": med("noop_client_p50_ms"),
        "noop_client_p99_ms": med("noop_client_p99_ms"),
        "p99_ratio_to_noop": med("p99_ratio_to_noop"),
        "errors": sum(r["errors"] for r in repeats),
        "event_errors": sum(r["event_errors"] for r in repeats),
        "valid": all(r["valid"] for r in repeats),
        "generator_lag_p99_ms": med("generator_lag_p99_ms"),
        "client_cpu_us_per_request": med("client_cpu_us_per_request"),
        "server_cpu_us_per_decision": med("server_cpu_us_per_decision"),
        "server_cpu_us_per_noop": med("server_cpu_us_per_noop"),
        "machine": machine_info(),
        "python": platform.python_version(),
        "versions": versions(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "per_repeat": repeats,
    }


# --------------------------------------------------------------------------- backends compared
async def one_run(args: argparse.Namespace, log: Any, tag: str) -> dict[str, Any]:
    """A fresh server on ``args.state``: warm-up, then one measured decisions/no-op pair."""
    workload = Workload(args.seed, args.customers, args.accept_rate)
    n = int(args.rate * max(args.duration, args.warmup) * 1.2) + 100
    async with kassa_server(args) as (host, port, pid):
        pool = await ConnectionPool(host, port, args.connections, max_size=4 * args.connections).start()
        events_pool = None if args.no_events else await ConnectionPool(host, port, args.event_connections).start()
        try:
            if args.warmup > 0:
                bodies = workload.decision_bodies(n, f"{tag}-warm")
                for path in ("/v1/decisions", "/_bench/noop"):
                    await run_phase(pool, events_pool, workload, bodies, path, args, args.warmup)
                    await settle(events_pool, args.settle)
            bodies = workload.decision_bodies(n, tag)
            dec, noop = await measure_pair(pool, events_pool, workload, bodies, args, pid, tag, log)
        finally:
            await pool.close()
            if events_pool is not None:
                await events_pool.close()
    res = summarize_repeat(dec, noop)
    res.pop("decisions", None)
    res.pop("noop", None)
    res["load_average"] = [round(x, 2) for x in os.getloadavg()]
    res["first_error"] = dec.first_error or noop.first_error
    res["first_event_error"] = dec.events.first_error
    res["event_timeouts"] = dec.events.timeouts
    for what in ("first_error", "first_event_error"):
        if res[what]:
            log(f"  {what.replace('_', ' ')}: {res[what]}")
    return res


async def compare_backends(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """``--runs`` rounds; in each, every rate on every backend, a fresh server per run, the backends' order
    alternating between rounds so neither always runs first. Medians per rate and backend."""
    backends = list(args.backends)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {f"{r:g}": {b: [] for b in backends} for r in args.rates}
    load_start = [round(x, 2) for x in os.getloadavg()]
    for k in range(args.runs):
        order = backends if k % 2 == 0 else backends[::-1]
        for rate in args.rates:
            for backend in order:
                args.rate, args.state = rate, backend
                res = await one_run(args, log, f"run {k + 1}/{args.runs}, {rate:g}/s, {backend}")
                runs[f"{rate:g}"][backend].append(res)
                log(f"  {backend} {rate:g}/s: p99 {res['client_p99_ms']} ms, no-op p99 {res['noop_client_p99_ms']} "
                    f"ms, errors {res['errors']}+{res['event_errors']}, load {res['load_average'][0]}")

    def med(rs: list[dict[str, Any]], key: str) -> float | None:
        vals = [r[key] for r in rs if r[key] is not None]
        return _r(statistics.median(vals)) if vals else None

    summary: dict[str, Any] = {}
    base, other = backends[0], backends[-1]
    for rate, by_backend in runs.items():
        row: dict[str, Any] = {}
        for backend, rs in by_backend.items():
            row[backend] = {key: med(rs, key) for key in (
                "client_p50_ms", "client_p99_ms", "server_p99_ms", "noop_client_p99_ms", "p99_ratio_to_noop",
                "server_cpu_us_per_decision", "server_cpu_us_per_noop", "generator_lag_p99_ms")}
            row[backend]["errors"] = sum(r["errors"] + r["event_errors"] for r in rs)
            row[backend]["valid_runs"] = sum(1 for r in rs if r["valid"])
        b99, o99 = row[base]["client_p99_ms"], row[other]["client_p99_ms"]
        row["p99_ratio"] = _r(o99 / b99) if b99 and o99 else None  # of the medians
        pairs = [o["client_p99_ms"] / b["client_p99_ms"] for b, o in zip(by_backend[base], by_backend[other],
                                                                           strict=True)
                 if b["client_p99_ms"] and o["client_p99_ms"]]
        row["p99_ratio_per_run"] = [_r(x) for x in pairs]
        summary[rate] = row
    return {
        "benchmark": "decision_backends",
        "backends": backends,
        "rates": args.rates,
        "runs": args.runs,
        "duration": args.duration,
        "warmup": args.warmup,
        "offers": args.offers,
        "features": args.features,
        "schedule": args.schedule,
        "target_ratio": args.target_ratio,
        "summary": summary,
        "met": all(r["p99_ratio"] is not None and r["p99_ratio"] <= args.target_ratio for r in summary.values()),
        "errors": sum(r[b]["errors"] for r in summary.values() for b in backends),
        "per_run": runs,
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(),
        "python": platform.python_version(),
        "versions": versions(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def compare_section(res: dict[str, Any]) -> str:
    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    m = res["machine"]
    base, other = res["backends"][0], res["backends"][-1]
    cmd = (f"python bench/decision_latency.py --backends {','.join(res['backends'])} --rates "
           f"{','.join(f'{r:g}' for r in res['rates'])} --runs {res['runs']} --duration {res['duration']:g} "
           f"--warmup {res['warmup']:g} --features {res['features']}")
    rows = []
    for rate, row in res["summary"].items():
        for backend in res["backends"]:
            b = row[backend]
            loads = ", ".join(f"{r['load_average'][0]:.1f}" for r in res["per_run"][rate][backend])
            rows.append(f"| {rate} | {backend} | {fmt(b['client_p50_ms'])} | **{fmt(b['client_p99_ms'])}** | "
                        f"{fmt(b['server_p99_ms'])} | {fmt(b['noop_client_p99_ms'])} | {fmt(b['p99_ratio_to_noop'])} | "
                        f"{fmt(b['server_cpu_us_per_decision'])} | {b['errors']} | {b['valid_runs']}/{res['runs']} | "
                        f"{loads} |")
    ratios = "; ".join(
        f"at {rate}/s **{fmt(row['p99_ratio'])}** (per run: {', '.join(fmt(x) for x in row['p99_ratio_per_run'])})"
        for rate, row in res["summary"].items())
    per_run = "\n".join(
        f"| {rate} | {backend} | {' / '.join(fmt(r['client_p99_ms']) for r in rs)} | "
        f"{' / '.join(fmt(r['noop_client_p99_ms']) for r in rs)} |"
        for rate, by_backend in res["per_run"].items() for backend, rs in by_backend.items())
    invalid = sum(row[b]["valid_runs"] for row in res["summary"].values() for b in res["backends"]) == 0
    caveat = ""
    if res["errors"] or invalid:
        caveat = (f" **These runs do not measure the backends:** {res['errors']:,} failed or timed-out requests "
                  f"(decisions and event posts) and {'no' if invalid else 'not every'} run in which the generator "
                  "kept its schedule; the server and the generator were starved of CPU.")
    if not res["met"]:
        verdict = "**Not met at every rate measured.**"
    else:
        verdict = "Under the target at every rate, but not conclusive." if caveat else "Met at every rate measured."
    busy = max(res["load_average_start"][0], res["load_average_end"][0]) > 2.0
    shared = "the machine was shared with other work" if busy else "nothing else ran on the machine"
    valid_note = ("on this shared machine most were not, so these are the figures of a busy VM, to be measured "
                  "again on a quiet one." if busy else "runs that were not are figures of a machine saturated by "
                  "the server and the generator together (2 cores), not of the backends alone.")
    return f"""{CMP_START}
## Decision latency: embedded vs Redis backends (issue 13)

`{cmd}` on {m["cpu"]} ({m["cores"]} cores), Python {res["python"]}; generator and server on the same
machine, Redis on it too; load average {res["load_average_start"]} at the start, {res["load_average_end"]} at
the end ({shared}); {res["date"]}.

One `kassa serve` process per run, started fresh: `{base}` (per-buyer state journaled in process, the in-memory
online store) or `{other}` (`state.backend: redis` and `features.online_store: redis`, one local Redis), the
feature definitions above applied (the decision reads the buyer's rows of the online store). Each run:
warm-up {res["warmup"]:g} s, then `POST /v1/decisions` open-loop ({res["schedule"]} schedule) for {res["duration"]:g} s
with every decision's events posted, then the no-op endpoint at the same rate for {res["duration"]:g} s. The backends
alternate which goes first from one round to the next. Medians of {res["runs"]} runs:

| rate/s | backend | p50 ms | p99 ms | server p99 ms | no-op p99 ms | p99 / no-op | CPU µs/decision | errors \
| valid runs | load (1 min) per run |
|---:|---|---:|---:|---:|---:|---:|---:|---:|:---:|---|
{chr(10).join(rows)}

{other} p99 / {base} p99 (target ≤ {res["target_ratio"]:g}): {ratios}.
{verdict}{caveat}

| rate/s | backend | p99 ms per run | no-op p99 ms per run |
|---:|---|---|---|
{per_run}

A run is "valid" when the generator's send lag stayed within 1 ms at P99; {valid_note}
{CMP_END}"""


def summarize_repeat(dec: Phase, noop: Phase) -> dict[str, Any]:
    d, n = dec.result, noop.result
    ratio = d.latency_ms["p99"] / n.latency_ms["p99"] if n.latency_ms["p99"] > 0 else float("nan")
    return {
        "client_p50_ms": _r(d.latency_ms["p50"]),
        "client_p90_ms": _r(d.latency_ms["p90"]),
        "client_p99_ms": _r(d.latency_ms["p99"]),
        "client_p999_ms": _r(d.latency_ms["p999"]),
        "client_max_ms": _r(d.latency_ms["max"]),
        "server_p50_ms": _r(dec.server_pct(50)),
        "server_p99_ms": _r(dec.server_pct(99)),
        "server_max_ms": _r(dec.server_pct(100)),
        "noop_client_p50_ms": _r(n.latency_ms["p50"]),
        "noop_client_p99_ms": _r(n.latency_ms["p99"]),
        "noop_client_p999_ms": _r(n.latency_ms["p999"]),
        "p99_ratio_to_noop": _r(ratio),
        "errors": d.errors + n.errors,
        "event_errors": dec.events.errors,
        "events_sent": dec.events.sent,
        "valid": d.valid and n.valid,
        # Includes the event posts and background learning a decision brings along.
        "server_cpu_us_per_decision": _r(dec.server_cpu_us_per_request() or math.nan, 1),
        "server_cpu_us_per_noop": _r(noop.server_cpu_us_per_request() or math.nan, 1),
        "generator_lag_p99_ms": _r(max(d.lag_p99_ms, n.lag_p99_ms)),
        "client_cpu_us_per_request": _r(d.client_cpu_us_per_request, 1),
        "decisions": d.summary(),
        "noop": n.summary(),
    }


def render_table(res: dict[str, Any]) -> Any:
    from rich.table import Table

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    table = Table(
        title=f"Decision latency, open loop at {res['rate']:g}/s, {res['duration']:g} s x {res['repeats']} "
        f"(median of repeats)"
    )
    table.add_column("")
    table.add_column("p50 ms", justify="right")
    table.add_column("p99 ms", justify="right")
    table.add_row("decision, client", fmt(res["client_p50_ms"]), fmt(res["client_p99_ms"]))
    table.add_row("decision, server took_ms", fmt(res["server_p50_ms"]), fmt(res["server_p99_ms"]))
    table.add_row("no-op, client", fmt(res["noop_client_p50_ms"]), fmt(res["noop_client_p99_ms"]))
    table.caption = (
        f"p99 ratio to no-op {fmt(res['p99_ratio_to_noop'])}; errors {res['errors']} "
        f"(+{res['event_errors']} event); generator lag p99 {fmt(res['generator_lag_p99_ms'])} ms; "
        f"{'valid' if res['valid'] else 'INVALID: generator fell behind'}; server CPU per request "
        f"{fmt(res['server_cpu_us_per_decision'])} µs decision (with its events), "
        f"{fmt(res['server_cpu_us_per_noop'])} µs no-op"
    )
    return table


def docs_section(res: dict[str, Any]) -> str:
    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    m, v = res["machine"], res["versions"]
    cmd = (
        f"python bench/decision_latency.py --rate {res['rate']:g} --duration {res['duration']:g} "
        f"--warmup {res['warmup']:g} --repeats {res['repeats']} --offers {res['offers']}"
    )
    rows = "\n".join(
        f"| {i + 1} | {fmt(r['client_p50_ms'])} | {fmt(r['client_p99_ms'])} | {fmt(r['server_p50_ms'])} "
        f"| {fmt(r['server_p99_ms'])} | {fmt(r['noop_client_p99_ms'])} | {r['errors']} "
        f"| {'yes' if r['valid'] else 'no'} |"
        for i, r in enumerate(res["per_repeat"])
    )
    return f"""{START}
## Decision latency

`{cmd}` on {m["cpu"]} ({m["cores"]} cores), Python {res["python"]}, kassa {v["kassa"]},
uvicorn {v["uvicorn"]}, vowpalwabbit {v["vowpalwabbit"]}; load generator and server on the same
machine; {res["date"]}.

Open-loop load: `POST /v1/decisions` at {res["rate"]:g}/s ({res["schedule"]} schedule, {res["offers"]}
offers in one `squarecb` placement with 3 slots), each decision followed by its impression events and
an accept for ~10 % of them; then the same load on `POST /_bench/noop`, the framework floor. Client
latency is timed from each request's intended send time to the last response byte; server latency is
the response's `took_ms`. Medians of {res["repeats"]} repeats:

| | p50 (ms) | p99 (ms) |
|---|---:|---:|
| decision, client-side | {fmt(res["client_p50_ms"])} | {fmt(res["client_p99_ms"])} |
| decision, server-side (`took_ms`) | {fmt(res["server_p50_ms"])} | {fmt(res["server_p99_ms"])} |
| no-op endpoint, client-side | {fmt(res["noop_client_p50_ms"])} | {fmt(res["noop_client_p99_ms"])} |

Decision p99 / no-op p99: **{fmt(res["p99_ratio_to_noop"])}**. Errors: {res["errors"]} (events:
{res["event_errors"]}). Generator send-lag p99: {fmt(res["generator_lag_p99_ms"])} ms
({"valid run" if res["valid"] else "**invalid run: the generator fell behind**"}). Server CPU per request
(all threads, including the events and background learning a decision brings along):
{fmt(res["server_cpu_us_per_decision"])} µs per decision, {fmt(res["server_cpu_us_per_noop"])} µs per no-op.

| repeat | client p50 | client p99 | server p50 | server p99 | no-op p99 | errors | valid |
|---:|---:|---:|---:|---:|---:|---:|:---:|
{rows}
{END}"""


def write_docs(res: dict[str, Any], path: Path = DOCS) -> None:
    write_section(docs_section(res), START, END, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=500.0, help="decisions per second (default 500)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per measured phase")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up per endpoint")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--url", help="target an already-running server (http://host:port) instead of starting one")
    p.add_argument("--offers", type=int, default=50)
    p.add_argument("--customers", type=int, default=5_000)
    p.add_argument("--accept-rate", type=float, default=0.1)
    p.add_argument("--no-events", action="store_true", help="do not post events for the decisions")
    p.add_argument("--schedule", choices=["fixed", "poisson"], default="fixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--connections", type=int, default=64, help="keep-alive connections for the load")
    p.add_argument("--event-connections", type=int, default=8)
    p.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, seconds")
    p.add_argument("--settle", type=float, default=1.0, help="idle seconds between phases")
    p.add_argument("--max-lag-ms", type=float, default=1.0, help="generator send-lag p99 above this: invalid")
    p.add_argument("--ready-timeout", type=float, default=20.0)
    p.add_argument("--state", choices=["embedded", "redis"], default="embedded",
                   help="backends of the started server: embedded, or redis (state.backend and the online store)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="state.redis_url with --state redis")
    p.add_argument("--features", help="feature definitions the server applies (e.g. examples/features.yaml)")
    p.add_argument("--backends", help="compare these backends (e.g. embedded,redis): fresh servers, interleaved")
    p.add_argument("--rates", default="600,1000", help="with --backends: comma-separated decisions per second")
    p.add_argument("--runs", type=int, default=3, help="with --backends: rounds (medians over them)")
    p.add_argument("--target-ratio", type=float, default=1.3, help="with --backends: last / first p99 target")
    p.add_argument("--docs-from", metavar="FILE",
                   help="with --backends: write the docs section from a saved --json output, run nothing")
    p.add_argument("--json", action="store_true", help="end the output with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS.name}")
    p.add_argument("--verbose", action="store_true", help="print the server's output at the end")
    args = p.parse_args(argv)
    if args.backends:
        args.backends = args.backends.split(",")
        if any(b not in ("embedded", "redis") for b in args.backends) or len(args.backends) != 2:
            p.error("--backends takes two of embedded, redis")
        args.rates = [float(r) for r in args.rates.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(stderr=False)

    def log(msg: str) -> None:
        console.print(f"[dim]{msg}[/dim]")

    try:
        import uvloop

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        run = asyncio.run
    if args.backends and args.docs_from:  # the JSON object is the last line of a --json run's output
        write_section(compare_section(json.loads(Path(args.docs_from).read_text().strip().splitlines()[-1])),
                      CMP_START, CMP_END, DOCS)
        log(f"wrote {DOCS}")
        return 0
    if args.backends:
        res = run(compare_backends(args, log))
        if args.write_docs:
            write_section(compare_section(res), CMP_START, CMP_END, DOCS)
            log(f"wrote {DOCS}")
        if args.json:
            print(json.dumps(res, separators=(",", ":")), flush=True)
        return 1 if res["errors"] else 0
    res = run(bench(args, log))
    console.print(render_table(res))
    if args.write_docs:
        write_docs(res)
        log(f"wrote {DOCS}")
    if args.json:
        print(json.dumps(res, separators=(",", ":")), flush=True)
    # An invalid run (generator behind) is reported in the output, not as a failure: on a loaded
    # machine it says "measure elsewhere", whereas errors mean the server misbehaved.
    return 1 if res["errors"] or res["event_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
