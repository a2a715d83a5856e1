"""Slate off-policy evaluation on the product world (issue 14): the pseudo-inverse (PI) estimator against the
simulator's ground truth for a policy other than the logging one.

The world is ``bench/quality.py``'s product cross-sell world (imported, not copied), talking to Kassa through
its HTTP API in process on a simulated clock. One placement, ``cross_sell_log``, logs with Kassa's
``uniform`` policy (3 slots drawn without replacement from the retrieved candidates; each slot's conditional
probability is in the decision log); accepts go back as ``accept`` events naming the shown offer. The
**target** is a different policy: Kassa's ``baseline`` retrieval-score ranking with exploration 0 (a second
placement with the same retrieval, asked for the same checkout and never shown), i.e. a deterministic slate.

**Position bias.** The product world has none (a shown product is accepted with its probability whatever its
slot). The bench multiplies acceptance by a slot-examination factor (``--examination``, default slot 1 1.0,
slot 2 0.7, slot 3 0.5) so the slate's value depends on the order; the reward stays additive over
(slot, item) pairs, which is what PI assumes.

**Ground truth** for the target: the expected accepts per checkout of the target's slate on the same
checkouts, in the world state of that checkout (sum over slots of examination x acceptance probability).

**Estimates** come from what ``kassa evaluate`` reads: the decision log (Parquet) and the event log, joined
by `kassa.learn.offline.dataset.load_logged` exactly as the online joiner joins them; then
`kassa.learn.offline.ope.pseudo_inverse` with each row's own number of candidates, and, for comparison, the
top-slot IPS estimate ``kassa evaluate`` computes (slot 1's reward only, the logged slot-1 probability),
which misses the value of slots 2 and 3. The first ``--warmup`` checkouts only build order history (the
retrieval needs it) and are not evaluated. PI's interval half-width goes as ``sqrt(candidates / decisions)``,
so the defaults (retrieval ``max_candidates 12``, ~9 candidates, 45,000 decisions per seed) are what fits a
shared machine; the quality bench's placement gives its policy up to 20 (``policy_candidates``), which takes
~2x10^5 decisions per seed for ±5 % (measured at ``--max-candidates 30``, ~21 candidates).

**Variance reduction** (`variants`): every candidate estimator on the same rows, each with its interval and
whether it covers the truth: PI with its weight as a control variate, self-normalised PI, doubly robust PI
(additive reward model cross-fitted on 2 folds), and the per-slot estimators `kassa evaluate --slate` reports
beside PI (`ope.slot_ips`, plain and doubly robust), which read each slot's own reward.

``--json`` ends with one JSON object; ``--write-docs`` rewrites this bench's section of ``docs/benchmarks.md``
(``--from-json FILE`` renders a saved run). ``--save-rows DIR`` pickles each seed's logged rows and truth, and
``--from-rows FILE...`` re-evaluates them without re-running the world (seconds instead of ~8 minutes a seed).
Medians over seeds with min-max spread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pickle
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchdocs import write_section
from kassa.learn.offline import ope
from kassa.learn.offline.dataset import load_logged
from kassa.learn.offline.evaluate import uniform_slate_rows
from quality import DAY, ProductWorld, _Http, product_catalog, spread

START, END = "<!-- bench:slate_ope:start -->", "<!-- bench:slate_ope:end -->"
QUALITY_END = "<!-- bench:quality:end -->"
LOG, TARGET = "cross_sell_log", "cross_sell_target"
# Every estimator `evaluate` reports (its `variants`), PI first; `slot_dr` is what `kassa evaluate --slate`
# reports beside PI.
ESTIMATORS = ("pi", "pi_cv", "pi_sn", "pi_dr", "pi_dr_rank", "slot_ips", "slot_dr")
LABELS = {"pi": "PI", "pi_cv": "PI, control variate", "pi_sn": "PI, self-normalised (wPI)",
          "pi_dr": "PI, doubly robust (signals)", "pi_dr_rank": "PI, doubly robust (rank)",
          "slot_ips": "per-slot IPS", "slot_dr": "per-slot DR (signals)"}


def slate_catalog(world: ProductWorld, max_candidates: int) -> dict[str, Any]:
    cat = product_catalog(world)
    per = max(1, max_candidates // 3)
    retrieval = {"co_purchase": per, "history": per, "popular": per, "max_candidates": max_candidates}
    reward = {"weights": {"accept": 1.0}, "wait_seconds": 2.0}
    # A decision past its latency budget answers with the fallback ranking at probability 1, not the
    # uniform logger's: on this loaded machine 50 ms is missed now and then, so the bench gives 5 s (it
    # measures estimation, not latency) and still leaves out any fallback row it finds.
    budget = 5_000.0
    cat["placements"] = [
        {"id": LOG, "slots": 3, "retrieval": retrieval, "reward": reward, "policy": "uniform",
         "latency_budget_ms": budget},
        {"id": TARGET, "slots": 3, "retrieval": retrieval, "reward": reward, "policy": "baseline",
         "exploration": 0.0, "latency_budget_ms": budget},
    ]
    return cat


async def slate_run(seed: int, n: int, warmup: int, n_products: int, n_customers: int, rate: float,
                    exam: list[float], max_candidates: int, save_rows: Path | None = None) -> dict[str, Any]:
    world = ProductWorld(seed, n_products, n_customers)
    rng = random.Random(f"slate-ope-run:{seed}")
    per_day = n_customers / 7.0
    t_sim = 0.0
    truth: dict[str, float] = {}  # logging decision id -> target slate's expected accepts
    target_ids: dict[str, list[str]] = {}
    logged_value: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kassa-bench-slate-ope-") as tmp:
        http = _Http(slate_catalog(world, max_candidates), seed, Path(tmp), rate)
        started = time.perf_counter()
        try:
            for i in range(warmup + n):
                t_sim += DAY / per_day
                http.advance()
                c = rng.randrange(n_customers)
                items = world.basket(c, t_sim)
                order = {"id": f"o{i}", "customer_id": f"c{c}", "items": [{"sku": world.names[p]} for p in items]}
                await http.events([{"event_id": f"o{i}", "type": "order", "customer": {"id": f"c{c}"},
                                    "order": order}])
                if i < warmup:
                    continue
                body = {"placement": LOG, "customer": {"id": f"c{c}"}, "order": order, "limit": 3}
                res = await http.decide(body)
                tgt = await http.decide({**body, "placement": TARGET})
                basket = set(items)
                did = res["decision_id"]
                target_ids[did] = [o["offer_id"] for o in tgt["offers"]]
                truth[did] = sum(e * world.p_accept(c, basket, int(o[1:]), t_sim)
                                 for e, o in zip(exam, target_ids[did], strict=False))
                shown = [int(o["offer_id"][1:]) for o in res["offers"]]
                probs = [e * world.p_accept(c, basket, p, t_sim) for e, p in zip(exam, shown, strict=False)]
                logged_value.append(sum(probs))
                accepts = []
                for p, q, off in zip(shown, probs, res["offers"], strict=True):
                    if rng.random() < q:
                        accepts.append({"event_id": f"a{i}-{p}", "type": "accept", "decision_id": did,
                                        "offer_id": off["offer_id"]})
                        if p in world.staples[c]:
                            world.staples[c][p][1] = t_sim
                await http.events(accepts)
            decide_seconds = time.perf_counter() - started
            log = http.kassa.engine.decision_log
            assert log is not None, "the bench needs the decision log"
            log.flush()
            placement = http.kassa.catalog.snapshot.placements[LOG].placement
            data = load_logged(Path(tmp) / "data", placement, lambda oid: oid, until=http.now + 3600.0)
        finally:
            await http.close()
    if save_rows is not None:  # what `evaluate` reads, to re-evaluate the same logged rows (`--from-rows`)
        with open(save_rows / f"slate_ope_rows_{seed}.pkl", "wb") as f:
            pickle.dump((seed, data, truth, target_ids, logged_value, decide_seconds), f)
    return evaluate(seed, data, truth, target_ids, logged_value, decide_seconds)


def evaluate(seed: int, data: Any, truth: dict[str, float], target_ids: dict[str, list[str]],
             logged_value: list[float], decide_seconds: float) -> dict[str, Any]:
    """PI and top-slot IPS from the logged rows against the simulator's truth on the same rows."""
    # The rows `kassa evaluate --slate` reads (`uniform_slate_rows`): slot j's logged probability must be
    # 1/(m - j), since PI's weights assume a uniform logger over the logged candidates. A row where it is not
    # would mean the candidates the log names are not what was sampled from: it is left out and counted.
    found = uniform_slate_rows(data, 3)
    at = {i: n for n, i in enumerate(found.rows)}
    rows = [i for i, d in enumerate(data.decision_ids) if d in truth and len(data.chosen[i]) == 3]
    fallback = sum(data.fallback[i] for i in rows)  # answered by the fallback ranking, not the logger
    rows = [i for i in rows if not data.fallback[i]]
    missing = 0  # target slates with an offer outside the logged candidates (no overlap: PI cannot see them)
    not_uniform = 0
    keep, t_idx, truths, top_reward, top_logged = [], [], [], [], []
    for i in rows:
        pos = {o: k for k, o in enumerate(data.candidates[i])}
        tgt = target_ids[data.decision_ids[i]]
        if len(tgt) != 3 or any(o not in pos for o in tgt):
            missing += 1
            continue
        if i not in at:
            not_uniform += 1
            continue
        keep.append(at[i])
        t_idx.append([pos[o] for o in tgt])
        truths.append(truth[data.decision_ids[i]])
        top_reward.append(data.rewards[i][0])
        top_logged.append(data.chosen_probabilities[i][0])
    sel = np.asarray(keep, dtype=np.int64)
    r, s, k = found.reward[sel], found.logged[sel], found.n_candidates[sel]
    t = np.asarray(t_idx)
    true_value = float(np.mean(truths))
    t0 = time.perf_counter()
    pi = ope.pseudo_inverse(r, t, s, k, reward_range=(0.0, 3.0))
    pi_seconds = time.perf_counter() - t0
    # What `kassa evaluate` estimates: slot 1 only, with slot 1's logged probability.
    top_target = (t[:, 0] == s[:, 0]).astype(float)
    top = ope.ips(np.asarray(top_reward), np.asarray(top_logged), top_target)
    out: dict[str, Any] = {
        "seed": seed, "rows": int(r.shape[0]), "no_overlap_rows": missing, "not_uniform_rows": not_uniform,
        "fallback_rows": fallback,
        "truth": true_value,
        "pi": pi.value, "pi_ci": [pi.ci_low, pi.ci_high], "pi_ess": pi.ess,
        "pi_rel_error": (pi.value - true_value) / true_value, "pi_covers": pi.ci_low <= true_value <= pi.ci_high,
        "top_ips": top.value, "top_ips_ci": [top.ci_low, top.ci_high],
        "top_ips_rel_error": (top.value - true_value) / true_value,
        "logging_value": float(np.mean(logged_value)), "logged_mean_reward": float(r.mean()),
        "mean_candidates": float(k.mean()), "min_candidates": int(k.min()), "max_candidates": int(k.max()),
        "pending": data.pending, "seconds": round(decide_seconds, 1), "pi_seconds": round(pi_seconds, 3),
    }
    # The variance-reduced candidates, on the same rows (`variants`).
    rows_sel = [found.rows[j] for j in keep]
    for name, est in variants(data, rows_sel, r, t, s, k).items():
        out[name] = est.value
        out[f"{name}_ci"] = [est.ci_low, est.ci_high]
        out[f"{name}_rel_error"] = (est.value - true_value) / true_value
        out[f"{name}_covers"] = est.ci_low <= true_value <= est.ci_high
    return out


