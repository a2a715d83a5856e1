"""Probabilities, reward joining, learning from outcomes and model swaps under load."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import msgspec
import numpy as np
import pytest

from kassa import schemas
from kassa.decide.policy import GreedyEpsilonPolicy, PmfPolicy, UniformPolicy, fill_slots
from kassa.events.decision_log import read_decisions
from kassa.events.join import PendingDecision
from kassa.learn.online.learner import OnlineLearner
from kassa.learn.online.rewards import RewardJoiner
from kassa.learn.serving.loader import load_serving
from tests.conftest import ADMIN, decision_body, order


@pytest.mark.parametrize("policy", [PmfPolicy([0.5, 0.2, 0.2, 0.1]), GreedyEpsilonPolicy([4, 3, 2, 1], 0.2),
                                    UniformPolicy(4)])
def test_slot_probabilities_are_the_sampling_distribution(policy):
    # Every slot's pmf sums to 1, and the empirical frequency of the first slot matches its pmf.
    rng = random.Random(3)
    counts = [0] * 4
    n = 20_000
    for _ in range(n):
        r = fill_slots(policy, 4, 2, rng)
        counts[r.chosen[0]] += 1
        assert len(set(r.chosen)) == 2
        assert all(0 < p <= 1 for p in r.probabilities)
    pmf = policy.slot_pmf([0, 1, 2, 3])
    assert sum(pmf) == pytest.approx(1.0)
    for i in range(4):
        assert counts[i] / n == pytest.approx(pmf[i], abs=0.015)


def test_second_slot_probability_is_conditional_on_the_first():
    ranking = fill_slots(PmfPolicy([0.7, 0.2, 0.1]), 3, 2, random.Random(0))
    first = ranking.chosen[0]
    rest = [i for i in range(3) if i != first]
    pmf = [0.7, 0.2, 0.1]
    assert ranking.probabilities[1] == pytest.approx(pmf[ranking.chosen[1]] / sum(pmf[i] for i in rest))


def test_decisions_are_logged_with_features_candidates_and_probabilities(client, kassa):
    ids = [client.post("/v1/decisions", json=decision_body(limit=2)).json()["decision_id"] for _ in range(5)]
    kassa.decision_log.flush()
    table = read_decisions(kassa.settings.data_path, placement="order_confirmation")
    rows = {r["decision_id"]: r for r in table.to_pylist()}
    assert set(ids) <= set(rows)
    row = rows[ids[0]]
    assert sum(row["probabilities"]) == pytest.approx(1.0)
    assert len(row["probabilities"]) == len(row["candidates"]) >= 2
    assert len(row["chosen"]) == len(row["chosen_probabilities"]) == 2
    features = msgspec.json.decode(row["features_json"])
    assert features["device"] == "mobile" and features["country"] == "US" and features["total_b"] == "50-100"


def _pending(decision_id: str, ts: float, offers=("a", "b"), customer=None, keys=(None, None)) -> PendingDecision:
    return PendingDecision(decision_id, "p", ts, ts + 60, "shared |c x", list(offers), [" |o id=a", " |o id=b"],
                           [0.5, 0.5], customer, list(keys))


def test_reward_joining_inside_the_wait_and_default_after():
    definition = schemas.RewardDefinition(weights={"accept": 1.0, "click": 0.25, "conversion": "value"},
                                          wait_seconds=60, default=-0.01, cap=10)
    joiner = RewardJoiner(lambda _p: definition)
    joiner.register(_pending("d1", 0.0))
    joiner.register(_pending("d2", 0.0, customer="c", keys=("SKU-A", None)))
    ev = schemas.Event
    assert joiner.observe(ev("1", "click", decision_id="d1", offer_id="a")) == 1
    assert joiner.observe(ev("2", "accept", decision_id="d1", offer_id="a")) == 1
    assert joiner.observe(ev("3", "accept", decision_id="d1", offer_id="zzz")) == 0  # not shown
    # an order for the same customer that buys a shown product is a conversion of that offer (capped)
    buy = schemas.Order(id="o1", items=[schemas.OrderItem(sku="SKU-A", price=30.0, qty=1)])
    assert joiner.observe(ev("4", "order", customer=schemas.Customer(id="c"), order=buy)) == 1
    assert joiner.expire(59.9) == []  # still inside the wait
    examples = {(e.decision_id, e.offer_id): e for e in joiner.expire(60.0)}
    assert examples[("d1", "a")].reward == pytest.approx(1.25)
    assert examples[("d1", "b")].reward == -0.01  # default: nothing happened
    assert examples[("d2", "a")].reward == 10  # 30 of conversion value, capped at 10
    assert examples[("d1", "a")].probability == 0.5 and examples[("d1", "a")].slot == 0
    # an outcome after the wait is late: counted, not learned
    assert joiner.observe(ev("5", "accept", decision_id="d1", offer_id="a")) == 0
    assert joiner.late_events == 1 and len(joiner) == 0


def test_outcomes_through_the_api_are_learned_after_the_wait(client, kassa, clock):
    body = decision_body(order=order(80, "US", ("electronics",)), limit=1)
    for i in range(12):
        d = client.post("/v1/decisions", json=body).json()
        top = d["offers"][0]["offer_id"]
        events = [{"event_id": f"i{i}", "type": "impression", "decision_id": d["decision_id"], "offer_id": top}]
        if top == "discount":
            events.append({"event_id": f"a{i}", "type": "accept", "decision_id": d["decision_id"],
                           "offer_id": top})
        client.post("/v1/events", json={"events": events})
    assert len(kassa.joiner) == 12 and kassa.learning.step() == 0  # wait not over
    clock.advance(61)
    assert kassa.learning.step() == 12
    learner = kassa.learning.learners["order_confirmation"]
    assert learner.rewarded_decisions == 12
    kassa.learning.snapshot_due(force=True)
    d = client.post("/v1/decisions", json=body).json()
    assert d["model_version"] == "order_confirmation@1"


def test_learned_policy_prefers_what_buyers_accept(client, kassa, clock):
    """Buyers in the US accept the discount, buyers in CA the partner offer: the model must find both."""
    rng = random.Random(1)
    for round_ in range(6):
        for i in range(150):
            country = rng.choice(["US", "CA"])
            d = client.post("/v1/decisions", json=decision_body(
                customer=f"c{i}", order=order(20, country, ("toys",)), limit=1)).json()
            top = d["offers"][0]["offer_id"]
            wanted = "discount" if country == "US" else "partner-us"
            if top == wanted and rng.random() < 0.8:
                client.post("/v1/events", json={"events": [{"event_id": f"{round_}-{i}", "type": "accept",
                                                            "decision_id": d["decision_id"], "offer_id": top}]})
        clock.advance(61)
        kassa.learning.step()
        kassa.learning.snapshot_due(force=True)
    wins = {"US": 0, "CA": 0}
    for country in wins:
        for i in range(100):
            d = client.post("/v1/decisions", json=decision_body(
                customer=f"x{i}", order=order(20, country, ("toys",)), limit=1)).json()
            assert d["model_version"].startswith("order_confirmation@")
            wins[country] += d["offers"][0]["offer_id"] == ("discount" if country == "US" else "partner-us")
    assert wins["US"] >= 80 and wins["CA"] >= 80, wins


def _stop_background_learning(kassa) -> None:
    """Cancel the app's learning task (it runs on the test client's loop, another thread), so that only the test
    expires, learns and snapshots: a tick of it between `clock.advance` and the test's own call would take them."""
    tasks = [t for t in kassa._tasks if t.get_name() == "kassa-learning"]
    for t in tasks:
        t.get_loop().call_soon_threadsafe(t.cancel)
    deadline = time.monotonic() + 5
    while not all(t.done() for t in tasks) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tasks and all(t.done() for t in tasks)


