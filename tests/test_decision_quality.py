"""Issue 14: the learner sees why a candidate was retrieved, the baseline is worth beating, rewards reach the
learner on a known scale, evaluation refuses small samples, and runs are reproducible."""

from __future__ import annotations

import asyncio

import msgspec

from kassa import schemas
from kassa.app import Kassa
from tests.conftest import Clock, decision_body


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
