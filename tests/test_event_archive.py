"""The decision-log writer role on `events.backend: jetstream` also copies the events stream into
``<data_dir>/events.db``, so batch training, off-policy evaluation and training sets (which read that file) see the
rewards of a production deployment's decisions, not only the decisions. Real NATS JetStream; own stream prefix."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from starlette.testclient import TestClient

from kassa import schemas
from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.events.decision_log import read_decisions
from kassa.events.factory import run_decision_log_writer
from kassa.learn.offline.dataset import load_logged
from tests.conftest import ADMIN, CATALOG, PUB, SECRET, decision_body
from tests.services import ensure_nats
from tests.test_event_bus import _delete_streams


@pytest.fixture
def kassa(tmp_path: Path) -> Iterator[Kassa]:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog), admin_key=ADMIN,
                             publishable_key=PUB, secret_key=SECRET,
                             **{"events.backend": "jetstream", "events.nats_url": ensure_nats(),
                                "events.prefix": "t" + uuid.uuid4().hex[:10], "learn.guard.enabled": False})
    k = Kassa(settings, seed=7)
    cfg = k.bus.cfg if k.bus is not None else None
    try:
        yield k
    finally:
        if cfg is not None:
            _delete_streams(cfg)


def _archived(data_dir: Path) -> list[tuple[str, float]]:
    path = data_dir / "events.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as conn:
        return [(r[0], r[1]) for r in conn.execute("SELECT event_id, received_at FROM events ORDER BY seq")]


def _run_writer(kassa: Kassa, decisions: int, events: int) -> None:
    """The writer role until ``decisions`` are in Parquet and ``events`` in events.db (or 15 s)."""
    kassa.decision_log.flush()
    data = kassa.settings.data_path

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_decision_log_writer(kassa.settings, stop))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (len(read_decisions(data)) < decisions
                                               or len(_archived(data)) < events):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # a duplicate, had it been written, would be by now
        stop.set()
        await task

    asyncio.run(go())


def test_the_writer_archives_the_events_stream_so_batch_training_sees_the_rewards(kassa: Kassa) -> None:
    data = kassa.settings.data_path
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        before = time.time()
        shown = []
        for i in range(3):
            d = client.post("/v1/decisions", json=decision_body(request_id=f"r{i}")).json()
            shown.append((d["decision_id"], d["offers"][0]["offer_id"]))
        events = [{"event_id": f"imp-{i}", "type": "impression", "decision_id": did, "offer_id": offer}
                  for i, (did, offer) in enumerate(shown)]
        events.append({"event_id": "acc-0", "type": "accept", "decision_id": shown[0][0], "offer_id": shown[0][1]})
        assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 4
        # a client retry of the same events: acknowledged as duplicates, archived once
        assert client.post("/v1/events", json={"events": events}).json()["accepted"] == 0
        after = time.time()
        _run_writer(kassa, 3, 4)
        archived = _archived(data)
        assert [e for e, _ in archived] == ["imp-0", "imp-1", "imp-2", "acc-0"]  # stream order, each once
        assert all(before - 1 <= at <= after + 1 for _, at in archived)  # when JetStream stored them

        # what `kassa train` / `kassa evaluate` read: the decisions with the accept joined to the first one
        placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
        logged = load_logged(data, placement, lambda o: o, until=time.time() + 3600)
        assert len(logged) == 3 and logged.events_replayed == 4
        rewards = dict(zip(logged.decision_ids, (r[0] for r in logged.rewards), strict=True))
        assert rewards[shown[0][0]] == pytest.approx(1.0)
        assert rewards[shown[1][0]] == rewards[shown[2][0]] == 0.0

        # a restart of the role resumes after what it archived: new events once, old ones not again
        more = [{"event_id": "clk-1", "type": "click", "decision_id": shown[1][0], "offer_id": shown[1][1]}]
        assert client.post("/v1/events", json={"events": more}).json()["accepted"] == 1
        _run_writer(kassa, 3, 5)
        assert [e for e, _ in _archived(data)] == ["imp-0", "imp-1", "imp-2", "acc-0", "clk-1"]
        with sqlite3.connect(data / "events.db") as conn:
            (position,) = conn.execute("SELECT seq FROM archive_position").fetchone()
        assert position == 5  # the stream's last sequence: four events and the click (duplicates were not stored)

    # the archived bodies are the events as the API took them (stamped with their time)
    with sqlite3.connect(data / "events.db") as conn:
        body = conn.execute("SELECT body FROM events WHERE event_id = 'acc-0'").fetchone()[0]
    ev = msgspec.json.decode(body, type=schemas.Event)
    assert ev.type == "accept" and ev.decision_id == shown[0][0] and ev.timestamp is not None


def test_the_writer_can_leave_the_events_out(kassa: Kassa) -> None:
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        d = client.post("/v1/decisions", json=decision_body()).json()
        ev = {"event_id": "imp", "type": "impression", "decision_id": d["decision_id"],
              "offer_id": d["offers"][0]["offer_id"]}
        assert client.post("/v1/events", json={"events": [ev]}).json()["accepted"] == 1
        kassa.decision_log.flush()

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_decision_log_writer(kassa.settings, stop, events=False))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len(read_decisions(kassa.settings.data_path)) < 1:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)
        stop.set()
        await task

    asyncio.run(go())
    assert len(read_decisions(kassa.settings.data_path)) == 1 and _archived(kassa.settings.data_path) == []


def test_at_a_steady_trickle_the_writer_makes_a_file_per_flush_interval_not_per_fetch(kassa: Kassa) -> None:
    """Each fetch came back with the one or two records published since the last: a Parquet file, an fsync and a
    directory fsync every few milliseconds (and as many tiny files for every reader of the log to open). The writer
    gathers for `decision_log_flush_seconds` (0.5 s) before it writes."""
    data = kassa.settings.data_path
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:

        async def go() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(run_decision_log_writer(kassa.settings, stop))
            await asyncio.sleep(1.0)  # the writer's consumers are up
            for i in range(40):  # ~1.2 s of decisions, one every 30 ms, each flushed to the stream at once
                d = await asyncio.to_thread(client.post, "/v1/decisions", json=decision_body(request_id=f"t{i}"))
                assert d.status_code == 200
                await asyncio.to_thread(kassa.decision_log.flush)
                await asyncio.sleep(0.03)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(read_decisions(data)) < 40:
                await asyncio.sleep(0.1)
            stop.set()
            await task

        asyncio.run(go())
    assert len(read_decisions(data)) == 40
    files = list((data / "decisions").glob("date=*/part-*.parquet"))
    assert 1 <= len(files) <= 6, len(files)  # ~1.2 s in 0.5 s gathers (a date boundary could add one); was ~40
