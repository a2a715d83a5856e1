"""Refund and cancellation events take back the conversion an order credited while its decision is open."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from starlette.testclient import TestClient

from kassa import schemas
from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.events.join import REFUND_HOLD_GRACE_SECONDS, PendingDecision
from kassa.learn.online.handover import HandoverJoiner
from kassa.learn.online.rewards import RewardJoiner
from tests.conftest import PUB, decision_body, order

VALUE = schemas.RewardDefinition(weights={"conversion": "value", "accept": 1.0}, wait_seconds=60)
FIXED = schemas.RewardDefinition(weights={"conversion": 2.0, "accept": 1.0}, wait_seconds=60, default=-0.5)


def joiner_with(definition: schemas.RewardDefinition, cls: type[RewardJoiner] = RewardJoiner) -> RewardJoiner:
    joiner = cls(lambda _p: definition)
    if isinstance(joiner, HandoverJoiner):
        joiner.activate("p", None)
    joiner.register(PendingDecision("d1", "p", 100.0, 160.0, "s", ["serum", "cream"],
                                    [" |o id=serum", " |o id=cream"], [0.6, 0.4], "c-1", ["SERUM-C", "CREAM-1"]))
    return joiner


def bought(order_id: str = "o-1", *lines: tuple[str, int, float]) -> schemas.Event:
    items = [schemas.OrderItem(sku=sku, qty=qty, price=price) for sku, qty, price in lines or [("SERUM-C", 2, 19.0)]]
    return schemas.Event(f"order-{order_id}", "order", customer=schemas.Customer(id="c-1"),
                         order=schemas.Order(id=order_id, created_at=130.0, items=items))


def refund(event_id: str, order_id: str = "o-1", *lines: tuple[str, int, float]) -> schemas.Event:
    items = [schemas.OrderItem(sku=sku, qty=qty, price=price) for sku, qty, price in lines]
    return schemas.Event(event_id, "refund", order=schemas.Order(id=order_id, items=items))


def closed(joiner: RewardJoiner) -> dict[str, float]:
    return {e.offer_id: e.reward for e in joiner.expire(160.0)}


@pytest.mark.parametrize("cls", [RewardJoiner, HandoverJoiner])  # embedded, and `kassa learn` over JetStream
def test_a_cancelled_order_takes_its_conversion_back_before_the_reward_is_learned(cls):
    kept, cancelled = joiner_with(VALUE, cls), joiner_with(VALUE, cls)
    for joiner in (kept, cancelled):
        assert joiner.observe(bought()) == 1
    assert cancelled.observe(refund("r-1")) == 1  # no lines: the whole order
    assert closed(kept) == {"serum": 38.0, "cream": 0.0}
    assert closed(cancelled) == {"serum": 0.0, "cream": 0.0}
    assert (cancelled.refunds_taken_back, cancelled.refunds_unmatched) == (1, 0)


def test_a_partial_refund_reduces_a_value_reward_by_the_refunded_amount():
    joiner = joiner_with(VALUE)
    joiner.observe(bought())  # 2 x 19.00
    assert joiner.observe(refund("r-1", "o-1", ("SERUM-C", 1, 19.0))) == 1
    assert closed(joiner) == {"serum": 19.0, "cream": 0.0}


def test_a_fixed_weight_conversion_stays_while_a_unit_is_kept_and_goes_to_the_default_with_the_last():
    joiner = joiner_with(FIXED)
    joiner.observe(bought())
    assert joiner.observe(refund("r-1", "o-1", ("SERUM-C", 1, 19.0))) == 1  # one of two units: not unmatched
    assert joiner._summed(joiner._pending["d1"]) == {"serum": 2.0}
    assert (joiner.refunds_taken_back, joiner.refunds_unmatched) == (1, 0)
    joiner.observe(refund("r-2", "o-1", ("SERUM-C", 1, 19.0)))
    assert closed(joiner) == {"serum": -0.5, "cream": -0.5}  # as if never converted: the placement's default


def test_a_refund_of_other_lines_leaves_the_conversion_and_other_outcomes_stay():
    joiner = joiner_with(VALUE)
    joiner.observe(bought("o-1", ("SERUM-C", 1, 19.0), ("SOCKS", 1, 5.0)))
    joiner.observe(schemas.Event("a-1", "accept", decision_id="d1", offer_id="serum"))
    assert joiner.observe(refund("r-1", "o-1", ("SOCKS", 1, 5.0))) == 0  # the offered product was kept
    assert joiner.observe(refund("r-2", "o-1")) == 1
    assert closed(joiner) == {"serum": 1.0, "cream": 0.0}  # the accept's weight is not a conversion's


def test_a_refund_of_an_unknown_order_or_after_the_window_changes_nothing_and_is_counted():
    joiner = joiner_with(VALUE)
    joiner.observe(bought())
    assert joiner.observe(refund("r-1", "o-404")) == 0
    assert closed(joiner) == {"serum": 38.0, "cream": 0.0}
    assert joiner.observe(refund("r-2", "o-1")) == 0  # the decision closed with the conversion: learned as is
    assert (joiner.refunds_taken_back, joiner.refunds_unmatched) == (0, 2)


def test_one_refund_takes_back_only_its_own_order_of_two():
    joiner = joiner_with(VALUE)
    joiner.observe(bought("o-1"))
    joiner.observe(bought("o-2", ("SERUM-C", 1, 10.0)))
    joiner.observe(refund("r-1", "o-2"))
    assert closed(joiner) == {"serum": 38.0, "cream": 0.0}


def test_a_journaled_conversion_is_still_taken_back_after_a_restart():
    restored = joiner_with(VALUE)
    restored.observe(bought())
    pending = msgspec.msgpack.decode(msgspec.msgpack.encode(restored._pending["d1"]), type=PendingDecision)
    joiner = RewardJoiner(lambda _p: VALUE)
    joiner.restore([pending])
    assert joiner.observe(refund("r-1", "o-1", ("SERUM-C", 1, 19.0))) == 1
    assert closed(joiner) == {"serum": 19.0, "cream": 0.0}


# --------------------------------------------------------------------------- a refund before its order
# Webhooks are not ordered: a platform may deliver the cancellation before the order (retries, parallel
# deliveries). The refund is held; the order arriving after it is taken back at once.
@pytest.mark.parametrize("cls", [RewardJoiner, HandoverJoiner])  # embedded, and `kassa learn` (its input's order)
def test_a_cancellation_delivered_before_its_order_takes_the_order_back_when_it_comes(cls):
    joiner = joiner_with(VALUE, cls)
    assert joiner.observe(refund("r-1")) == 0  # no conversion yet: counted unmatched (what the ack says), held
    assert (joiner.refunds_taken_back, joiner.refunds_unmatched) == (0, 1)
    joiner.observe(bought())
    assert joiner.refunds_taken_back_on_order == 1
    assert closed(joiner) == {"serum": 0.0, "cream": 0.0}  # as if it never converted


def test_a_partial_refund_delivered_before_its_order_leaves_the_kept_amount():
    joiner = joiner_with(FIXED)
    joiner.observe(refund("r-1", "o-1", ("SERUM-C", 1, 19.0)))
    joiner.observe(bought())  # 2 x 19.00: one unit kept, the conversion stays
    assert closed(joiner) == {"serum": 2.0, "cream": -0.5}
    value = joiner_with(VALUE)
    value.observe(refund("r-1", "o-1", ("SERUM-C", 1, 19.0)))
    value.observe(bought())
    assert closed(value) == {"serum": 19.0, "cream": 0.0}


def test_a_held_refund_is_let_go_once_every_decision_open_when_it_came_has_closed():
    joiner = joiner_with(VALUE)  # d1 closes at 160
    joiner.observe(refund("r-1", "o-1"))
    joiner.expire(150.0)
    assert joiner.held_refunds == 1
    joiner.expire(160.0 + REFUND_HOLD_GRACE_SECONDS)
    assert joiner.held_refunds == 0
    joiner.register(PendingDecision("d2", "p", 300.0, 360.0, "s", ["serum"], [" |o id=serum"], [1.0], "c-1",
                                    ["SERUM-C"]))
    later = bought("o-1")
    assert later.order is not None
    later.order.created_at = 310.0
    joiner.observe(later)  # long after: not held any more, a conversion like any other
    assert {e.offer_id: e.reward for e in joiner.expire(360.0)} == {"serum": 38.0}


def test_held_refunds_are_bounded_in_count_oldest_let_go_first(monkeypatch):
    monkeypatch.setattr("kassa.learn.online.rewards.MAX_HELD_REFUNDS", 3)
    joiner = joiner_with(VALUE)
    for i in range(5):
        joiner.observe(refund(f"r-{i}", f"o-{i}"))
    assert joiner.held_refunds == 3
    joiner.observe(bought("o-0"))  # its refund was let go: it counts
    joiner.observe(bought("o-4", ("SERUM-C", 1, 5.0)))  # still held: taken back
    assert closed(joiner) == {"serum": 38.0, "cream": 0.0}


def test_a_held_refund_survives_a_restart_of_the_embedded_joiner(tmp_path):
    from kassa.state.local import SqliteStateJournal

    journal = SqliteStateJournal(tmp_path / "state.db")
    first = RewardJoiner(lambda _p: VALUE, journal)
    for decision_id, deadline in (("d1", 160.0), ("d2", 400.0)):
        first.register(PendingDecision(decision_id, "p", 120.0, deadline, "s", ["serum"], [" |o id=serum"], [1.0],
                                       "c-1", ["SERUM-C"]))
    first.observe(refund("r-1"))
    first.observe(refund("r-2", "o-2"))
    first.expire(300.0)  # d1 closed; d2, open, may still be converted by o-1: both held
    journal.close()  # "kill -9" after the journal's last commit

    journal = SqliteStateJournal(tmp_path / "state.db")
    restored = journal.load(350.0)
    joiner = RewardJoiner(lambda _p: VALUE, journal)
    joiner.restore(restored.pending, restored.held_refunds)
    assert joiner.held_refunds == 2
    joiner.observe(bought("o-1"))  # came after the restart: still taken back
    assert {e.offer_id: e.reward for e in joiner.expire(400.0)} == {"serum": 0.0}
    journal.close()
    later = SqliteStateJournal(tmp_path / "state.db").load(400.0 + REFUND_HOLD_GRACE_SECONDS + 1)
    assert later.held_refunds == []  # its time is up


# --------------------------------------------------------------------------- through POST /v1/events
@pytest.fixture
def api(kassa: Kassa) -> Iterator[TestClient]:
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as c:
        yield c


def post(api: TestClient, *events: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/v1/events", json={"events": list(events)})
    assert response.status_code == 200, response.text
    return response.json()


def serum_decision(api: TestClient) -> str:
    body = decision_body(customer="c-9", order=order(80, "US", ("electronics",), order_id="o-0"),
                         candidates=["serum-upsell", "discount"], limit=2)
    response = api.post("/v1/decisions", json=body)
    assert response.status_code == 200, response.text
    assert "serum-upsell" in [o["offer_id"] for o in response.json()["offers"]]
    return str(response.json()["decision_id"])


SERUM_LINE = {"sku": "SERUM-C", "product_id": "p-1", "qty": 1, "price": 19.0}  # the offer's product


def serum_order(clock: Any, qty: int = 2) -> dict[str, Any]:
    return {"event_id": "order-1", "type": "order", "customer": {"id": "c-9"},
            "order": {"id": "5002", "created_at": clock(), "items": [SERUM_LINE | {"qty": qty}]}}


def test_a_refund_posted_in_the_window_reduces_the_learned_reward_and_a_replay_changes_nothing(
        api, kassa, clock, joined):
    decision_id = serum_decision(api)
    clock.advance(10)
    post(api, serum_order(clock))
    partial = {"event_id": "refund-1", "type": "refund",
               "order": {"id": "5002", "items": [SERUM_LINE]}}
    assert post(api, partial) == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}
    assert post(api, partial) == {"accepted": 0, "duplicates": 1, "unknown_decisions": 0}
    clock.advance(61)
    kassa.learning.step()
    assert {e.offer_id: e.reward for e in joined if e.decision_id == decision_id}["serum-upsell"] == 19.0
    assert [e.type for _, e in kassa.event_log.read()] == ["order", "refund"]


def test_a_refund_of_an_unknown_order_is_accepted_stored_and_said_unmatched(api, kassa, clock):
    answer = post(api, {"event_id": "refund-9", "type": "refund", "order": {"id": "never-seen"}})
    assert answer == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0, "unmatched_refunds": 1}
    assert [e.order.id for _, e in kassa.event_log.read() if e.order] == ["never-seen"]
    metrics = api.get("/metrics").text
    assert 'kassa_refunds_total{result="unmatched"} 1.0' in metrics
    assert 'kassa_refunds_total{result="taken_back"} 0.0' in metrics


def test_a_refund_without_an_order_or_decision_is_refused_naming_the_field(api):
    response = api.post("/v1/events", json={"events": [{"event_id": "r", "type": "refund"}]})
    assert response.status_code == 422
    assert response.json()["field"] == "events[0].order" and "refunded order's `id`" in response.json()["detail"]


def test_kassa_train_replays_the_refund_with_the_log_and_joins_the_same_reduced_reward(api, kassa, clock):
    from kassa.learn.offline.dataset import load_logged

    decision_id = serum_decision(api)
    clock.advance(10)
    post(api, serum_order(clock), {"event_id": "refund-1", "type": "refund", "timestamp": clock() + 1,
                                   "order": {"id": "5002", "items": [SERUM_LINE]}})
    assert kassa.decision_log is not None
    kassa.decision_log.flush()
    snap = kassa.catalog.snapshot
    data = load_logged(kassa.settings.data_path, snap.placements["order_confirmation"].placement,
                       lambda o: (snap.offers[o].product_id or snap.offers[o].sku), until=clock() + 86_400.0)
    i = data.decision_ids.index(decision_id)
    assert dict(zip(data.chosen[i], data.rewards[i], strict=True))["serum-upsell"] == 19.0  # 38.00 less 19.00
