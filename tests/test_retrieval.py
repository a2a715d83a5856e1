"""Tests for kassa.decide.retrieval: co-purchase, history, popularity, caps and decay."""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Iterable
from typing import Any

from kassa import schemas
from kassa.decide.retrieval import ProductRetriever, product_key

DAY = 86_400.0
T0 = 1_700_000_000.0


def order(keys: Iterable[str], oid: str = "o") -> schemas.Order:
    return schemas.Order(id=oid, items=[schemas.OrderItem(sku=k) for k in keys])


def retriever(**kw: Any) -> ProductRetriever:
    # refresh_seconds=0: rebuild cached lists on every read after a change, so tests see every order.
    return ProductRetriever(refresh_seconds=0.0, **kw)


def keys_of(cands: list[tuple[str, str]], source: str | None = None) -> list[str]:
    return [k for k, s in cands if source is None or s == source]


def test_product_key_prefers_product_id() -> None:
    assert product_key(schemas.OrderItem(sku="S1", product_id="P1")) == "P1"
    assert product_key(schemas.OrderItem(sku="S1")) == "S1"
    assert product_key(schemas.Offer(id="o", kind="product", title="t", sku="S2")) == "S2"
    assert product_key(schemas.Offer(id="o", kind="partner", title="t")) is None


def test_observe_keys_items_by_product_id() -> None:
    r = retriever()
    o = schemas.Order(id="o1", items=[schemas.OrderItem(sku="s-a", product_id="A"), schemas.OrderItem(sku="s-b")])
    r.observe_order(o, None, T0)
    assert keys_of(r.retrieve(["A"], None, T0, 5, 0, 0, 5)) == ["s-b"]
    assert keys_of(r.retrieve(["s-b"], None, T0, 5, 0, 0, 5)) == ["A"]


def test_co_purchase_finds_complements() -> None:
    rng = random.Random(1)
    r = retriever()
    noise = [f"n{i}" for i in range(200)]
    ts = T0
    for i in range(2000):
        ts += 60
        basket = rng.sample(noise, 2)
        if i % 2:
            basket += ["A", "B"]  # A is always bought with B
        else:
            basket += ["C", "D"]
        rng.shuffle(basket)
        r.observe_order(order(basket, f"o{i}"), None, ts)

    one = r.retrieve(["A"], None, ts, co_purchase=5, history=0, popular=0, max_candidates=5)
    assert one[0] == ("B", "co_purchase")
    assert len(one) == 5

    two = r.retrieve(["A", "C"], None, ts, co_purchase=5, history=0, popular=0, max_candidates=5)
    assert set(keys_of(two)[:2]) == {"B", "D"}
    assert all(s == "co_purchase" for _, s in two)


def test_co_purchase_sums_weights_across_order_items() -> None:
    r = retriever()
    ts = T0
    # X is a moderate neighbour of both A and B; Y a stronger neighbour of A alone.
    for _ in range(3):
        ts += 1
        r.observe_order(order(["A", "X"]), None, ts)
        r.observe_order(order(["B", "X"]), None, ts)
    for _ in range(4):
        ts += 1
        r.observe_order(order(["A", "Y"]), None, ts)
    assert keys_of(r.retrieve(["A"], None, ts, 2, 0, 0, 2)) == ["Y", "X"]
    assert keys_of(r.retrieve(["A", "B"], None, ts, 2, 0, 0, 2)) == ["X", "Y"]


def test_never_returns_order_items_or_excluded() -> None:
    rng = random.Random(2)
    products = [f"p{i}" for i in range(60)]
    r = retriever()
    ts = T0
    for i in range(3000):
        ts += 600
        r.observe_order(order(rng.sample(products, rng.randint(1, 5)), f"o{i}"), f"c{i % 20}", ts)
    for trial in range(300):
        in_order = rng.sample(products, rng.randint(1, 4))
        excl = rng.sample(products, rng.randint(0, 10))
        exclude: Collection[str] = set(excl) if trial % 2 else list(excl)  # sets and other collections
        got = r.retrieve(in_order, f"c{trial % 25}", ts, 10, 10, 10, 25, exclude=exclude)
        ks = keys_of(got)
        assert not set(ks) & set(in_order)
        assert not set(ks) & set(excl)
        assert len(ks) == len(set(ks))
        assert len(ks) <= 25


