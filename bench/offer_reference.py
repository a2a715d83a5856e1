"""A reference learner for `bench/quality.py`'s offer world: what a well-specified model reaches on its streams.

Issue 14 asks Kassa for >= 0.8 of the per-checkout oracle over the last third of the offer world. This script
measures how far a learner that knows the world's model family gets on the same streams: per offer, a Bayesian
logistic regression on exactly the features the world's accept probability is built from (an intercept and
one-hot device, country and category: ``OfferWorld.p``), a Gaussian prior centred on a low accept rate, refit by
Newton's method every ``--refit`` checkouts (Laplace approximation), Thompson sampling, and the offers' true values
(expected value = p x value). It sees no irrelevant feature and needs no reward scale: a bound-like reference,
not a product. Same worlds, contexts and drift as `quality.py` (``OfferWorld(seed)``); its own accept draws.

``--explore`` picks how it explores on the same posterior:

- ``ts`` (default): Thompson sampling, the posterior's spread scaled by ``--scale`` (1: plain TS);
- ``ucb``: the offer with the highest value x sigmoid(mean logit + ``--scale`` x the logit's posterior sd);
- ``linucb``: no logistic model and no known values: per offer a ridge regression (``lambda`` 1) of the
  value-weighted reward divided by 30 (Kassa's normalised reward, ADR 0010) on the same features, the offer with
  the highest estimate + ``--scale`` x its sd, exact (``--bonus full``) or from per-feature counts only
  (``--bonus diagonal``: what a hashed linear model could keep beside its weights); ``--epsilon`` picks
  uniformly at random that share of the time (what logged propensities for off-policy evaluation would need);
- ``squarecb``: the same ridge regression with SquareCB's rule (``gamma = --gamma-scale x sqrt(t)``) on its
  estimates, i.e. Kassa's exploration on an exact least-squares fit instead of VW's online one.

    python bench/offer_reference.py --seeds 1 2 3 4 5 --checkouts 9000 --json
    python bench/offer_reference.py --explore linucb --scale 0.3 --bonus diagonal --epsilon 0.02

Ends by printing one JSON object (``--json``) with each seed's share of the oracle over the last third.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import CATS, COUNTRIES, DEVICES, OfferWorld

D = 1 + len(DEVICES) + len(COUNTRIES) + len(CATS)
PRIOR_MEAN = np.zeros(D)
PRIOR_MEAN[0] = -3.0  # accept rates of a few percent, as the world's base logits give


def features(ctx: tuple[str, str, str]) -> np.ndarray:
    x = np.zeros(D)
    x[0] = 1.0
    x[1 + DEVICES.index(ctx[0])] = 1.0
    x[1 + len(DEVICES) + COUNTRIES.index(ctx[1])] = 1.0
    x[1 + len(DEVICES) + len(COUNTRIES) + CATS.index(ctx[2])] = 1.0
    return x


def fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, prior_var: float,
        start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MAP of a logistic regression with a Gaussian prior, and the Laplace covariance (Newton, 8 steps)."""
    m = start.copy()
    p0 = np.eye(D) / prior_var
    h = p0
    for _ in range(8):
        p = 1.0 / (1.0 + np.exp(-(x @ m)))
        g = x.T @ (w * (p - y)) + p0 @ (m - PRIOR_MEAN)
        h = (x * (w * p * (1.0 - p))[:, None]).T @ x + p0
        m = m - np.linalg.solve(h, g)
    return m, np.linalg.inv(h)


