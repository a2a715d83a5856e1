"""The dashboard's outcomes on `events.backend: jetstream`: decisions and their events read back from the
decision log (written by the decision-log writer role) and the events stream of a real NATS JetStream server.
Each test uses its own stream prefix and deletes its streams."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from starlette.testclient import TestClient

from kassa import schemas
from kassa.api.app import create_app
from kassa.api.dashboard import outcomes as outcomes_module
from kassa.api.dashboard.outcomes import Outcomes
from kassa.api.dashboard.stream_window import StreamEventWindow
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.events.decision_log import read_decisions
from kassa.events.factory import run_decision_log_writer
from kassa.events.jetstream import BusConfig
from kassa.events.jetstream_log import JetStreamEventLog
from tests.conftest import ADMIN, CATALOG, PUB, SECRET, decision_body, order
from tests.services import ensure_nats
from tests.test_event_bus import _cfg, _delete_streams


@pytest.fixture
def kassa(tmp_path: Path) -> Iterator[Kassa]:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog), admin_key=ADMIN,
                             publishable_key=PUB, secret_key=SECRET,
                             **{"events.backend": "jetstream", "events.nats_url": ensure_nats(),
                                "events.prefix": "t" + uuid.uuid4().hex[:10], "learn.guard.enabled": False})
    k = Kassa(settings, seed=7)
    assert k.bus is not None and isinstance(k.event_log, JetStreamEventLog)
    cfg = k.bus.cfg
    try:
        yield k  # the test's app closes it (its lifespan stops Kassa)
    finally:
        _delete_streams(cfg)


def _write_decision_log(kassa: Kassa, n: int) -> None:
    """Run the decision-log writer role (into this process's data dir) until ``n`` decisions are in Parquet."""
    kassa.decision_log.flush()

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_decision_log_writer(kassa.settings, stop))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(read_decisions(kassa.settings.data_path)) < n:
            await asyncio.sleep(0.1)
        stop.set()
        await task

    asyncio.run(go())
    assert len(read_decisions(kassa.settings.data_path)) == n


def test_outcomes_on_jetstream_join_the_events_stream_with_the_decision_log(
        kassa: Kassa, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outcomes_module, "MAX_EVENTS", 2)  # the dashboard pages' read cap, for the last checks
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        before = time.time()
        d = client.post("/v1/decisions", json=decision_body(order=order(total=80.0,
                                                                        categories=("electronics", "skincare"))))
        assert d.status_code == 200, d.text
        did, offers = d.json()["decision_id"], [o["offer_id"] for o in d.json()["offers"]]
        other = client.post("/v1/decisions", json=decision_body(request_id="r-other")).json()
        events = [{"event_id": "imp", "type": "impression", "decision_id": did, "offer_id": offers[0]},
                  {"event_id": "acc", "type": "accept", "decision_id": did, "offer_id": offers[0]},
                  {"event_id": "clk", "type": "click", "decision_id": did, "offer_id": offers[1]},
                  {"event_id": "x-acc", "type": "accept", "decision_id": other["decision_id"],
                   "offer_id": other["offers"][0]["offer_id"]}]
        assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 4
        after = time.time()
        _write_decision_log(kassa, 2)

        outcomes = Outcomes(kassa, max_events=1000)
        closed_at = time.time() + 120  # past the placement's 60 s window
        detail = outcomes.decision(did, now=closed_at)
        assert detail is not None and detail.closed and detail.events_cut_at is None
        assert [ev.event_id for _, ev, _ in detail.events] == ["imp", "acc", "clk"]  # not the other decision's
        assert all(inside and before - 1 <= at <= after + 1 for at, _, inside in detail.events)  # stored times
        rewards = {o.offer_id: o.reward for o in detail.shown}
        assert rewards[offers[0]] == pytest.approx(1.0) and rewards[offers[1]] == pytest.approx(0.1)
        assert detail.reward == pytest.approx(1.1)

        stats = outcomes.placements(before - 10, now=closed_at)["order_confirmation"]
        assert stats.events_cut_at is None
        version = stats.by_version["baseline"]
        assert (version.decisions, version.open) == (2, 0)
        assert version.reward == pytest.approx(2.1)  # 1.1 for this decision, 1.0 for the other's accept
        assert stats.by_offer[offers[0]].reward >= 1.0
        open_now = outcomes.placements(before - 10, now=after)["order_confirmation"].by_version["baseline"]
        assert (open_now.decisions, open_now.open) == (0, 2)
        # the pages' incremental read of the stream gives what a full read of it gives
        full_read = Outcomes(kassa, max_events=1000, incremental=False)
        for t in (after, closed_at):
            assert full_read.placements(before - 10, now=t) == outcomes.placements(before - 10, now=t)

        # the read cap: the scan stops short, the result says up to when it read, the pages say so
        capped = Outcomes(kassa)
        assert capped.max_events == 2
        short = capped.decision(did, now=closed_at)
        assert short is not None and short.events_cut_at is not None
        assert [ev.event_id for _, ev, _ in short.events] == ["imp", "acc"] and short.reward == pytest.approx(1.0)
        assert capped.placements(before - 10, now=closed_at)["order_confirmation"].events_cut_at is not None
        assert capped.placements(before - 10, now=closed_at) == Outcomes(kassa, incremental=False).placements(
            before - 10, now=closed_at)
        admin = {"Authorization": f"Bearer {ADMIN}"}
        page = client.get("/dashboard/decisions", params={"id": did}, headers=admin)
        assert page.status_code == 200 and 'data-testid="events-cut"' in page.text and "<td>acc</td>" in page.text
        page = client.get("/dashboard/placements/order_confirmation", headers=admin)
        assert page.status_code == 200 and 'data-testid="events-cut"' in page.text


