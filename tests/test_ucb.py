"""The UCB policy (`kassa.policies.UCB`): counts learned beside the weights, travelling in the sidecar, and a
bonus at serving equal to the sum over the same terms the learner counted."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import numpy as np
import pytest
import vowpalwabbit

from kassa import policies, schemas
from kassa.learn.online.learner import OnlineLearner
from kassa.learn.serving.bonus import WeightCounts, example_terms
from kassa.learn.serving.linear import LinearModel
from kassa.learn.serving.sidecar import export, export_live, read_sidecar_counts, sidecar_path, spec_from_args
from tests.conftest import ADMIN, decision_body
from tests.test_linear import N_OFFERS, action, context

LT = vowpalwabbit.LabelType.CONTEXTUAL_BANDIT


def _reference_bonus(model: LinearModel, counts: np.ndarray, shared: str, lines: list[str]) -> np.ndarray:
    out = []
    for line in lines:
        idx, val = example_terms(model._hashing, model.spec, shared, line)
        out.append(np.sqrt((val / (1.0 + counts[idx])).sum()))
    return np.array(out)


def _trained(tmp_path: Path, interactions: str, examples: list[tuple[str, str, float]],
             alpha: float) -> tuple[LinearModel, WeightCounts]:
    """A VW ε-greedy model learned on ``examples`` (shared line, action line, cost), with the counts the online
    learner would keep, exported and opened as a UCB model."""
    ws = vowpalwabbit.Workspace(f"--cb_explore_adf --epsilon 0.05 {interactions} -b 18 --quiet", enable_logging=False)
    spec = spec_from_args(ws.get_arguments(), 0)
    counts = WeightCounts(spec)
    for shared, act, cost in examples:
        ex = ws.parse([shared, f"0:{cost}:1{act}"], LT)
        ws.learn(ex)
        ws.finish_example(ex)
        counts.add(shared, act)
    path = tmp_path / "m.vw"
    ws.save(str(path))
    export_live(ws, 0, path, (alpha, counts.nonzero()))
    ws.finish()
    return LinearModel.open(path, "u1"), counts


@pytest.mark.parametrize("interactions", [
    "-q co",  # shared x action (Kassa's offers)
    "-q oc -q cg",  # action namespace first; two interactions
    "-q og -q cd",  # action x action and shared x shared (left out: the same for every action)
    "-q co -q dg --ignore_linear d",  # Kassa's ``-q co -q bk --ignore_linear b`` shape
    "-q co --ignore_linear o",  # an action namespace without linear terms
])
def test_the_served_bonus_is_the_sum_over_what_was_learned(tmp_path: Path, interactions: str) -> None:
    rng = random.Random(5)
    examples = [(context(rng), action(rng.randrange(N_OFFERS // 2)), -float(rng.random() < 0.2))  # half never learned
                for _ in range(300)]
    model, counts = _trained(tmp_path, interactions, examples, 0.7)
    assert model.spec.policy == "ucb" and model.spec.alpha == pytest.approx(0.7)
    for _ in range(20):
        shared = context(rng)
        lines = [action(i) for i in rng.sample(range(N_OFFERS), 12)]
        bonus = model.bonus(shared, lines)
        np.testing.assert_allclose(bonus, _reference_bonus(model, counts.n, shared, lines), rtol=1e-5)
        # ε-greedy on the optimistic costs
        optimistic = model.scores(shared, lines) - 0.7 * bonus
        best = int(np.argmin(optimistic))
        pmf = model.pmf(shared, lines)
        assert model.ranked(shared, lines) == (pmf, optimistic.tolist())  # the costs later slots follow
        assert pmf[best] == pytest.approx(0.95 + 0.05 / 12, abs=1e-6)
        assert sum(pmf) == pytest.approx(1.0)
        assert min(pmf) == pytest.approx(0.05 / 12, abs=1e-6)
    # offers never learned carry the larger bonus, in any context
    shared = context(rng)
    learned = model.bonus(shared, [action(i) for i in range(N_OFFERS // 2)])
    unseen = model.bonus(shared, [action(i) for i in range(N_OFFERS // 2, N_OFFERS)])
    assert unseen.min() > learned.max()


def test_the_online_learner_keeps_its_counts_across_a_restart_and_a_rebuilt_sidecar_serves_as_epsilon(
        tmp_path: Path) -> None:
    placement = schemas.Placement(id="p", policy="ucb", ucb_alpha=0.4, ucb_epsilon=0.1)
    learner = OnlineLearner(placement, tmp_path / "online")
    assert "--epsilon 0.1" in learner.args and learner.counts is not None
    rng = random.Random(2)
    for _ in range(200):
        learner.learn(context(rng), action(rng.randrange(5)), float(rng.random() < 0.3), 0.5)
    path, version = learner.snapshot()
    spec, _, _, counts = read_sidecar_counts(sidecar_path(path))
    assert spec.policy == "ucb" and spec.alpha == pytest.approx(0.4) and spec.epsilon == pytest.approx(0.1)
    assert counts is not None and counts[0].size > 0
    np.testing.assert_allclose(WeightCounts(spec, counts).n, learner.counts.n, rtol=1e-6)
    # a fresh model: every estimate equal, so the bonus alone ranks, and the five learned offers come last
    model = LinearModel.open(path, version)
    shared = context(rng)
    lines = [action(i) for i in range(10)]
    order = np.argsort(model.bonus(shared, lines))
    assert set(order[:5].tolist()) == set(range(5))
    # a restart continues the counts with the weights
    again = OnlineLearner(placement, tmp_path / "online")
    assert again.counts is not None
    np.testing.assert_array_equal(again.counts.n, learner.counts.n.astype(np.float32).astype(np.float64))
    again.learn(context(rng), action(7), 1.0, 0.5)
    assert again.counts.n.sum() > learner.counts.n.sum()
    # the same VW arguments under ε-greedy are another kind of model: not continued as if it had counts
    eps = OnlineLearner(schemas.Placement(id="p", policy="epsilon", exploration=0.1), tmp_path / "online")
    assert eps.counts is None and eps.learned == 0
    # a sidecar rebuilt from the VW file alone has no counts: it serves as plain ε-greedy, and says so
    rebuilt = export(path, tmp_path / "rebuilt.lin")
    assert read_sidecar_counts(rebuilt)[0].policy == "epsilon" and read_sidecar_counts(rebuilt)[3] is None


def test_ucb_is_a_placement_policy_with_bounded_settings_and_never_read_from_vw_options() -> None:
    decode = msgspec.json.Decoder(schemas.Placement).decode
    p = decode(b'{"id": "p", "policy": "ucb", "ucb_alpha": 0.2, "ucb_epsilon": 0.05}')
    assert p.ucb_alpha == 0.2 and policies.get(p.policy).uses_counts
    for bad in (b'{"id": "p", "ucb_alpha": -1}', b'{"id": "p", "ucb_epsilon": 1.5}', b'{"id": "p", "ucb_alpha": "x"}'):
        with pytest.raises(msgspec.ValidationError):
            decode(bad)
    # models are marked UCB by their counts; their VW arguments read as ε-greedy
    assert policies.from_vw_options({"cb_explore_adf": [], "epsilon": ["0.02"]}).name == "epsilon"


def test_counts_with_a_half_life_weigh_an_example_half_after_that_many_more() -> None:
    ws = vowpalwabbit.Workspace("--cb_explore_adf --epsilon 0.05 -q co -b 18 --quiet", enable_logging=False)
    spec = spec_from_args(ws.get_arguments(), 0)
    ws.finish()
    rng = random.Random(9)
    shared, first = context(rng), action(0)
    forgetting, keeping = WeightCounts(spec, half_life=10), WeightCounts(spec)
    for counts in (forgetting, keeping):
        counts.add(shared, first)
    idx = example_terms(forgetting._hashing, spec, shared, first)[0]
    own = idx[np.isin(idx, example_terms(forgetting._hashing, spec, shared, action(1))[0], invert=True)]
    np.testing.assert_allclose(forgetting.n[own], keeping.n[own])
    for _ in range(10):  # other offers only: the first offer's own weights are not added to again
        for counts in (forgetting, keeping):
            counts.add(shared, action(1))
    np.testing.assert_allclose(forgetting.n[own], 0.5 * keeping.n[own], rtol=1e-9)
    # what is exported is the decayed count, and a restart from it goes on from there
    again = WeightCounts(spec, forgetting.nonzero(), half_life=10)
    np.testing.assert_allclose(again.n, forgetting.n, rtol=1e-6)


def test_a_ucb_placement_learns_and_serves_through_the_api(client, kassa, clock) -> None:  # type: ignore[no-untyped-def]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    placement = client.get("/v1/placements/order_confirmation", headers=admin).json()["placement"]
    bad = client.put("/v1/placements/order_confirmation", json={**placement, "policy": "ucb", "ucb_alpha": -1},
                     headers=admin)
    assert bad.status_code == 422 and "ucb_alpha" in bad.text, bad.text
    r = client.put("/v1/placements/order_confirmation", json={**placement, "policy": "ucb", "ucb_alpha": 0.5,
                                                              "ucb_epsilon": 0.1}, headers=admin)
    assert r.status_code in (200, 201), r.text
    for i in range(10):
        d = client.post("/v1/decisions", json=decision_body(customer=f"u{i}")).json()
        client.post("/v1/events", json={"events": [{"event_id": f"u{i}", "type": "accept",
                                                    "decision_id": d["decision_id"],
                                                    "offer_id": d["offers"][0]["offer_id"]}]})
    clock.advance(61)
    assert kassa.learning.step() > 0
    learner = kassa.learning.learner("order_confirmation")
    assert learner is not None and learner.counts is not None and learner.counts.n.sum() > 0
    kassa.learning.snapshot_due(force=True)
    served = kassa.models.get("order_confirmation")
    assert isinstance(served, LinearModel) and served.n is not None and served.spec.alpha == 0.5
    d = client.post("/v1/decisions", json=decision_body(customer="after")).json()
    assert d["model_version"] == "order_confirmation@1"
    top = d["offers"][0]["probability"]
    assert 0.9 <= top <= 1.0, d  # 1 - ε + ε/k for the optimistic best


def test_a_ucb_learner_whose_snapshot_lost_its_sidecar_counts_again_from_zero_and_says_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    placement = schemas.Placement(id="p", policy="ucb")
    learner = OnlineLearner(placement, tmp_path / "online")
    rng = random.Random(4)
    for _ in range(50):
        learner.learn(context(rng), action(rng.randrange(5)), 1.0, 0.5)
    path, _ = learner.snapshot()
    sidecar_path(path).unlink()
    with caplog.at_level("WARNING", logger="kassa.learn"):
        again = OnlineLearner(placement, tmp_path / "online")
    assert again.counts is not None and not again.counts.n.any()
    assert again.learned == 50  # the weights continue; only the counts start over
    assert "UCB counts of 00000001.vw unreadable" in caplog.text and "counting again from zero" in caplog.text


def test_the_bonus_stays_the_sum_over_learned_terms_while_action_tables_grow_and_reset(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The action lines' own terms are cached per table row (`LinearModel._action_bonus`): rows added later and
    a reset of the tables (too many distinct lines) must not change a bonus."""
    import kassa.learn.serving.hashing as hashing_module

    rng = random.Random(8)
    lines = [f" |o id=w{i} " + " ".join(f"t{j}=x{i % (j + 2)}" for j in range(i % 9)) + f" |g p:{i % 7 + 1}"
             for i in range(150)]
    examples = [(context(rng), rng.choice(lines[:60]), -1.0) for _ in range(200)]
    model, counts = _trained(tmp_path, "-q co -q og", examples, 1.0)
    monkeypatch.setattr(hashing_module, "_MAX_CACHED", len(model._hashing.action_ids) + 100)
    for trial in range(60):
        shared = context(rng)
        cands = rng.sample(lines, rng.randint(1, 40))
        np.testing.assert_allclose(model.bonus(shared, cands), _reference_bonus(model, counts.n, shared, cands),
                                   rtol=1e-5, err_msg=str(trial))
    assert model._hashing.generation >= 1
