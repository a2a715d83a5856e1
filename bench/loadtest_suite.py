"""The standard `kassa loadtest` suite: decisions, the mixed profile and the do-nothing floor, per backend.

Owns the load-test benchmark. For each online-store backend (the embedded in-process store, then Redis at
``--redis-url``) it starts ``kassa serve`` in a subprocess (bench endpoints on, a 50-offer ``squarecb``
placement, the example feature definitions, a Shopify webhook secret) and runs, ``--repeats`` times each,
open-loop through the same generator `kassa loadtest` uses:

* **floor**: ``POST /_bench/noop`` with decision-sized bodies — the server's do-nothing endpoint;
* **decisions**: ``POST /v1/decisions`` alone;
* **mixed**: the "Black Friday peak" profile's mix (decisions, impression/click/accept beacons for the
  decisions made, signed order webhooks, feature pushes) with its idle keep-alive connections;

all at the "Black Friday peak" profile's rate (``--rate`` overrides), reporting medians of the repeats and
the ratios to the floor. Then the generator's own capacity: ``--capacity-rate`` (3,000/s) against the
floor, with its send lag, CPU per request and CPU use measured, and the server's CPU beside it.

    python bench/loadtest_suite.py --duration 20 --repeats 3 --json --write-docs
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from benchdocs import DOCS, write_section
from decision_latency import _free_port, make_catalog, process_cpu_seconds, versions
from kassa.loadtest.profiles import load_profile, parse_profile
from kassa.loadtest.runner import RunConfig, machine_info, run_loadtest
from kassa.loadtest.worker import raise_fd_limit

ROOT = Path(__file__).resolve().parent.parent
PUB, SECRET, ADMIN, WEBHOOK_SECRET = "bench-pub", "bench-secret", "bench-admin", "bench-shopify-secret"
START, END = "<!-- bench:loadtest_suite:start -->", "<!-- bench:loadtest_suite:end -->"
PROFILE = "black-friday-peak"


@contextlib.contextmanager
def kassa_serve(backend: str, redis_url: str, log: Any) -> Iterator[tuple[str, int]]:
    """A ready ``kassa serve`` subprocess on ``backend`` ("embedded" or "redis"); yields (url, pid)."""
    with tempfile.TemporaryDirectory(prefix="kassa-bench-loadtest-") as tmp:
        root = Path(tmp)
        catalog = root / "catalog.yaml"
        catalog.write_text(yaml.safe_dump(make_catalog(50), sort_keys=False))
        features: dict[str, Any] = {"definitions_file": str(ROOT / "examples" / "features.yaml")}
        if backend == "redis":
            features.update(online_store="redis", redis_url=redis_url, key_prefix=f"kassa-bench-{secrets.token_hex(4)}")
        cfg = root / "kassa.yaml"
        cfg.write_text(yaml.safe_dump({"data_dir": str(root / "data"), "catalog_file": str(catalog),
                                       "log_level": "warning", "features": features}))
        port = _free_port()
        env = {**os.environ, "KASSA_PUBLISHABLE_KEY": PUB, "KASSA_SECRET_KEY": SECRET, "KASSA_ADMIN_KEY": ADMIN,
               "KASSA_SERVER__BENCH_ENDPOINTS": "true", "KASSA_INTEGRATIONS__SHOPIFY__WEBHOOK_SECRET": WEBHOOK_SECRET}
        log_path = root / "server.log"
        url = f"http://127.0.0.1:{port}"
        # The server inherits this process's (raised) open-file limit: 10,000 idle connections need it.
        raise_fd_limit(65_536)
        with log_path.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "kassa", "serve", "--settings", str(cfg),
                                     "--port", str(port)],
                                    env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            try:
                deadline = time.monotonic() + 60
                while True:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"kassa serve ({backend}) did not become ready:\n"
                                         f"{log_path.read_text(errors='replace')[-3000:]}")
                    with contextlib.suppress(OSError), urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                        if r.status == 200:
                            break
                    time.sleep(0.2)
                log(f"kassa serve ({backend}) ready on {url}")
                yield url, proc.pid
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def one_run(url: str, pid: int, profile: Any, args: argparse.Namespace, rate: float, idle: int) -> dict[str, Any]:
    cpu0 = process_cpu_seconds(pid)
    res = run_loadtest(RunConfig(url=url, profile=profile, rate=rate, duration=args.duration, ramp=args.ramp,
                                 key=PUB, secret_key=SECRET, webhook_secret=WEBHOOK_SECRET, idle=idle,
                                 max_lag_ms=args.max_lag_ms, seed=args.seed))
    cpu1 = process_cpu_seconds(pid)
    s = res["summary"]
    sent = sum(v["requests"] for v in s["by_type"].values())
    g = s["generator"]
    return {
        "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "p999_ms": s["p999_ms"], "max_ms": s["max_ms"],
        "achieved_rate": s["achieved_rate"], "error_rate": s["error_rate"], "errors": s["errors"],
        "errors_by_kind": s["errors_by_kind"],
        "valid": s["valid"], "verdict": s["verdict"], "reason": s["verdict_reason"],
        "lag_p99_ms": g["send_lag_ms"]["p99_ms"], "generator_cpu_us_per_request": g["cpu_us_per_request"],
        "generator_cpu_util": max((u or 0.0) for u in g["cpu_util_per_worker"]), "workers": g["workers"],
        # Over the whole run incl. ramp and idle-connection refreshes: an upper bound per measured request.
        "server_cpu_us_per_request": round((cpu1 - cpu0) / sent * 1e6, 1) if cpu0 is not None and cpu1 is not None
        and sent else None,
        "server_took_p99_ms": s["server"]["took_ms"]["p99"],
        "idle_held": s["idle_connections"]["min_held"], "idle_asked": s["idle_connections"]["asked"],
        "loadavg_1m": s["machine"]["loadavg_1m"],
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in runs[0]:
        vals = [r[k] for r in runs if isinstance(r[k], int | float) and not isinstance(r[k], bool)]
        if len(vals) == len(runs):
            out[k] = round(statistics.median(vals), 3)
    out["valid_runs"] = sum(r["valid"] for r in runs)
    out["runs"] = len(runs)
    out["errors"] = sum(r["errors"] for r in runs)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def bench(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    bf = load_profile(PROFILE)
    rate = args.rate or bf.peak_rate()
    idle = bf.connections.idle if args.idle is None else args.idle
    floor_p = parse_profile({"name": "do-nothing floor", "traffic": {"rate": rate}, "mix": {"noop": 1},
                             "schedule": bf.schedule, "slo": {"p99_ms": bf.slo.p99_ms}}, "<bench>")
    decisions_p = parse_profile({"name": "decisions", "traffic": {"rate": rate}, "mix": {"decision": 1},
                                 "schedule": bf.schedule, "slo": {"p99_ms": bf.slo.p99_ms}}, "<bench>")
    backends: dict[str, Any] = {}
    capacity: dict[str, Any] = {}
    machine = machine_info()  # load average at the start: other work on the machine shows in every figure
    for backend in args.backends:
        with kassa_serve(backend, args.redis_url, log) as (url, pid):
            runs: dict[str, list[dict[str, Any]]] = {"floor": [], "decisions": [], "mixed": []}
            for rep in range(args.repeats):
                for name, prof, n_idle in (("floor", floor_p, 0), ("decisions", decisions_p, 0),
                                           ("mixed", bf, idle)):
                    log(f"{backend} repeat {rep + 1}/{args.repeats}: {name} at {rate:,.1f}/s"
                        + (f" with {n_idle:,} idle connections" if n_idle else ""))
                    r = one_run(url, pid, prof, args, rate, n_idle)
                    runs[name].append(r)
                    log(f"  p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, {r['achieved_rate']}/s, errors "
                        f"{r['errors']}, {'valid' if r['valid'] else 'INVALID'} (lag p99 {r['lag_p99_ms']} ms)")
            med = {k: median_of(v) for k, v in runs.items()}
            med["ratios"] = {
                "decisions_p99_to_floor": ratio(med["decisions"].get("p99_ms"), med["floor"].get("p99_ms")),
                "decisions_p50_to_floor": ratio(med["decisions"].get("p50_ms"), med["floor"].get("p50_ms")),
                "mixed_p99_to_floor": ratio(med["mixed"].get("p99_ms"), med["floor"].get("p99_ms")),
            }
            med["per_run"] = runs
            backends[backend] = med
            if backend == args.backends[0] and args.capacity_rate:
                cap_p = parse_profile({"name": "generator capacity", "traffic": {"rate": args.capacity_rate},
                                       "mix": {"noop": 1}, "schedule": "fixed", "slo": {"p99_ms": 1000}}, "<bench>")
                cap_runs = []
                for rep in range(args.repeats):
                    log(f"generator capacity {rep + 1}/{args.repeats}: no-op at {args.capacity_rate:,.0f}/s")
                    r = one_run(url, pid, cap_p, args, args.capacity_rate, 0)
                    cap_runs.append(r)
                    log(f"  achieved {r['achieved_rate']}/s, lag p99 {r['lag_p99_ms']} ms, generator "
                        f"{r['generator_cpu_us_per_request']} µs/request ({r['generator_cpu_util']:.0%} of a core)")
                capacity = {"rate": args.capacity_rate, **median_of(cap_runs), "per_run": cap_runs}
    return {
        "benchmark": "loadtest_suite",
        "profile": bf.name,
        "rate": round(rate, 2),
        "rate_derivation": bf.rate_derivation(),
        "duration": args.duration,
        "ramp": args.ramp,
        "repeats": args.repeats,
        "idle_connections": idle,
        "max_lag_ms": args.max_lag_ms,
        "schedule": bf.schedule,
        "mix": {k: round(v, 4) for k, v in bf.mix.fractions().items()},
        "backends": backends,
        "generator_capacity": capacity,
        "machine": {**machine, "loadavg_1m_end": round(os.getloadavg()[0], 2)},
        "python": sys.version.split()[0],
        "versions": versions(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _f(x: Any, nd: int = 2) -> str:
    return "–" if x is None else f"{x:,.{nd}f}"


def docs_section(res: dict[str, Any]) -> str:
    m, v = res["machine"], res["versions"]
    cmd = (f"python bench/loadtest_suite.py --duration {res['duration']:g} --ramp {res['ramp']:g} "
           f"--repeats {res['repeats']} --idle {res['idle_connections']}")
    rows = []
    for backend, b in res["backends"].items():
        for name, label in (("floor", "do-nothing floor (`/_bench/noop`)"), ("decisions", "decisions alone"),
                            ("mixed", "Black Friday mix")):
            x = b[name]
            rows.append(f"| {backend} | {label} | {_f(x.get('p50_ms'))} | {_f(x.get('p99_ms'))} | "
                        f"{_f(x.get('p999_ms'))} | {_f(x.get('achieved_rate'), 1)} | "
                        f"{_f(x.get('error_rate', 0) * 100, 3)} % "
                        f"| {_f(x.get('server_cpu_us_per_request'), 0)} | {x['valid_runs']}/{x['runs']} |")
    ratios = "; ".join(
        f"{backend}: decisions P99 / floor P99 **{_f(b['ratios']['decisions_p99_to_floor'])}**, "
        f"Black Friday mix P99 / floor P99 {_f(b['ratios']['mixed_p99_to_floor'])}"
        for backend, b in res["backends"].items())
    cap = res["generator_capacity"]
    cap_text = (
        f"Against the floor at **{cap['rate']:,.0f} requests/s** (fixed schedule) the generator achieved "
        f"{_f(cap.get('achieved_rate'), 1)}/s with send lag P99 {_f(cap.get('lag_p99_ms'))} ms, spending "
        f"{_f(cap.get('generator_cpu_us_per_request'), 1)} µs of CPU per request "
        f"({_f(cap.get('generator_cpu_util', 0) * 100, 0)} % "
        f"of one core; the server spent {_f(cap.get('server_cpu_us_per_request'), 0)} µs per request); "
        f"{cap['valid_runs']} of {cap['runs']} runs valid (send-lag P99 within {res['max_lag_ms']:g} ms)."
        if cap else "Not measured in this run.")
    busy = max(m["loadavg_1m"], m["loadavg_1m_end"]) > (m["cores"] or 1)
    caveat = (f"\n**The machine was busy with other work during this run** (load average above its {m['cores']} "
              f"cores): runs marked invalid had a late generator, and every figure is noisier and higher than on an "
              f"idle machine. Rerun the suite on an idle machine (or with the generator on another one) before "
              f"quoting it.\n" if busy else "")
    first = next(iter(res["backends"].values()), None)
    headline = ""
    if first:
        d = first["decisions"]
        headline = (
            f"**Decision endpoint at the Black Friday peak rate ({res['rate']:,.1f} requests/s, "
            f"{next(iter(res['backends']))} backend):** P99 {_f(d.get('p99_ms'))} ms, throughput "
            f"{_f(d.get('achieved_rate'), 1)}/s, error rate {_f(d.get('error_rate', 0) * 100, 3)} %, "
            f"{_f(first['ratios']['decisions_p99_to_floor'])}x the do-nothing floor's P99.")
    return f"""{START}
