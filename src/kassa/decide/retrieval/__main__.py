"""Manual timing of `ProductRetriever.retrieve`: ``python -m kassa.decide.retrieval``."""

from __future__ import annotations

import time

from kassa import schemas
from kassa.decide.retrieval.retriever import ProductRetriever


def main() -> None:  # pragma: no cover - manual timing
    import itertools
    import random

    rng = random.Random(7)
    n_products, n_orders, n_customers = 10_000, 100_000, 20_000
    products = [f"p{i}" for i in range(n_products)]
    # Zipf-ish popularity plus a fixed complement per product, so lists are realistic, not uniform.
    cum = list(itertools.accumulate(1.0 / (i + 1) ** 0.8 for i in range(n_products)))
    complement = {p: products[(i * 7919 + 13) % n_products] for i, p in enumerate(products)}
    orders = []
    for i in range(n_orders):
        ks = rng.choices(products, cum_weights=cum, k=rng.randint(1, 4))
        if rng.random() < 0.5:
            ks.append(complement[ks[0]])
        orders.append(schemas.Order(id=f"o{i}", items=[schemas.OrderItem(sku=k) for k in ks]))
    buyers = [f"c{rng.randrange(n_customers)}" for _ in range(n_orders)]

    r = ProductRetriever()
    ts = 1.7e9
    t0 = time.perf_counter()
    for order, buyer in zip(orders, buyers, strict=True):
        ts += 30.0
        r.observe_order(order, buyer, ts)
    dt = time.perf_counter() - t0
    print(f"observe_order: {dt / n_orders * 1e6:.1f} µs/order; stats {r.stats()}")

    queries = [(rng.choices(products, cum_weights=cum, k=3), f"c{rng.randrange(n_customers)}") for _ in range(20_000)]
    for ks, c in queries:  # warm the neighbour caches, as steady state would
        r.retrieve(ks, c, ts, 20, 10, 20, 50)
    cases = {
        "3 items, 20/10/20 of 50": (20, 10, 20, 50),
        "3 items, co_purchase 20 only": (20, 0, 0, 20),
        "1 item, 20/10/20 of 50": (20, 10, 20, 50),
    }
    clock = time.perf_counter_ns
    for label, args in cases.items():
        qs = [(ks[:1], c) for ks, c in queries] if label.startswith("1 item") else queries
        # Per-call percentiles rather than a loop total: on a shared host a few preempted calls
        # would otherwise dominate the mean.
        samples = []
        for ks, c in qs:
            t = clock()
            r.retrieve(ks, c, ts, *args)
            samples.append(clock() - t)
        samples.sort()
        p50, p90, p99 = (samples[int(q * len(samples))] / 1000 for q in (0.5, 0.9, 0.99))
        mean = sum(samples) / len(samples) / 1000
        print(f"retrieve ({label}): p50 {p50:.1f}  p90 {p90:.1f}  p99 {p99:.1f}  mean {mean:.1f} µs")


if __name__ == "__main__":  # pragma: no cover
    main()
