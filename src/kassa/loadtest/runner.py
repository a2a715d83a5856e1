"""Run one load test: start the generator processes, keep them in step, judge the result.

Owns :class:`RunConfig`, :func:`run_loadtest` and the judgement of a run: the HDR histograms per
request type, the per-second timeline, the server's own figures (``took_ms`` of each decision and the
``/metrics`` counters scraped before and after), whether the run is *valid* (the generator kept its
schedule) and the SLO verdict.

A run is **invalid** — its latencies describe the generator, not the server — when the generator did
not send every scheduled request, when its send lag (actual minus intended send time) has a p99 above
the limit (default: 5 % of the SLO's P99 target, at least 1 ms) or a p99.9 above ten times it, or when
a generator process could not open the idle connections the profile asks for (its own file limit), or
when the measured window holds too few latencies for the SLO's percentile (100 for a P99: the slowest of
fewer is a lower percentile of the server's, :func:`min_latencies`). An invalid run's verdict is FAIL
with the reasons; it is never reported as a PASS.

The verdict is **PASS** only when the run is valid and the steady window (after the ramp) meets every
SLO target: P99 (and P50/P99.9/max when the profile sets them) of all requests, the error rate, the
achieved throughput relative to the asked rate, and the idle connections held. Latency counts every
request with an HTTP response of any status, and a timed-out request at the time it was given up
(a lower bound); only refused or broken connections have no latency, and they count as errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any
from urllib.error import URLError
from urllib.parse import urlsplit
from urllib.request import urlopen

import msgspec
import numpy as np

from kassa.loadtest import hist
from kassa.loadtest.profiles import REQUEST_TYPES, Profile
from kassa.loadtest.worker import CONN_ERROR, TIMEOUT, WorkerSpec, raise_fd_limit, worker_process

PER_WORKER_RATE = 4000.0  # requests/s one generator process is given before another is added (~15 % of a core)


class LoadTestError(RuntimeError):
    """The load test could not run (bad URL, unreachable server, rejected pre-flight request)."""


class RunInterrupted(LoadTestError):
    """Ctrl-C before anything of the measured window was sent: there is nothing to report."""


@dataclass
class RunConfig:
    url: str
    profile: Profile
    rate: float | None = None  # steady requests/s; default: the profile's peak rate
    duration: float | None = None  # measured seconds; default: the profile's
    ramp: float | None = None  # default: the profile's
    workers: int | None = None  # generator processes; default: one per PER_WORKER_RATE, at most the cores
    key: str | None = None  # publishable key (decisions, events)
    secret_key: str | None = None  # secret key (feature pushes)
    webhook_secret: str | None = None  # signs order webhooks
    timeout: float = 5.0
    seed: int = 0
    max_lag_ms: float | None = None  # default: 5 % of the SLO's P99, at least 1 ms
    idle: int | None = None  # idle connections; default: the profile's
    scrape_metrics: bool = True
    ready_timeout: float = 120.0
    debug: dict[str, float] = field(default_factory=dict)  # test hooks (see WorkerSpec.debug_*)

    @property
    def steady_rate(self) -> float:
        return float(self.rate if self.rate is not None else self.profile.peak_rate())

    @property
    def steady_duration(self) -> float:
        return float(self.duration if self.duration is not None else self.profile.duration_seconds)

    @property
    def ramp_seconds(self) -> float:
        return float(self.ramp if self.ramp is not None else self.profile.ramp_seconds)

    @property
    def idle_connections(self) -> int:
        return int(self.idle if self.idle is not None else self.profile.connections.idle)

    @property
    def lag_limit_ms(self) -> float:
        if self.max_lag_ms is not None:
            return self.max_lag_ms
        return max(1.0, 0.05 * self.profile.slo.p99_ms)


def parse_url(url: str) -> tuple[str, int, str]:
    """``http://host:port[/prefix]`` -> (host, port, prefix); the generator speaks plain HTTP/1.1."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise LoadTestError(f"--url must be http://host:port (plain HTTP/1.1; put TLS in front of it), got {url!r}")
    try:
        port = parts.port or 80
    except ValueError:  # urlsplit's "Port out of range 0-65535" / "could not be cast" (was a traceback)
        raise LoadTestError(f"--url {url!r}: the port must be a number in 0-65535") from None
    return parts.hostname, port, parts.path.rstrip("/")


