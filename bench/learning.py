"""Continuous learning under drift, and the drift detector, measured on the demo simulator.

For each seed the demo's shoppers (``kassa.demo.simulator``) buy ``--checkouts`` times (default 40,000);
from checkout ``drift_at`` (half-way) on they accept offers by the simulator's drifted truth
(`DRIFTED_APPEAL`: the app offer loses mobile buyers, a rival serum subscription takes skincare buyers,
January favours the fitness app, ...; the best offer changes for several large segments while the best
achievable rate stays about the same). Three runs share every shopper and every random draw:

* ``learning``: Kassa as it runs, learning and publishing a model snapshot every simulated second;
* ``frozen``: the same, but no model is published after the drift (the policy that never learns again);
* ``no drift``: the learning run on the world without the drift, for false alarms and as the
  counterfactual.

Kassa runs in this process (`kassa.app.Kassa` with the demo's catalog and learning settings) on a
simulated clock of ``--rate`` checkouts per second (the demo's own pace over HTTP is ~380/s): per checkout
the order event, the decision of its traffic slice, and the buyer's impression/accept events are
applied the way ``/v1/events`` applies them (without the durable event-log append, which learning does
not read), and every 0.05 simulated seconds the learning loop runs its step and tick, as its background
task does. 40,000 checkouts rather than the demo's 20,000 so the drift lands on a policy that has mostly
stopped improving: at 10,000 it still gains ~1 % per 1,000 checkouts, and "recovery" would be flattered.

Measurements (checkouts count all traffic; rates are over the learned policy's 80 % slice):

* reward rate: expected accepts per policy checkout, from the simulator's true acceptance of what was
  shown (realised accepts, noisier, are reported beside it);
* ``pre_drift_reward_rate``: over the 5,000 checkouts before the drift;
* rolling window: the last 1,000 checkouts (~800 policy decisions); ``checkouts_to_recover`` is the
  smallest ``k`` such that the window ending ``k`` checkouts after the drift lies wholly after it and
  its rate is >= 90 % of the pre-drift rate (null if that never happens within the run);
* ``recovered_reward_rate``: the window ending 5,000 checkouts after the drift (the target's deadline);
  ``recovery_ratio`` = recovered / pre-drift; ``settled`` is the last 5,000 checkouts of the run;
* ``drift_detected_after``: checkouts from the drift until a `DriftMonitor` check first raises an
  alert (any detector). The monitor has its default settings, is fed every logged decision of the
  policy placement and every closed decision's rewards from checkout ``--monitor-from`` on, takes its
  first full window as the reference, and is checked every ``--check-every`` checkouts;
* ``false_alarms_without_drift``: alerts the same monitor raises over the no-drift run (its alerts
  before the drift in the drift run are reported too). A second monitor started at
  ``--early-monitor`` (just after the cold start) is reported beside it: the simulated store opens at
  checkout 0, and while its buyer base fills up (repeat buyers accumulate over the first ~10,000
  checkouts) the profile features really do shift, which that monitor reports.

Medians over seeds are the headline. ``--vw-extra`` passes extra Vowpal Wabbit arguments through the
settings (``learn.vw_extra_args``) to test learner settings without changing Kassa's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from benchdocs import write_section
from kassa import schemas
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.demo.simulator import SLICE_PLACEMENT, World, decision_request, order_event, outcome_events
from kassa.demo.store import POLICY, DemoStore
from kassa.monitor.drift.monitor import DriftMonitor

START, END = "<!-- bench:learning:start -->", "<!-- bench:learning:end -->"
PRE_WINDOW = 5_000
ROLLING = 1_000
TARGET_RECOVERY = 0.9
RECOVERY_BUDGET = 5_000
HEADER = (
    "| seed | pre-drift | first 1k after | +5k | ratio | to 90 % | frozen +5k (ratio) | no drift +5k "
    "| settled: learning / frozen | detected after | first alert | false alarms: before drift / no-drift run "
    "| from {early:,}: no-drift run |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"
)
LEARN_EVERY_S = 0.05  # the learning loop's interval


@dataclass
class Watch:
    """One drift monitor of a run and the alerts it raised: (checkout, kind, feature) per new alert."""

    start: int
    monitor: DriftMonitor
    alerts: list[tuple[int, str, str]] = field(default_factory=list)
    active: set[tuple[str, str]] = field(default_factory=set)  # alerting at the last check

    def check(self, i: int, now: float) -> None:
        report = self.monitor.check(now)
        for row in report.alerts:
            if (row.kind, row.feature) not in self.active:
                self.alerts.append((i, row.kind, row.feature))
        self.active = {(r.kind, r.feature) for r in report.alerts}


@dataclass
class Run:
    """Per-checkout outcome of one simulated run."""

    slice: np.ndarray  # 0 policy, 1 random, 2 static
    expected: np.ndarray  # true expected accepts of what was shown
    accepted: np.ndarray  # realised accepts
    watches: list[Watch] = field(default_factory=list)
    seconds: float = 0.0


class _DecisionTap:
    """Stands in for the decision-log writer: hands each record to the drift monitors that have started
    (a server would tap the writer's thread the same way)."""

    def __init__(self) -> None:
        self.monitors: list[DriftMonitor] = []

    def append(self, record: Any) -> None:
        for m in self.monitors:
            m.observe_record(record)


async def _simulate(seed: int, n: int, drift_at: int | None, freeze_at: int | None, rate: float,
                    static_order: list[str], vw_extra: str, monitor_starts: Sequence[int],
                    check_every: int) -> Run:
    store = DemoStore.build(seed)
    world = World(store, seed, drift_at=drift_at)
    plan = world.checkouts(n)
    slices = {"policy": 0, "random": 1, "static": 2}
    run = Run(np.array([slices[c.slice] for c in plan]), np.zeros(n), np.zeros(n),
              [Watch(start, DriftMonitor(POLICY)) for start in monitor_starts])
    with tempfile.TemporaryDirectory(prefix="kassa-bench-learning-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp)
        catalog_file = path / "catalog.json"
        catalog_file.write_bytes(msgspec.json.encode(store.catalog(static_order)))
        settings = load_settings(None, **{
            "data_dir": str(path), "catalog_file": str(catalog_file), "log_level": "warning",
            # The demo's settings: publish a snapshot every second once 50 examples were learned.
            "learn.snapshot_every_seconds": 1.0, "learn.snapshot_min_learns": 50,
            "learn.vw_extra_args": vw_extra,
        })
        t0 = 1_800_000_000.0
        now = [t0]
        kassa = Kassa(settings, clock=lambda: now[0], seed=seed)
        kassa.warm_up()
        tap = _DecisionTap()
        writer = kassa.engine.decision_log
        kassa.engine.decision_log = tap  # type: ignore[assignment]
        joiner_expire = kassa.joiner.expire

        def expire(at: float, limit: int = 10_000) -> list:
            examples = joiner_expire(at, limit)
            for m in tap.monitors:
                m.observe_joined(examples)
            return examples

        kassa.joiner.expire = expire  # type: ignore[method-assign]
        learning = kassa.learning
        tick = getattr(learning, "tick", None)
        event = msgspec.convert
        learn_every = max(1, round(rate * LEARN_EVERY_S))
        started = time.perf_counter()
        try:
            for i, c in enumerate(plan):
                now[0] = t0 + i / rate
                for w in run.watches:
                    if i == w.start:
                        tap.monitors.append(w.monitor)
                kassa.events.apply(event(order_event(c), schemas.Event))
                resp = await kassa.engine.decide(decision_request(c, SLICE_PLACEMENT[c.slice]))
                shown = [o.offer_id for o in resp.offers]
                answers = world.accepts(c, shown)
                run.expected[i] = sum(world.p_accept(c, o) for o in shown)
                run.accepted[i] = sum(answers)
                for e in outcome_events(resp.decision_id, shown, answers):
                    kassa.events.apply(event(e, schemas.Event))
                if i % learn_every == 0:
                    learning.step(now[0])
                    if freeze_at is None or i < freeze_at:  # frozen: nothing new is published
                        if tick is not None:
                            tick(now[0])
                        else:
                            learning.snapshot_due(now[0])
                if i % check_every == 0:
                    for w in run.watches:
                        if i > w.start:
                            w.check(i, now[0])
        finally:
            run.seconds = time.perf_counter() - started
            kassa.engine.decision_log = writer
            await kassa.stop()
    return run


def simulate(seed: int, n: int, drift_at: int | None, freeze_at: int | None, rate: float, static_order: list[str],
             vw_extra: str, monitor_starts: Sequence[int], check_every: int) -> Run:
    return asyncio.run(_simulate(seed, n, drift_at, freeze_at, rate, static_order, vw_extra, monitor_starts,
                                 check_every))


def rate_of(run: Run, lo: int, hi: int, what: str = "expected", slice_id: int = 0) -> float:
    mask = run.slice[lo:hi] == slice_id
    values = getattr(run, what)[lo:hi][mask]
    return float(values.mean()) if values.size else float("nan")


def rolling_rates(run: Run, start: int, window: int = ROLLING) -> np.ndarray:
    """Rate over the policy checkouts in [k - window, k) for every k from start + window to the end."""
    pol = (run.slice == 0).astype(np.float64)
    num = np.concatenate([[0.0], np.cumsum(run.expected * pol)])
    den = np.concatenate([[0.0], np.cumsum(pol)])
    ends = np.arange(start + window, len(run.slice) + 1)
    return (num[ends] - num[ends - window]) / np.maximum(den[ends] - den[ends - window], 1.0)


def measure(seed: int, n: int, drift_at: int, rate: float, vw_extra: str, monitor_from: int, early_monitor: int,
            check_every: int) -> dict[str, Any]:
    world = World(DemoStore.build(seed), seed)
    static_order = world.best_static_order()  # the static control: best list under the pre-drift truth
    starts = sorted({monitor_from, early_monitor})
    common: dict[str, Any] = dict(rate=rate, static_order=static_order, vw_extra=vw_extra, monitor_starts=starts,
                                  check_every=check_every)
    drift = simulate(seed, n, drift_at, None, **common)
    frozen = simulate(seed, n, drift_at, drift_at, **common)
    calm = simulate(seed, n, None, None, **common)

    def watch(run: Run, start: int) -> Watch:
        return next(w for w in run.watches if w.start == start)

    pre = rate_of(drift, drift_at - PRE_WINDOW, drift_at)
    roll = rolling_rates(drift, drift_at)
    hit = np.nonzero(roll >= TARGET_RECOVERY * pre)[0]
    deadline = drift_at + RECOVERY_BUDGET
    recovered = rate_of(drift, deadline - ROLLING, deadline)
    settled_lo = max(drift_at, n - PRE_WINDOW)
    main = watch(drift, monitor_from)
    after = [a for a in main.alerts if a[0] >= drift_at]
    before = [a for a in main.alerts if a[0] < drift_at]
    calm_alerts = watch(calm, monitor_from).alerts
    early = watch(calm, early_monitor).alerts
    frozen_recovered = rate_of(frozen, deadline - ROLLING, deadline)
    no_drift_recovered = rate_of(calm, deadline - ROLLING, deadline)
    return {
        "seed": seed,
        "pre_drift_reward_rate": pre,
        "recovered_reward_rate": recovered,
        "recovery_ratio": recovered / pre,
        "checkouts_to_recover": int(hit[0]) + ROLLING if hit.size else None,
        "first_window_after_drift_rate": rate_of(drift, drift_at, drift_at + ROLLING),
        "settled_reward_rate": rate_of(drift, settled_lo, n),
        "frozen_recovered_reward_rate": frozen_recovered,
        "frozen_recovery_ratio": frozen_recovered / pre,
        "frozen_settled_reward_rate": rate_of(frozen, settled_lo, n),
        "no_drift_reward_rate_same_window": no_drift_recovered,
        "recovered_vs_no_drift": recovered / no_drift_recovered,
        "no_drift_settled_reward_rate": rate_of(calm, settled_lo, n),
        "pre_drift_realised_rate": rate_of(drift, drift_at - PRE_WINDOW, drift_at, "accepted"),
        "recovered_realised_rate": rate_of(drift, deadline - ROLLING, deadline, "accepted"),
        "static_pre_rate": rate_of(drift, drift_at - PRE_WINDOW, drift_at, slice_id=2),
        "static_post_rate": rate_of(drift, settled_lo, n, slice_id=2),
        "random_pre_rate": rate_of(drift, drift_at - PRE_WINDOW, drift_at, slice_id=1),
        "random_post_rate": rate_of(drift, settled_lo, n, slice_id=1),
        "drift_detected_after": (after[0][0] - drift_at) if after else None,
        "first_alert": f"{after[0][1]}:{after[0][2]}" if after else None,
        "alerts_after_drift": [f"{i - drift_at}:{k}:{f}" for i, k, f in after][:10],
        "false_alarms_before_drift": len(before),
        "false_alarms_without_drift": len(calm_alerts),
        "false_alarm_detail": [f"{i}:{k}:{f}" for i, k, f in (before + calm_alerts)],
        "early_monitor_alarms_without_drift": len(early),
        "early_monitor_alarm_detail": [f"{i}:{k}:{f}" for i, k, f in early],
        "frozen_detected_after": next((i - drift_at for i, _, _ in watch(frozen, monitor_from).alerts
                                       if i >= drift_at), None),
        "seconds": round(drift.seconds + frozen.seconds + calm.seconds, 1),
    }


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _median(runs: Sequence[dict[str, Any]], key: str) -> Any:
    """Median where a missing value (never recovered, never detected) ranks worse than any number."""
    values = sorted((r[key] for r in runs), key=lambda v: math.inf if v is None else v)
    mid = values[(len(values) - 1) // 2 : len(values) // 2 + 1]
    if any(v is None for v in mid):
        return None
    return statistics.median(mid)


def section(runs: list[dict[str, Any]], summary: dict[str, Any], args: argparse.Namespace) -> str:
    rows = "\n".join(
        f"| {r['seed']} | {_fmt(r['pre_drift_reward_rate'])} | {_fmt(r['first_window_after_drift_rate'])} | "
        f"{_fmt(r['recovered_reward_rate'])} | **{_fmt(r['recovery_ratio'], 2)}** | "
        f"**{_fmt(r['checkouts_to_recover'])}** | {_fmt(r['frozen_recovered_reward_rate'])} "
        f"({_fmt(r['frozen_recovery_ratio'], 2)}) | {_fmt(r['no_drift_reward_rate_same_window'])} | "
        f"{_fmt(r['settled_reward_rate'])} / {_fmt(r['frozen_settled_reward_rate'])} | "
        f"**{_fmt(r['drift_detected_after'])}** | {_fmt(r['first_alert'])} | "
        f"{r['false_alarms_before_drift']} / **{r['false_alarms_without_drift']}** | "
        f"{r['early_monitor_alarms_without_drift']} |"
        for r in runs
    )
    early = sorted({d.split(":", 2)[2] for r in runs for d in r["early_monitor_alarm_detail"]})
    last_early = max((int(d.split(":", 1)[0]) for r in runs for d in r["early_monitor_alarm_detail"]), default=0)
    load = summary.get("load_average")
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_note = f", load average {load:.1f} at the end (the machine was shared)" if load else ""
    extra = f" --vw-extra '{args.vw_extra}'" if args.vw_extra else ""
    return f"""{START}
## Learning through drift (`bench/learning.py`)

`python bench/learning.py --checkouts {args.checkouts}{extra}` ({len(runs)} seeds) on {platform.machine()},
Python {platform.python_version()}, {stamp}, {summary['seconds']:.0f} s{load_note}.
The demo simulator's buyers change what they accept at checkout {args.checkouts // 2:,}: the app offer loses
mobile buyers, a rival serum subscription takes skincare buyers, January favours the fitness app, and so
on (the best offer changes for about a third of buyers; the best achievable rate stays the same). Kassa
runs in-process with the demo's catalog and learning settings on a simulated clock of {args.rate:.0f}
checkouts/s. Rates are true expected accepts per checkout of the learned policy's 80 % slice;
pre-drift is the 5,000 checkouts before the drift, "+5k" the {ROLLING:,} checkouts ending 5,000 after it,
"to 90 %" the first rolling {ROLLING:,}-checkout window after the drift at >= 90 % of pre-drift; "frozen"
publishes no model after the drift; "no drift" is the same run on the unchanged world. Detection: a
`DriftMonitor` with default settings on the policy placement from checkout {args.monitor_from:,}, checked
every {args.check_every} checkouts; an alarm is any new alert of any detector.

{HEADER.format(early=args.early_monitor)}
{rows}

Medians: recovery ratio **{_fmt(summary['recovery_ratio'], 2)}** at +5,000 (target >= 0.9; the frozen policy
{_fmt(summary['frozen_recovery_ratio'], 2)}), checkouts to recover **{_fmt(summary['checkouts_to_recover'])}**
(target <= 5,000), drift detected after **{_fmt(summary['drift_detected_after'])}** checkouts (target <=
2,000); false alarms without drift **{summary['false_alarms_without_drift']}** over all seeds (target 0). A
monitor started at checkout {args.early_monitor:,} raised {summary['early_monitor_alarms_without_drift']} alarm(s)
over the no-drift runs, the last at checkout {last_early:,}, on {", ".join(early) or "nothing"}: the simulated
store opens at checkout 0 and its repeat-buyer share climbs while the buyer base fills up, a real shift of
the profile features that the monitor reports.
{END}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkouts", type=int, default=40_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rate", type=float, default=400.0, help="simulated checkouts per second")
    ap.add_argument("--monitor-from", type=int, default=10_000, help="checkout the drift monitor starts at")
    ap.add_argument("--early-monitor", type=int, default=2_000, help="start of a second monitor, reported aside")
    ap.add_argument("--check-every", type=int, default=100, help="checkouts between drift checks")
    ap.add_argument("--vw-extra", default="", help="extra VW arguments (learn.vw_extra_args) to test")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    drift_at = args.checkouts // 2
    if drift_at < PRE_WINDOW or args.checkouts - drift_at < RECOVERY_BUDGET:
        raise SystemExit(f"--checkouts must be at least {2 * max(PRE_WINDOW, RECOVERY_BUDGET):,}")
    if not 0 <= args.monitor_from < drift_at or not 0 <= args.early_monitor < drift_at:
        raise SystemExit("--monitor-from and --early-monitor must start before the drift")
    logging.getLogger("kassa").setLevel(logging.ERROR)  # snapshots log at INFO, drift alerts at WARNING
    t0 = time.perf_counter()
    runs = []
    for seed in args.seeds:
        r = measure(seed, args.checkouts, drift_at, args.rate, args.vw_extra, args.monitor_from, args.early_monitor,
                    args.check_every)
        runs.append(r)
        print(f"seed {seed}: pre {r['pre_drift_reward_rate']:.3f}, +5k {r['recovered_reward_rate']:.3f} "
              f"(ratio {r['recovery_ratio']:.2f}, frozen {r['frozen_recovery_ratio']:.2f}), recovered after "
              f"{r['checkouts_to_recover']}, detected after {r['drift_detected_after']} ({r['first_alert']}), "
              f"false alarms {r['false_alarms_before_drift']}+{r['false_alarms_without_drift']} "
              f"{r['false_alarm_detail']}, early monitor {r['early_monitor_alarm_detail']}, {r['seconds']} s",
              file=sys.stderr)
    summary: dict[str, Any] = {
        "checkouts": args.checkouts, "drift_at": drift_at, "seeds": args.seeds, "rate": args.rate,
        "monitor_from": args.monitor_from, "vw_extra": args.vw_extra,
        "pre_drift_reward_rate": statistics.median(r["pre_drift_reward_rate"] for r in runs),
        "recovered_reward_rate": statistics.median(r["recovered_reward_rate"] for r in runs),
        "recovery_ratio": statistics.median(r["recovery_ratio"] for r in runs),
        "frozen_recovery_ratio": statistics.median(r["frozen_recovery_ratio"] for r in runs),
        "recovered_vs_no_drift": statistics.median(r["recovered_vs_no_drift"] for r in runs),
        "checkouts_to_recover": _median(runs, "checkouts_to_recover"),
        "drift_detected_after": _median(runs, "drift_detected_after"),
        "false_alarms_without_drift": sum(r["false_alarms_without_drift"] for r in runs),
        "false_alarms_before_drift": sum(r["false_alarms_before_drift"] for r in runs),
        "early_monitor_alarms_without_drift": sum(r["early_monitor_alarms_without_drift"] for r in runs),
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average": round(os.getloadavg()[0], 2),
        "runs": runs,
    }
    if args.write_docs:
        write_section(section(runs, summary, args), START, END)
    if args.json:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