def _broken_and_fine(client, kassa, n: int) -> None:
    """Placements "broken" and "fine" with ``n`` accepted decisions each, the app's own learning task stopped."""
    _stop_background_learning(kassa)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    for placement in ("broken", "fine"):
        body = {"id": placement, "slots": 1, "offers": ["discount", "warranty"], "min_learned_decisions": 5,
                "reward": {"weights": {"accept": 1.0}, "wait_seconds": 60}}
        assert client.put(f"/v1/placements/{placement}", json=body, headers=admin).status_code == 201
        for i in range(n):
            d = client.post("/v1/decisions", json=decision_body(placement=placement, customer=f"{placement}{i}")).json()
            client.post("/v1/events", json={"events": [{"event_id": f"{placement}-{i}", "type": "accept",
                                                        "decision_id": d["decision_id"],
                                                        "offer_id": d["offers"][0]["offer_id"]}]})


def test_a_placement_whose_snapshot_fails_does_not_stop_the_others(client, kassa, clock, caplog):
    """A learner whose weights are NaN (a reward beyond VW's 32-bit floats) cannot be exported. Its failure
    stopped every later placement's snapshot and the guardrails and registry poll of each 50 ms tick, and was
    logged again on every tick; now the others publish and it is tried again at the snapshot cadence."""
    _broken_and_fine(client, kassa, 6)
    clock.advance(61)
    kassa.learning.learner("broken")  # first in the learners' order
    for ex in kassa.joiner.expire(kassa.clock(), 1000):
        # a reward VW reads as -inf (its fixed weight scale is 1): the broken learner's weights become NaN
        kassa.learning.learner(ex.placement).learn(ex.shared, ex.action,
                                                   1e308 if ex.placement == "broken" else ex.reward, 1.0)
    with caplog.at_level("ERROR", logger="kassa.learn"):
        assert kassa.learning.snapshot_due(force=True) == ["fine"]
        assert kassa.learning.snapshot_due(clock()) == []  # not tried again on the next tick
    assert sum("snapshot of broken failed" in r.getMessage() for r in caplog.records) == 1
    assert kassa.models.get("fine").version == "fine@1" and kassa.models.get("broken") is None


