"""The load generator's beacons name decisions a real confirmation page would still be reporting: joined
to their decision even under a reward window as short as ``kassa demo``'s 1 s."""

from __future__ import annotations

import json
from typing import Any

from kassa.loadtest.mix import ACCEPT, BEACON_MAX_AGE_S, CLICK, IMPRESSION, RequestFactory
from kassa.loadtest.profiles import Payload


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _factory(clock: _Clock) -> RequestFactory:
    def build(method: str, path: str, body: bytes, headers: bytes) -> dict[str, Any]:
        return dict(json.loads(body))

    return RequestFactory(Payload(), build, tag="t", seed=1, key="pub", secret_key=None, webhook_secret=None,
                          clock=clock)


def _decide(f: RequestFactory, uid: int) -> None:
    f.on_decision(uid, json.dumps({"decision_id": f"d{uid}", "offers": [{"offer_id": "o1"}, {"offer_id": "o2"}],
                                   "took_ms": 1.0}).encode())


def _named(body: Any) -> set[str]:
    return {e["decision_id"] for e in body["events"]}


def test_impressions_report_the_newest_decision_not_a_backlogs_oldest() -> None:
    clock = _Clock()
    f = _factory(clock)
    for uid in range(100):  # the decisions that get no impression (10 % in black-friday-peak) pile up
        _decide(f, uid)
        clock.now += 0.03
    assert _named(f.beacon(IMPRESSION, 1)) == {"d99"}
    assert _named(f.beacon(IMPRESSION, 2)) == {"d98"}  # each decision's impressions once


def test_clicks_and_accepts_name_only_decisions_received_within_the_beacon_age() -> None:
    clock = _Clock()
    f = _factory(clock)
    for uid in range(200):  # 6 s of decisions; the demo's reward window closes 1 s after each
        _decide(f, uid)
        clock.now += 0.03
    recent = {f"d{uid}" for uid in range(200) if 1000.0 + 0.03 * uid >= clock.now - BEACON_MAX_AGE_S}
    named = set().union(*(_named(f.beacon(code, 10 + i)) for i, code in enumerate([CLICK, ACCEPT] * 100)))
    assert named <= recent and len(named) > 1
    clock.now += 5.0  # a lull: the newest decision is all there is to click on
    _decide(f, 200)
    assert _named(f.beacon(CLICK, 999)) == {"d200"}


def test_an_impression_never_reports_a_decision_older_than_the_beacon_age() -> None:
    clock = _Clock()
    f = _factory(clock)
    for uid in range(3):
        _decide(f, uid)
    f.beacon(IMPRESSION, 1)  # d2
    clock.now += 5.0  # d0 and d1 still unreported, now past the demo's reward window
    _decide(f, 3)
    assert _named(f.beacon(IMPRESSION, 2)) == {"d3"}
    assert _named(f.beacon(IMPRESSION, 3)) == {"d3"}  # no fresh one left: the newest again, not d1