def _mp_context() -> Any:
    """forkserver where there is one: a clean process (safe beside a threaded parent, e.g. a server under
    test) that has imported the worker once, so later runs (plan steps, repeats) start in milliseconds."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["kassa.loadtest.worker"])
        return ctx
    return mp.get_context("spawn")


def auto_workers(rate: float) -> int:
    return max(1, min(os.cpu_count() or 1, math.ceil(rate / PER_WORKER_RATE)))


# --------------------------------------------------------------------------- /metrics
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([^\s]+)")


def parse_prometheus(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            with contextlib.suppress(ValueError):
                out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def _get(url: str, timeout: float) -> tuple[int, str]:
    with urlopen(url, timeout=timeout) as r:
        return int(r.status), r.read().decode(errors="replace")


def scrape_metrics(base_url: str, timeout: float = 5.0) -> dict[tuple[str, str], float] | None:
    try:
        status, text = _get(base_url + "/metrics", timeout)
    except (URLError, OSError, ValueError, http.client.HTTPException):
        return None
    return parse_prometheus(text) if status == 200 else None


def _le(labels: str) -> tuple[str, float]:
    m = re.search(r'(?:^\{|,)le="([^"]+)"', labels)
    rest = re.sub(r',?le="[^"]+"', "", labels).replace("{,", "{")
    rest = "" if rest == "{}" else rest
    return rest, float(m.group(1)) if m else math.nan


def metrics_delta(before: dict[tuple[str, str], float] | None,
                  after: dict[tuple[str, str], float] | None) -> dict[str, Any]:
    """Counters that moved and every histogram's count, mean and bucket-estimated P50/P99 over the run."""
    if before is None or after is None:
        return {"available": False}
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    counters = {
        f"{name}{labels}": round(v, 3) for (name, labels), v in sorted(delta.items())
        if name.endswith("_total") and v
    }
    hists: dict[tuple[str, str], dict[str, Any]] = {}
    for (name, labels), v in delta.items():
        if name.endswith("_bucket"):
            rest, le = _le(labels)
            hists.setdefault((name[:-7], rest), {"buckets": []})["buckets"].append((le, v))
    stages = []
    for (base, labels), h in sorted(hists.items()):
        count = delta.get((base + "_count", labels), 0.0)
        total = delta.get((base + "_sum", labels), 0.0)
        if count <= 0:
            continue
        buckets = sorted(h["buckets"])
        stages.append({
            "metric": base + labels, "count": int(count),
            "mean_ms": round(total / count * 1e3, 3) if base.endswith("_seconds") else round(total / count, 3),
            "p50_ms": _bucket_quantile(buckets, 0.5, count), "p99_ms": _bucket_quantile(buckets, 0.99, count),
        })
    return {"available": True, "counters": counters, "histograms": stages}


def _bucket_quantile(buckets: list[tuple[float, float]], q: float, count: float) -> float | None:
    """Prometheus-style linear interpolation inside the bucket that holds the quantile (ms)."""
    target = q * count
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= target:
            if math.isinf(le):
                return round(prev_le * 1e3, 3)
            frac = (target - prev_c) / (c - prev_c) if c > prev_c else 1.0
            return round((prev_le + (le - prev_le) * frac) * 1e3, 3)
        prev_le, prev_c = le, c
    return None


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo").read().splitlines():  # noqa: SIM115 - tiny, read once
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = os.getloadavg() if hasattr(os, "getloadavg") else (math.nan,) * 3
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_1m": round(load[0], 2)}


# --------------------------------------------------------------------------- the run
def _said(body: str, limit: int = 240) -> str:
    """What a pre-flight answer said: a problem body's ``detail`` (or ``title``), else the body, cut with an
    ellipsis (it was cut mid-JSON)."""
    with contextlib.suppress(ValueError):
        doc = json.loads(body)
        if isinstance(doc, dict) and (doc.get("detail") or doc.get("title")):
            return str(doc.get("detail") or doc.get("title"))
    return body if len(body) <= limit else body[:limit] + "…"