def test_an_example_a_learner_raises_on_is_skipped_and_the_batch_others_are_learned(client, kassa, clock, caplog):
    """The joiner has already expired a batch when `step` learns it: an exception from one example's learner used to
    end the step and lose every later example of the batch, for every placement."""
    _broken_and_fine(client, kassa, 4)
    broken = kassa.learning.learner("broken")
    fine = kassa.learning.learner("fine")

    def fail(*args, **kwargs):
        raise RuntimeError("simulated learner failure")

    broken.learn = fail  # type: ignore[method-assign]
    clock.advance(61)
    with caplog.at_level("ERROR", logger="kassa.learn"):
        assert kassa.learning.step() == 8
    assert fine.rewarded_decisions == 4  # all of "fine", whatever the batch's order
    assert kassa.learning.failed_examples == 4
    assert sum("learning an example of broken failed" in r.getMessage() for r in caplog.records) == 1


def _train_one_snapshot(client, kassa, clock, n=10):
    for i in range(n):
        d = client.post("/v1/decisions", json=decision_body(customer=f"t{i}")).json()
        client.post("/v1/events", json={"events": [{"event_id": f"t{kassa.models.swaps}-{i}", "type": "accept",
                                                    "decision_id": d["decision_id"],
                                                    "offer_id": d["offers"][0]["offer_id"]}]})
    clock.advance(61)
    kassa.learning.step()
    return kassa.learning.publish("order_confirmation", kassa.learning.learner("order_confirmation"))


def test_model_swap_during_a_request_does_not_mix_versions(client, kassa, clock):
    """A swap that lands while a decision awaits the feature store must not leak into that response."""
    old = _train_one_snapshot(client, kassa, clock)
    body = decision_body(limit=3)
    real_read = kassa.store.read
    swapped = []

    async def read_and_swap(keys, views=None):
        rows = await real_read(keys, views)
        if not swapped:
            swapped.append(_train_one_snapshot_sync(kassa))
        await asyncio.sleep(0)
        return rows

    kassa.store.read = read_and_swap  # type: ignore[method-assign]
    d = client.post("/v1/decisions", json=body).json()
    assert swapped and kassa.models.get("order_confirmation").version == swapped[0].version
    # the response came wholly from the model it started with: its version and its scores
    assert d["model_version"] == old.version
    from kassa.features.featurize import shared_line
    from kassa.features.request import request_features

    req = msgspec.convert(body, schemas.DecisionRequest)
    feats = request_features(req, clock(), "UTC", None)
    feats.update({"customer_signals.ltv": 0.0, "customer_signals.segment": "unknown",  # the view defaults
                  "customer_activity.orders_1h": 0, "customer_activity.spend_7d": 0.0})
    snap = kassa.catalog.snapshot
    kept = [o for o in snap.placements["order_confirmation"].static_offers]
    from kassa.decide.rules import OrderFacts, eligible

    facts = OrderFacts.of(req)
    kept = [o for o in kept if eligible(snap.offers[o], facts, clock(), "c-1", None) is None]
    pmf = old.pmf(shared_line(feats), [snap.action_lines[o] for o in kept])
    by_offer = dict(zip(kept, pmf, strict=True))
    for o in d["offers"]:
        assert o["score"] == pytest.approx(by_offer[o["offer_id"]], abs=1e-6)


