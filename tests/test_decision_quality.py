"""Issue 14: the learner sees why a candidate was retrieved, the baseline is worth beating, rewards reach the
learner on a known scale, evaluation refuses small samples, and runs are reproducible."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
from starlette.testclient import TestClient

from kassa import schemas
from kassa.api.app import create_app
from kassa.app import Kassa
from tests.conftest import PUB, Clock, decision_body, order


def _orders(kassa: Kassa, clock: Clock) -> None:
    # p-1 (serum) and p-2 (cleanser) are bought together; c-1 buys the cleanser every week.
    for i in range(6):
        clock.advance(7 * 86_400.0)
        kassa.retriever.observe_order(schemas.Order(id=f"o{i}", items=[
            schemas.OrderItem(sku="SERUM-C", product_id="p-1"), schemas.OrderItem(sku="CLEANSER", product_id="p-2"),
        ]), f"other{i}", clock())
        kassa.retriever.observe_order(schemas.Order(id=f"r{i}", items=[
            schemas.OrderItem(sku="CLEANSER", product_id="p-2")]), "c-1", clock() + 60)
    clock.advance(7 * 86_400.0)


def _decide(kassa: Kassa, body: dict) -> schemas.DecisionResponse:
    return asyncio.run(kassa.engine.decide(msgspec.convert(body, schemas.DecisionRequest)))


def test_retrieval_signals_reach_the_action_lines_and_the_decision_log(kassa: Kassa, clock: Clock) -> None:
    _orders(kassa, clock)
    res = _decide(kassa, decision_body("cross_sell", order={"id": "q1", "items": [
        {"sku": "SERUM-C", "product_id": "p-1"}]}))
    assert [o.offer_id for o in res.offers] == ["cleanser"]
    assert res.offers[0].score > 0  # the retrieval score is the baseline's score
    pending = next(iter(kassa.joiner._pending.values()))
    assert " |r " in pending.actions[0] and "s_co" in pending.actions[0] and "due=yes" in pending.actions[0]
    log = kassa.decision_log
    assert log is not None
    rec = log.find_unwritten(res.decision_id)
    assert rec is not None and rec.candidate_signals is not None
    assert rec.candidate_signals[rec.candidates.index("cleanser")] in pending.actions[0]


def test_rewards_reach_the_learner_with_a_typical_outcome_worth_about_one() -> None:
    from kassa.learn.online.learner import RewardScale

    fixed = RewardScale(schemas.RewardDefinition(weights={"accept": 2.0, "click": 0.2}))
    assert fixed(2.0) == 1.0 and fixed(0.0) == 0.0
    by_value = RewardScale(schemas.RewardDefinition(weights={"conversion": "value"}, cap=1000.0))
    assert by_value(0.0) == 0.0  # before any outcome: unscaled
    assert by_value(30.0) == 1.0  # the first outcome sets the mean
    by_value(10.0)
    assert by_value.scale == 20.0
    restored = RewardScale.restore(schemas.RewardDefinition(weights={"conversion": "value"}), by_value.state())
    assert restored.scale == 20.0
    batch = RewardScale.of(schemas.RewardDefinition(weights={"conversion": "value"}), [[30.0, 0.0], [10.0]])
    assert batch.scale == 20.0


def test_the_learner_regresses_rewards_unweighted_by_the_probability_they_were_shown_with(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # An offer explored at p = 0.005 learns from its accepts exactly as one shown at p = 1 (ADR 0010 addendum):
    # an importance weight of 200 made one explored outcome swing that offer's estimate and the policy chased it.
    from kassa.learn.online.learner import OnlineLearner
    from kassa.learn.serving.linear import LinearModel

    placement = schemas.Placement(id="p", slots=1)
    scores = []
    for name, p in (("explored", 0.005), ("chosen", 1.0)):
        learner = OnlineLearner(placement, tmp_path / name)
        for accepted in (1.0, 0.0, 1.0):
            learner.learn("shared |c device=m", " |o id=a", accepted, p)
        path, version = learner.snapshot()
        scores.append(LinearModel.open(path, version).scores("shared |c device=m", [" |o id=a", " |o id=b"]))
    assert scores[0].tolist() == scores[1].tolist()
    assert scores[0][0] < scores[0][1]  # the accepted offer learned a lower cost than one never shown


def test_the_same_seed_serves_the_same_offers_to_the_same_requests(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def run(seed: int, name: str) -> list[list[tuple[str, float]]]:
        kassa = Kassa(msgspec.structs.replace(settings, data_dir=str(tmp_path / name)), clock=Clock(), seed=seed)
        out = []
        for i in range(40):
            res = _decide(kassa, decision_body(customer=f"c{i}"))
            out.append([(o.offer_id, o.probability) for o in res.offers])
        return out

    assert run(3, "a") == run(3, "b")
    assert run(3, "c") != run(4, "d")


# ------------------------------------------------------------------ the publish guard
class _Fixed:
    """A scorer with a fixed pmf over every candidate list (first candidate gets ``p``)."""

    def __init__(self, p: float) -> None:
        self.p = p

    def pmf(self, shared: str, action_lines: list[str]) -> list[float]:
        rest = (1.0 - self.p) / (len(action_lines) - 1)
        return [self.p] + [rest] * (len(action_lines) - 1)


def _guard_rows(guard, n: int, reward_of_first: float) -> None:  # type: ignore[no-untyped-def]
    from kassa.events.join import JoinedExample

    rng = random.Random(5)
    for i in range(n):
        shown = 0 if rng.random() < 0.5 else 1  # logged uniformly over two candidates
        reward = reward_of_first if shown == 0 else 0.5
        guard.observe(JoinedExample("p", f"d{i}", "shared |c x", "", "o", reward, 0.5, 0, "v",
                                    [" |o a", " |o b"], shown))


def test_the_publish_guard_holds_a_snapshot_worse_than_production_and_passes_a_better_one() -> None:
    from kassa.learn.online.guard import PublishGuard

    guard = PublishGuard(window=1000, min_ess=50)
    _guard_rows(guard, 1000, reward_of_first=1.0)  # the first candidate is better
    better = guard.check("p", _Fixed(0.9), _Fixed(0.1))
    assert better.publish and better.value_new is not None and better.value_serving is not None
    assert better.value_new > better.value_serving
    worse = guard.check("p", _Fixed(0.1), _Fixed(0.9))
    assert not worse.publish and worse.kind == "worse"
    assert worse.reason.startswith("held: worse than production")
    baseline = guard.check("p", _Fixed(0.9), None)  # the baseline is the logging policy: its mean is its value
    assert baseline.publish and baseline.value_serving == pytest.approx(0.75, abs=0.05)


def test_the_publish_guard_holds_below_the_minimum_ess_and_says_so() -> None:
    from kassa.learn.online.guard import PublishGuard

    guard = PublishGuard(window=1000, min_ess=50)
    _guard_rows(guard, 20, reward_of_first=1.0)
    v = guard.check("p", _Fixed(0.9), None)
    assert not v.publish and v.kind == "ess" and "below the minimum 50" in v.reason


def _learn_rounds(client, kassa: Kassa, clock: Clock, rounds: int = 6) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    for round_ in range(rounds):
        for i in range(150):
            country = rng.choice(["US", "CA"])
            d = client.post("/v1/decisions", json=decision_body(
                customer=f"c{i}", order=order(20, country, ("toys",)), limit=1)).json()
            top = d["offers"][0]["offer_id"]
            if top == ("discount" if country == "US" else "partner-us") and rng.random() < 0.8:
                client.post("/v1/events", json={"events": [{"event_id": f"{round_}-{i}", "type": "accept",
                                                            "decision_id": d["decision_id"], "offer_id": top}]})
        clock.advance(61)
        kassa.learning.step()
        kassa.learning.snapshot_due(force=True)


def _guarded(settings, clock: Clock, min_ess: float) -> Kassa:  # type: ignore[no-untyped-def]
    guard = msgspec.structs.replace(settings.learn.guard, enabled=True, min_ess=min_ess)
    learn = msgspec.structs.replace(settings.learn, guard=guard)
    return Kassa(msgspec.structs.replace(settings, learn=learn), clock=clock, seed=7)


def test_continuous_learning_publishes_snapshots_that_beat_the_baseline(settings, clock) -> None:  # type: ignore[no-untyped-def]
    kassa = _guarded(settings, clock, 20.0)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        _learn_rounds(client, kassa, clock, rounds=10)
        served = kassa.models.get("order_confirmation")
        assert served is not None  # held while its ESS was below 20, published once it was not
        assert served.meta["guard_value"] > 0.2, served.meta  # the value baseline's logged reward was ~0.011


def test_a_held_snapshot_stays_a_candidate_with_its_reason_and_is_counted(settings, clock) -> None:  # type: ignore[no-untyped-def]
    kassa = _guarded(settings, clock, 1e9)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        _learn_rounds(client, kassa, clock, rounds=2)
        assert kassa.models.get("order_confirmation") is None  # the baseline keeps serving
        versions = kassa.model_registry.versions("order_confirmation")
        assert versions and all(v.stage == "candidate" for v in versions)
        assert "held: ESS" in kassa.model_registry.history(version=versions[0].version, limit=1)[0].reason
        metrics = client.get("/metrics").text
        assert 'kassa_snapshots_held_total{placement="order_confirmation",reason="ess"}' in metrics


# ------------------------------------------------------------------ honest small-sample evaluation
def test_small_sample_intervals_stay_inside_the_reward_range_and_the_gate_refuses_them() -> None:
    import numpy as np

    from kassa.learn.offline import ope

    rng = np.random.default_rng(0)
    n = 60
    reward = (rng.random(n) < 0.3).astype(float)
    logged = np.full(n, 0.05)
    target = np.where(rng.random(n) < 0.1, 1.0, 0.0)  # the candidate agrees with a handful of rows
    ev = ope.evaluate_policies(reward, logged, {"cand": target, "prod": np.full(n, 0.05)},
                               reward_range=(0.0, 1.0))
    est = ev.estimate("cand", "ips")
    assert 0.0 <= est.ci_low <= est.ci_high <= 1.0
    verdict = ope.gate(est, ev.estimate("prod", "ips"), min_ess=100)
    assert not verdict.passed and "below the minimum 100" in verdict.reason


def test_an_estimate_outside_the_reward_range_is_clamped_into_its_interval() -> None:
    """IPS with large weights on accepted rows, and DR with a reward model that overshoots, estimate values no
    policy can have; the estimate was left outside its clipped interval (DR -0.0005 beside [0.0000, 0.0889])."""
    import numpy as np

    from kassa.learn.offline import ope

    n = 50
    logged = np.r_[np.full(10, 0.1), np.full(n - 10, 0.2)]
    target = np.r_[np.ones(10), np.zeros(n - 10)]  # weight 10 on the first ten rows, 0 elsewhere
    for reward, q_logged, name, raw_value, clamped in (
            (np.r_[np.ones(10), np.zeros(n - 10)], np.zeros(n), "ips", 2.0, 1.0),  # 10 * 10 / 50
            (np.zeros(n), np.full(n, 0.9), "dr", 0.1 - 1.8, 0.0)):  # 0.1 + 10 * 10 * (0 - 0.9) / 50
        kw = {"q_logged": q_logged, "q_targets": {"cand": np.full(n, 0.1)}}
        raw = ope.evaluate_policies(reward, logged, {"cand": target}, **kw)
        assert raw.estimate("cand", name).value == pytest.approx(raw_value)
        ev = ope.evaluate_policies(reward, logged, {"cand": target}, reward_range=(0.0, 1.0), **kw)
        for est_name in ("ips", "snips", "dr"):
            est = ev.estimate("cand", est_name)
            assert 0.0 <= est.ci_low <= est.value <= est.ci_high <= 1.0, (est_name, est)
        assert ev.estimate("cand", name).value == clamped


# ------------------------------------------------------------------ slates
def test_pseudo_inverse_matches_the_simulators_ground_truth_for_another_slate_policy() -> None:
    """Uniform logging of 3 slots out of 8 offers, a slot-additive reward with position bias (slot 2 is seen
    less than slot 1), a deterministic target ranking: the estimate is within 5 % of the true value."""
    import numpy as np

    from kassa.learn.offline import ope

    rng = np.random.default_rng(14)
    n, k, slots = 60_000, 8, 3
    ctx = rng.integers(0, 4, n)
    rel = rng.uniform(0.05, 0.6, (4, k))  # P(accept | context, offer) in slot 1
    pos = np.array([1.0, 0.6, 0.35])  # examination probability per slot
    target = np.argsort(-(rel + rng.normal(0, 0.08, rel.shape)), axis=1)[:, :slots]  # a ranking, not the best
    truth = float(np.mean([sum(rel[c, target[c, j]] * pos[j] for j in range(slots)) for c in ctx]))
    logged = np.array([rng.permutation(k)[:slots] for _ in range(n)])
    reward = np.array([sum(rng.random() < rel[c, a] * pos[j] for j, a in enumerate(row))
                       for c, row in zip(ctx, logged, strict=True)], dtype=float)
    est = ope.pseudo_inverse(reward, target[ctx], logged, k, reward_range=(0.0, float(slots)))
    assert abs(est.value - truth) / truth < 0.05, (est.value, truth)
    assert est.ci_low <= truth <= est.ci_high
    # Slot 1 alone (what the top-slot estimators evaluate) misses the rest of the slate's value.
    assert truth - float(np.mean([rel[c, target[c, 0]] for c in ctx])) > 0.1


def test_the_closed_form_slate_weights_equal_the_pseudo_inverse_of_the_uniform_logging_moment() -> None:
    import numpy as np

    from kassa.learn.offline import ope

    rng = np.random.default_rng(3)
    for m, slots in ((3, 3), (5, 2), (8, 3), (13, 3), (9, 4), (6, 1)):
        gram = ope._uniform_slate_gram_pinv(m, slots)
        offsets = np.arange(slots) * m
        target = np.array([rng.permutation(m)[:slots] for _ in range(300)])
        # Logged slates: random, the target itself, and the target's items in other slots.
        logged = np.array([rng.permutation(m)[:slots] if i % 3 == 0 else
                           (t if i % 3 == 1 else rng.permutation(t)) for i, t in enumerate(target)])
        ref = gram[(target + offsets)[:, :, None], (logged + offsets)[:, None, :]].sum(axis=(1, 2))
        got = ope.uniform_slate_weights(target, logged, np.full(300, m))
        np.testing.assert_allclose(got, ref, atol=1e-9)
        # Averaged over every logged slate a uniform logger could draw, the weight is 1.
        every = np.array([rng.permutation(m)[:slots] for _ in range(20_000)])
        assert abs(ope.uniform_slate_weights(np.repeat(target[:1], 20_000, 0), every,
                                             np.full(20_000, m)).mean() - 1.0) < 0.15


def test_pseudo_inverse_takes_each_rows_own_number_of_candidates() -> None:
    """Retrieved candidate sets differ per decision (here 6 to 30): with each row's own count the estimate
    stays within 5 % of the truth; pretending every row had the largest count does not."""
    import numpy as np

    from kassa.learn.offline import ope

    rng = np.random.default_rng(21)
    n, slots = 60_000, 3
    pos = np.array([1.0, 0.7, 0.5])
    m = rng.integers(6, 31, n)
    rel = rng.uniform(0.0, 0.1, (n, 30))
    rel[:, :3] = rng.uniform(0.3, 0.6, (n, 3))  # each row's best three candidates
    target = np.tile(np.arange(slots), (n, 1))  # the best three, in order
    truth = float((rel[:, :3] * pos).sum(axis=1).mean())
    logged = np.array([rng.permutation(k)[:slots] for k in m])
    p = rel[np.arange(n)[:, None], logged] * pos
    reward = (rng.random((n, slots)) < p).sum(axis=1).astype(float)
    est = ope.pseudo_inverse(reward, target, logged, m, reward_range=(0.0, 3.0))
    assert abs(est.value - truth) / truth < 0.05, (est.value, truth)
    assert est.ci_low <= truth <= est.ci_high
    wrong = ope.pseudo_inverse(reward, target, logged, 30)
    assert abs(wrong.value - truth) / truth > 0.2, (wrong.value, truth)
    with pytest.raises(ope.OPEInputError):
        ope.pseudo_inverse(reward, target, logged, np.full(n, 2))  # fewer candidates than slots
    with pytest.raises(ope.OPEInputError):
        ope.pseudo_inverse(reward[:10], np.full((10, 3), 7), logged[:10], np.full(10, 6))  # index >= count


def test_product_action_lines_carry_no_product_id(
        kassa: Kassa, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kassa.features.featurize import action_line

    snap = kassa.catalog.snapshot
    line = action_line(snap.offers["serum-upsell"])
    assert "serum-upsell" not in line and " |i " not in line and "cat=skincare" in line
    assert "id=warranty" in action_line(snap.offers["warranty"])  # other offers keep their id, crossed


def test_a_products_category_is_crossed_with_the_baskets_categories_only() -> None:
    # ADR 0010: a product's category crossed (-q co) with every context feature cost the product learner ~6 %
    # where categories carried no signal; it is linear in |k and crossed (-q bk) with the basket's categories.
    from kassa.features.featurize import action_line, shared_line
    from kassa.learn.offline.dataset import logged_shared_line
    from kassa.learn.online.learner import vw_args

    product = schemas.Offer(id="p1", kind="product", title="t", sku="p1", category="dairy", value=5.0)
    line = action_line(product)
    assert " |k cat=dairy" in line and "cat=" not in line.split(" |k ")[0]
    partner = schemas.Offer(id="w", kind="partner", title="t", category="dairy", value=5.0)
    assert " |k " not in action_line(partner) and "cat=dairy" in action_line(partner)  # crossed as before
    features = {"hour": "9", "cat": ["bakery", "dairy"], "prev_cat": ["fruit"], "guest": False}
    shared = shared_line(features)
    assert shared.startswith("shared |c ") and shared.endswith(" |b cat=bakery cat=dairy prev_cat=fruit")
    assert shared_line({"hour": "9"}) == "shared |c hour=9"  # no categories: no |b
    # batch training and OPE rebuild the same line from the decision log (lists logged joined with "|")
    assert logged_shared_line({"hour": "9", "cat": "bakery|dairy", "prev_cat": "fruit", "guest": False}) == shared
    placement = schemas.Placement(id="x", retrieval=schemas.Retrieval())
    assert " -q co -q bk --ignore_linear b " in f" {vw_args(placement)} "


def test_a_placements_context_features_are_all_its_learner_sees_and_its_log_records(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import CATALOG

    path = tmp_path / "narrow.yaml"
    path.write_text(CATALOG.replace("    min_learned_decisions: 5\n",
                                    "    min_learned_decisions: 5\n    context_features: [device, country]\n", 1))
    kassa = Kassa(msgspec.structs.replace(settings, catalog_file=str(path)), clock=Clock(), seed=1)
    res = _decide(kassa, decision_body())
    pending = kassa.joiner._pending[res.decision_id]
    assert pending.shared.split() == ["shared", "|c", "country=US", "device=mobile"]
    log = kassa.decision_log
    assert log is not None
    rec = log.find_unwritten(res.decision_id)
    assert rec is not None and set(rec.features) == {"country", "device"}
    # Unset (the default): every request feature, e.g. the basket's category and the hour
    res = _decide(kassa, decision_body(placement="cross_sell", order={"id": "q1", "items": [
        {"sku": "SERUM-C", "product_id": "p-1", "category": "beauty"}]}))
    rec = log.find_unwritten(res.decision_id)
    assert rec is not None and {"cat", "hour", "device"} <= set(rec.features)


def test_a_models_schema_hash_names_the_context_features_only_when_a_placement_narrows_them() -> None:
    from kassa.learn.registry import feature_schema_hash

    every = schemas.Placement(id="p")
    assert feature_schema_hash(every, None) == feature_schema_hash(schemas.Placement(id="p", slots=1), None)
    narrow = schemas.Placement(id="p", context_features=["device", "country"])
    assert feature_schema_hash(narrow, None) != feature_schema_hash(every, None)
    assert feature_schema_hash(narrow, None) == feature_schema_hash(
        schemas.Placement(id="p", context_features=["country", "device"]), None)


def _uniform_slate_reps(reps: int, n: int, seed: int):
    """``reps`` independent uniformly logged slate logs (3 slots of 8 offers, 4 contexts, position bias, each
    slot's accept drawn from its own offer) and a fixed target ranking: (per rep: reward, slot rewards,
    target, logged, context, truth)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    k, slots = 8, 3
    rel = rng.uniform(0.05, 0.6, (4, k))
    pos = np.array([1.0, 0.6, 0.35])
    ranking = np.argsort(-(rel + rng.normal(0, 0.08, rel.shape)), axis=1)[:, :slots]
    out = []
    for _ in range(reps):
        ctx = rng.integers(0, 4, n)
        logged = np.argsort(rng.random((n, k)), axis=1)[:, :slots]
        slot_reward = (rng.random((n, slots)) < rel[ctx[:, None], logged] * pos).astype(float)
        target = ranking[ctx]
        truth = float((rel[ctx[:, None], target] * pos).sum(axis=1).mean())
        out.append((slot_reward.sum(axis=1), slot_reward, target, logged, ctx, truth))
    return out


