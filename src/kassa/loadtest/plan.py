"""Capacity plan: the highest rate one node serves within the SLO, and the nodes a profile's peak needs.

Owns :func:`plan_capacity`. It runs short open-loop steps with the profile's mix, payloads and idle
connections, multiplying the rate by ``factor`` after each step that PASSes, until a step FAILs; then
it bisects between the last PASS and the first FAIL ``refine`` times. The node count is

    nodes = ceil(peak rate / (highest passing rate x (1 - headroom))) + spare nodes

with ``headroom`` and ``spare_nodes`` from the profile's ``capacity`` section. A step that comes out
*invalid* (the generator could not keep the rate on this machine) stops the search: the highest
passing rate is then only a lower bound on the node's capacity, and the plan says so — it never counts
the generator's limit as the server's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from kassa.loadtest.runner import LoadTestError, RunConfig, RunInterrupted, min_latencies, run_loadtest


def _step_record(rate: float, result: dict[str, Any]) -> dict[str, Any]:
    s = result["summary"]
    return {
        "rate": round(rate, 2), "verdict": s["verdict"], "valid": s["valid"], "p50_ms": s["p50_ms"],
        "p99_ms": s["p99_ms"], "p999_ms": s["p999_ms"], "error_rate": s["error_rate"],
        "achieved_rate": s["achieved_rate"], "reason": s["verdict_reason"],
        "lag_p99_ms": s["generator"]["send_lag_ms"]["p99_ms"],
    }


def nodes_needed(peak_rate: float, max_rate: float, headroom: float, spare: int) -> int:
    """Nodes for ``peak_rate`` when each runs at most ``(1 - headroom)`` of ``max_rate``, plus spares."""
    per_node = max_rate * (1.0 - headroom)
    return math.ceil(peak_rate / per_node - 1e-9) + spare


def plan_capacity(
    base: RunConfig,
    *,
    start_rate: float | None = None,
    step_seconds: float = 15.0,
    ramp_seconds: float = 3.0,
    factor: float = 1.5,
    max_rate: float | None = None,
    max_steps: int = 14,
    refine: int = 2,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    run: Callable[[RunConfig], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Step the rate up to the highest one that meets the SLO, then size the fleet for the profile's peak."""
    if factor <= 1.0:
        raise ValueError("factor must be above 1")
    profile = base.profile
    peak = profile.peak_rate()
    runner = run or (lambda cfg: run_loadtest(cfg))
    # Every step measures at least as many requests as the first; too few would make each step invalid, which
    # the search reads as the generator's limit. The default first rate rises to that (a P99.9 target at 50/s
    # for 15 s: 750 of the 1,000 latencies it needs).
    name, need = max(min_latencies(profile.slo).items(), key=lambda kv: kv[1])
    rate = start_rate or max(1.0, min(peak, 50.0), need / step_seconds)
    if rate * step_seconds < need - 1e-9:
        raise LoadTestError(f"the first step measures {rate * step_seconds:,.0f} requests ({rate:g}/s for "
                            f"{step_seconds:g} s) and a {name} needs at least {need:,}: raise --start-rate or "
                            f"--step-seconds")
    steps: list[dict[str, Any]] = []
    best: float | None = None
    first_fail: float | None = None
    stopped = ""

    def step(r: float) -> dict[str, Any]:
        cfg = dataclasses.replace(base, rate=r, duration=step_seconds, ramp=ramp_seconds)
        result = runner(cfg)
        if result["summary"].get("interrupted"):  # Ctrl-C: a cut step is no measure of the node (nor the generator)
            raise RunInterrupted(f"interrupted during the step at {r:,.1f}/s after {len(steps)} complete step(s)")
        rec = _step_record(r, result)
        steps.append(rec)
        if on_step is not None:
            on_step(rec)
        return rec

    for _ in range(max_steps):
        rec = step(rate)
        if not rec["valid"]:
            stopped = f"the generator could not keep {rate:,.0f}/s on this machine ({rec['reason']})"
            break
        if rec["verdict"] != "PASS":
            first_fail = rate
            break
        best = rate
        if max_rate is not None and rate >= max_rate:
            stopped = f"reached --max-rate {max_rate:g}/s while still meeting the SLO"
            break
        rate = rate * factor if max_rate is None else min(rate * factor, max_rate)
    else:
        stopped = f"still meeting the SLO after {max_steps} steps"

    if first_fail is not None and best is not None:
        lo, hi = best, first_fail
        for _ in range(refine):
            mid = (lo + hi) / 2.0
            rec = step(mid)
            if not rec["valid"]:
                stopped = f"the generator could not keep {mid:,.0f}/s on this machine"
                break
            if rec["verdict"] == "PASS":
                lo = mid
            else:
                hi = mid
        best = lo

    cap = profile.capacity
    out: dict[str, Any] = {
        "profile": profile.name,
        "url": base.url,
        "peak_rate": round(peak, 2),
        "rate_derivation": profile.rate_derivation(),
        "slo": {"p99_ms": profile.slo.p99_ms, "error_rate": profile.slo.error_rate},
        "max_rate": round(best, 2) if best is not None else None,
        "exact": not stopped,
        "note": stopped or (f"highest passing rate {best:,.1f}/s; first failing {first_fail:,.1f}/s"
                            if best is not None and first_fail is not None else ""),
        "headroom": cap.headroom,
        "spare_nodes": cap.spare_nodes,
        "steps": steps,
    }
    if best is None:
        out.update(nodes=None, per_node_rate=None,
                   summary=f"no step met the SLO (the first, at {steps[0]['rate']:,.1f}/s: {steps[0]['reason']})")
        return out
    return _sized(out, "one node meets", "", best, stopped, peak, cap)


