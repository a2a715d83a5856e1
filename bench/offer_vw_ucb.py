"""Would an uncertainty bonus on Kassa's kind of regression reach 0.8 of the offer world's oracle? (ADR 0010)

An emulation, not Kassa: a Vowpal Wabbit squared-loss online regression of the normalised reward (divided by the
mean non-zero reward so far, as Kassa's `RewardScale` does for value-weighted rewards) on the offer crossed with
the three context features the world's acceptance depends on (``-q ca``, ``-l`` as Kassa's default), learning
only the shown offer's example as Kassa's two-line ``mtr`` update with probability 1 does. Exploration is either
SquareCB's rule on its estimates (``--explore squarecb``) or the highest estimate plus ``--alpha`` x a diagonal
uncertainty bonus, ``sqrt(sum over the offer's features of 1 / (1 + n))`` with ``n`` the times that (offer,
feature) was learned, and ``--epsilon`` uniform picks (so logged propensities exist; ``--explore ucb``). Same
worlds, contexts and drift as `bench/quality.py` (``OfferWorld(seed)``); its own accept draws, as
`bench/offer_reference.py`. The last third's expected value against the per-checkout oracle, per world.

    python bench/offer_vw_ucb.py --explore ucb --alpha 0.3 --epsilon 0.02 --json
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import vowpalwabbit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from offer_reference import report
from quality import OfferWorld


def run(seed: int, n: int, explore: str, alpha: float, epsilon: float, gamma_scale: float,
        learning_rate: float, vw_args: str = "") -> dict[str, float]:
    world = OfferWorld(seed)
    contexts = [world.context() for _ in range(n)]  # then drifts from this rng state, as in quality.py
    ws = vowpalwabbit.Workspace(f"-q ca -l {learning_rate} -b 20 --quiet {vw_args}", enable_logging=False)
    pick = random.Random(f"offer-vw-ucb:{seed}")
    draw = random.Random(f"offer-reference:{seed}")
    k = len(world.ids)
    counts: dict[tuple[int, str], int] = {}
    mean, rewarded = 0.0, 0
    policy, oracle = [], []
    started = time.perf_counter()
    for i, ctx in enumerate(contexts):
        if i == n // 2:
            world.drift()
        shared = f"|c device={ctx[0]} country={ctx[1]} cat={ctx[2]}"
        lines = [f"{shared} |a id={o}" for o in world.ids]
        est = [ws.predict(line) for line in lines]
        if explore == "squarecb":
            best = max(range(k), key=lambda j: est[j])
            gamma = gamma_scale * math.sqrt(i + 1)
            p = [1.0 / (k + gamma * (est[best] - e)) for e in est]
            p[best] = 0.0
            p[best] = 1.0 - sum(p)
            a = pick.choices(range(k), weights=p)[0]
        else:
            keys = ("1", f"d{ctx[0]}", f"c{ctx[1]}", f"k{ctx[2]}")
            score = [est[o] + alpha * math.sqrt(sum(1.0 / (1.0 + counts.get((o, f), 0)) for f in keys))
                     for o in range(k)]
            a = max(range(k), key=lambda j: score[j])
            if epsilon and pick.random() < epsilon:
                a = pick.randrange(k)
            for f in keys:
                counts[(a, f)] = counts.get((a, f), 0) + 1
        policy.append(world.ev(a, ctx))
        oracle.append(max(world.ev(o, ctx) for o in range(k)))
        reward = world.value[a] if draw.random() < world.p(a, ctx) else 0.0
        if reward:
            rewarded += 1
            mean += (reward - mean) / rewarded
        ws.learn(f"{reward / (mean if rewarded else 1.0)} {lines[a]}")
    ws.finish()
    last = slice(n - n // 3, n)
    return {"seed": seed, "vs_oracle": sum(policy[last]) / sum(oracle[last]),
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    ap.add_argument("--checkouts", type=int, default=9000)
    ap.add_argument("--explore", choices=("ucb", "squarecb"), default="ucb")
    ap.add_argument("--alpha", type=float, default=0.3, help="ucb: the bonus's weight")
    ap.add_argument("--epsilon", type=float, default=0.02, help="ucb: share of uniformly random picks")
    ap.add_argument("--gamma-scale", type=float, default=50.0, help="squarecb (Kassa's default 50)")
    ap.add_argument("--learning-rate", type=float, default=0.1, help="VW -l (Kassa's default 0.1)")
    ap.add_argument("--vw-args", default="", help="more VW arguments for the regression (e.g. '--power_t 0')")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report(lambda seed: run(seed, args.checkouts, args.explore, args.alpha, args.epsilon, args.gamma_scale,
                            args.learning_rate, args.vw_args),
           args.seeds, {"explore": args.explore, "alpha": args.alpha, "epsilon": args.epsilon,
                        "gamma_scale": args.gamma_scale, "learning_rate": args.learning_rate, "vw_args": args.vw_args,
                        "checkouts": args.checkouts}, args.json)


if __name__ == "__main__":
    main()
