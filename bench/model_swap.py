"""Model swaps under load: 100 production swaps during an open-loop run at 200 decisions/s.

Starts ``kassa serve`` on a generated 50-offer catalog with a few hundred registered versions of its
placement (two trained models, registered alternately), then runs `kassa loadtest` (decisions only, fixed
schedule) twice per repeat: once untouched, once while a thread promotes 100 fresh versions to production
(with ``force``). ``--via registry`` (default) promotes in the registry from this process, as
`kassa models promote`, `kassa train` or another replica would, and the server swaps on its registry poll;
``--via http`` promotes over the server's admin API, so the server does the registry write too. Every
swap is loaded and published by the server itself. Reports the medians of the client P99 and the error
counts of both phases, their ratio, the swaps the server counted, and the in-process cost of loading one
version (numpy scorer against a VW workspace).

Target (issue 4): zero failed requests and no P99 change beyond noise during 100 swaps under 200
decisions/s.

    python bench/model_swap.py --repeats 3 --json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from benchdocs import write_section
from decision_latency import PLACEMENT, make_catalog
from kassa import schemas
from kassa.db import make_engine
from kassa.features.definitions import FeatureRepo
from kassa.learn.online.learner import OnlineLearner
from kassa.learn.registry import ModelRegistry, feature_schema_hash
from kassa.learn.rollout import promote_version
from kassa.learn.serving.linear import LinearModel
from kassa.learn.serving.loader import load_serving
from kassa.learn.serving.vw import VWModel

START = "<!-- bench:model-swap:start -->"
END = "<!-- bench:model-swap:end -->"
ADMIN, PUB = "bench-admin", "bench-publishable"
KASSA = [sys.executable, "-m", "kassa"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def register_models(data: Path, catalog: dict, count: int) -> list[str]:
    """``count`` versions (two trained models, registered alternately): every swap loads a version the
    server has never loaded, as a fresh snapshot or a promotion would."""
    placement = schemas.Placement(**{k: v for k, v in catalog["placements"][0].items() if k != "reward"})
    registry = ModelRegistry(make_engine(data / "kassa.db"), data / "models")
    schema = feature_schema_hash(placement, FeatureRepo())
    paths = []
    for seed in (1, 2):
        rng = random.Random(seed)
        learner = OnlineLearner(placement, data / f"train-{seed}")
        for _ in range(3000):
            offer = rng.choice(catalog["offers"])
            learner.learn(f"shared |c country={rng.choice('ABCD')}", f" |o id={offer['id']}",
                          float(rng.random() < 0.1 * seed), 0.02)
        path, _ = learner.snapshot()
        paths.append((path, learner.args))
    versions = []
    for i in range(count):
        path, largs = paths[i % 2]
        mv = registry.register(placement.id, path, schema_hash=schema, learner_args=largs, source="batch",
                               metrics={"rewarded_decisions": 100_000, "learned": 3000})
        versions.append(mv.version)
    registry.promote(versions[0], "production", reason="bench start")
    return versions


def load_costs(data: Path, versions: list[str], n: int = 20) -> dict:
    """In-process cost of loading one version for serving: the numpy scorer (what the server does) against
    a VW workspace load + free (what it did before ADR 0005); medians over ``n`` versions."""
    registry = ModelRegistry(make_engine(data / "kassa.db"), data / "models")
    linear, vw, kinds = [], [], set()
    for version in versions[:n]:
        mv = registry.get(version)
        path = registry.verify(mv, None)
        t = time.perf_counter()
        model = load_serving(path, version, mv.metrics, mv.sha256)
        linear.append(time.perf_counter() - t)
        kinds.add("linear" if isinstance(model, LinearModel) else "vw")
        t = time.perf_counter()
        old = VWModel(path, version)
        old.workspace.finish()
        del old
        vw.append(time.perf_counter() - t)
    return {"scorer": "+".join(sorted(kinds)), "load_ms_linear": round(statistics.median(linear) * 1e3, 3),
            "load_free_ms_vw": round(statistics.median(vw) * 1e3, 3)}


def post(url: str, body: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def server_swaps(base: str) -> int:
    """The server's own count of serving-set changes (``kassa_model_swaps_total``)."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("kassa_model_swaps_total "):
                return int(float(line.split()[1]))
    raise SystemExit("the server's /metrics has no kassa_model_swaps_total")