def _preflight_problems(preflight: dict[str, Any], cfg: RunConfig) -> list[str]:
    hints = {
        401: "the server wants a valid key: pass --key (publishable) / --secret-key (feature pushes)",
        403: "the key is of the wrong kind or not allowed from here",
    }
    problems = []
    for kind, res in preflight.items():
        st = res["status"]
        if st in (401, 403):
            problems.append(f"{kind}: HTTP {st}: {hints[st]} (the server said: {_said(res['body'])})")
        elif st == 404 or st == 405:
            hint = {
                "noop": "start the server with server.bench_endpoints: true (KASSA_SERVER__BENCH_ENDPOINTS=true)",
                "webhook": "this server has no order-webhook endpoint for the platform: set mix.webhook to 0",
                "feature_push": f"the server has no push view {cfg.profile.payload.feature_push.view!r}: apply "
                                f"feature definitions with it, change payload.feature_push.view, or set "
                                f"mix.feature_push to 0",
                "decision": f"unknown placement {cfg.profile.payload.placement!r}? set payload.placement",
            }.get(kind, "the endpoint is missing")
            problems.append(f"{kind}: HTTP {st}: {hint} (the server said: {_said(res['body'])})")
        elif st == 0:
            problems.append(f"{kind}: no response: {_said(res['body'])}")
    return problems