def variants(data: Any, rows: list[int], r: np.ndarray, t: np.ndarray, s: np.ndarray,
             k: np.ndarray) -> dict[str, ope.Estimate]:
    """PI's variance-reduction candidates on the rows PI reads. On the whole slate's reward, under PI's own
    assumption: the weight as a control variate (``E[w] = 1``: ``mean(w r) - c (mean(w) - 1)``, ``c = Cov(w r,
    w) / Var(w)``, ``pi_cv``), self-normalised PI (``Σ w r / Σ w``, ``pi_sn``), and doubly robust PI (``mean(g(t)
    + w (r - g(s)))``) with an additive reward model cross-fitted on 2 folds, keyed by each candidate's logged
    retrieval signals (``pi_dr``; the suffix carries its merged score and rank bucket) or by its rank among the
    logged candidates (``pi_dr_rank``). On each slot's own reward (`ope.slot_ips`, which assumes a slot's reward
    depends on its own item alone): ``slot_ips`` and its doubly robust form with the signals model
    (``slot_dr``, what `kassa evaluate --slate` reports)."""
    rs = np.asarray([data.rewards[i] for i in rows], dtype=np.float64)  # (n, 3) each slot's reward
    sig = [data.signals[i] or [""] * len(data.candidates[i]) for i in rows]
    sig_l = np.asarray([[sg[c] for c in row] for sg, row in zip(sig, s, strict=True)])
    sig_t = np.asarray([[sg[c] for c in row] for sg, row in zip(sig, t, strict=True)])
    g_t, g_l = ope.cross_fit_slot_model(rs, sig_l, sig_t)
    rk_t, rk_l = ope.cross_fit_slot_model(rs, s, t)
    w = ope.uniform_slate_weights(t, s, k)
    wr = w * r
    dw = w - w.mean()
    c = float(np.dot(wr - wr.mean(), dw) / np.dot(dw, dw))
    sn = float(wr.sum() / w.sum())
    sn_se = float(np.sqrt(np.sum((w * (r - sn)) ** 2)) / w.sum())
    return {
        "pi_cv": _normal("pi_cv", wr - c * (w - 1.0)),
        "pi_sn": ope.Estimate("pi_sn", sn, sn - 1.96 * sn_se, sn + 1.96 * sn_se, sn_se, r.shape[0], 0.0),
        "pi_dr": _normal("pi_dr", g_t.sum(axis=1) + w * (r - g_l.sum(axis=1))),
        "pi_dr_rank": _normal("pi_dr_rank", rk_t.sum(axis=1) + w * (r - rk_l.sum(axis=1))),
        "slot_ips": ope.slot_ips(rs, t, s, k, reward_range=(0.0, 3.0)),
        "slot_dr": ope.slot_ips(rs, t, s, k, reward_range=(0.0, 3.0), g_target=g_t, g_logged=g_l),
    }