def _train_one_snapshot_sync(kassa):
    learner = kassa.learning.learner("order_confirmation")
    learner.learn("shared |c x", " |o id=discount", 1.0, 0.5)
    return kassa.learning.publish("order_confirmation", learner)


def test_model_swaps_under_concurrent_requests_never_fail(settings, clock):
    """Real server, four client threads, 20 swaps: every answer is 200 and names a published version."""
    import http.client
    import socket

    from kassa.app import Kassa
    from kassa.server import BackgroundServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = msgspec.structs.replace(settings, server=msgspec.structs.replace(settings.server, port=port))
    kassa = Kassa(settings, clock=clock)
    # The client threads share this process's GIL with the server; a generous budget keeps GIL waits
    # from turning answers into (honest) fallbacks, which is not what this test is about.
    placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
    kassa.catalog.put_placement(msgspec.structs.replace(placement, latency_budget_ms=60_000))
    learner = kassa.learning.learner("order_confirmation")
    for _ in range(10):
        learner.learn("shared |c x", " |o id=discount", 1.0, 0.5)
    learner.rewarded_decisions = 100
    versions = {kassa.learning.publish("order_confirmation", learner).version}
    server = BackgroundServer(settings, kassa).start()
    statuses: list[int] = []
    seen: set[str] = set()
    stop = threading.Event()
    body = msgspec.json.encode(decision_body())
    from tests.conftest import PUB

    def hammer():
        conn = http.client.HTTPConnection("127.0.0.1", port)
        while not stop.is_set():
            conn.request("POST", "/v1/decisions", body, {"Authorization": f"Bearer {PUB}"})
            r = conn.getresponse()
            payload = r.read()
            statuses.append(r.status)
            if r.status == 200:
                seen.add(msgspec.json.decode(payload)["model_version"])

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(20):
            learner.learn("shared |c x", " |o id=discount", 1.0, 0.5)
            # publish from the server's own loop, as the learning task does
            fut = asyncio.run_coroutine_threadsafe(_publish(kassa, learner), _server_loop(server))
            versions.add(fut.result(timeout=10))
    finally:
        stop.set()
        for t in threads:
            t.join()
        server.stop()
    assert len(statuses) > 50 and set(statuses) == {200}
    assert seen <= versions and len(seen) > 1


async def _publish(kassa, learner) -> str:
    await asyncio.sleep(0.01)
    return kassa.learning.publish("order_confirmation", learner).version


def _server_loop(server):
    assert server.loop is not None
    return server.loop


def test_past_the_budget_the_answer_is_the_fallback_ranking(client, kassa):
    placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
    kassa.catalog.put_placement(msgspec.structs.replace(placement, latency_budget_ms=1e-6))  # 1 ns: always past
    d = client.post("/v1/decisions", json=decision_body(order=order(80, "US", ("electronics",)), limit=3)).json()
    assert d["fallback"] is True and d["model_version"] == "fallback"
    # the fallback ranking: eligible offers by value, deterministic
    assert [o["offer_id"] for o in d["offers"]] == ["warranty", "serum-upsell", "discount"]
    assert all(o["probability"] == 1.0 for o in d["offers"])


def test_a_failing_feature_store_degrades_to_the_fallback_not_an_error(client, kassa):
    async def broken(keys, views=None):
        raise ConnectionError("store down")

    kassa.store.read = broken  # type: ignore[method-assign]
    r = client.post("/v1/decisions", json=decision_body())
    assert r.status_code == 200 and r.json()["fallback"] is True and r.json()["offers"]
    # guests without a session need no store read and are unaffected
    assert client.post("/v1/decisions", json=decision_body(customer=None)).json()["fallback"] is False


@pytest.mark.parametrize("policy", [PmfPolicy([0.6, 0.25, 0.1, 0.05], "greedy"), PmfPolicy([0.6, 0.25, 0.1, 0.05]),
                                    GreedyEpsilonPolicy([1, 4, 2, 3], 0.3),
                                    PmfPolicy([0.7, 0.1, 0.1, 0.1], "greedy", costs=[0.0, 3.0, 1.0, 2.0])])
def test_later_slots_follow_the_stated_conditional_distribution(policy):
    """Given slot 1, slot 2's empirical frequencies match `slot_pmf` of the remaining candidates."""
    rng = random.Random(5)
    first, counts, n = 0, [0] * 4, 0
    while n < 20_000:
        r = fill_slots(policy, 4, 2, rng)
        if r.chosen[0] != first:
            continue
        n += 1
        counts[r.chosen[1]] += 1
        remaining = [1, 2, 3]
        assert r.probabilities[1] == pytest.approx(policy.slot_pmf(remaining)[remaining.index(r.chosen[1])])
    expected = policy.slot_pmf([1, 2, 3])
    assert sum(expected) == pytest.approx(1.0)
    for j, i in enumerate([1, 2, 3]):
        assert counts[i] / n == pytest.approx(expected[j], abs=0.015)