def test_slot_estimator_is_unbiased_and_narrower_than_pseudo_inverse_under_uniform_logging() -> None:
    """Over 200 independent logs of 2,000 uniformly logged slates: the per-slot estimate, plain and doubly
    robust (a cross-fitted per-slot model by offer and context), averages to the truth within 1 %, its 95 %
    interval covers the truth in about 95 % of logs, and it is narrower than PI's on the same rows."""
    import numpy as np

    from kassa.learn.offline import ope

    errors: dict[str, list[float]] = {"pi": [], "slot_ips": [], "slot_dr": []}
    covers = {name: 0 for name in errors}
    width = {name: 0.0 for name in errors}
    reps = _uniform_slate_reps(200, 2_000, seed=7)
    for reward, slot_reward, target, logged, ctx, truth in reps:
        keys = ctx[:, None] * 100
        g_t, g_l = ope.cross_fit_slot_model(slot_reward, keys + logged, keys + target)
        for est in (ope.pseudo_inverse(reward, target, logged, 8),
                    ope.slot_ips(slot_reward, target, logged, 8),
                    ope.slot_ips(slot_reward, target, logged, 8, g_target=g_t, g_logged=g_l)):
            name = "pi" if est.name == "pseudo_inverse" else est.name
            errors[name].append((est.value - truth) / truth)
            covers[name] += est.ci_low <= truth <= est.ci_high
            width[name] += (est.ci_high - est.ci_low) / len(reps)
    for name in ("slot_ips", "slot_dr"):
        assert abs(np.mean(errors[name])) < 0.01, (name, np.mean(errors[name]))
        assert 0.9 <= covers[name] / len(reps) <= 0.99, (name, covers[name])
        assert width[name] < 0.85 * width["pi"], (name, width)
    assert width["slot_dr"] < width["slot_ips"]