def test_history_ranks_due_replenishment_first() -> None:
    r = retriever()
    cust = "c1"
    # X: bought every 10 days, last 10 days ago -> due now.
    for d in (0, 10, 20):
        r.observe_order(order(["X"]), cust, T0 + d * DAY)
    # Y: bought more often overall, every 10 days, but last bought 1 day ago -> not due.
    for d in (-9, 1, 11, 21, 29):
        r.observe_order(order(["Y"]), cust, T0 + d * DAY)
    # Z: bought once: never due.
    r.observe_order(order(["Z"]), cust, T0 + 25 * DAY)
    now = T0 + 30 * DAY
    got = r.retrieve([], cust, now, co_purchase=0, history=3, popular=0, max_candidates=3)
    assert got == [("X", "history"), ("Y", "history"), ("Z", "history")]

    # Long after, X's habit has lapsed (well past 3 intervals): back to most-bought order.
    later = T0 + 200 * DAY
    assert keys_of(r.retrieve([], cust, later, 0, 3, 0, 3)) == ["Y", "X", "Z"]


def test_history_ignores_replayed_orders_and_guests() -> None:
    r = retriever()
    for _ in range(5):  # the same order delivered five times is one purchase
        r.observe_order(order(["X"]), "c1", T0)
    r.observe_order(order(["X"]), "c1", T0 + 10 * DAY)
    r.observe_order(order(["G"]), None, T0)
    assert r._hist["c1"]["X"][0] == 2.0
    assert r.stats()["customers"] == 1
    assert r.retrieve([], None, T0, 0, 5, 0, 5) == []
    assert r.retrieve([], "unknown", T0, 0, 5, 0, 5) == []


def test_popular_fills_when_there_is_no_signal() -> None:
    r = retriever(popular_size=3)
    ts = T0
    for n, k in ((5, "P1"), (4, "P2"), (3, "P3"), (1, "P4")):
        for _ in range(n):
            ts += 1
            r.observe_order(order([k]), "old", ts)
    got = r.retrieve(["never-seen"], "new-customer", ts, co_purchase=10, history=10, popular=10, max_candidates=10)
    assert got == [("P1", "popular"), ("P2", "popular"), ("P3", "popular")]
    assert keys_of(r.retrieve(["P1"], None, ts, 0, 0, 10, 10)) == ["P2", "P3"]


def test_popular_top_matches_brute_force() -> None:
    rng = random.Random(3)
    half_life = 2.0
    r = retriever(popular_size=25, half_life_days=half_life)
    products = [f"p{i}" for i in range(400)]
    tau = half_life * DAY / math.log(2)
    counts: dict[str, float] = {}
    ts = T0
    for i in range(5000):
        ts += rng.uniform(0, 600)
        basket = set(rng.choices(products, weights=range(1, 401), k=3))
        r.observe_order(order(basket, f"o{i}"), None, ts)
        for k in basket:
            counts[k] = counts.get(k, 0.0) + math.exp((ts - T0) / tau)
    expected = sorted(counts, key=counts.__getitem__, reverse=True)[:25]
    assert keys_of(r.retrieve([], None, ts, 0, 0, 25, 25)) == expected


def test_popularity_score_is_decayed_order_count() -> None:
    r = retriever(half_life_days=10.0)
    for i in range(4):
        r.observe_order(order(["A", "B"]), None, T0 + i)
    r.observe_order(order(["B"]), None, T0 + 10 * DAY)
    assert r.popularity("missing") == 0.0
    assert math.isclose(r.popularity("A"), 4 * 0.5, rel_tol=1e-4)  # one half-life old
    assert math.isclose(r.popularity("B"), 4 * 0.5 + 1, rel_tol=1e-4)
    assert math.isclose(r.popularity("B", now=T0 + 20 * DAY), (4 * 0.5 + 1) / 2, rel_tol=1e-4)


