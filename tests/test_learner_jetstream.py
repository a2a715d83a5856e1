"""`kassa learn` on `roles.learner_input: jetstream`: serving processes publish each decision's join record and
its events to JetStream; a learner on any machine joins and learns them, and a standby takes over a killed
one without learning an example twice or losing one. Real NATS JetStream and Redis (tests/services.py), a
stream prefix and a Redis key prefix per test."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
import redis
import yaml

from kassa import schemas
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.events.jetstream import BusConfig, ensure_streams
from kassa.events.join import JoinedExample, PendingDecision
from kassa.learn.online.inputs import JetStreamInput
from kassa.roles.learner import LearnerRole
from tests.services import ensure_nats, ensure_redis, start_nats
from tests.test_roles import HEADERS, SRC, Project, _free_port, _wait_ready

CATALOG = {
    "offers": [{"id": f"o{k}", "kind": "partner", "title": f"Offer {k}", "value": 1 + k,
                "content": {"headline": f"offer {k}"}} for k in range(6)],
    "placements": [{"id": "checkout", "slots": 2, "offers": [f"o{k}" for k in range(6)], "policy": "squarecb",
                    "reward": {"wait_seconds": 1, "weights": {"accept": 1.0}}}],
}


@pytest.fixture
def names() -> Iterator[tuple[str, str, str, str]]:
    """(NATS url, stream prefix, Redis url, Redis key prefix); streams and keys deleted afterwards."""
    nats_url, redis_url = ensure_nats(), ensure_redis()
    token = uuid.uuid4().hex[:10]
    prefix, key_prefix = f"tl{token}", f"kassa-test-jsl-{token}"
    yield nats_url, prefix, redis_url, key_prefix
    cfg = BusConfig(url=nats_url, prefix=prefix, join_records=True)

    async def drop() -> None:
        nc = await nats.connect(nats_url, allow_reconnect=False, max_reconnect_attempts=0)
        for name, _ in cfg.streams():
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(name)
        await nc.close()

    with contextlib.suppress(Exception):
        asyncio.run(drop())
    client = redis.Redis.from_url(redis_url)
    for pattern in (f"{key_prefix}:*", f"{prefix}:*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    client.close()


def _settings_tree(root: Path, nats_url: str, prefix: str, redis_url: str, key_prefix: str) -> dict:
    (root / "catalog.yaml").write_text(yaml.safe_dump(CATALOG))
    return {"catalog_file": str(root / "catalog.yaml"), "admin_key": "jsl-admin", "publishable_key": "roles-pub",
            "learn": {"snapshot_every_seconds": 1, "snapshot_min_learns": 1},
            "events": {"backend": "jetstream", "nats_url": nats_url, "prefix": prefix},
            "state": {"backend": "redis", "redis_url": redis_url, "key_prefix": key_prefix, "timeout_ms": 2000},
            "roles": {"learner_input": "jetstream", "lease": "redis", "redis_url": redis_url,
                      "lease_prefix": prefix, "lease_ttl_seconds": 5.0}}


def test_learner_input_jetstream_needs_the_jetstream_event_backend() -> None:
    with pytest.raises(SystemExit, match=r"events\.backend: jetstream"):
        load_settings(None, **{"roles.learner_input": "jetstream"})


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_decision_made_by_one_server_and_answered_on_the_other_is_learned_from_jetstream(
        tmp_path: Path, names: tuple[str, str, str, str], anyio_backend: str) -> None:
    nats_url, prefix, redis_url, key_prefix = names
    tree = _settings_tree(tmp_path, nats_url, prefix, redis_url, key_prefix)

    def settings(name: str):  # type: ignore[no-untyped-def]
        return msgspec.convert({**tree, "data_dir": str(tmp_path / name)}, type(load_settings(None)))

    a, b = Kassa(settings("a"), seed=1, role="serve"), Kassa(settings("b"), seed=2, role="serve")
    learner = LearnerRole(settings("learn"))
    joined: list[JoinedExample] = []
    on_joined = learner.loop.on_joined
    learner.loop.on_joined = lambda examples: (joined.extend(examples), on_joined and on_joined(examples))
    stop = asyncio.Event()
    task = asyncio.create_task(learner.run(stop))
    try:
        deadline = time.monotonic() + 20
        while "checkout" not in learner.joiner.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "checkout" in learner.joiner.active
        shown: dict[str, list[str]] = {}
        for i in range(20):
            server = a if i % 2 == 0 else b
            req = msgspec.convert({"placement": "checkout", "customer": {"id": f"c{i}"},
                                   "order": {"id": f"ord-{i}", "currency": "USD", "total": 20.0, "items": []}},
                                  schemas.DecisionRequest)
            response = await server.engine.decide(req)
            assert response.offers and not response.fallback
            shown[response.decision_id] = [o.offer_id for o in response.offers]
        # every decision's accept of its first offer goes to the *other* server
        for i, (decision_id, offers) in enumerate(shown.items()):
            other = b if i % 2 == 0 else a
            ack = await other.events.ingest(msgspec.convert(
                {"events": [{"event_id": f"{decision_id}-a", "type": "accept", "decision_id": decision_id,
                             "offer_id": offers[0]}]}, schemas.EventBatch))
            assert ack.accepted == 1
        expected = sum(len(o) for o in shown.values())
        deadline = time.monotonic() + 20
        while learner.loop.learned < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert learner.loop.learned == expected
        rewarded = {(ex.decision_id, ex.offer_id) for ex in joined if ex.reward == 1.0}
        assert rewarded == {(d, o[0]) for d, o in shown.items()}
        assert all(ex.reward == 0.0 for ex in joined if (ex.decision_id, ex.offer_id) not in rewarded)
        assert learner.joiner.closed_with_outcome == len(shown)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        for k in (a, b):
            await k.stop()


@contextlib.asynccontextmanager
async def _input(names: tuple[str, str, str, str]) -> AsyncIterator[tuple[BusConfig, JetStreamInput, Any]]:
    """A started `JetStreamInput` on this test's streams (join records on, 0.3 s settle) and a JetStream
    context to publish with; closed after."""
    nats_url, prefix, _, _ = names
    cfg = BusConfig(url=nats_url, prefix=prefix, join_records=True)
    source = await JetStreamInput(cfg, lookback_seconds=60, settle_seconds=0.3).start()
    assert source.nc is not None
    try:
        yield cfg, source, source.nc.jetstream()
    finally:
        await source.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_jetstream_input_hands_a_decision_over_before_an_event_stored_first(
        tmp_path: Path, names: tuple[str, str, str, str], anyio_backend: str) -> None:
    """The event is stored before its decision's record (a slow serving worker): it waits in the input
    until the record is in, then comes after it."""
    async with _input(names) as (cfg, source, js):
        event = schemas.Event(event_id="e1", type="accept", decision_id="d1", offer_id="o1", timestamp=time.time())
        await js.publish(cfg.events_subject, msgspec.json.encode(event))
        await asyncio.sleep(0.1)
        pending = PendingDecision("d1", "checkout", time.time(), time.time() + 1, "s", ["o1"], ["a"], [1.0])
        await js.publish(cfg.records_subject, msgspec.msgpack.encode(pending))
        decisions: list[str] = []
        events: list[tuple[int, str]] = []
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            batch = await source.poll()
            decisions += [p.decision_id for p in batch.decisions]
            events += [(len(decisions), e.event_id) for e in batch.events]
        assert decisions == ["d1"] and events == [(1, "e1")]  # the event came once the decision had


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_kassa_learn_takes_back_an_order_whose_cancellation_was_stored_before_it_also_after_a_restart(
        tmp_path: Path, names: tuple[str, str, str, str], anyio_backend: str) -> None:
    """The learner reads events in the stream's order, decisions first: a cancellation stored before its order
    (webhooks are not ordered) is held, and the order is taken back as it comes; a learner started later reads
    both again from its look-back and joins the same reward."""
    from kassa.learn.online.handover import HandoverJoiner

    value = schemas.RewardDefinition(weights={"conversion": "value"}, wait_seconds=30)
    now = time.time()
    pending = PendingDecision("d-held", "checkout", now, now + 2, "s", ["o1"], ["a"], [1.0], "c-held", ["SERUM-C"])
    cancel = schemas.Event("r-held", "refund", order=schemas.Order(id="ord-held"))
    bought = schemas.Event("o-held", "order", customer=schemas.Customer(id="c-held"),
                           order=schemas.Order(id="ord-held", created_at=now + 0.1,
                                               items=[schemas.OrderItem(sku="SERUM-C", qty=2, price=19.0)]))

    async def learned(source: JetStreamInput) -> tuple[dict[str, float], HandoverJoiner]:
        joiner = HandoverJoiner(lambda _p: value)
        joiner.activate("checkout", None)
        seen: list[str] = []
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            batch = await source.poll()
            for p in batch.decisions:
                joiner.register(p)
            for e in batch.events:
                seen.append(e.event_id)
                joiner.observe(e)
        assert seen == ["r-held", "o-held"]  # the stream's order: the cancellation first
        return {ex.offer_id: ex.reward for ex in joiner.expire(pending.deadline)}, joiner

    async with _input(names) as (cfg, source, js):
        await js.publish(cfg.records_subject, msgspec.msgpack.encode(pending))
        await js.publish(cfg.events_subject, msgspec.json.encode(cancel))
        await js.publish(cfg.events_subject, msgspec.json.encode(bought))
        rewards, joiner = await learned(source)
        assert rewards == {"o1": 0.0}  # 38.00 before: the cancelled order was learned as a conversion
        assert (joiner.refunds_unmatched, joiner.refunds_taken_back_on_order) == (1, 1)
    async with _input(names) as (cfg, again, js):  # a learner started after both were stored
        assert (await learned(again))[0] == {"o1": 0.0}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_record_stored_after_its_deadline_does_not_close_before_the_events_stored_with_it(
        tmp_path: Path, names: tuple[str, str, str, str], anyio_backend: str) -> None:
    """A serving worker's spool replays a decision's record and its events after a NATS outage, past the
    decision's deadline: `caught_up_to` (what the learner closes by) stays below that deadline until the events
    stored with the record are handed over. It did not: 1,144 of 1,144 events of the decisions made during a
    10 s NATS outage were late, their rewards lost."""
    async with _input(names) as (cfg, source, js):
        now = time.time()
        pending = PendingDecision("d-late", "checkout", now - 10, now - 5, "s", ["o1"], ["a"], [1.0])
        await js.publish(cfg.records_subject, msgspec.msgpack.encode(pending))
        await asyncio.sleep(0.2)  # the spool replays its events a moment after (within settle)
        event = schemas.Event(event_id="e-late", type="accept", decision_id="d-late", offer_id="o1",
                              timestamp=now - 8)
        await js.publish(cfg.events_subject, msgspec.json.encode(event))
        decided = evented = False
        deadline = time.monotonic() + 5
        while not evented and time.monotonic() < deadline:
            batch = await source.poll()
            decided = decided or any(p.decision_id == "d-late" for p in batch.decisions)
            evented = any(e.event_id == "e-late" for e in batch.events)
            if decided and not evented:
                assert source.caught_up_to < pending.deadline  # the learner would close it now, reward lost
        assert decided and evented
        while source.caught_up_to < pending.deadline:  # and it is not held for ever
            assert time.monotonic() < deadline, "caught_up_to stayed held"
            await source.poll()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_jetstream_input_rides_out_a_nats_restart_without_losing_or_repeating_a_message(
        tmp_path: Path, anyio_backend: str) -> None:
    server = await asyncio.to_thread(start_nats)  # it probes with asyncio.run: not on this loop
    cfg = BusConfig(url=server.url, prefix="restart", join_records=True, reconnect_wait_seconds=0.1)
    source = await JetStreamInput(cfg, lookback_seconds=60, settle_seconds=0.0).start()
    assert source.nc is not None

    async def publish(ids: range) -> None:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        now = time.time()
        for i in ids:
            pending = PendingDecision(f"d{i}", "checkout", now, now + 1, "s", ["o1"], ["a"], [1.0])
            await js.publish(cfg.records_subject, msgspec.msgpack.encode(pending), headers={"Nats-Msg-Id": f"d{i}"})
        await nc.close()

    async def read_until(n: int, into: list[str], seconds: float = 15.0) -> None:
        deadline = time.monotonic() + seconds
        while len(into) < n and time.monotonic() < deadline:
            into += [p.decision_id for p in (await source.poll()).decisions]
            await asyncio.sleep(0.02)

    try:
        seen: list[str] = []
        await publish(range(100))
        await read_until(100, seen)
        server.kill()
        for _ in range(5):  # NATS away: polls answer empty, never raise
            assert len(await source.poll()) == 0
        await asyncio.to_thread(server.start)  # same store: the streams are back, the in-memory consumers are not
        await publish(range(100, 150))
        await read_until(150, seen)
        assert seen == [f"d{i}" for i in range(150)]
    finally:
        await source.close()
        server.stop()


# ---------------------------------------------------------------------------------------------- processes
def _one_decision(client: httpx.Client, port: int, i: int, out: list[int]) -> None:
    body = {"placement": "checkout", "customer": {"id": f"c{i % 50}"},
            "order": {"id": f"ord-{uuid.uuid4().hex[:8]}", "currency": "USD", "total": 20.0, "items": []}}
    r = client.post(f"http://127.0.0.1:{port}/v1/decisions", json=body, headers=HEADERS, timeout=10)
    assert r.status_code == 200, r.text
    dec = r.json()
    out.append(len(dec["offers"]))
    if dec["offers"] and i % 3 == 0:
        ev = {"events": [{"event_id": f"{dec['decision_id']}-a", "type": "accept", "decision_id": dec["decision_id"],
                          "offer_id": dec["offers"][0]["offer_id"]}]}
        r = client.post(f"http://127.0.0.1:{port}/v1/events", json=ev, headers=HEADERS, timeout=10)
        assert r.status_code == 200, r.text


def _lineage(log: str) -> list[int]:
    return [int(n) for n in re.findall(r"registered checkout@\d+ as production \((\d+) examples learned\)", log)]


def test_standby_on_jetstream_takes_over_a_kill_9_and_learns_every_example_exactly_once(
        tmp_path: Path, names: tuple[str, str, str, str]) -> None:
    nats_url, prefix, redis_url, key_prefix = names
    p = Project(tmp_path, **_settings_tree(tmp_path, nats_url, prefix, redis_url, key_prefix))
    t_start = time.monotonic()
    try:
        port = _free_port()
        p.start("serve", "--port", str(port), "--workers", "2", "--learner", "external", log="serve.log")
        _wait_ready(port)
        first = p.start("learn", log="learn-a.log")
        p.wait_log("learn-a.log", r"learner active for checkout")
        p.start("learn", log="learn-b.log")
        p.wait_log("learn-b.log", r"started as standby")
        t_ready = time.monotonic()
        slots: list[int] = []
        stop = threading.Event()
        failures: list[BaseException] = []

        def stream() -> None:  # decisions and events without pause, across the kill
            i = 0
            with httpx.Client() as client:
                while not stop.is_set():
                    try:
                        _one_decision(client, port, i, slots)
                    except BaseException as exc:  # reported by the test thread
                        failures.append(exc)
                        return
                    i += 1
                    time.sleep(0.01)  # ~50-100 decisions/s: enough in flight, few enough to learn quickly

        driver = threading.Thread(target=stream, daemon=True)
        driver.start()
        p.wait_log("learn-a.log", r"registered checkout@\d+ as production", timeout=20)
        time.sleep(0.5)  # decisions still open and examples learned after A's last snapshot when it dies
        holder = redis.Redis.from_url(redis_url).get(f"{prefix}:learn:lease:checkout")
        assert holder is not None and f":{first.pid}:" in holder.decode()
        os.killpg(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        took_over = p.wait_log("learn-b.log", r"learner active for checkout", timeout=15)
        assert took_over - killed <= 10.0, took_over - killed
        time.sleep(1.0)  # the stream goes on with B active
        stop.set()
        driver.join(15)
        assert not failures, failures
        expected = sum(slots)
        # every example of every decision served, once, in the lineage B publishes on top of A's snapshot
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and max(_lineage(p.log("learn-b.log")), default=0) < expected:
            time.sleep(0.2)
        learned_b = _lineage(p.log("learn-b.log"))
        print(f"ready after {t_ready - t_start:.1f} s, killed at {killed - t_start:.1f} s, all learned at "
              f"{time.monotonic() - t_start:.1f} s; takeover after kill -9: {took_over - killed:.2f} s;",
              f"{len(slots)} decisions, {expected} examples;",
              f"A published {_lineage(p.log('learn-a.log'))[-1]},",
              re.search(r"learner active for checkout \(.*", p.log("learn-b.log")).group(0),  # type: ignore[union-attr]
              f"B's lineage {learned_b[-1] if learned_b else None}")
        assert learned_b and learned_b[-1] == expected, (expected, learned_b, p.log("learn-b.log")[-3000:])
        time.sleep(1.0)  # nothing more closes: nothing learned twice later either
        assert max(_lineage(p.log("learn-b.log"))) == expected
    finally:
        p.stop()


# A serving worker (`_serve_worker`, as `kassa serve --workers N` forks it) with a probe thread: once ready, it
# serves decisions and events over HTTP, then looks at the bus from inside the worker and stops it with SIGTERM.
_WORKER_PROBE = r'''
import asyncio, json, os, signal, sys, threading, uuid
import httpx
import kassa.api.app as api_app
from kassa.config import load_settings
from kassa.roles.workers import _serve_worker

settings = load_settings(sys.argv[1])
base = f"http://127.0.0.1:{settings.server.port}"
headers = {"Authorization": "Bearer roles-pub"}
built = {}
create_app = api_app.create_app
api_app.create_app = lambda kassa: built.setdefault("app", create_app(kassa))

def probe():
    with httpx.Client(base_url=base, headers=headers, timeout=10) as client:
        while True:
            try:
                if client.get("/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        decisions = events = 0
        for i in range(20):
            r = client.post("/v1/decisions", json={"placement": "checkout", "customer": {"id": f"c{i}"}})
            assert r.status_code == 200, r.text
            dec = r.json()
            decisions += 1
            evs = [{"event_id": f"{dec['decision_id']}-{o['offer_id']}", "type": "impression",
                    "decision_id": dec["decision_id"], "offer_id": o["offer_id"]} for o in dec["offers"]]
            assert client.post("/v1/events", json={"events": evs}).status_code == 200
            events += len(evs)
    kassa = built["app"].state.kassa
    bus = kassa.bus.thread

    async def on_the_loop():
        try:
            bus.call(asyncio.sleep(0), timeout=2)
            refused = None
        except RuntimeError as exc:
            refused = str(exc)
        return threading.current_thread() is threading.main_thread(), refused

    serves_on_main, refused = asyncio.run_coroutine_threadsafe(on_the_loop(), bus.loop).result(10)
    print(json.dumps({"threads": [t.name for t in threading.enumerate()], "bus_on_server_loop": serves_on_main,
                      "refused": refused, "count_from_a_thread": kassa.event_log.count(),
                      "decisions": decisions, "events": events}), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=probe, daemon=True).start()
_serve_worker(settings, None, 0)
'''


def test_a_serving_worker_runs_its_bus_on_the_server_loop_and_drains_it_on_sigterm(
        tmp_path: Path, names: tuple[str, str, str, str]) -> None:
    nats_url, prefix, redis_url, key_prefix = names
    tree = {**_settings_tree(tmp_path, nats_url, prefix, redis_url, key_prefix), "data_dir": str(tmp_path / "data"),
            "server": {"port": _free_port()}}
    (tmp_path / "kassa.yaml").write_text(yaml.safe_dump(tree))
    (tmp_path / "probe.py").write_text(_WORKER_PROBE)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "kassa.yaml")], env=env,
                          capture_output=True, timeout=90)
    out = proc.stdout.decode()
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, out, proc.stderr.decode()[-3000:])
    seen = msgspec.json.decode(out.strip().splitlines()[-1])
    assert seen["bus_on_server_loop"] and "kassa-bus" not in seen["threads"], seen
    assert seen["refused"] and "await it instead" in seen["refused"]  # raised, not deadlocked
    assert seen["count_from_a_thread"] == seen["events"] > 0  # a reader thread still reaches the bus

    async def stored() -> dict[str, int]:
        nc = await nats.connect(nats_url)
        try:
            cfg = BusConfig(prefix=prefix, join_records=True)
            return {name: (await nc.jetstream().stream_info(name)).state.messages for name, _ in cfg.streams()}
        finally:
            await nc.close()

    # what the worker acknowledged (the events) or buffered (decisions, join records) reached JetStream by its stop
    counts = asyncio.run(stored())
    cfg = BusConfig(prefix=prefix, join_records=True)
    assert counts == {cfg.events_stream: seen["events"], cfg.decisions_stream: seen["decisions"],
                      cfg.records_stream: seen["decisions"]}, counts


def test_kassa_learn_started_while_nats_is_down_waits_for_it_and_takes_the_lease_once_it_answers(
        tmp_path: Path, names: tuple[str, str, str, str]) -> None:
    # It exited with a 70-line traceback (NoServersError) and its supervisor restarted it every ~4 s: a crash
    # loop for as long as NATS was away.
    _, prefix, redis_url, key_prefix = names
    server = start_nats()
    try:
        server.kill()
        p = Project(tmp_path, **_settings_tree(tmp_path, server.url, prefix, redis_url, key_prefix))
        learner = p.start("learn", log="learn.log")
        try:
            p.wait_log("learn.log", r"learner input: JetStream at .* unreachable", timeout=20)
            time.sleep(3.0)
            assert learner.poll() is None, p.log("learn.log")[-3000:]
            assert "Traceback" not in p.log("learn.log")
            assert redis.Redis.from_url(redis_url).get(f"{prefix}:learn:lease:checkout") is None  # no lease held
            server.start()
            p.wait_log("learn.log", r"learner active for checkout", timeout=20)
            learner.send_signal(signal.SIGTERM)
            assert learner.wait(20) == 0
        finally:
            p.stop()
    finally:
        server.kill()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_jetstream_input_reads_a_stream_created_again_after_nats_lost_its_store(
        tmp_path: Path, anyio_backend: str) -> None:
    # It re-created its consumer after the last sequence it had read (5), on a new stream numbered from 1: the
    # first 5 records published after the wipe were never read.
    server = await asyncio.to_thread(start_nats)
    cfg = BusConfig(url=server.url, prefix="wiped", join_records=True, reconnect_wait_seconds=0.1)
    source = await JetStreamInput(cfg, lookback_seconds=60, settle_seconds=0.1).start()
    assert source.nc is not None

    async def publish(ids: list[str]) -> None:
        js = source.nc.jetstream()  # type: ignore[union-attr]
        for d in ids:
            pending = PendingDecision(d, "checkout", time.time(), time.time() + 60, "s", ["o1"], ["a"], [1.0])
            await js.publish(cfg.records_subject, msgspec.msgpack.encode(pending))

    async def read(n: int) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            got += [p.decision_id for p in (await source.poll()).decisions]
        return got

    try:
        await publish([f"a{i}" for i in range(5)])
        assert await read(5) == [f"a{i}" for i in range(5)]
        await asyncio.to_thread(server.kill)
        shutil.rmtree(Path(server.store) / "jetstream")
        await asyncio.to_thread(server.start)
        deadline = time.monotonic() + 10
        while not source.nc.is_connected:
            assert time.monotonic() < deadline, "no reconnect"
            await asyncio.sleep(0.05)
        await ensure_streams(source.nc.jetstream(), cfg)  # as the serving workers' bus does
        await publish([f"b{i}" for i in range(3)])
        assert await read(3) == [f"b{i}" for i in range(3)]
    finally:
        await source.close()
        await asyncio.to_thread(server.stop)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_closing_the_input_is_not_logged_as_a_nats_outage(
        names: tuple[str, str, str, str], anyio_backend: str, caplog: pytest.LogCaptureFixture) -> None:
    """A clean stop of `kassa learn` (SIGTERM) ended with `WARNING learner input: NATS disconnected; reconnecting`:
    its own close fired the disconnect callback, which an SRE reads as an outage."""
    caplog.set_level(logging.INFO, logger="kassa.learn")
    async with _input(names) as (_cfg, source, _js):
        assert source.nc is not None and source.nc.is_connected
    await asyncio.sleep(0.2)  # the client's callbacks run on its tasks
    assert not [r.getMessage() for r in caplog.records if "disconnected" in r.getMessage()]