## Load test suite (`kassa loadtest`)

`{cmd}` on {m["cpu"]} ({m["cores"]} cores), Python {res["python"]}, kassa {v["kassa"]}, uvicorn {v["uvicorn"]};
generator and server on the same machine; load average {m["loadavg_1m"]} at the start, {m["loadavg_1m_end"]}
at the end; {res["date"]}.

Open loop ({res["schedule"]} schedule) at the "Black Friday peak" profile's rate: {res["rate_derivation"]}.
Each run ramps for {res["ramp"]:g} s, then measures {res["duration"]:g} s; latency is client-side from each
request's intended send time; medians of {res["repeats"]} repeats. The mix is
{", ".join(f"{k} {v:.1%}" for k, v in res["mix"].items())}, with {res["idle_connections"]:,} idle keep-alive
connections held open. A run counts as valid when the generator's send-lag P99 stayed within
{res["max_lag_ms"]:g} ms. Server CPU is all threads of `kassa serve` over the whole run (ramp and idle
refreshes included) per measured request.
{caveat}
{headline}

| backend | workload | P50 ms | P99 ms | P99.9 ms | achieved /s | errors | server CPU µs/req | valid runs |
|---|---|---:|---:|---:|---:|---:|---:|:---:|
{chr(10).join(rows)}

Ratios: {ratios}.

**Generator capacity.** {cap_text}
{END}"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, help="requests/s (default: the Black Friday peak profile's rate)")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per run")
    p.add_argument("--ramp", type=float, default=3.0, help="ramp seconds before each run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--idle", type=int, help="idle connections in the mixed runs (default: the profile's)")
    p.add_argument("--backends", nargs="+", default=["embedded", "redis"], choices=["embedded", "redis"])
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--capacity-rate", type=float, default=3000.0, help="generator capacity check (0: skip)")
    p.add_argument("--max-lag-ms", type=float, default=5.0, help="send-lag P99 above this makes a run invalid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="end the output with one JSON object")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS.name}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    console = Console(stderr=True)
    res = bench(args, lambda msg: console.print(f"[dim]{msg}[/dim]"))
    section = docs_section(res)
    sys.stderr.write(section + "\n")
    if args.write_docs:
        write_section(section, START, END)
        console.print(f"[dim]wrote {DOCS}[/dim]")
    if args.json:
        print(json.dumps(res, separators=(",", ":"), default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