def _normal(name: str, terms: np.ndarray) -> ope.Estimate:
    mean, se = float(terms.mean()), float(terms.std(ddof=1) / np.sqrt(terms.shape[0]))
    return ope.Estimate(name, mean, mean - 1.96 * se, mean + 1.96 * se, se, int(terms.shape[0]), 0.0)


def rows_for_5pct(r: dict[str, Any]) -> float:
    half = (r["pi_ci"][1] - r["pi_ci"][0]) / 2.0
    return float(r["rows"] * (half / (0.05 * r["truth"])) ** 2)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("truth", "pi", "pi_rel_error", "pi_ess", "top_ips", "top_ips_rel_error", "logging_value",
                "mean_candidates"):
        out[key] = spread([r[key] for r in runs])
    out["abs_pi_rel_error"] = spread([abs(r["pi_rel_error"]) for r in runs])
    # The interval shrinks as 1/sqrt(rows): rows a 95 % half-width of 5 % of the truth would take.
    out["rows_for_5pct_halfwidth"] = spread([rows_for_5pct(r) for r in runs])
    out["pi_covers"] = sum(r["pi_covers"] for r in runs)
    out["within_5pct"] = sum(abs(r["pi_rel_error"]) <= 0.05 for r in runs)
    out["target_median_within_5pct"] = abs(out["pi_rel_error"][0]) <= 0.05
    # Every estimator on the same rows (`variants`): errors, interval half-width over the truth, coverage.
    out["estimators"] = {
        name: {"rel_error": spread([r[f"{name}_rel_error"] for r in runs]),
               "abs_rel_error": spread([abs(r[f"{name}_rel_error"]) for r in runs]),
               "half_width": spread([half_width(r, name) for r in runs]),
               "rows_for_5pct_halfwidth": spread([r["rows"] * (half_width(r, name) / 0.05) ** 2 for r in runs]),
               "covers": sum(r[f"{name}_covers"] for r in runs),
               "within_5pct": sum(abs(r[f"{name}_rel_error"]) <= 0.05 for r in runs)}
        for name in ESTIMATORS if all(f"{name}_rel_error" in r for r in runs)}
    return out