def run(seed: int, n: int, refit: int, prior_var: float, half_life: float | None, explore: str = "ts",
        scale: float = 1.0, bonus: str = "full", epsilon: float = 0.0, gamma_scale: float = 50.0) -> dict[str, float]:
    world = OfferWorld(seed)
    contexts = [world.context() for _ in range(n)]  # then drifts from this rng state, as in quality.py
    rng = np.random.default_rng(seed)
    draw = random.Random(f"offer-reference:{seed}")
    pick_rng = random.Random(f"offer-reference-pick:{seed}")
    k = len(world.ids)
    values = np.array(world.value)
    data: list[list[tuple[int, np.ndarray, float]]] = [[] for _ in range(k)]
    means = [PRIOR_MEAN.copy() for _ in range(k)]
    covs = [np.eye(D) * prior_var for _ in range(k)]
    chols = [np.linalg.cholesky(c) for c in covs]
    ridge_inv = np.array([np.eye(D) for _ in range(k)])  # linucb / squarecb: (I + X'X)^-1 per offer
    ridge_b = np.zeros((k, D))
    counts = np.zeros((k, D))
    policy, oracle = [], []
    started = time.perf_counter()
    for i, ctx in enumerate(contexts):
        if i == n // 2:
            world.drift()
        x = features(ctx)
        if explore == "ts":
            theta = np.array([means[a] + scale * (chols[a] @ rng.standard_normal(D)) for a in range(k)])
            a = int(np.argmax(values / (1.0 + np.exp(-(theta @ x)))))
        elif explore == "ucb":
            logit = np.array([means[o] @ x + scale * math.sqrt(x @ covs[o] @ x) for o in range(k)])
            a = int(np.argmax(values / (1.0 + np.exp(-logit))))
        else:
            est = np.einsum("kij,kj->ki", ridge_inv, ridge_b) @ x
            if explore == "squarecb":
                best = int(np.argmax(est))
                p = 1.0 / (k + gamma_scale * math.sqrt(i + 1) * (est[best] - est))
                p[best] = 0.0
                p[best] = 1.0 - p.sum()
                a = pick_rng.choices(range(k), weights=p.tolist())[0]
            else:
                if bonus == "full":
                    sd = np.sqrt(np.einsum("i,kij,j->k", x, ridge_inv, x))
                else:
                    sd = np.sqrt((x * x / (1.0 + counts)).sum(axis=1))
                a = int(np.argmax(est + scale * sd))
                if epsilon and pick_rng.random() < epsilon:
                    a = pick_rng.randrange(k)
        policy.append(world.ev(a, ctx))
        oracle.append(max(world.ev(o, ctx) for o in range(k)))
        accepted = draw.random() < world.p(a, ctx)
        if explore in ("linucb", "squarecb"):
            ridge_b[a] += (world.value[a] / 30.0 if accepted else 0.0) * x
            counts[a] += x * x
            u = ridge_inv[a] @ x
            ridge_inv[a] -= np.outer(u, u) / (1.0 + x @ u)
            continue
        data[a].append((i, x, 1.0 if accepted else 0.0))
        if (i + 1) % refit == 0:
            for o in range(k):
                if not data[o]:
                    continue
                xs = np.array([d[1] for d in data[o]])
                ys = np.array([d[2] for d in data[o]])
                ts = np.array([d[0] for d in data[o]])
                ws = np.ones(len(ts)) if half_life is None else 0.5 ** ((i - ts) / half_life)
                means[o], covs[o] = fit(xs, ys, ws, prior_var, means[o])
                chols[o] = np.linalg.cholesky(covs[o])
    last = slice(n - n // 3, n)
    return {"seed": seed, "vs_oracle": sum(policy[last]) / sum(oracle[last]),
            "seconds": round(time.perf_counter() - started, 1)}


def report(runs_of: Callable[[int], dict[str, float]], seeds: list[int], settings: dict[str, Any],
           as_json: bool) -> None:
    """Run each seed, print its share of the oracle as it finishes, then the summary (one JSON object with
    ``--json``). Shared with `bench/offer_vw_ucb.py`."""
    runs = []
    for seed in seeds:
        r = runs_of(seed)
        runs.append(r)
        print(f"seed {seed}: {r['vs_oracle']:.3f} of the oracle ({r['seconds']} s)", file=sys.stderr)
    shares = [r["vs_oracle"] for r in runs]
    out = {"vs_oracle_median": statistics.median(shares), "vs_oracle_min": min(shares),
           "vs_oracle_max": max(shares), "spread": max(shares) - min(shares), **settings, "runs": runs}
    print(json.dumps(out) if as_json else out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--checkouts", type=int, default=9000)
    ap.add_argument("--refit", type=int, default=100, help="checkouts between refits")
    ap.add_argument("--prior-var", type=float, default=1.0)
    ap.add_argument("--half-life", type=float, help="checkouts; older observations weigh less (default: none)")
    ap.add_argument("--explore", choices=("ts", "ucb", "linucb", "squarecb"), default="ts")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="ts: the posterior's spread x this; ucb, linucb: the bonus in posterior sds")
    ap.add_argument("--bonus", choices=("full", "diagonal"), default="full", help="linucb's uncertainty")
    ap.add_argument("--epsilon", type=float, default=0.0, help="linucb: share of uniformly random picks")
    ap.add_argument("--gamma-scale", type=float, default=50.0, help="squarecb")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report(lambda seed: run(seed, args.checkouts, args.refit, args.prior_var, args.half_life, args.explore,
                            args.scale, args.bonus, args.epsilon, args.gamma_scale),
           args.seeds, {"half_life": args.half_life, "checkouts": args.checkouts, "explore": args.explore,
                        "scale": args.scale, "bonus": args.bonus, "epsilon": args.epsilon,
                        "gamma_scale": args.gamma_scale}, args.json)


if __name__ == "__main__":
    main()