def swapper(base: str, versions: list[str], swaps: int, seconds: float, result: dict, via: str,
            data: Path) -> None:
    """Promote ``versions`` one by one: over the server's admin API (``via="http"``: the registry write, then
    the load, happen in the server), or straight in the registry (``via="registry"``) from a separate
    process at the lowest CPU priority, standing for `kassa models promote`, `kassa train` or another
    replica on another machine: on this 2-core box its CPU would otherwise be billed to the server."""
    if via == "registry":
        ctx = multiprocessing.get_context("fork")
        done = ctx.Value("i", 0)
        proc = ctx.Process(target=_promote_in_registry, args=(data, versions[:swaps], seconds / swaps, done))
        proc.start()
        proc.join()
        result["swaps"] = done.value
        return
    ok = 0
    gap = seconds / swaps
    t0 = time.perf_counter()
    for i, version in enumerate(versions[:swaps]):
        delay = t0 + (i + 0.5) * gap - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        if post(f"{base}/v1/models/{version}/stage",
                {"stage": "production", "force": True, "reason": "bench"}) == 200:
            ok += 1
    result["swaps"] = ok


def _promote_in_registry(data: Path, versions: list[str], gap: float, done: Any) -> None:
    os.nice(19)
    registry = ModelRegistry(make_engine(data / "kassa.db"), data / "models")
    t0 = time.perf_counter()
    for i, version in enumerate(versions):
        delay = t0 + (i + 0.5) * gap - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        promote_version(registry, version, "production", force=True, reason="bench", actor="bench")
        done.value += 1


def delayed_swapper(base: str, versions: list[str], swaps: int, seconds: float, result: dict, via: str,
                    data: Path) -> None:
    time.sleep(2.5)  # the generator ramps for 2 s first; the swaps span the measured window
    before = server_swaps(base)
    swapper(base, versions, swaps, seconds, result, via, data)
    time.sleep(0.5)  # the last promotion's poll
    result["server_swaps"] = server_swaps(base) - before