def test_scan_since_starts_at_the_first_event_stored_at_or_after_the_time(tmp_path: Path) -> None:
    cfg: BusConfig = _cfg(ensure_nats(), tmp_path)
    log = JetStreamEventLog.connect(cfg)
    try:
        def append(ids: list[str]) -> None:
            events = [schemas.Event(event_id=i, type="click", decision_id="d1") for i in ids]
            asyncio.run(log.append(events, time.time()))

        append(["old-1", "old-2", "old-3"])
        time.sleep(0.3)
        since = time.time()
        append(["new-1", "new-2"])
        decode = msgspec.json.Decoder(schemas.Event).decode
        rows, complete = log.scan_since(since, 100, batch=1)  # one message per call onto the bus loop
        assert complete and [decode(body).event_id for _, body in rows] == ["new-1", "new-2"]
        assert all(at >= since for at, _ in rows)
        rows, complete = log.scan_since(0.0, 4, batch=3)
        assert not complete and [decode(body).event_id for _, body in rows] == ["old-1", "old-2", "old-3", "new-1"]
        assert log.scan_since(time.time() + 60, 100) == ([], True)
    finally:
        log.close()
        _delete_streams(cfg)


Held = tuple[dict[str, list[tuple[float, str, str | None, float | None]]], float | None]


def _full_read(log: JetStreamEventLog, since: float, max_events: int) -> Held:
    """What `Outcomes` made of a full read of the stream (`scan_since`): events by decision id, and the cut."""
    rows, complete = log.scan_since(since, max_events)
    decode = msgspec.json.Decoder(schemas.Event).decode
    out: dict[str, list[tuple[float, str, str | None, float | None]]] = {}
    for at, body in rows:
        ev = decode(body)
        if ev.decision_id is not None:
            out.setdefault(ev.decision_id, []).append((at, ev.type, ev.offer_id, ev.value))
    return out, None if complete else (rows[-1][0] if rows else since)


def _windowed(window: StreamEventWindow, since: float) -> Held:
    with window.since(since) as (held, cut_at):
        return ({d: [(at, o.type, o.offer_id, o.value) for at, o in events] for d, events in held.items()}, cut_at)


def test_the_incremental_window_holds_what_a_full_read_of_the_stream_returns(tmp_path: Path) -> None:
    cfg: BusConfig = _cfg(ensure_nats(), tmp_path)
    log = JetStreamEventLog.connect(cfg)
    n = 0

    def append(decisions: list[str | None]) -> float:
        """One event per entry (None: without a decision id), after a pause; the time before them."""
        nonlocal n
        time.sleep(0.05)
        before = time.time()
        time.sleep(0.05)
        events = []
        for i, d in enumerate(decisions):
            n += 1
            events.append(schemas.Event(event_id=f"e{n}", type=("impression", "accept", "order")[i % 3],
                                        decision_id=d, offer_id=f"o{i % 2}" if d else None,
                                        value=float(n) if i % 3 == 2 else None))
        asyncio.run(log.append(events, time.time()))
        return before

    try:
        t0 = append(["d1", "d1", None, "d2"])
        t1 = append(["d2", "d3", "d1"])
        window = StreamEventWindow(log, max_events=1000, refresh_seconds=0.0)
        capped = StreamEventWindow(log, max_events=3, refresh_seconds=0.0)
        assert _windowed(window, t0) == _full_read(log, t0, 1000) and window.read_events == 7
        assert _windowed(capped, t0) == _full_read(log, t0, 3)
        assert _windowed(capped, t0)[1] is not None  # cut: the cap holds the first 3 of the 7
        t2 = append(["d3", None, "d4", "d1"])
        for since in (t0, t1, t2, t2 + 60):  # the window moves on: older events dropped, only new ones read
            assert _windowed(window, since) == _full_read(log, since, 1000), since
            assert _windowed(capped, since) == _full_read(log, since, 3), since
        assert window.read_events == 11  # each message read once
        t3 = append(["d5"])
        assert _windowed(window, t1) == _full_read(log, t1, 1000)  # back before its start: read afresh
        assert _windowed(window, t3) == _full_read(log, t3, 1000)
        assert _windowed(capped, t0) == _full_read(log, t0, 3)
        # within refresh_seconds a view reuses the last read
        slow = StreamEventWindow(log, max_events=1000, refresh_seconds=60.0)
        held, cut_at = _windowed(slow, t0)
        append(["d6"])
        assert _windowed(slow, t0) == (held, cut_at) and "d6" not in held
    finally:
        log.close()
        _delete_streams(cfg)


def test_the_overview_shows_the_jetstream_bus_connected_with_its_prefix_and_spool(kassa: Kassa) -> None:
    from tests.test_dashboard import _system

    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as client:
        rows = _system(client.get("/dashboard").text)
    events = rows["Events and decision records"]
    assert events[:2] == ["NATS JetStream", kassa.settings.events.nats_url]
    assert "connected" in events[2]
    assert f"prefix {kassa.settings.events.prefix}; 0 acknowledged and waiting in the local spool" == events[3]