def run_loadtest(cfg: RunConfig, on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the load test ``cfg`` describes; returns the result (see :func:`summarize`)."""
    host, port, base_path = parse_url(cfg.url)
    profile = cfg.profile
    fractions = profile.mix.fractions()
    missing = []  # every missing secret at once, not one per attempt
    if "feature_push" in fractions and not cfg.secret_key:
        missing.append(
            f"the mix sends feature pushes ({fractions['feature_push']:.1%} of requests), which need a secret key: "
            f"pass --secret-key (or set KASSA_SECRET_KEY), or drop them with --mix feature_push=0"
        )
    if "webhook" in fractions and not cfg.webhook_secret:
        missing.append(
            f"the mix sends order webhooks ({fractions['webhook']:.1%} of requests), which are signed: pass "
            f"--webhook-secret (the platform's shared secret configured in Kassa), or --mix webhook=0"
        )
    if missing:
        raise LoadTestError("; and ".join(missing))
    base_url = cfg.url.rstrip("/")
    try:
        _get(base_url + "/healthz", 5.0)
    except URLError as exc:
        code = getattr(exc, "code", None)
        if code is None:  # an HTTPError (any status) means the server answered
            raise LoadTestError(f"cannot reach {base_url}: {exc.reason}") from None
        if code in (404, 405):  # every Kassa answers it; the pre-flight blamed the placement or the webhook
            raise LoadTestError(f"{base_url} is not a Kassa server: GET /healthz answered {code} (another service "
                                f"on that port, or a path prefix missing from --url?)") from None
    except OSError as exc:
        raise LoadTestError(f"cannot reach {base_url}: {exc}") from None
    except http.client.HTTPException as exc:  # another protocol on that port (NATS's INFO line was a traceback)
        said = _said(str(exc).strip(), 80)
        raise LoadTestError(f"{base_url} does not answer HTTP ({type(exc).__name__}: {said}); is --url the port "
                            f"Kassa serves on?") from None

    rate, duration, ramp = cfg.steady_rate, cfg.steady_duration, cfg.ramp_seconds
    workers = cfg.workers or auto_workers(rate)
    idle_total = cfg.idle_connections
    soft, hard = raise_fd_limit(idle_total + 1024)
    tag = secrets.token_hex(3)
    payload = msgspec.to_builtins(profile.payload)
    specs = [
        WorkerSpec(
            index=k, workers=workers, host=host, port=port, base_path=base_path, rate=rate, duration=duration,
            ramp=ramp, schedule=profile.schedule, seed=cfg.seed, fractions=fractions, payload=payload,
            key=cfg.key, secret_key=cfg.secret_key, webhook_secret=cfg.webhook_secret,
            connections=profile.connections.active, idle=idle_total // workers + (1 if k < idle_total % workers else 0),
            idle_refresh=profile.connections.refresh_seconds, timeout=cfg.timeout,
            drain_timeout=cfg.timeout + 1.0, tag=tag,
            debug_stall_at=cfg.debug.get("stall_at") if k == 0 else None,
            debug_stall_seconds=cfg.debug.get("stall_seconds", 0.0),
            debug_burn_us=cfg.debug.get("burn_us", 0.0),
        )
        for k in range(workers)
    ]
    ctx = _mp_context()
    conns: list[Connection] = []
    procs = []
    for spec in specs:
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=worker_process, args=(spec, child_end), daemon=True,
                           name=f"kassa-loadgen-{spec.index}")
        proc.start()
        child_end.close()
        conns.append(parent_end)
        procs.append(proc)
    started_at = dt.datetime.now(dt.UTC)
    machine = machine_info()
    try:
        ready = _gather(conns, "ready", cfg.ready_timeout, on_progress, phase="opening connections")
        preflight = ready[0]["preflight"]
        problems = _preflight_problems(preflight, cfg)
        if problems:
            raise LoadTestError("pre-flight requests were rejected:\n  " + "\n  ".join(problems))
        metrics_before = scrape_metrics(base_url) if cfg.scrape_metrics else None
        t0_wall = time.time() + 0.3
        for c in conns:
            c.send(("start", t0_wall))
        live = _Live(workers, rate, ramp + duration, on_progress)
        got: dict[int, dict[str, Any]] = {}
        try:
            results = _gather(conns, "result", ramp + duration + cfg.timeout + 60.0, live.update, phase="running",
                              got=got)
        except KeyboardInterrupt:  # Ctrl-C: the workers (which ignore SIGINT) stop sending and report what they have
            for c in conns:
                with contextlib.suppress(OSError):
                    c.send(("stop", None))
            results = _gather(conns, "result", cfg.timeout + 30.0, None, phase="stopping after Ctrl-C", got=got)
        metrics_after = scrape_metrics(base_url) if cfg.scrape_metrics else None
    finally:
        for c in conns:
            with contextlib.suppress(OSError):
                c.send(("stop", None))
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    machine["loadavg_1m_end"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    interrupted = ""
    stops = [r["stopped_at"] for r in results if r.get("stopped_at") is not None]
    if stops:
        cut = ramp + math.floor((min(stops) - ramp) * 100) / 100  # whole hundredths of a second measured
        if cut <= ramp:
            raise RunInterrupted(f"interrupted {min(stops):.1f} s in, during the {ramp:g} s ramp: nothing was "
                                 f"measured")
        interrupted = f"interrupted (Ctrl-C) {cut - ramp:.1f} s into the {duration:g} s measured window"
        results = [_cut(r, cut) for r in results]
        cfg = dataclasses.replace(cfg, duration=cut - ramp)
    return summarize(
        cfg, results, ready, metrics_delta(metrics_before, metrics_after),
        meta={"started_at": started_at.strftime("%Y-%m-%d %H:%M:%S UTC"), "machine": machine, "workers": workers,
              "fd_limit": {"soft": soft, "hard": hard}, "tag": tag},
        interrupted=interrupted,
    )


def _cut(result: dict[str, Any], cut: float) -> dict[str, Any]:
    """A worker's result without the requests scheduled from ``cut`` on (the workers stop a moment apart)."""
    keep = result["intended"] < cut
    out = {**result, **{k: result[k][keep] for k in ("uid", "type", "intended", "send_lag", "latency", "done",
                                                      "status", "took_ms")}}
    out["sent"] = out["scheduled"] = int(keep.sum())
    return out


def _gather(conns: list[Connection], kind: str, timeout: float,
            on_progress: Callable[[dict[str, Any]], None] | None, phase: str,
            got: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Wait for one ``kind`` message from every worker, passing progress messages on. ``got`` keeps the
    answers across calls (those that came before a Ctrl-C are not asked for again)."""
    got = {} if got is None else got
    deadline = time.monotonic() + timeout
    pending = [c for i, c in enumerate(conns) if i not in got]
    while len(got) < len(conns):
        left = deadline - time.monotonic()
        if left <= 0:
            raise LoadTestError(f"generator processes did not report {kind!r} within {timeout:.0f} s ({phase})")
        for c in wait(pending, timeout=min(left, 0.5)):
            assert isinstance(c, Connection)
            try:
                msg = c.recv()
            except EOFError:
                raise LoadTestError(f"a generator process exited while {phase}") from None
            if msg[0] == "error":
                raise LoadTestError(f"generator process {msg[1]} failed while {phase}:\n{msg[2]}")
            if msg[0] == "progress":
                if on_progress is not None:
                    on_progress({"worker": msg[1], **msg[2]})
            elif msg[0] == kind:
                got[msg[1]] = msg[2]
                pending.remove(c)
        if on_progress is not None and kind == "ready":
            on_progress({"phase": phase, "ready": len(got), "workers": len(conns)})
    return [got[i] for i in range(len(conns))]


class _Live:
    """Merges the workers' progress messages into one snapshot for the terminal view."""

    def __init__(self, workers: int, rate: float, total_seconds: float,
                 sink: Callable[[dict[str, Any]], None] | None) -> None:
        self.sink = sink
        self.rate, self.total = rate, total_seconds
        self.per: dict[int, dict[str, Any]] = {}
        self.recent: list[tuple[float, np.ndarray]] = []
        self.errors = 0
        self.answered = 0

    def update(self, msg: dict[str, Any]) -> None:
        if "worker" not in msg:
            return
        w = msg["worker"]
        self.per[w] = msg
        now = time.monotonic()
        self.recent.append((now, msg["lat_ms"]))
        self.recent = [(t, a) for t, a in self.recent if now - t <= 3.0]
        self.errors += msg["errors"]
        self.answered += msg["answered"]
        if self.sink is None:
            return
        lat = np.concatenate([a for _, a in self.recent]) if self.recent else np.empty(0)
        t = max(p["t"] for p in self.per.values())
        window = min(3.0, max(0.5, t))
        self.sink({
            "phase": "running", "t": t, "total": self.total, "sent": sum(p["sent"] for p in self.per.values()),
            "answered": self.answered, "errors": self.errors,
            "rate_now": sum(a.size for _, a in self.recent) / window,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "behind_ms": max(p["behind_ms"] for p in self.per.values()),
            "cpu_util": [round(p["cpu_util"], 2) for _, p in sorted(self.per.items())],
            "idle_held": sum(p["idle_held"] for p in self.per.values()),
            "outstanding": sum(p["outstanding"] for p in self.per.values()),
        })


# --------------------------------------------------------------------------- judgement
def _r(x: float | None, nd: int = 3) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), nd)