def half_width(r: dict[str, Any], name: str) -> float:
    """An estimator's 95 % half-width as a share of the truth."""
    lo, hi = r[f"{name}_ci"]
    return float((hi - lo) / 2.0 / r["truth"])


def _s(t: list[float] | tuple[float, float, float], d: int = 3) -> str:
    return f"{t[0]:.{d}f} ({t[1]:.{d}f} to {t[2]:.{d}f})"


def section(runs: list[dict[str, Any]], s: dict[str, Any], args: argparse.Namespace, load: str) -> str:
    rows = "\n".join(
        f"| {r['seed']} | {r['rows']:,} | {r['mean_candidates']:.0f} | {r['truth']:.4f} | **{r['pi']:.4f}** | "
        f"{r['pi_ci'][0]:.4f}-{r['pi_ci'][1]:.4f} | **{100 * r['pi_rel_error']:+.1f} %** | {r['pi_ess']:,.0f} | "
        f"{r['top_ips']:.4f} | {100 * r['top_ips_rel_error']:+.1f} % | {r['logging_value']:.4f} | {r['seconds']:.0f} |"
        for r in runs)
    exam = ", ".join(f"{e:g}" for e in args.examination)
    saved = args.from_json is not None or bool(args.from_rows)
    return f"""{START}
## Slate OPE on the product world (`bench/slate_ope.py`, issue 14)

`python bench/slate_ope.py --seeds {' '.join(str(r['seed']) for r in runs)} --checkouts {args.checkouts}
--warmup {args.warmup} --products {args.products} --max-candidates {args.max_candidates}` on
{platform.machine()}, Python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
(a shared 2-core machine, load average {load} {'when rendered from saved runs' if saved else 'at the end'};
seeds may run as parallel processes whose `--json` outputs are merged, or whose `--save-rows` are evaluated
together with `--from-rows`, so "s" is wall time under load).
The product world of `bench/quality.py` through Kassa's HTTP
API in process; logging policy Kassa's `uniform` (3 slots without replacement from the retrieved
candidates); target Kassa's `baseline` retrieval-score ranking with exploration 0 on the same checkouts,
never shown. The product world has no position bias, so the bench multiplies acceptance by a slot
examination factor ({exam} for slots 1-3); rewards stay additive over (slot, item), as PI assumes. Truth:
the simulator's expected accepts per checkout of the target's slates in each checkout's world state.
Estimates from the decision log and event log joined by `load_logged` (what `kassa evaluate` reads);
95 % normal intervals. Rows checked: {sum(r.get('not_uniform_rows', 0) for r in runs)} logged with other than
the uniform probabilities 1/m, 1/(m-1), 1/(m-2); {sum(r.get('fallback_rows', 0) for r in runs)} fallback answers
and {sum(r['no_overlap_rows'] for r in runs)} target slates outside the logged candidates left out.

| seed | rows | mean candidates | truth | PI estimate | PI interval | PI error | PI ESS | top-slot IPS \
| its error | logging policy's value | s |
|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{rows}

PI relative error {_s([100 * x for x in s['pi_rel_error']], 1)} % (median, min to max; |error| median
{100 * s['abs_pi_rel_error'][0]:.1f} %); {s['within_5pct']} of {len(runs)} seeds within 5 %, the interval
covers the truth on {s['pi_covers']} of {len(runs)}. Top-slot IPS (what `kassa evaluate` estimates without
`--slate`: slot 1's reward only) {_s([100 * x for x in s['top_ips_rel_error']], 1)} % off the slate's value: it
evaluates the first slot and misses what slots 2 and 3 add.

PI's variance grows with the number of candidates: a uniform logger shows the target's item in a given slot
once in `m` decisions, so the interval's half-width goes as `sqrt(m / rows)`. At these
{s['mean_candidates'][0]:.0f} candidates a 95 % half-width of 5 % of the truth takes about
{s['rows_for_5pct_halfwidth'][0]:,.0f} rows ({s['rows_for_5pct_halfwidth'][1]:,.0f} to
{s['rows_for_5pct_halfwidth'][2]:,.0f}); with more candidates proportionally more (the quality bench's
placement gives its policy up to 20). Hence the smaller `--max-candidates` here: the estimator is the same,
the bench only has to fit the machine's time. Top-slot IPS's interval is no help either way: it is an
interval around slot 1's value, not the slate's.
{compare(runs, s)}
{END}"""


