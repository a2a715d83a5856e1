"""CPU per decision of `DecisionEngine.decide` in process, on the demo's catalog and its checkouts.

Owns the micro-benchmark behind localised offer content (issue 16, part 6): the hot path must not get
measurably slower when offers carry content per locale, prices per currency and a disclosure label. It
builds the demo store and world for a seed, a `Kassa` on a temporary data dir (no HTTP, no learning
loop), then times (process CPU time) ``--decisions`` calls of ``engine.decide`` over the demo's mix of markets (US, GB,
DE, CA, FR, NL: six locales, four currencies) and reports the median of ``--repeats`` runs in µs per
decision. The first pass over the checkouts warms every cache (the formatted prices included); the
timed passes are the steady state a server sees.

    python bench/content_cost.py --decisions 20000 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import msgspec

from kassa.app import Kassa
from kassa.config import load_settings
from kassa.demo.simulator import World, decision_request
from kassa.demo.store import POLICY, DemoStore


async def _time(kassa: Kassa, requests: list, n: int) -> float:
    engine = kassa.engine
    for req in requests:  # warm-up: every cache filled once
        await engine.decide(req)
    # CPU time of this process, not wall time: the figure is the decision's own cost, and other work on a
    # shared machine (which stretches wall time by 2-5x here) does not count against it.
    t0 = time.process_time()
    for i in range(n):
        await engine.decide(requests[i % len(requests)])
    return (time.process_time() - t0) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    store = DemoStore.build(args.seed)
    world = World(store, args.seed)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        catalog = Path(tmp) / "catalog.json"
        catalog.write_bytes(msgspec.json.encode(store.catalog(world.best_static_order())))
        settings = load_settings(None, data_dir=str(Path(tmp) / "data"), catalog_file=str(catalog),
                                 log_level="warning")
        kassa = Kassa(settings, seed=args.seed)
        requests = [decision_request(c, POLICY) for c in world.checkouts(2_000, stream="bench")]
        markets = sorted({(r.context.locale, r.order.currency) for r in requests if r.context and r.order})

        async def repeat() -> list[float]:
            return [await _time(kassa, requests, args.decisions) for _ in range(args.repeats)]

        runs = asyncio.run(repeat())
    result = {"us_per_decision_median": round(statistics.median(runs), 1), "runs": [round(r, 1) for r in runs],
              "decisions": args.decisions, "markets": [f"{loc}/{cur}" for loc, cur in markets]}
    print(f"decide: {result['us_per_decision_median']} µs CPU per decision (median of {args.repeats}: "
          f"{result['runs']}) over {len(markets)} locale/currency pairs")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
