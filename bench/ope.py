"""Off-policy evaluation speed on 1,000,000 logged decisions (target: well under 10 s for the estimators).

Owns the OPE benchmark. A synthetic log (2-30 candidates per decision, epsilon-greedy logging, candidate and
production policies, Bernoulli rewards per offer, reward-model values) is generated once,
outside the timings; then each step is timed ``--repeats`` times and the median reported beside a
baseline that does the least possible work on the same column (``numpy.mean`` of the rewards), so the
ratio says what the estimator costs over just touching the data. Steps: IPS, SNIPS and DR alone (each
with input validation), `evaluate_policies` for four policies x three estimators (normal intervals),
the same with a 200-resample bootstrap, fitting `MeanRewardModel` and computing ``q_target`` over every
candidate, and drawing the HTML and PNG report. ``--json`` ends with one JSON object; ``--write-docs``
rewrites this benchmark's section of ``docs/benchmarks.md``.

    python bench/ope.py --rows 1000000 --json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kassa.learn.offline import ope, ope_report

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchdocs import write_section

START, END = "<!-- bench:ope:start -->", "<!-- bench:ope:end -->"
TARGET_SECONDS = 10.0


def _eps_greedy(rng: np.random.Generator, k: np.ndarray, agree: float) -> np.ndarray:
    """A greedy slot per row: slot 0 (the logging policy's pick) with probability ``agree``, else another."""
    other = 1 + (rng.random(k.shape[0]) * (k - 1)).astype(np.int64)
    return np.where(rng.random(k.shape[0]) < agree, 0, other)


def synthetic_log(rows: int, seed: int) -> dict[str, Any]:
    """Arrays shaped like `kassa evaluate`'s input, one row per logged decision (its first slot), from
    epsilon-greedy policies over 2-30 candidate offers per decision, so every weight is a real ratio of
    two policies' probabilities (mean weight 1) and the estimators agree with each other."""
    rng = np.random.default_rng(seed)
    k = rng.integers(2, 31, rows)
    offsets = np.cumsum(k) - k
    row_of = np.repeat(np.arange(rows), k)
    slot = np.arange(int(k.sum())) - offsets[row_of]
    actions = rng.integers(0, 200, slot.shape[0])  # offer ids of every candidate
    accept = rng.uniform(0.02, 0.2, 200)  # each offer's true acceptance rate
    # Logging: greedy on slot 0 with epsilon 0.2; the logged slot and its propensity.
    eps = 0.2
    logged_slot = np.where(rng.random(rows) < 1 - eps, 0, (rng.random(rows) * k).astype(np.int64))
    logged_prob = np.where(logged_slot == 0, 1 - eps, 0.0) + eps / k
    logged_action = actions[offsets + logged_slot]
    reward = (rng.random(rows) < accept[logged_action]).astype(np.float64)
    out: dict[str, Any] = {"reward": reward, "logged_prob": logged_prob, "num_candidates": k, "actions": actions,
                           "logged_action": logged_action}
    for name, agree, eps_t in (("candidate", 0.7, 0.1), ("production", 0.9, 0.2)):
        greedy = _eps_greedy(rng, k, agree)
        out[name] = np.where(logged_slot == greedy, 1 - eps_t, 0.0) + eps_t / k
        out[f"{name}_flat_probs"] = np.where(slot == greedy[row_of], 1 - eps_t, 0.0) + eps_t / k[row_of]
    return out


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    log = synthetic_log(args.rows, args.seed)
    r, lp, cand, prod, k = log["reward"], log["logged_prob"], log["candidate"], log["production"], log["num_candidates"]
    q = ope.MeanRewardModel.fit(log["logged_action"], r)
    q_logged = q.predict(log["logged_action"])
    q_targets = {p: q.expected_ragged(log["actions"], log[f"{p}_flat_probs"], k) for p in ("candidate", "production")}
    q_target = q_targets["candidate"]
    targets = {"candidate": cand, "production": prod}
    holder: dict[str, ope.Evaluation] = {}

    def evaluate(method: ope.Method, n_boot: int = 200) -> None:
        holder[method] = ope.evaluate_policies(r, lp, targets, q_logged=q_logged, q_targets=q_targets,
                                               num_candidates=k, method=method, n_boot=n_boot, seed=1)

    def reward_model() -> None:
        m = ope.MeanRewardModel.fit(log["logged_action"], r)
        m.predict(log["logged_action"])
        m.expected_ragged(log["actions"], log["candidate_flat_probs"], k)

    steps: dict[str, Callable[[], object]] = {
        "baseline_numpy_mean": lambda: float(np.mean(r)),
        "ips": lambda: ope.ips(r, lp, cand),
        "snips": lambda: ope.snips(r, lp, cand),
        "doubly_robust": lambda: ope.doubly_robust(r, lp, cand, q_logged, q_target),
        "evaluate_policies_normal": lambda: evaluate("normal"),
        f"evaluate_policies_bootstrap_{args.n_boot}": lambda: evaluate("bootstrap", args.n_boot),
        "reward_model_fit_and_q": reward_model,
    }
    results: dict[str, dict[str, float]] = {}
    for name, fn in steps.items():
        fn()  # warm-up: first-touch page faults and lazy imports do not belong to the steady state
        results[name] = timed(fn, args.repeats if "bootstrap" not in name else args.boot_repeats)
        if not args.json:
            print(f"{name}: median {results[name]['median_s'] * 1000:.1f} ms", file=sys.stderr)
    base = results["baseline_numpy_mean"]["median_s"]
    for res in results.values():
        res["x_baseline"] = res["median_s"] / base

    ev = holder["normal"]
    gate = ope.gate(ev.estimate("candidate", "dr"), ev.estimate("production", "dr"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ope_report.write_html(ev, Path(tmp) / "ope.html", gate=gate)
        html_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ope_report.write_png(ev, Path(tmp) / "ope.png", gate=gate)
        png_s = time.perf_counter() - t0
    return {
        "rows": args.rows, "candidate_rows": int(k.sum()), "repeats": args.repeats,
        "boot_repeats": args.boot_repeats, "n_boot": args.n_boot,
        "seed": args.seed, "target_seconds": TARGET_SECONDS,
        "evaluate_policies_seconds": results["evaluate_policies_normal"]["median_s"],
        "within_target": results["evaluate_policies_normal"]["median_s"] < TARGET_SECONDS,
        "report_html_seconds": html_s, "report_png_seconds": png_s, "steps": results,
        "estimates": {p: {e: round(est.value, 5) for e, est in pe.estimates.items()} for p, pe in ev.policies.items()},
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "numpy": importlib.metadata.version("numpy")},
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def section(res: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| `{name}` | {s['median_s'] * 1000:,.1f} | {s['min_s'] * 1000:,.1f} | {s['x_baseline']:,.0f} |"
        for name, s in res["steps"].items()
    )
    m = res["machine"]
    return f"""{START}
## Off-policy evaluation

`python bench/ope.py --rows {res['rows']}` on {m['cpu']} ({m['cores']} cores), Python {m['python']},
numpy {m['numpy']}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Synthetic log of {res['rows']:,}
decisions (2-30 candidates each, {res['candidate_rows']:,} candidate entries); median of {res['repeats']} runs
({res['boot_repeats']} for the bootstrap) after one warm-up; baseline = `numpy.mean` of the reward column. The
machine's 2 cores were shared with other jobs, so the minimum is closer to the unloaded cost than the median.
`reward_model_fit_and_q` fits `MeanRewardModel` on the log and computes `q_logged` and the candidate's
`q_target` over every candidate entry.

| step | median ms | min ms | × baseline |
|---|---:|---:|---:|
{rows}

`evaluate_policies` (candidate, production, uniform random and the logged policy; IPS, SNIPS and DR with
normal intervals) took {res['evaluate_policies_seconds']:.2f} s against a {res['target_seconds']:.0f} s target
({'met' if res['within_target'] else 'missed'}). Writing the HTML report took {res['report_html_seconds']:.2f} s
and the PNG {res['report_png_seconds']:.2f} s (independent of the row count). The bootstrap costs about
`rows × resamples` random draws, so keep it for logs small enough that the normal approximation is in doubt.
{END}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--boot-repeats", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples in the bootstrap step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="end with one JSON object")
    ap.add_argument("--write-docs", action="store_true", help="rewrite this benchmark's section of docs/benchmarks.md")
    args = ap.parse_args()
    res = run(args)
    if args.write_docs:
        write_section(section(res), START, END)
    if args.json:
        print(json.dumps(res))
    else:
        print(section(res))


if __name__ == "__main__":
    main()