def test_where_an_epsilon_greedy_pmf_ties_later_slots_go_to_the_next_best_by_cost_not_the_first_listed():
    pmf = [0.025, 0.025, 0.9, 0.025, 0.025]  # ε-greedy (and UCB): every action but the best at ε/k
    costs = [0.5, 0.4, 0.1, 0.2, 0.3]
    ranked = PmfPolicy(pmf, "greedy", costs)
    assert ranked.order == [2, 3, 4, 1, 0]
    assert PmfPolicy(pmf, "greedy").order == [2, 0, 1, 3, 4]  # what slots 2+ followed before: listing order
    # slot 2 given slot 1 = the best: the removed mass goes to the next best by cost, in sampling and in its pmf
    remaining = [0, 1, 3, 4]
    assert ranked.slot_pmf(remaining) == pytest.approx([0.025, 0.025, 0.925, 0.025])
    assert ranked.sample({2}, 0.5)[2] == 3
    greedy_slates = [fill_slots(ranked, 5, 3, random.Random(s)).chosen for s in range(200)]
    assert sum(c == [2, 3, 4] for c in greedy_slates) > 150  # ~0.9 x 0.925 x 0.95 of them


def test_a_number_far_outside_what_the_learner_saw_does_not_take_over_the_scores(tmp_path) -> None:
    # Amounts in cents learned from at 1,000-20,000, then scored at 1e9: linear in the raw number, the scores
    # reached ~3e3 (0.3 in range) and the pmf put 1.0 on one offer for every buyer, the wrong one on desktop.
    from kassa.features.featurize import action_line, shared_line, tokens

    offers = [schemas.Offer(id=f"o{i}", kind="partner", title=f"O{i}") for i in range(4)]
    actions = [action_line(o) for o in offers]
    accept = {"mobile": [0.30, 0.10, 0.05, 0.05], "desktop": [0.05, 0.10, 0.30, 0.05]}
    rng = random.Random(0)
    learner = OnlineLearner(schemas.Placement(id="p", slots=1), tmp_path)
    for _ in range(1000):  # logged uniformly
        device, k = rng.choice(list(accept)), rng.randrange(4)
        learner.learn(shared_line({"device": device, "amount": rng.randint(1_000, 20_000)}), actions[k],
                      float(rng.random() < accept[device][k]), 0.25)
    model = load_serving(*learner.snapshot(), {"rewarded_decisions": 1000})
    for device, best in (("mobile", 0), ("desktop", 2)):
        shared = shared_line({"device": device, "amount": 10**9})
        assert np.abs(model.scores(shared, actions)).max() < 2
        assert np.argmax(model.pmf(shared, actions)) == best
    # past ±100 a number is log-compressed, continuously (the same at the bound and just past it)
    assert tokens({"cents": 1e9, "refund": -1e3, "n": 100, "m": 100.001, "rate": 0.25}) == [
        "cents:1711.81", "refund:-330.259", "n:100", "m:100.001", "rate:0.25"]


def test_numeric_features_past_the_write_bound_never_reach_the_learner() -> None:
    # Feature writes refuse magnitudes past ±1e15, batch sources are not checked: a served value of 1e30 would
    # leave VW's weight for it infinite (and every score NaN), so such values are left out like NaN and 0.
    import math

    import vowpalwabbit

    from kassa.features.featurize import shared_line, tokens

    assert tokens({"ltv": 1e30, "n": -(10**18), "nan": float("nan"), "inf": float("inf"), "zero": 0,
                   "spend": 1e15, "items": -3}) == ["spend:3093.36", "items:-3"]  # log-compressed past ±100
    ws = vowpalwabbit.Workspace("--cb_explore_adf -q co --quiet", enable_logging=False)
    try:
        line = shared_line({"ltv": 1e30, "device": "mobile"})
        ws.learn(f"{line}\n0:-1:0.5 |o id=a\n |o id=b")
        pmf = ws.predict(f"{line}\n |o id=a\n |o id=b")
        assert all(math.isfinite(p) for p in pmf) and abs(sum(pmf) - 1.0) < 1e-6
    finally:
        ws.finish()