def summarize(cfg: RunConfig, results: list[dict[str, Any]], ready: list[dict[str, Any]],
              server_metrics: dict[str, Any], meta: dict[str, Any], interrupted: str = "") -> dict[str, Any]:
    """Turn the workers' raw arrays into the result: summary figures, verdict, timeline and curves."""
    profile = cfg.profile
    rate, duration, ramp = cfg.steady_rate, cfg.steady_duration, cfg.ramp_seconds
    cat = {k: np.concatenate([r[k] for r in results]) for k in
           ("type", "intended", "send_lag", "latency", "done", "status", "took_ms")}
    types, intended, status, latency = cat["type"], cat["intended"], cat["status"], cat["latency"]
    send_lag = cat["send_lag"].astype(np.float64)
    done = cat["done"]
    scheduled = sum(r["scheduled"] for r in results)
    sent = sum(r["sent"] for r in results)

    steady = (intended >= ramp) & (intended < ramp + duration)
    ok = (status >= 200) & (status < 300)
    has_latency = (status > 0) | (status == TIMEOUT)
    failed = ~ok

    overall = hist.from_seconds(latency[steady & has_latency])
    lat_steady = latency[steady & has_latency]
    summary_lat = hist.summary_ms(overall, float(lat_steady.max()) if lat_steady.size else None)
    by_type: dict[str, Any] = {}
    curves: dict[str, Any] = {"all": hist.percentile_curve(overall)}
    for code in sorted(set(types.tolist())):
        name = REQUEST_TYPES[code]
        m = steady & (types == code)
        h = hist.from_seconds(latency[m & has_latency])
        vals = latency[m & has_latency]
        by_type[name] = {
            "requests": int(m.sum()), "errors": int((m & failed).sum()),
            **{f"{k}_ms": v for k, v in hist.summary_ms(h, float(vals.max()) if vals.size else None).items()},
            "latencies": int(vals.size), "thin_percentiles": hist.thin_percentiles(int(vals.size)),
        }
        curves[name] = hist.percentile_curve(h, up_to=hist.supported_percentile(int(vals.size)))

    n_steady = int(steady.sum())
    errors_by_kind: dict[str, int] = {}
    for st, cnt in zip(*np.unique(status[steady & failed], return_counts=True), strict=True):
        kind = "timeout" if st == TIMEOUT else "connection" if st == CONN_ERROR else f"http_{int(st)}"
        errors_by_kind[kind] = int(cnt)
    errors = int((steady & failed).sum())
    error_rate = errors / n_steady if n_steady else 0.0
    achieved = int((ok & (done >= ramp) & (done < ramp + duration)).sum()) / duration
    lags = np.clip(send_lag[~np.isnan(send_lag)], 0.0, None)
    lag = {
        "p50_ms": _r(float(np.percentile(lags, 50)) * 1e3) if lags.size else None,
        "p99_ms": _r(float(np.percentile(lags, 99)) * 1e3) if lags.size else None,
        "p999_ms": _r(float(np.percentile(lags, 99.9)) * 1e3) if lags.size else None,
        "max_ms": _r(float(lags.max()) * 1e3) if lags.size else None,
    }
    took = cat["took_ms"][steady & ok & (types == REQUEST_TYPES.index("decision"))].astype(np.float64) / 1e3
    took_h = hist.from_seconds(took)
    server_took = hist.summary_ms(took_h, float(np.nanmax(took)) if took.size and not np.all(np.isnan(took)) else None)

    cpu = [r["cpu_seconds"] for r in results]
    wall = [max(1e-9, r["wall_seconds"]) for r in results]
    generator = {
        "workers": meta["workers"],
        "lag_limit_ms": cfg.lag_limit_ms,
        "send_lag_ms": lag,
        "cpu_us_per_request": _r(sum(cpu) / sent * 1e6, 1) if sent else None,
        "cpu_util_per_worker": [_r(c / w, 3) for c, w in zip(cpu, wall, strict=True)],
        "max_outstanding": sum(r["max_outstanding"] for r in results),
        "orphan_beacons": sum(r["orphan_beacons"] for r in results),
        "pool_connect_errors": sum(r["pool_connect_errors"] for r in results),
        "fd_limit": meta["fd_limit"],
    }
    idle_stats = _merge_idle([r["idle"] for r in results], [x["idle"] for x in ready], cfg.idle_connections,
                             [x["idle_open_seconds"] for x in ready])
    warnings = sorted({w for r in results for w in r["warnings"]})

    # -- validity
    invalid = [interrupted] if interrupted else []
    limit = cfg.lag_limit_ms
    if sent < scheduled:
        invalid.append(f"the generator sent {sent:,} of {scheduled:,} scheduled requests")
    if lag["p99_ms"] is not None and lag["p99_ms"] > limit:
        invalid.append(f"the generator fell behind its schedule: send lag p99 {lag['p99_ms']:.2f} ms > limit "
                       f"{limit:g} ms")
    elif lag["p999_ms"] is not None and lag["p999_ms"] > 10 * limit:
        invalid.append(f"the generator stalled: send lag p99.9 {lag['p999_ms']:.2f} ms > 10 x limit {limit:g} ms")
    if idle_stats["capped_by_generator"]:
        invalid.append(f"the generator could not open the idle connections asked for: {warnings[0]}")
    invalid_samples, thin = _too_few_latencies(int(lat_steady.size), profile.slo)
    invalid += invalid_samples
    warnings += thin
    beacon_codes = [REQUEST_TYPES.index(t) for t in BEACON_TYPES]
    beacons_sent = int((np.isin(types, beacon_codes) & ~np.isnan(send_lag)).sum())
    warnings += _unjoined_beacons(server_metrics, beacons_sent, generator["orphan_beacons"])
    saturated = [i for i, u in enumerate(generator["cpu_util_per_worker"]) if u is not None and u > 0.9]
    if saturated:
        warnings.append(f"generator process(es) {saturated} used > 90% of a core: add --workers if the lag limit "
                        f"was close")
    valid = not invalid

    # -- verdict
    slo = profile.slo
    fails, passes = [], []
    p99 = summary_lat["p99"]

    def check(name: str, value: float | None, target: float | None, unit: str = " ms") -> None:
        if target is None:
            return
        if value is None:
            fails.append(f"no {name} (no responses)")
        elif value > target:
            fails.append(f"{name} {value:,.2f}{unit} > {target:g}{unit}")
        else:
            passes.append(f"{name} {value:,.2f}{unit} <= {target:g}{unit}")

    check("P99", p99, slo.p99_ms)
    check("P50", summary_lat["p50"], slo.p50_ms)
    check("P99.9", summary_lat["p999"], slo.p999_ms)
    check("max", summary_lat["max"], slo.max_ms)
    if error_rate > slo.error_rate:
        fails.append(f"error rate {error_rate:.3%} > {slo.error_rate:.3%} ({errors:,} of {n_steady:,}: "
                     + ", ".join(f"{k} {v:,}" for k, v in errors_by_kind.items()) + ")")
    else:
        passes.append(f"error rate {error_rate:.3%} <= {slo.error_rate:.3%}")
    # Against what the schedule asked in the window, not rate x duration: a Poisson schedule's count varies (the
    # default seed asks 175 requests in 2 s at 100/s), which failed a server that answered every one.
    scheduled_rate = n_steady / duration
    ratio = achieved / scheduled_rate if n_steady else 0.0
    if ratio < slo.min_throughput_ratio:
        fails.append(f"throughput {achieved:,.1f}/s is {ratio:.1%} of the {scheduled_rate:,.1f}/s scheduled "
                     f"(< {slo.min_throughput_ratio:.0%})")
    else:
        passes.append(f"throughput {achieved:,.1f}/s = {ratio:.1%} of the {scheduled_rate:,.1f}/s scheduled")
    asked_idle = idle_stats["asked"]
    if asked_idle and not idle_stats["capped_by_generator"] and idle_stats["min_held"] < 0.99 * asked_idle:
        fails.append(f"held only {idle_stats['min_held']:,} of {asked_idle:,} idle connections "
                     f"({', '.join(f'{k}: {v}' for k, v in idle_stats['failed'].items()) or 'closed by the server'})")
    elif asked_idle:
        passes.append(f"{idle_stats['min_held']:,} of {asked_idle:,} idle connections held")
    if not valid:
        verdict, reason = "FAIL", "run invalid: " + "; ".join(invalid)
    elif fails:
        verdict, reason = "FAIL", "; ".join(fails)
    else:
        verdict, reason = "PASS", "; ".join(passes)

    summary: dict[str, Any] = {
        "profile": profile.name,
        "profile_source": profile.source,
        "url": cfg.url,
        "asked_rate": _r(rate, 2),
        "achieved_rate": _r(achieved, 2),
        "sent_rate": _r(int((steady & ~np.isnan(send_lag)).sum()) / duration, 2),
        "scheduled_rate": _r(scheduled_rate, 2),
        "duration_s": duration,
        "ramp_s": ramp,
        "schedule": profile.schedule,
        "requests": n_steady,
        "p50_ms": summary_lat["p50"],
        "p90_ms": summary_lat["p90"],
        "p99_ms": summary_lat["p99"],
        "p999_ms": summary_lat["p999"],
        "max_ms": summary_lat["max"],
        "mean_ms": summary_lat["mean"],
        "errors": errors,
        "error_rate": round(error_rate, 6),
        "errors_by_kind": errors_by_kind,
        "first_errors": {k: v for r in results for k, v in r["first_errors"].items()},
        "valid": valid,
        "interrupted": bool(interrupted),
        "invalid_reasons": invalid,
        "verdict": verdict,
        "verdict_reason": reason,
        "slo": msgspec.to_builtins(slo),
        "mix": {k: round(v, 4) for k, v in profile.mix.fractions().items()},
        "by_type": by_type,
        "server": {"took_ms": server_took, "metrics": server_metrics},
        "generator": generator,
        "idle_connections": idle_stats,
        "warnings": warnings,
        "rate_derivation": profile.rate_derivation() if cfg.rate is None else f"--rate {rate:g} requests/s",
        **meta,
    }
    raw = {k: cat[k] for k in ("type", "intended", "send_lag", "latency", "status")}  # numpy; not in the report
    return {"summary": summary, "timeline": _timeline(cat, ramp + duration, rate, ramp), "curves": curves, "raw": raw}