def _sized(out: dict[str, Any], who: str, how: str, best: float, stopped: str, peak: float, cap: Any
           ) -> dict[str, Any]:
    """``out`` with the fleet for ``peak`` when one node meets the SLO up to ``best``, and its summary."""
    per_node = best * (1.0 - cap.headroom)
    nodes = nodes_needed(peak, best, cap.headroom, cap.spare_nodes)
    # The rate right after "up to", the reason after it: "up to at least (a lower bound: the generator could
    # not keep 400/s ...)) 200.0 requests/s" hid the figure behind the reason.
    at_least, bound = (" at least", f" (a lower bound: {stopped})") if stopped else ("", "")
    out.update(per_node_rate=round(per_node, 2), nodes=nodes, summary=(
        f"{who} the SLO up to{at_least} {best:,.1f} requests/s{how}{bound}; planned at {1 - cap.headroom:.0%} of that "
        f"({per_node:,.1f}/s), the peak of {peak:,.1f} requests/s needs {nodes - cap.spare_nodes} node(s) "
        f"+ {cap.spare_nodes} spare = {nodes}"))
    return out


def plan_from_measured(profile: Any, measured: dict[str, Any], workers: int | None = None) -> dict[str, Any]:
    """Size the fleet from a saved `bench/topology.py --json` run instead of stepping a live node.

    Every measured rate of one worker count becomes a step: PASS when its client P99 and its error rate
    (decision and event errors over the decisions sent) meet the profile's SLO. The highest passing rate is
    exact only if a higher measured rate failed with the generator on schedule; otherwise it is a lower
    bound and the plan says so (a step whose generator fell behind still passes if it met the SLO, since
    latency counts from the intended send time; if it failed, the search stops there).
    ``workers`` picks the worker count (default: the largest measured);
    the answer also holds the highest passing rate of every worker count, the curve from 1 to N processes.
    """
    runs = measured.get("runs")
    if measured.get("benchmark") != "topology" or not isinstance(runs, list) or not runs:
        raise ValueError("not a bench/topology.py --json result (expected \"benchmark\": \"topology\" and runs)")
    # The error rate is over rate x duration: without a duration, 3 errors at 500/s were 3 over "1", 300 %.
    duration = measured.get("duration")
    if isinstance(duration, bool) or not isinstance(duration, int | float) or not duration > 0:
        raise ValueError(f"\"duration\" (the seconds measured at each rate) must be a number above 0, got "
                         f"{duration!r}")
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("workers"), int) or not isinstance(run.get("rates"),
                                                                                                  dict):
            raise ValueError(f"runs[{i}]: expected {{\"workers\": N, \"rates\": {{RATE: {{...}}}}}}")
        for rate_s, r in run["rates"].items():
            p99 = r.get("client_p99_ms") if isinstance(r, dict) else None
            if p99 is not None and (isinstance(p99, bool) or not isinstance(p99, int | float)):
                raise ValueError(f"runs[{i}].rates.{rate_s}.client_p99_ms: expected a number of ms, got {p99!r}")
    slo = profile.slo

    def steps_of(run: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for rate_s, r in sorted(run["rates"].items(), key=lambda kv: float(kv[0])):
            rate = float(rate_s)
            sent = max(1.0, rate * duration)
            errors = int(r.get("errors") or 0) + int(r.get("event_errors") or 0)
            error_rate = errors / sent
            p99 = r.get("client_p99_ms")
            ok = p99 is not None and p99 <= slo.p99_ms and error_rate <= slo.error_rate
            reason = (f"P99 {p99} ms {'<=' if p99 is not None and p99 <= slo.p99_ms else '>'} {slo.p99_ms:g} ms, "
                      f"error rate {error_rate:.3%}")
            out.append({"rate": rate, "verdict": "PASS" if ok else "FAIL", "valid": bool(r.get("valid", True)),
                        "p99_ms": p99, "error_rate": round(error_rate, 6), "reason": reason})
        return out

    def best_of(steps: list[dict[str, Any]]) -> tuple[float | None, str]:
        # Latency is timed from each request's intended send time, so a step whose generator fell behind but
        # still met the SLO is a pass (the server met it with the generator's lag added), yet the search can
        # no longer be exact; a failing step with a lagging generator says nothing about the server.
        best: float | None = None
        lagged: list[float] = []
        for st in steps:
            if not st["valid"]:
                lagged.append(st["rate"])
                if st["verdict"] != "PASS":
                    return best, f"the generator fell behind at {st['rate']:,.0f}/s"
            elif st["verdict"] != "PASS":
                return best, ("" if not lagged else
                              f"the generator fell behind at {', '.join(f'{r:,.0f}' for r in lagged)}/s")
            best = st["rate"]
        note = f"the highest measured rate ({steps[-1]['rate']:,.0f}/s) still met the SLO" if steps else "no rate"
        if lagged:
            note += f"; the generator fell behind at {', '.join(f'{r:,.0f}' for r in lagged)}/s"
        return best, note

    by_workers = {int(run["workers"]): run for run in runs}
    chosen = workers if workers is not None else max(by_workers)
    if chosen not in by_workers:
        raise ValueError(f"no run with {chosen} worker(s) in the file (measured: {sorted(by_workers)})")
    curve = []
    for w, run in sorted(by_workers.items()):
        best, note = best_of(steps_of(run))
        curve.append({"workers": w, "max_rate": best, "exact": not note, "note": note})
    steps = steps_of(by_workers[chosen])
    best, stopped = best_of(steps)
    cap = profile.capacity
    peak = profile.peak_rate()
    out: dict[str, Any] = {
        "profile": profile.name, "source": "measured", "workers": chosen, "peak_rate": round(peak, 2),
        "slo": {"p99_ms": slo.p99_ms, "error_rate": slo.error_rate}, "max_rate": best, "exact": not stopped,
        "note": stopped, "headroom": cap.headroom, "spare_nodes": cap.spare_nodes, "steps": steps, "curve": curve,
        "measured_at": measured.get("date"), "settings": measured.get("settings"),
    }
    if best is None:
        out.update(nodes=None, per_node_rate=None,
                   summary=f"no measured rate met the SLO with {chosen} worker(s) ({steps[0]['reason']})")
        return out
    return _sized(out, f"one node of {chosen} worker(s) met", " as measured", best, stopped, peak, cap)