def compare(runs: list[dict[str, Any]], s: dict[str, Any]) -> str:
    """Every estimator on the same rows: its error per seed, its half-width, coverage and rows for ±5 %."""
    ests = s.get("estimators", {})
    if not ests:
        return ""
    head = " | ".join(f"seed {r['seed']}" for r in runs)
    lines = []
    for name, e in ests.items():
        errs = " | ".join(f"{100 * r[f'{name}_rel_error']:+.1f} %" for r in runs)
        lines.append(f"| {LABELS.get(name, name)} | {errs} | {100 * e['abs_rel_error'][0]:.1f} % | "
                     f"{e['within_5pct']} / {len(runs)} | {100 * e['half_width'][0]:.1f} % | "
                     f"{e['covers']} / {len(runs)} | {e['rows_for_5pct_halfwidth'][0]:,.0f} |")
    rows = "\n".join(lines)
    return f"""
**Variance reduction, every estimator on the same rows** (`variants` in the bench: errors against the truth per
seed; median |error|; seeds within 5 %; median 95 % half-width as a share of the truth; seeds whose interval
covers the truth; rows a half-width of 5 % would take). The PI variants use the whole slate's reward under PI's
assumption: the weight as a control variate (`E[w] = 1`), self-normalised PI, doubly robust PI with an additive
model cross-fitted on 2 folds by each candidate's logged retrieval signals or its rank. The per-slot ones
(`ope.slot_ips`) use each slot's own reward and assume it depends on that slot's item alone.

| estimator | {head} | median abs error | within 5 % | half-width | covers | rows for ±5 % |
|---|{'---:|' * len(runs)}---:|---:|---:|---:|---:|
{rows}

{verdict(ests, len(runs))}
"""