def min_latencies(slo: Any) -> dict[str, int]:
    """Latencies the measured window needs for each percentile target of ``slo`` to be one: a P99 of fewer than
    100 is the maximum of the sample, which sits near its P90 (10 latencies), not the server's P99."""
    targets = {"P99": 99.0} | ({"P99.9": 99.9} if slo.p999_ms is not None else {})
    return {name: math.ceil(100.0 / (100.0 - q) - 1e-9) for name, q in targets.items()}


def _too_few_latencies(n: int, slo: Any) -> tuple[list[str], list[str]]:
    """(invalid reasons, warnings) about the size of the sample behind the SLO's percentile targets."""
    invalid, warnings = [], []
    for name, need in min_latencies(slo).items():
        q = 100.0 - 100.0 / need
        if n < need:
            invalid.append(f"only {n:,} latencies in the measured window; a {name} needs at least {need:,} (run "
                           f"longer with --duration, or at a higher rate)")
        elif n < 10 * need:
            slower = n - math.ceil(q / 100.0 * n - 1e-9)
            warnings.append(f"the {name} rests on the {slower:,} slowest of {n:,} latencies; {10 * need:,} or more "
                            f"give a stable {name} (run longer)")
    return invalid, warnings


BEACON_TYPES = ("impression", "click", "accept")  # the requests that name a decision the generator received
UNJOINED_BEACONS_WARN = 0.01  # of the beacons sent: more unknown decisions than that is no rounding at the edges


