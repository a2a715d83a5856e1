"""Start-up does not replay the whole event log (issue 15): the state rebuilt from it is saved at a clean
stop with its log position, and the next start replays only what came after."""

from __future__ import annotations

import msgspec
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.decide.retrieval import ProductRetriever
from kassa.events import replay_state
from kassa.features.profile import CustomerProfiles
from tests.conftest import PUB, order


def post_orders(kassa: Kassa, first: int, n: int) -> None:
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as c:
        for i in range(first, first + n):
            ev = {"event_id": f"o-{i}", "type": "order", "customer": {"id": f"c-{i % 7}"},
                  "order": order(order_id=f"O-{i}", categories=("skincare", "beauty"), skus=(f"S-{i % 5}", "S-X"))}
            assert c.post("/v1/events", json={"events": [ev]}).json()["accepted"] == 1


def full_replay(kassa: Kassa) -> tuple[dict, dict]:
    profiles, retriever = CustomerProfiles(), ProductRetriever()
    for _, event in kassa.event_log.read(0, 10_000):
        if event.type == "order" and event.order is not None:
            customer = event.customer.id if event.customer else None
            ts = event.order.created_at or event.timestamp or kassa.clock()
            if customer is not None:
                profiles.observe_order(event.order, customer, ts)
            retriever.observe_order(event.order, customer, ts)
    return profiles.dump()["profiles"], msgspec.to_builtins(retriever.dump())


def test_a_restart_restores_the_saved_state_and_replays_only_the_tail(settings, clock):
    first = Kassa(settings, clock=clock)
    post_orders(first, 0, 20)  # the TestClient's exit stops Kassa: the state is saved at position 20
    path = settings.data_path / replay_state.FILE
    assert path.exists()
    second = Kassa(settings, clock=clock)
    # another 5 orders land in the log while the state file is older (as after a crash)
    post_orders(second, 20, 5)
    path.unlink()
    replay_state.save(path, 20, *_state_at(settings, clock, 20))
    third = Kassa(settings, clock=clock)
    after = replay_state.load(path, third.event_log.max_seq(), third.profiles, third.retriever)
    assert after == 20
    assert third.events.replay(after=after) == 5  # only the tail
    expected_profiles, expected_retriever = full_replay(third)
    assert third.profiles.dump()["profiles"] == expected_profiles
    assert msgspec.to_builtins(third.retriever.dump()) == expected_retriever


def _state_at(settings, clock, seq: int) -> tuple[CustomerProfiles, ProductRetriever]:
    kassa = Kassa(settings, clock=clock)
    profiles, retriever = CustomerProfiles(), ProductRetriever()
    for s, event in kassa.event_log.read(0, seq):
        assert s <= seq
        if event.type == "order" and event.order is not None:
            customer = event.customer.id if event.customer else None
            ts = event.order.created_at or event.timestamp or clock()
            if customer is not None:
                profiles.observe_order(event.order, customer, ts)
            retriever.observe_order(event.order, customer, ts)
    kassa.event_log.close()
    return profiles, retriever


def test_a_damaged_or_stale_state_file_means_a_full_replay(settings, clock):
    first = Kassa(settings, clock=clock)
    post_orders(first, 0, 3)
    path = settings.data_path / replay_state.FILE
    path.write_bytes(b"\x93garbage")
    kassa = Kassa(settings, clock=clock)
    assert replay_state.load(path, kassa.event_log.max_seq(), kassa.profiles, kassa.retriever) == 0
    replay_state.save(path, 10_000, kassa.profiles, kassa.retriever)  # ahead of the log: it was replaced
    assert replay_state.load(path, kassa.event_log.max_seq(), kassa.profiles, kassa.retriever) == 0
    with TestClient(create_app(kassa)):
        assert kassa.profiles.get("c-1")["orders_count"] == 1  # the full replay rebuilt it