def test_dedupe_across_sources_and_source_order() -> None:
    r = retriever()
    ts = T0
    # B: neighbour of A, in the customer's history and the most popular product.
    for _ in range(5):
        ts += DAY
        r.observe_order(order(["A", "B"]), None, ts)
        r.observe_order(order(["B", "H"]), "c1", ts)
        r.observe_order(order(["B"]), None, ts)
    got = r.retrieve(["A"], "c1", ts, co_purchase=5, history=5, popular=5, max_candidates=10)
    ks = keys_of(got)
    assert len(ks) == len(set(ks))
    assert got[0] == ("B", "co_purchase")
    assert ("H", "history") in got
    assert ("B", "history") not in got and ("B", "popular") not in got
    sources = [s for _, s in got]
    rank = {"co_purchase": 0, "history": 1, "popular": 2}
    assert sources == sorted(sources, key=rank.__getitem__)


def test_quotas_and_max_candidates() -> None:
    rng = random.Random(4)
    products = [f"p{i}" for i in range(100)]
    r = retriever()
    ts = T0
    for i in range(2000):
        ts += 3600
        r.observe_order(order(rng.sample(products, 4), f"o{i}"), "c1", ts)
    got = r.retrieve(["p1", "p2", "p3"], "c1", ts, co_purchase=4, history=3, popular=5, max_candidates=50)
    assert [s for _, s in got] == ["co_purchase"] * 4 + ["history"] * 3 + ["popular"] * 5
    assert len(r.retrieve(["p1"], "c1", ts, 20, 20, 20, max_candidates=7)) == 7
    assert keys_of(r.retrieve(["p1"], "c1", ts, 0, 0, 0, 10)) == []
    assert r.retrieve(["p1"], "c1", ts, 5, 5, 5, 0) == []
    assert {s for _, s in r.retrieve(["p1"], "c1", ts, 0, 5, 5, 10)} == {"history", "popular"}


def test_time_decay_ranks_old_pair_below_newer_one() -> None:
    r = retriever(half_life_days=30.0)
    for i in range(10):
        r.observe_order(order(["A", "OLD"]), None, T0 + i)
    for i in range(10):
        r.observe_order(order(["A", "NEW"]), None, T0 + 60 * DAY + i)
    now = T0 + 61 * DAY
    assert keys_of(r.retrieve(["A"], None, now, 2, 0, 0, 2)) == ["NEW", "OLD"]
    # Popularity decays the same way.
    assert keys_of(r.retrieve(["A"], None, now, 0, 0, 2, 2)) == ["NEW", "OLD"]
    # Two half-lives on, 10 old purchases (weight ~2.5) lose to 3 fresh ones (~3).
    for i in range(3):
        r.observe_order(order(["A", "FRESH"]), None, T0 + 120 * DAY + i)
    later = T0 + 121 * DAY
    assert keys_of(r.retrieve(["A"], None, later, 3, 0, 0, 3)) == ["FRESH", "NEW", "OLD"]


def test_decay_survives_renormalisation() -> None:
    # A tiny half-life forces many renormalisations of the growing scale.
    r = retriever(half_life_days=0.01)
    ts = T0
    for step in range(200):
        ts += DAY  # 100 half-lives per step: far past the renormalisation point each time
        r.observe_order(order(["A", f"X{step}"]), None, ts)
        r.observe_order(order([f"X{step}"]), None, ts)
    got = r.retrieve(["A"], None, ts, 3, 0, 3, 6)
    assert got[0] == ("X199", "co_purchase")
    assert ("X199", "popular") not in got
    assert all(math.isfinite(w) for nb in r._nb.values() for w in nb.values())
    assert all(math.isfinite(w) for w in r._pop.values())