def _unjoined_beacons(server_metrics: dict[str, Any], beacons_sent: int, orphans: int) -> list[str]:
    """A warning when ``kassa_event_unknown_decisions_total`` rose during the run by more than 1 % of the beacons
    sent: their events joined no decision, so the run did not exercise the reward join a store's beacons do (it
    showed only in the report's server-counters table). The orphan beacons, sent before any decision came back,
    name no decision by design and are not counted."""
    counters = server_metrics.get("counters", {}) if server_metrics.get("available") else {}
    unknown = int(counters.get("kassa_event_unknown_decisions_total", 0)) - orphans
    if beacons_sent <= 0 or unknown <= UNJOINED_BEACONS_WARN * beacons_sent:
        return []
    return [f"{unknown:,} beacon events were not joined to their decisions (kassa_event_unknown_decisions_total "
            f"rose by {unknown + orphans:,} during the run, {unknown / beacons_sent:.1%} of the {beacons_sent:,} "
            "beacons sent): the server's reward window may be shorter than the beacons' delay, or it did not keep "
            "the decisions, so their rewards were not learned from"]


def _merge_idle(end: list[dict[str, Any]], start: list[dict[str, Any]], asked: int,
                open_seconds: list[float]) -> dict[str, Any]:
    failed: dict[str, int] = {}
    for s in end:
        for k, v in s["failed"].items():
            failed[k] = failed.get(k, 0) + v
    per_worker_asked = sum(s["asked"] for s in end)
    return {
        "asked": asked,
        "opened_at_start": sum(s["held"] for s in start),
        "seconds_to_open": _r(max(open_seconds) if open_seconds else 0.0),
        "held_at_end": sum(s["held"] for s in end),
        "min_held": sum(s["min_held"] for s in end),
        "failed": failed,
        "closed_by_server": sum(s["closed_by_server"] for s in end),
        "reopened": sum(s["reopened"] for s in end),
        "refresh_requests": sum(s["refresh_sent"] for s in end),
        "refresh_failed": sum(s["refresh_failed"] + s["refresh_unanswered"] for s in end),
        "capped_by_generator": per_worker_asked < asked,
    }