def verdict(ests: dict[str, Any], n: int) -> str:
    """Which estimator is the better one, and by how much, from the numbers above."""
    if "slot_dr" not in ests or "pi" not in ests:
        return ""
    pi, dr = ests["pi"], ests["slot_dr"]
    best_pi = min((e["half_width"][0], LABELS[k]) for k, e in ests.items() if k.startswith("pi_"))
    return (f"The per-slot DR estimate (what `kassa evaluate --slate` reports beside PI) is the better one: a "
            f"median half-width of {100 * dr['half_width'][0]:.1f} % of the truth against PI's "
            f"{100 * pi['half_width'][0]:.1f} % "
            f"({dr['half_width'][0] / pi['half_width'][0]:.2f}x, about {dr['rows_for_5pct_halfwidth'][0]:,.0f} rows "
            f"for ±5 % instead of {pi['rows_for_5pct_halfwidth'][0]:,.0f}), median |error| "
            f"{100 * dr['abs_rel_error'][0]:.1f} % against {100 * pi['abs_rel_error'][0]:.1f} %, within 5 % on "
            f"{dr['within_5pct']} of {n} seeds against {pi['within_5pct']}; its interval covers the truth on "
            f"{dr['covers']} of {n} (PI's on {pi['covers']}). The variants on the whole slate's reward barely help "
            f"(at best {100 * best_pi[0]:.1f} %, {best_pi[1]}): with accepts this rare PI's variance is the "
            "Bernoulli noise of every slot multiplied by the weight, which neither a control variate nor a reward "
            "model removes; reading each slot's own reward leaves the other slots' noise out, at the price of "
            "assuming a slot's reward depends on its own item alone (true in this world), so PI stays the gate's "
            "estimator.")