def test_memory_caps_hold_after_many_orders() -> None:
    rng = random.Random(5)
    n_products = 10_000
    products = [f"p{i}" for i in range(n_products)]
    cum = [0.0] * n_products
    acc = 0.0
    for i in range(n_products):  # skewed: hot products overflow their neighbour lists
        acc += 1.0 / (i + 1)
        cum[i] = acc
    r = retriever(neighbours_per_product=20, history_per_customer=10, popular_size=50, max_customers=2_000)
    ts = T0
    for i in range(50_000):
        ts += 30
        basket = rng.choices(products, cum_weights=cum, k=rng.randint(1, 6))
        r.observe_order(order(basket, f"o{i}"), f"c{rng.randrange(5_000)}", ts)
        if i % 5000 == 0:  # reads interleaved with writes, as in production
            r.retrieve(basket[:3], f"c{i % 5_000}", ts, 20, 10, 20, 50)

    stats = r.stats()
    assert stats["orders"] == 50_000
    assert stats["products"] <= n_products
    assert max(len(nb) for nb in r._nb.values()) <= 2 * 20
    assert stats["pairs"] == sum(len(nb) for nb in r._nb.values())
    assert stats["pairs"] <= 2 * 20 * stats["products"]
    assert stats["customers"] <= 2_000
    assert max(len(h) for h in r._hist.values()) <= 10
    assert stats["history_entries"] == sum(len(h) for h in r._hist.values()) <= 2_000 * 10
    assert len(r._pop_top) == 50
    # The hottest product co-occurs with thousands of others: its list was pruned, not unbounded.
    assert 20 <= len(r._nb["p0"]) <= 40


# ------------------------------------------------------------------ issue 14: scored retrieval with signals
def test_scored_retrieval_ranks_a_due_repeat_purchase_above_co_purchase_and_popularity() -> None:
    r = retriever()
    ts = T0
    for i in range(30):  # "milk" every 7 days for this buyer; A and B bought together by everyone
        ts = T0 + i * 7 * DAY
        r.observe_order(order(["milk"], f"m{i}"), "c1", ts)
        for j in range(5):
            r.observe_order(order(["A", "B", f"n{j}"], f"x{i}-{j}"), f"other{j}", ts + 10 + j)
    now = ts + 7 * DAY  # milk is due
    got = r.retrieve_scored(["A"], "c1", now, 5, 5, 5, 10)
    keys = [k for k, _, _ in got]
    assert keys[0] == "milk"
    assert keys.index("B") < min(keys.index(f"n{j}") for j in range(5) if f"n{j}" in keys)
    scores = [s for _, s, _ in got]
    assert scores == sorted(scores, reverse=True)
    milk = dict((k, line) for k, _, line in got)["milk"]
    assert "s_hi" in milk and "due=yes" in milk and "hc:" in milk
    # how due, finer (7 days since over a 7-day mean: bucket [1, 1.25)), and crossed with the count (30: log2 4+)
    assert "dr=4" in milk and "hd=4_4" in milk
    b = dict((k, line) for k, _, line in got)["B"]
    assert b.startswith(" |r ") and "s_co" in b and "cf:" in b and "lc:" in b and "rk=" in b


def test_history_strength_peaks_when_a_habit_is_due() -> None:
    from kassa.decide.retrieval import signals

    week = 7 * DAY
    due = signals.history_strength(10, week, week)
    assert due > signals.history_strength(10, 0.5 * week, week) > signals.history_strength(10, 0.1 * week, week)
    assert due > signals.history_strength(10, 1.5 * week, week) > signals.history_strength(10, 3 * week, week)
    # lapsed (twice the interval or more) and bought once weigh W_ONCE of a habit; never bought, nothing
    assert math.isclose(signals.history_strength(10, 3 * week, week), signals.W_ONCE * 10 / 12)
    assert math.isclose(signals.history_strength(1, week, 0.0), signals.W_ONCE / 3)
    assert signals.history_strength(0, week, week) == 0.0
    # a due habit outranks the strongest co-purchase confidence (1.0): the buyer's own repeat purchases are what
    # converts (issue 14's grocery replay: most-bought 0.21 against 0.0765 for co-purchase order)
    assert signals.history_strength(2, week, week) > 1.0
    assert [signals.ratio_bucket(r * week, week) for r in (0.1, 0.8, 1.0, 1.4, 2.5, 9)] == [0, 3, 4, 5, 7, 9]