def test_slot_estimator_needs_each_slots_reward_to_come_from_its_own_item() -> None:
    """A reward the log credits to slot 1 whatever earned it (the slate's total is still additive): PI stays
    unbiased, the per-slot estimate does not, as its docstring warns."""
    import numpy as np

    from kassa.learn.offline import ope

    (reward, slot_reward, target, logged, _, truth), = _uniform_slate_reps(1, 60_000, seed=9)
    pooled = np.zeros_like(slot_reward)
    pooled[:, 0] = slot_reward.sum(axis=1)
    pi = ope.pseudo_inverse(reward, target, logged, 8)
    slot = ope.slot_ips(pooled, target, logged, 8)
    assert pi.ci_low <= truth <= pi.ci_high
    assert not slot.ci_low <= truth <= slot.ci_high and abs(slot.value - truth) / truth > 0.1, (slot, truth)
    with pytest.raises(ope.OPEInputError):
        ope.slot_ips(slot_reward, target, logged, 8, g_target=np.zeros_like(slot_reward))  # g_logged missing
    with pytest.raises(ope.OPEInputError):
        ope.slot_ips(slot_reward[:, :2], target, logged, 8)  # one reward per slot


def test_context_features_name_only_features_kassa_derives_or_feature_view_fields() -> None:
    from kassa.features.request import request_features

    # every name request_features can give, with every optional part of a request and a profile present
    req = msgspec.convert({"placement": "p", "customer": {"id": "c1"},
                           "order": {"id": "o1", "platform": "shopify", "currency": "EUR", "total": 50.0,
                                     "ship_country": "FR", "items": [{"sku": "s", "category": "tea", "price": 5.0}]},
                           "context": {"device": "mobile", "locale": "fr-FR"}}, schemas.DecisionRequest)
    profile = {"orders_count": 3, "spend_total": 120.0, "last_order_ts": 1.0e9, "recent_categories": ["tea"]}
    seen = set(request_features(req, 1.7e9, profile=profile)) | set(request_features(req, 1.7e9))
    assert seen == set(schemas.REQUEST_FEATURES)
    schemas.Placement(id="p", context_features=["device", "country", "signals.ltv"])  # view fields: not checked here
    with pytest.raises(ValueError, match=r"context_features: unknown feature 'devce'; the request features are "
                                         r"total, .*'view\.field'"):
        schemas.Placement(id="p", context_features=["devce"])
    # decoding a placement (what the API answers 422 with)
    with pytest.raises(msgspec.ValidationError, match="unknown feature 'Device'"):
        msgspec.json.decode(b'{"id": "p", "context_features": ["Device"]}', type=schemas.Placement)