def loadtest(base: str, profile: Path, rate: float, duration: float) -> dict:
    cmd = [*KASSA, "loadtest", "--url", base, "--profile", str(profile), "--rate", str(rate), "--duration",
           str(duration), "--json", "--key", PUB]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"loadtest printed no JSON (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=50.0)
    ap.add_argument("--swaps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--via", choices=["registry", "http"], default="registry",
                    help="promote in the registry from another process (default), or over the server's admin API")
    ap.add_argument("--no-learner", action="store_true",
                    help="no online learner in the server (reward windows longer than the run): the swap alone")
    ap.add_argument("--poll", type=float, default=0.2, help="the server's learn.registry_poll_seconds")
    ap.add_argument("--tag", default="", help="write a separate docs section (e.g. another swap cadence)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"steady": [], "swapping": []}
    swaps_done: list[int] = []
    server_done: list[int] = []
    with tempfile.TemporaryDirectory(prefix="kassa-swap-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        catalog = make_catalog(50)
        if args.no_learner:
            catalog["placements"][0]["reward"] = {"wait_seconds": 3600}
        cat_file = Path(tmp) / "catalog.json"
        cat_file.write_text(json.dumps(catalog))
        versions = register_models(data, catalog, 1 + args.swaps * args.repeats)
        costs = load_costs(data, versions)
        fresh = iter(versions[1:])
        profile = Path(tmp) / "profile.yaml"
        profile.write_text(yaml.safe_dump({
            "name": "decisions only", "traffic": {"rate": args.rate}, "ramp_seconds": 2,
            "duration_seconds": args.duration, "schedule": "fixed",
            "mix": {"decision": 1.0, "impression": 0, "click": 0, "accept": 0, "webhook": 0, "feature_push": 0},
            "payload": {"placement": PLACEMENT}, "connections": {"idle": 0, "active": 16},
            "slo": {"p99_ms": 200, "error_rate": 0.001},
        }))
        port = free_port()
        env = {**os.environ, "KASSA_ADMIN_KEY": ADMIN, "KASSA_PUBLISHABLE_KEY": PUB, "KASSA_LOG_LEVEL": "warning",
               "KASSA_LEARN__AUTO_PUBLISH": "false",
               "KASSA_LEARN__REGISTRY_POLL_SECONDS": str(args.poll)}
        server = subprocess.Popen([*KASSA, "serve", "--data-dir", str(data), "--catalog", str(cat_file), "--port",
                                   str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(f"{base}/readyz", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            for rep in range(args.repeats):
                for phase in (("steady", "swapping") if rep % 2 == 0 else ("swapping", "steady")):
                    result: dict = {}
                    thread = None
                    if phase == "swapping":
                        batch = [next(fresh) for _ in range(args.swaps)]
                        thread = threading.Thread(target=delayed_swapper, args=(
                            base, batch, args.swaps, args.duration - 1.0, result, args.via, data), daemon=True)
                        thread.start()
                    summary = loadtest(base, profile, args.rate, args.duration)
                    if thread is not None:
                        thread.join()
                        swaps_done.append(result.get("swaps", 0))
                        server_done.append(result.get("server_swaps", 0))
                    runs[phase].append(summary)
                    print(f"{phase:>9}: p99 {summary['p99_ms']:.2f} ms, errors {summary['errors']}, "
                          f"valid {summary['valid']}"
                          + (f", swaps {swaps_done[-1]} (server {server_done[-1]})" if thread else ""),
                          file=sys.stderr)
        finally:
            server.terminate()
            server.wait(timeout=30)

    def med(phase: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in runs[phase])

    figures = {
        "rate": args.rate, "duration_s": args.duration, "repeats": args.repeats,
        "steady_p99_ms": round(med("steady", "p99_ms"), 3), "swapping_p99_ms": round(med("swapping", "p99_ms"), 3),
        "steady_p50_ms": round(med("steady", "p50_ms"), 3), "swapping_p50_ms": round(med("swapping", "p50_ms"), 3),
        "steady_p99_runs": [round(float(r["p99_ms"]), 2) for r in runs["steady"]],
        "swapping_p99_runs": [round(float(r["p99_ms"]), 2) for r in runs["swapping"]],
        "steady_errors": sum(int(r["errors"]) for r in runs["steady"]),
        "swapping_errors": sum(int(r["errors"]) for r in runs["swapping"]),
        "swaps_per_run": swaps_done, "server_swaps_per_run": server_done, "via": args.via,
        "registry_poll_seconds": args.poll, "learner": not args.no_learner,
        "valid_runs": sum(bool(r["valid"]) for p in runs.values() for r in p),
        "runs": sum(len(p) for p in runs.values()), **costs,
    }
    figures["p99_ratio_swapping_to_steady"] = round(figures["swapping_p99_ms"] / figures["steady_p99_ms"], 3)
    if args.write_docs:
        write_docs(figures, args.tag)
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:>30}: {v}")


def write_docs(f: dict, tag: str = "") -> None:
    start, end = (START, END) if not tag else (START.replace("swap:", f"swap-{tag}:"), END.replace("swap:",
                                                                                                   f"swap-{tag}:"))
    via = ("straight in the registry from another process (as `kassa models promote` or another replica "
           "would), so the server's part is its registry poll and the load" if f["via"] == "registry" else
           "over the server's admin API (`POST /v1/models/{version}/stage`), so the server also does the "
           "registry write")
    learner = ("on: it learns every decision (unrewarded once the 2 s reward window closes), and after each "
               "promotion it continues from the promoted version at its next snapshot (one VW reload per "
               "snapshot interval, then the examples learned meanwhile are learned again)" if f["learner"] else
               "off (reward windows longer than the run): the serving swap alone")
    flags = f"--via {f['via']}" + (" --no-learner" if not f["learner"] else "") + (f" --tag {tag}" if tag else "")
    cadence = f"one swap every {f['duration_s'] / max(f['swaps_per_run'] or [1]):.1f} s"
    text = f"""{start}
## Model swaps under load (`bench/model_swap.py {flags}`: {cadence})

`kassa serve` (embedded, 50 offers, squareCB placement with two registered models) under an open-loop,
decisions-only load of {f['rate']:g}/s for {f['duration_s']:g} s, measured by `kassa loadtest`. In the
"swapping" runs, {f['swaps_per_run']} versions are promoted to production during the window,
{via}; each is a version the server has not loaded before, and the server counted
{f['server_swaps_per_run']} swaps of its serving set (registry poll every {f['registry_poll_seconds']:g} s).
Medians of {f['repeats']} runs each
(alternating order); {platform.machine()}, {os.cpu_count()} vCPU, Python {platform.python_version()};
{f['valid_runs']} of {f['runs']} runs valid (generator kept its schedule).
Measured {dt.date.today().isoformat()}.

| | P50 ms | P99 ms | errors |
|---|---:|---:|---:|
| steady | {f['steady_p50_ms']} | {f['steady_p99_ms']} | {f['steady_errors']} |
| 100 swaps during the run | {f['swapping_p50_ms']} | {f['swapping_p99_ms']} | {f['swapping_errors']} |
| ratio | | {f['p99_ratio_swapping_to_steady']} | |

P99 of each run: steady {f['steady_p99_runs']}, swapping {f['swapping_p99_runs']} ms.

Online learner in the server: {learner}.
Serving scorer: {f['scorer']} (ADR 0005). Loading one version for serving, in-process, median of 20:
{f['load_ms_linear']} ms (read the exported weights into numpy), against {f['load_free_ms_vw']} ms for
a Vowpal Wabbit workspace load + free, which holds the GIL throughout and was the cause of the
P99 increase before ADR 0005. The default online-snapshot cadence is one swap every 10 s.
{end}"""
    write_section(text, start, end)


if __name__ == "__main__":
    main()
