"""The policy table (`kassa.policies`): a new policy is one class registered in one module, here this test's.

The schema, the OpenAPI enum, the learner's VW arguments, the serving loader and the engine all read the
table, so registering VW's online cover exploration below is all it takes to serve it end to end.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import msgspec
import pytest

from kassa import policies, schemas
from kassa.learn.online.learner import vw_args
from kassa.learn.serving.linear import LinearModel
from kassa.learn.serving.sidecar import UnsupportedModel, spec_from_args
from kassa.learn.serving.vw import VWModel
from tests.conftest import ADMIN, decision_body


class Cover(policies.PlacementPolicy):
    """VW's online cover (Agarwal et al. 2014): not reproduced by the numpy scorer, so VW serves it."""

    name: ClassVar[str] = "test_cover"
    vw_flag: ClassVar[str | None] = "cover"
    numpy_scorer: ClassVar[bool] = False

    def vw_exploration(self, placement: Any) -> str:
        return "--cover 2"


@pytest.fixture
def cover() -> Iterator[None]:
    policies.register(Cover)
    try:
        yield
    finally:
        policies.unregister(Cover.name)


def test_every_built_in_policy_has_one_row_saying_what_it_does():
    rows = {name: policies.get(name) for name in policies.names()}
    assert set(rows) == {"squarecb", "epsilon", "softmax", "ucb", "baseline", "uniform"}
    assert {n for n, p in rows.items() if p.learns} == {"squarecb", "epsilon", "softmax", "ucb"}
    assert {n for n, p in rows.items() if p.numpy_scorer} == {"squarecb", "epsilon", "softmax", "ucb"}
    assert {n for n, p in rows.items() if p.uses_counts} == {"ucb"}
    assert rows["softmax"].later_slots == "renormalise" and rows["squarecb"].later_slots == "greedy"


def test_the_learner_arguments_come_from_the_placements_policy():
    assert "--softmax --lambda 4.0" in vw_args(schemas.Placement(id="p", policy="softmax", softmax_lambda=4.0))
    assert "--epsilon 0.2" in vw_args(schemas.Placement(id="p", policy="epsilon", exploration=0.2))
    assert "--epsilon 0.05" in vw_args(schemas.Placement(id="p", policy="ucb", ucb_epsilon=0.05))
    # a placement that does not learn still trains squareCB's model, ready for when it switches
    assert "--squarecb" in vw_args(schemas.Placement(id="p", policy="uniform"))


def test_the_scorer_reads_the_policy_back_from_a_models_vw_arguments():
    assert spec_from_args("--cb_explore_adf --softmax --lambda 3 --bit_precision 18", None).policy == "softmax"
    assert spec_from_args("--cb_explore_adf --epsilon 0.3 --bit_precision 18", None).epsilon == 0.3
    with pytest.raises(UnsupportedModel, match="counter"):
        spec_from_args("--cb_explore_adf --squarecb --bit_precision 18", None)


def test_an_unknown_policy_is_refused_with_the_known_ones_named():
    with pytest.raises(msgspec.ValidationError, match=r"unknown policy 'nope'.*squarecb"):
        msgspec.json.decode(b'{"id": "p", "policy": "nope"}', type=schemas.Placement)


def test_a_policy_registered_in_a_test_module_is_served_end_to_end(cover, client, kassa, clock):
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert "--cover 2" in vw_args(schemas.Placement(id="p", policy="test_cover"))
    placement = client.get("/v1/placements/order_confirmation", headers=admin).json()["placement"]
    r = client.put("/v1/placements/order_confirmation", json={**placement, "policy": "test_cover"}, headers=admin)
    assert r.status_code in (200, 201), r.text
    for i in range(10):
        d = client.post("/v1/decisions", json=decision_body(customer=f"t{i}")).json()
        assert d["model_version"] == "baseline"  # cold start: the baseline serves until enough rewards
        client.post("/v1/events", json={"events": [{"event_id": f"t{i}", "type": "accept",
                                                    "decision_id": d["decision_id"],
                                                    "offer_id": d["offers"][0]["offer_id"]}]})
    clock.advance(61)
    slots = placement.get("slots", schemas.Placement(id="x").slots)
    assert kassa.learning.step() == 10 * slots  # one example per slot shown
    learner = kassa.learning.learner("order_confirmation")
    assert learner is not None and "--cover 2" in learner.args
    kassa.learning.snapshot_due(force=True)
    served = kassa.models.get("order_confirmation")
    assert isinstance(served, VWModel) and not isinstance(served, LinearModel)  # not covered by numpy: VW serves
    d = client.post("/v1/decisions", json=decision_body(customer="after")).json()
    assert d["model_version"] == "order_confirmation@1"
    assert 0.0 < d["offers"][0]["probability"] <= 1.0