def _timeline(cat: dict[str, np.ndarray], span: float, rate: float, ramp: float) -> dict[str, list[Any]]:
    """Per second: asked, sent, answered, errors, latency p50/p99/max (by intended second), send-lag p99."""
    seconds = max(1, math.ceil(span))
    intended, status, latency = cat["intended"], cat["status"], cat["latency"]
    lag = cat["send_lag"].astype(np.float64)
    done = cat["done"]
    sec = np.clip(intended.astype(np.int64), 0, seconds - 1)
    ok = (status >= 200) & (status < 300)
    has_latency = (status > 0) | (status == TIMEOUT)
    order = np.argsort(sec, kind="stable")
    bounds = np.searchsorted(sec[order], np.arange(seconds + 1))
    out: dict[str, list[Any]] = {k: [] for k in ("t", "asked", "answered", "errors", "p50_ms", "p99_ms", "max_ms",
                                                  "lag_p99_ms")}
    done_sec = done[ok].astype(np.int64)
    answered = np.bincount(done_sec[(done_sec >= 0) & (done_sec < seconds)], minlength=seconds)
    for s in range(seconds):
        idx = order[bounds[s] : bounds[s + 1]]
        lat = latency[idx][has_latency[idx]]
        p50, p99 = hist.exact_percentiles_ms(lat)
        lg = lag[idx]
        lg = lg[~np.isnan(lg)]
        out["t"].append(s)
        out["asked"].append(int(idx.size))
        out["answered"].append(int(answered[s]))
        out["errors"].append(int((~ok[idx]).sum()))
        out["p50_ms"].append(p50)
        out["p99_ms"].append(p99)
        out["max_ms"].append(_r(float(lat.max()) * 1e3) if lat.size else None)
        out["lag_p99_ms"].append(_r(float(np.percentile(np.clip(lg, 0, None), 99)) * 1e3) if lg.size else None)
    out["ramp_s"] = [ramp]
    out["rate"] = [rate]
    return out