def test_scored_retrieval_merges_sources_into_one_candidate() -> None:
    r = retriever()
    for i in range(10):
        r.observe_order(order(["A", "B"], f"o{i}"), "c1", T0 + i * DAY)
    got = r.retrieve_scored(["A"], "c1", T0 + 20 * DAY, 5, 5, 5, 10)
    assert [k for k, _, _ in got].count("B") == 1
    line = got[0][2]
    assert got[0][0] == "B" and "s_co s_hi s_po" in line


def test_scored_retrieval_respects_exclusions_and_the_cap() -> None:
    r = retriever()
    for i in range(50):
        r.observe_order(order([f"p{i}", f"p{i + 1}", "A"], f"o{i}"), None, T0 + i)
    got = r.retrieve_scored(["A"], None, T0 + 60, 20, 0, 20, 7, exclude={"p3"})
    keys = [k for k, _, _ in got]
    assert len(keys) == 7 and "A" not in keys and "p3" not in keys and len(set(keys)) == 7


def test_scored_retrieval_ranks_a_rare_items_steady_complement_above_a_popular_items_occasional_one() -> None:
    # A is in 200 orders, Y in 30 of them; R is in 10 orders, X in all of them. Summed co-purchases put Y first
    # (30 against 10); the confidence P(neighbour | basket item) puts X first (10/30 against 30/220).
    r = retriever()
    for i in range(200):
        r.observe_order(order(["A", "Y"] if i < 30 else ["A", f"n{i}"], f"a{i}"), None, T0 + i)
    for i in range(10):
        r.observe_order(order(["R", "X"], f"r{i}"), None, T0 + 300 + i)
    got = r.retrieve_scored(["A", "R"], None, T0 + 400, 20, 0, 0, 5)
    keys = [k for k, _, _ in got]
    assert keys[:2] == ["X", "Y"]
    x_line = got[0][2]
    assert "cf:0.3" in x_line and "sc:" in x_line and "lc:" in x_line


def test_scored_retrieval_builds_suffixes_only_for_the_candidates_it_returns() -> None:
    r = retriever()
    for i in range(40):
        r.observe_order(order(["A", f"p{i}"], f"o{i}"), None, T0 + i)
    few = r.retrieve_scored(["A"], None, T0 + 60, 40, 0, 0, 3)
    many = r.retrieve_scored(["A"], None, T0 + 60, 40, 0, 0, 40)
    assert len(few) == 3 and few == many[:3]  # the cut takes the best of the same merge


def test_cache_refresh_follows_the_given_clock_not_the_machines() -> None:
    # Issue 14 (reproducible seeded runs): a cached neighbour list or popularity top list is rebuilt when the
    # retriever's clock (Kassa's, simulated in the bench) says it is stale, however fast the machine runs.
    now = [T0]
    r = ProductRetriever(refresh_seconds=10.0, clock=lambda: now[0])
    r.observe_order(order(["A", "B"], "o1"), None, T0)
    assert keys_of(r.retrieve(["A"], None, T0, 5, 0, 5, 5)) == ["B"]  # first read builds the caches
    for i in range(5):
        r.observe_order(order(["A", "C"], f"c{i}"), None, T0 + i)
    # the clock has not moved: the cached lists stay as built, whatever wall time passed
    assert keys_of(r.retrieve(["A"], None, T0, 5, 0, 0, 5), "co_purchase") == ["B"]
    assert keys_of(r.retrieve(["Z"], None, T0, 0, 0, 5, 5), "popular") == ["A", "B"]
    now[0] = T0 + 10.0  # stale on the given clock: rebuilt
    assert keys_of(r.retrieve(["A"], None, T0, 5, 0, 0, 5), "co_purchase") == ["C", "B"]
    assert keys_of(r.retrieve(["Z"], None, T0, 0, 0, 5, 5), "popular") == ["A", "C", "B"]
    for i in range(5):
        r.observe_order(order(["A", "D"], f"d{i}"), None, T0 + 20 + i)
    now[0] = T0  # a clock that steps back counts as stale too, rather than freezing the caches
    assert keys_of(r.retrieve(["A"], None, T0, 5, 0, 0, 5), "co_purchase")[0] in ("C", "D")
    assert "D" in keys_of(r.retrieve(["A"], None, T0, 5, 0, 0, 5), "co_purchase")