def write_docs(sec: str) -> None:
    """This bench's section, placed right after the quality section the first time."""
    from benchdocs import DOCS

    text = DOCS.read_text()
    if START not in text and QUALITY_END in text:
        head, tail = text.split(QUALITY_END, 1)
        DOCS.write_text(head + QUALITY_END + "\n\n" + sec + tail)
        return
    write_section(sec, START, END)


async def _main(args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    for seed in args.seeds:
        r = await slate_run(seed, args.checkouts, args.warmup, args.products, args.customers, args.rate,
                            args.examination, args.max_candidates, args.save_rows)
        runs.append(r)
        print(f"seed {seed}: truth {r['truth']:.4f} PI {r['pi']:.4f} [{r['pi_ci'][0]:.4f}, {r['pi_ci'][1]:.4f}] "
              f"({100 * r['pi_rel_error']:+.1f} %, ESS {r['pi_ess']:.0f}) top-slot IPS {r['top_ips']:.4f} "
              f"({100 * r['top_ips_rel_error']:+.1f} %), {r['rows']} rows, {r['mean_candidates']:.0f} candidates, "
              f"{r['seconds']} s; " + ", ".join(
                  f"{n} {100 * r[f'{n}_rel_error']:+.1f} % ±{100 * half_width(r, n):.1f} %" for n in ESTIMATORS[1:]),
              file=sys.stderr)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--checkouts", type=int, default=45_000, help="evaluated checkouts per seed")
    ap.add_argument("--warmup", type=int, default=2_000, help="checkouts that only build order history")
    ap.add_argument("--products", type=int, default=10_000)
    ap.add_argument("--customers", type=int, default=1_500)
    ap.add_argument("--max-candidates", type=int, default=12,
                    help="retrieval's max_candidates (~20 candidates need ~2x10^5 decisions for ±5 %%)")
    ap.add_argument("--examination", type=float, nargs="+", default=[1.0, 0.7, 0.5])
    ap.add_argument("--rate", type=float, default=100.0, help="simulated checkouts per second")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--from-json", type=Path)
    ap.add_argument("--save-rows", type=Path, help="directory to pickle each seed's logged rows and truth into")
    ap.add_argument("--from-rows", type=Path, nargs="+",
                    help="re-evaluate pickled rows (--save-rows) instead of running")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.from_json is not None:
        runs = json.loads(args.from_json.read_text().strip().splitlines()[-1])["runs"]
    elif args.from_rows:
        runs = []
        for path in args.from_rows:
            with open(path, "rb") as f:
                runs.append(evaluate(*pickle.load(f)))  # the bench's own files
    else:
        runs = asyncio.run(_main(args))
    summary = summarize(runs)
    if args.write_docs:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        write_docs(section(runs, summary, args, load))
    if args.json:
        print(json.dumps({"summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
