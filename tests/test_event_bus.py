"""The JetStream event bus against a real nats-server: acks, dedupe, replay, the spool through an outage,
durable consumers across restarts. Each test uses its own stream prefix and deletes its streams."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
import uvloop
from nats.js import api

from kassa import schemas
from kassa.events.consumers import DecisionLogConsumer, EventConsumer, FilePositionStore, run_consumer
from kassa.events.decision_log import DecisionRecord, read_decisions
from kassa.events.jetstream import BusConfig, JetStreamBus, PublishFailed, _AckBatch, take_queued_first
from kassa.events.jetstream_log import DecisionPublisher, JetStreamEventLog
from tests.services import NatsServer, ensure_nats, start_nats


def _cfg(url: str, tmp_path: Path, **kw: float) -> BusConfig:
    return BusConfig(url=url, prefix="t" + uuid.uuid4().hex[:10], spool_dir=tmp_path / "spool",
                     reconnect_wait_seconds=0.1, **kw)  # type: ignore[arg-type]


def _delete_streams(cfg: BusConfig) -> None:
    async def go() -> None:
        nc = await nats.connect(cfg.url, allow_reconnect=False, max_reconnect_attempts=0)
        js = nc.jetstream()
        for name in (cfg.events_stream, cfg.decisions_stream):
            with contextlib.suppress(Exception):
                await js.delete_stream(name)
        await nc.close()

    with contextlib.suppress(Exception):
        asyncio.run(go())


@pytest.fixture
def cfg(tmp_path: Path) -> Iterator[BusConfig]:
    c = _cfg(ensure_nats(), tmp_path)
    yield c
    _delete_streams(c)


@pytest.fixture
def throwaway() -> Iterator[NatsServer]:
    server = start_nats()
    yield server
    server.stop()


def _events(prefix: str, n: int, key: str = "d1") -> list[schemas.Event]:
    return [schemas.Event(event_id=f"{prefix}-{i}", type="click", decision_id=key) for i in range(n)]


def _wait(cond, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_append_is_acked_by_jetstream_and_duplicates_by_event_id_are_counted_once(cfg: BusConfig) -> None:
    log = JetStreamEventLog.connect(cfg)
    other = JetStreamEventLog.connect(dataclasses.replace(cfg, spool_dir=cfg.spool_dir.parent / "other-spool"))
    try:
        async def go() -> None:
            first = await log.append(_events("a", 10), 1000.0)
            assert len(first.new) == 10 and first.duplicates == 0
            assert all(ev.timestamp == 1000.0 for ev in first.new)  # stamped like the SQLite log
            again = await log.append(_events("a", 3) + _events("b", 2), 1001.0)
            assert len(again.new) == 2 and again.duplicates == 3
            # Another serving process (its own connection and spool) is deduplicated by JetStream too.
            cross = await other.append(_events("a", 5), 1002.0)
            assert cross.duplicates == 5 and not cross.new

        asyncio.run(go())
        assert log.count() == 12 and log.max_seq() == 12
        assert log.bus.spool_depth == 0 and not log.bus.spooling
    finally:
        other.close()
        log.close()


def test_appends_of_one_loop_pass_share_one_bus_hand_over_and_each_gets_its_own_rows(cfg: BusConfig) -> None:
    log = JetStreamEventLog.connect(cfg)
    calls: list[int] = []
    append_rows = log.bus.append_rows

    async def counted(rows):  # type: ignore[no-untyped-def]
        calls.append(len(rows))
        return await append_rows(rows)

    log.bus.append_rows = counted  # type: ignore[method-assign]
    try:
        async def go() -> None:
            # Three POSTs in one pass of the loop, the third repeating an event of the first (a client retry).
            results = await asyncio.gather(log.append(_events("a", 3), 1000.0), log.append(_events("b", 2), 1000.0),
                                           log.append(_events("a", 1) + _events("c", 1), 1000.0))
            assert [len(r.new) for r in results] == [3, 2, 1] and [r.duplicates for r in results] == [0, 0, 1]
            assert [ev.event_id for ev in results[2].new] == ["c-0"]
            assert calls == [7]
            alone = await log.append(_events("d", 2), 1001.0)  # a later pass: its own hand-over
            assert len(alone.new) == 2 and calls == [7, 2]

        asyncio.run(go())
        assert [ev.event_id for _, ev in log.read(0, 100)] == ["a-0", "a-1", "a-2", "b-0", "b-1", "c-0", "d-0", "d-1"]
    finally:
        log.close()


def test_an_append_after_the_bus_closed_fails_instead_of_hanging(cfg: BusConfig) -> None:
    log = JetStreamEventLog.connect(cfg)
    log.close()

    async def go() -> None:
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(log.append(_events("a", 1), 1000.0), 5)

    asyncio.run(go())


def test_a_pull_fetch_taking_queued_messages_first_gets_what_nats_py_gets(cfg: BusConfig) -> None:
    async def go() -> list[list[list[bytes]]]:
        nc = await nats.connect(cfg.url)
        js = nc.jetstream()
        stream, subject = cfg.events_stream, cfg.events_subject
        await js.add_stream(name=stream, subjects=[subject])
        for i in range(250):
            await js.publish(subject, b"m%d" % i)
        out = []
        for fast in (False, True):
            consumer = api.ConsumerConfig(ack_policy=api.AckPolicy.NONE, mem_storage=True)
            psub = await js.pull_subscribe(subject, stream=stream, config=consumer)
            if fast:
                take_queued_first(psub._sub)
            batches = [[m.data for m in await psub.fetch(n, timeout=2)] for n in (100, 1, 120, 100)]
            # nothing left: times out as nats-py does (its own error, or asyncio's when the wait_for around its
            # request ran out first on a loaded machine)
            with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
                await psub.fetch(10, timeout=0.3)
            assert psub._sub._pending_size == 0
            await psub.unsubscribe()
            out.append(batches)
        await nc.close()
        return out

    slow, fast = asyncio.run(go())
    assert fast == slow
    assert [m for batch in fast for m in batch] == [b"m%d" % i for i in range(250)]
    assert [len(b) for b in fast] == [100, 1, 120, 29]


def test_read_replays_in_append_order_from_any_position(cfg: BusConfig) -> None:
    log = JetStreamEventLog.connect(cfg)
    try:
        async def go() -> None:
            for b in range(5):
                await log.append(_events(f"b{b}", 20), float(b))

        asyncio.run(go())
        seqs, ids = [], []
        after = 0
        while rows := log.read(after, 30):
            seqs += [s for s, _ in rows]
            ids += [ev.event_id for _, ev in rows]
            after = rows[-1][0]
        assert seqs == list(range(1, 101))
        assert ids == [f"b{b}-{i}" for b in range(5) for i in range(20)]
        assert [ev.event_id for _, ev in log.read(57, 3)] == ["b2-17", "b2-18", "b2-19"]  # a jump backwards
        assert log.read(100) == []
    finally:
        log.close()


def test_events_are_spooled_while_jetstream_is_down_and_replayed_in_order_with_none_lost(
        throwaway: NatsServer, tmp_path: Path) -> None:
    cfg = _cfg(throwaway.url, tmp_path, ack_timeout_seconds=0.5)
    log = JetStreamEventLog.connect(cfg)
    acked: list[str] = []
    depth_seen: list[int] = []
    recovered: list[float] = []

    async def writer(key: str, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            batch = [schemas.Event(event_id=f"{key}-{i + j}", type="click", decision_id=key) for j in range(5)]
            result = await log.append(batch, time.time())
            assert not result.duplicates
            acked.extend(ev.event_id for ev in batch)
            i += 5
            await asyncio.sleep(0.002)

    async def go() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(writer(f"k{n}", stop)) for n in range(4)]
        await asyncio.sleep(0.5)
        throwaway.kill()  # JetStream gone mid-load
        await asyncio.sleep(1.5)
        depth_seen.append(log.bus.spool_depth)
        await asyncio.to_thread(throwaway.start)  # same port, same store
        t0 = time.monotonic()
        while (log.bus.spooling or log.bus.spool_depth) and time.monotonic() - t0 < 15:
            await asyncio.sleep(0.05)  # the writers keep going: the replay must catch up under load
        recovered.append(time.monotonic() - t0)
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(go())
        assert depth_seen[0] > 0  # acknowledged from the spool while down
        assert recovered[0] < 15  # back to publishing directly while the load went on
        _wait(lambda: log.bus.spool_depth == 0 and not log.bus.spooling, 30)
        rows, after = [], 0
        while batch := log.read(after, 5000):
            rows += batch
            after = batch[-1][0]
        stored = [ev.event_id for _, ev in rows]
        assert len(stored) == len(set(stored))  # no event twice
        assert sorted(stored) == sorted(acked)  # count-exact: every acknowledged event, nothing else
        for key in ("k0", "k1", "k2", "k3"):  # order kept per key
            nums = [int(e.split("-")[1]) for e in stored if e.startswith(key + "-")]
            assert nums == sorted(nums)
    finally:
        log.close()


def test_publish_acks_skip_nats_py_per_message_path_and_keep_their_meaning_across_a_nats_restart(
        throwaway: NatsServer, tmp_path: Path) -> None:
    """The bus's ack subscription is routed (`kassa.events.nats_routes`): no ack reaches nats-py's `Msg` queue, and
    acks, duplicates, 503 no-responders and error bodies mean what they meant, before and after a restart."""
    cfg = _cfg(throwaway.url, tmp_path, ack_timeout_seconds=0.5)
    bus = JetStreamBus(cfg)

    def publish(*ids: str, subject: str = cfg.events_subject) -> list[bool]:
        acks = bus.thread.call(bus._publish([(subject, i, b"{}") for i in ids]), timeout=10)
        return [ack.duplicate for ack in acks]

    def routed_only() -> bool:
        sub = bus._ack_sub
        return sub._received == 0 and sub._pending_queue.empty() and sub._id in bus.nc._kassa_routes  # type: ignore[union-attr]

    try:
        _wait(lambda: bus.connected and not bus.spooling)
        assert publish("r-0", "r-1", "r-2") == [False, False, False]
        assert publish("r-1", "r-3") == [True, False]  # duplicates reported per row
        with pytest.raises(PublishFailed, match="NoStreamResponseError"):
            publish("x", subject=cfg.prefix + ".nowhere")  # no stream: the server's 503 status
        sub = bus._ack_sub
        assert routed_only()

        throwaway.kill()
        _wait(lambda: not bus.connected)
        with pytest.raises(PublishFailed):
            publish("r-4")
        throwaway.start()  # same port, same store: nats-py resubscribes with the same subscription id
        _wait(lambda: bus.connected and not bus.spooling)
        assert publish("r-3", "r-4") == [True, False]
        with pytest.raises(PublishFailed, match="NoStreamResponseError"):
            publish("y", subject=cfg.prefix + ".nowhere")
        assert bus._ack_sub is sub and routed_only()

        async def error_body() -> BaseException | None:  # an API error in the ack body fails its batch
            batch = _AckBatch(2, asyncio.get_running_loop().create_future())
            bus._ack_waiting[10**9] = (batch, 0)
            bus._on_ack(f"{bus._ack_prefix}.{10**9}".encode(), b"", b'{"error":{"code":500,"err_code":10077}}',
                        None)
            return batch.future.exception()

        assert isinstance(bus.thread.call(error_body(), timeout=5), nats.js.errors.APIError)
        assert bus._ack_waiting == {}
    finally:
        bus.close()


def test_a_bus_started_while_nats_is_down_spools_and_delivers_once_it_starts(tmp_path: Path) -> None:
    server = start_nats()
    server.kill()
    cfg = _cfg(server.url, tmp_path)
    log = JetStreamEventLog.connect(cfg)
    try:
        result = asyncio.run(log.append(_events("early", 7), 5.0))
        assert len(result.new) == 7 and log.bus.spool_depth == 7
        again = asyncio.run(log.append(_events("early", 2), 5.0))  # a retry during the outage
        assert again.duplicates == 2
        server.start()
        _wait(lambda: log.bus.spool_depth == 0 and not log.bus.spooling, 30)
        assert [ev.event_id for _, ev in log.read(0, 100)] == [f"early-{i}" for i in range(7)]
    finally:
        log.close()
        server.stop()


def test_reads_while_nats_is_down_warn_once_per_interval_not_per_read(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # `kassa stream` tails the event log every 20 ms: started while NATS was away it wrote this WARNING on every read,
    # ~50 lines a second (278 in a 6 s run), where every other dependency's outage says so once per 10 s.
    server = start_nats()
    server.kill()
    log = JetStreamEventLog.connect(_cfg(server.url, tmp_path))
    try:
        with caplog.at_level("WARNING", logger="kassa.bus"):
            for _ in range(50):
                assert log.read(0, 100) == []
        lines = [r.getMessage() for r in caplog.records if "event log read while NATS is unreachable" in r.getMessage()]
        assert len(lines) == 1, lines
    finally:
        log.close()
        server.stop()


def test_streams_nats_refuses_are_named_once_per_interval_not_reported_as_disconnects(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # A NATS that answers but refuses the streams (here a dedupe window longer than the retention; also overlapping
    # subjects, an account's JetStream limits): every retry closed its probe connection, which logged "NATS
    # disconnected; spooling until it is back" twice a second, while why was only at DEBUG.
    cfg = dataclasses.replace(_cfg(ensure_nats(), tmp_path), retention_seconds=60.0, dedupe_window_seconds=120.0)
    with caplog.at_level("DEBUG", logger="kassa.bus"):
        log = JetStreamEventLog.connect(cfg)
        try:
            time.sleep(2.0)  # ~4 retries at reconnect_wait_seconds 0.1 + the ack timeout each
        finally:
            log.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert not any("NATS disconnected" in w for w in warnings), warnings
    refused = [w for w in warnings if "duplicates window can not be larger" in w]
    assert len(refused) == 1, warnings  # the start's line; the retries' at most once per 10 s
    _delete_streams(cfg)


def test_nats_restarted_with_its_store_wiped_gets_the_streams_again_and_every_spooled_event(tmp_path: Path) -> None:
    # The streams went with the store: every replay of the spool was refused (no responders) for ever, logged
    # at DEBUG, while events kept being acknowledged into the spool.
    server = start_nats()
    cfg = _cfg(server.url, tmp_path, ack_timeout_seconds=0.5)
    log = JetStreamEventLog.connect(cfg)
    try:
        assert len(asyncio.run(log.append(_events("before", 3), 5.0)).new) == 3
        server.kill()
        shutil.rmtree(Path(server.store) / "jetstream")  # the streams and their messages
        result = asyncio.run(log.append(_events("during", 5), 5.0))
        assert len(result.new) == 5 and log.bus.spool_depth == 5
        server.start()
        _wait(lambda: log.bus.spool_depth == 0 and not log.bus.spooling, 20)
        assert [ev.event_id for _, ev in log.read(0, 100)] == [f"during-{i}" for i in range(5)]
        assert len(asyncio.run(log.append(_events("after", 2), 5.0)).new) == 2
        assert log.bus.spool_depth == 0
    finally:
        log.close()
        server.stop()


def test_a_spool_left_by_a_dead_process_is_delivered_by_the_next_one(tmp_path: Path) -> None:
    server = start_nats()
    server.kill()
    cfg = _cfg(server.url, tmp_path)
    try:
        first = JetStreamBus(cfg)
        rows = [(cfg.events_subject, f"x-{i}", b'{"event_id":"x-%d","type":"click"}' % i) for i in range(3)]
        assert first.thread.call(first.append_rows(rows)) == [True, True, True]
        first.thread.stop()  # dies without draining: its spool file stays behind, unlocked once closed
        first.spool.close()
        server.start()
        log = JetStreamEventLog.connect(cfg)
        try:
            _wait(lambda: log.bus.spool_depth == 0 and not log.bus.spooling, 30)
            assert [ev.event_id for _, ev in log.read(0, 10)] == ["x-0", "x-1", "x-2"]
        finally:
            log.close()
    finally:
        server.stop()


def test_event_consumer_resumes_after_restart_without_loss_or_double_processing(cfg: BusConfig,
                                                                                tmp_path: Path) -> None:
    log = JetStreamEventLog.connect(cfg)
    seen: list[str] = []
    position = FilePositionStore(tmp_path / "learner.position")

    async def apply(batch: list[tuple[int, schemas.Event]]) -> None:
        seen.extend(ev.event_id for _, ev in batch)

    async def consume_until(n: int, crash_before_ack: bool = False) -> None:
        consumer = EventConsumer(cfg, "learner", apply, position, batch=100)  # type: ignore[arg-type]
        if crash_before_ack:
            async def lost_ack(msgs):  # type: ignore[no-untyped-def]
                # The effect and the position are stored, then the process dies before acking.
                fresh = [(m.metadata.sequence.stream, m.data) for m in msgs]
                await consumer.handler(fresh)
                position.save(fresh[-1][0])
                consumer.stop()
            consumer._handle = lost_ack  # type: ignore[method-assign]
        await consumer.start()
        task = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + 15
        while len(seen) < n and not task.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        consumer.stop()
        await task
        await consumer.close()

    try:
        asyncio.run(log.append(_events("c", 300), 1.0))
        asyncio.run(consume_until(100))
        first = len(seen)
        assert 100 <= first <= 300
        asyncio.run(log.append(_events("c2", 200), 2.0))
        asyncio.run(consume_until(first + 100, crash_before_ack=True))
        asyncio.run(consume_until(500))
        expected = [f"c-{i}" for i in range(300)] + [f"c2-{i}" for i in range(200)]
        assert seen == expected  # every event once, in order, across three runs
    finally:
        log.close()


def _record(i: int, ts: float) -> DecisionRecord:
    return DecisionRecord(decision_id=f"dec-{i}", ts=ts, placement="p", model_version="v1", request_id=None,
                          customer_id=f"c{i}", features={"x": float(i)}, candidates=["a", "b"],
                          probabilities=[0.5, 0.5], chosen=["a"], chosen_probabilities=[0.5], explored=False,
                          fallback=False, took_ms=1.0)


def test_an_idle_decision_publisher_sleeps_until_a_record_comes_and_then_publishes_it(cfg: BusConfig) -> None:
    bus = JetStreamBus(cfg)
    publisher = DecisionPublisher(bus, flush_seconds=0.01)
    rounds = 0
    publish_buffered = publisher._publish_buffered

    async def counted() -> int:
        nonlocal rounds
        rounds += 1
        return await publish_buffered()

    publisher._publish_buffered = counted  # type: ignore[method-assign]
    try:
        _wait(lambda: publisher._idle)
        before = rounds
        time.sleep(0.5)  # ticking every 10 ms would be ~50 rounds
        assert rounds == before and publisher._idle
        for round_ in range(3):  # each idle spell ends with the next append
            publisher.append(_record(round_, 1_780_000_000.0))
            _wait(lambda r=round_: publisher.written == r + 1, timeout=5)  # type: ignore[misc]
            _wait(lambda: publisher._idle)
        assert publisher.pending == 0
    finally:
        started = time.monotonic()
        publisher.close()  # an idle publisher stops at once
        assert time.monotonic() - started < 2
        bus.close()


def test_decision_records_reach_the_parquet_log_exactly_once_across_writer_restarts(cfg: BusConfig,
                                                                                     tmp_path: Path) -> None:
    bus = JetStreamBus(cfg)
    publisher = DecisionPublisher(bus)
    root = tmp_path / "dlog"
    day, next_day = 1_780_000_000.0, 1_780_086_400.0  # two date partitions in one batch
    try:
        for i in range(400):
            publisher.append(_record(i, day if i % 2 else next_day))
        publisher.flush()
        assert publisher.written == 400 and publisher.pending == 0

        async def write(expect: int = 0, stop_after_files: int | None = None) -> DecisionLogConsumer:
            writer = DecisionLogConsumer(cfg, root, batch=150)
            stop = asyncio.Event()
            if stop_after_files is not None:
                real = writer._write_file

                def crash_after(*args):  # type: ignore[no-untyped-def]
                    path = real(*args)
                    if writer.files_written >= stop_after_files:
                        raise _Killed("killed after a file, before the batch's ack")
                    return path
                writer._write_file = crash_after  # type: ignore[method-assign]
            task = asyncio.create_task(run_consumer(writer, stop))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not task.done():
                if stop_after_files is None and writer.written >= expect:
                    break
                await asyncio.sleep(0.05)
            stop.set()
            with pytest.raises(_Killed) if stop_after_files is not None else _nothing():
                await task
            return writer

        asyncio.run(write(stop_after_files=1))  # one date's file of the first batch, then killed
        assert len(read_decisions(root)) < 400
        asyncio.run(write(expect=400 - len(read_decisions(root))))
        table = read_decisions(root)
        ids = table.column("decision_id").to_pylist()
        assert len(ids) == 400 and len(set(ids)) == 400
        for i in range(400, 450):  # a later writer run picks up only what is new
            publisher.append(_record(i, day))
        publisher.flush()
        assert asyncio.run(write(expect=50)).written == 50
        ids = read_decisions(root).column("decision_id").to_pylist()
        assert len(ids) == 450 and len(set(ids)) == 450
    finally:
        publisher.close()
        bus.close()


class _Killed(BaseException):
    """A crash: not an ``Exception``, so the consumer's retry loop does not catch it."""


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_the_server_on_the_jetstream_backend_acks_events_and_publishes_decision_records(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings
    from tests.conftest import ADMIN, CATALOG, PUB, SECRET, decision_body

    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    prefix = "t" + uuid.uuid4().hex[:10]
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog), admin_key=ADMIN,
                             publishable_key=PUB, secret_key=SECRET,
                             **{"events.backend": "jetstream", "events.nats_url": ensure_nats(),
                                "events.prefix": prefix})
    kassa = Kassa(settings, seed=7)
    cfg = kassa.bus.cfg if kassa.bus is not None else None
    assert cfg is not None and isinstance(kassa.event_log, JetStreamEventLog)
    try:
        with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
            d = client.post("/v1/decisions", json=decision_body()).json()
            offer_id = d["offers"][0]["offer_id"]
            events = [{"event_id": "e1", "type": "impression", "decision_id": d["decision_id"], "offer_id": offer_id},
                      {"event_id": "e2", "type": "accept", "decision_id": d["decision_id"], "offer_id": offer_id},
                      {"event_id": "e2", "type": "accept", "decision_id": d["decision_id"], "offer_id": offer_id}]
            assert client.post("/v1/events", json={"events": events}).json() == {"accepted": 2, "duplicates": 1,
                                                                              "unknown_decisions": 0}
            assert client.post("/v1/events", json={"events": events[:2]}).json() == {"accepted": 0, "duplicates": 2,
                                                                                  "unknown_decisions": 0}
            kassa.decision_log.flush()
            assert "kassa_event_spool_depth 0.0" in client.get("/metrics").text
        reader = JetStreamEventLog.connect(dataclasses.replace(cfg, spool_dir=tmp_path / "reader-spool"))
        try:
            assert [ev.event_id for _, ev in reader.read(0, 10)] == ["e1", "e2"]
        finally:
            reader.close()

        async def decisions_in_stream() -> int:
            nc = await nats.connect(cfg.url)
            info = await nc.jetstream().stream_info(cfg.decisions_stream)
            await nc.close()
            return int(info.state.messages)

        assert asyncio.run(decisions_in_stream()) == 1
    finally:
        _delete_streams(cfg)


def test_the_server_starts_and_acks_events_into_the_spool_while_nats_is_down(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings
    from tests.conftest import ADMIN, CATALOG, PUB, SECRET, decision_body

    server = start_nats()
    server.kill()
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog), admin_key=ADMIN,
                             publishable_key=PUB, secret_key=SECRET,
                             **{"events.backend": "jetstream", "events.nats_url": server.url,
                                "events.prefix": "t" + uuid.uuid4().hex[:10]})
    kassa = Kassa(settings, seed=7)
    try:
        with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
            d = client.post("/v1/decisions", json=decision_body())
            assert d.status_code == 200
            event = {"event_id": "down-1", "type": "impression", "decision_id": d.json()["decision_id"],
                     "offer_id": d.json()["offers"][0]["offer_id"]}
            assert client.post("/v1/events", json={"events": [event]}).json() == {"accepted": 1, "duplicates": 0,
                                                                                "unknown_decisions": 0}
            kassa.decision_log.flush()
            assert "kassa_event_spool_depth 2.0" in client.get("/metrics").text  # the event and the decision
    finally:
        server.stop()


def test_the_stream_processor_tails_jetstream_and_resumes_from_its_checkpoint_once(cfg: BusConfig,
                                                                                 tmp_path: Path) -> None:
    from kassa.features.streaming.processor import StreamProcessor
    from tests.test_streaming import CUSTOMER, T0, make_store, order_event, stored

    log = JetStreamEventLog.connect(cfg)
    store = make_store()
    checkpoint = tmp_path / "stream.checkpoint"

    async def run(n_new: int, first: int) -> StreamProcessor:
        await log.append([order_event(f"o{i}", T0 + i, customer="c1") for i in range(first, first + n_new)], T0)
        proc = StreamProcessor([CUSTOMER], store, log, clock=lambda: T0 + 100, checkpoint_path=checkpoint,
                               batch_size=7)
        await proc.catch_up()
        await proc.save_checkpoint()
        return proc

    try:
        first = asyncio.run(run(20, 0))
        assert (first.processed, first.seq) == (20, 20)
        second = asyncio.run(run(5, 20))  # a restart: state and position from the checkpoint, only new events
        assert second.restored and (second.processed, second.duplicates, second.seq) == (25, 0, 25)
        row = asyncio.run(stored(store, CUSTOMER, "c1"))
        assert row is not None and row["orders_1h"] == 25
    finally:
        log.close()


def test_the_decision_log_writer_runner_writes_what_serving_processes_publish(cfg: BusConfig,
                                                                             tmp_path: Path) -> None:
    from kassa.config import load_settings
    from kassa.events.factory import open_bus, open_decision_publisher, run_decision_log_writer

    settings = load_settings(None, data_dir=str(tmp_path / "writer"),
                             **{"events.backend": "jetstream", "events.nats_url": cfg.url, "events.prefix": cfg.prefix})
    bus = open_bus(settings)
    assert bus is not None
    publisher = open_decision_publisher(bus)
    try:
        for i in range(3):
            publisher.append(_record(i, 1_780_000_000.0))
        publisher.flush()

        async def go() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(run_decision_log_writer(settings, stop))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(read_decisions(settings.data_path)) < 3:
                await asyncio.sleep(0.1)
            stop.set()
            await task

        asyncio.run(go())
        assert sorted(read_decisions(settings.data_path).column("decision_id").to_pylist()) == [
            "dec-0", "dec-1", "dec-2"]
    finally:
        publisher.close()
        bus.close()


def test_a_bus_on_an_adopted_loop_takes_appends_on_it_and_refuses_blocking_calls_from_it(cfg: BusConfig) -> None:
    """A serving worker's bus (`kassa.roles.workers`): built on the server's loop before it runs, no thread of its
    own; appends and wake-ups go to it without a cross-thread hand-over, a blocking call from the loop raises
    instead of waiting for itself, one from another thread still waits for the loop, and it closes awaited."""
    bus_threads = sum(t.name == "kassa-bus" for t in threading.enumerate())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop = runner.get_loop()
        bus = JetStreamBus(cfg, loop=loop)  # connects by running the loop until it has: nobody runs it yet
        assert bus.thread.loop is loop and bus.connected
        assert sum(t.name == "kassa-bus" for t in threading.enumerate()) == bus_threads
        log = JetStreamEventLog(bus)
        publisher = DecisionPublisher(bus, flush_seconds=0.01)
        submitted: list[object] = []
        submit = bus.thread.submit
        bus.thread.submit = lambda coro: (submitted.append(coro), submit(coro))[1]  # type: ignore[method-assign]

        async def go() -> None:
            assert bus.thread.here()
            results = await asyncio.gather(log.append(_events("a", 3), 1000.0), log.append(_events("b", 2), 1000.0))
            assert [len(r.new) for r in results] == [3, 2]
            while not publisher._idle:
                await asyncio.sleep(0.01)
            publisher.append(_record(0, 1_780_000_000.0))  # wakes the idle task on this loop
            while publisher.written < 1:
                await asyncio.sleep(0.01)
            with pytest.raises(RuntimeError, match="await it instead"):
                bus.thread.call(asyncio.sleep(0))  # it would wait for the loop it blocks
            for close in (log.close, publisher.close, bus.close):
                with pytest.raises(RuntimeError, match="await aclose"):
                    close()
            assert await asyncio.to_thread(log.count) == 5  # a reader thread waits for this loop as before
            publisher.append(_record(1, 1_780_000_000.0))
            await publisher.aclose()  # publishes what is buffered
            assert publisher.written == 2 and publisher.pending == 0
            await log.aclose()
            await bus.aclose()

        runner.run(asyncio.wait_for(go(), 30))
        assert len(submitted) == 1  # the reader thread's request; none for the appends or the wake-up


def test_a_bus_loop_that_dies_at_any_point_leaves_no_coroutine_never_awaited(tmp_path: Path) -> None:
    """A process dying with its bus (the loop stopped without `close`, as in the dead-process test above) must not
    leave a task whose coroutine never started: once dropped, it is finalized with the RuntimeWarning "coroutine
    'Event.wait' was never awaited". The drain task used to make one each time it went back to waiting. The
    test looks for such a task on the stopped loop rather than for the warning itself, which comes whenever the
    bus is garbage collected (pytest's log capture keeps it alive past the test). NATS is unreachable here so
    that no client connection dies with the loop too."""

    async def wake_then_die(bus: JetStreamBus, yields: int) -> None:
        bus._kick()
        for _ in range(yields):
            await asyncio.sleep(0)
        asyncio.get_running_loop().stop()

    never_started: dict[int, list[str]] = {}
    for yields in range(8):  # stop the loop a few iterations after waking the drain task
        bus = JetStreamBus(_cfg("nats://127.0.0.1:1", tmp_path / str(yields)), connect_timeout=0.2)
        try:
            time.sleep(0.05)  # the drain task parked, waiting to be woken
            bus.thread.submit(wake_then_die(bus, yields))
            bus.thread._thread.join(timeout=5)
            assert not bus.thread._thread.is_alive()
            created = [repr(t.get_coro()) for t in asyncio.all_tasks(bus.thread.loop)
                       if inspect.getcoroutinestate(t.get_coro()) == inspect.CORO_CREATED]  # type: ignore[arg-type]
            if created:
                never_started[yields] = created
        finally:
            bus.thread.loop.close()
            bus.spool.close()
    assert never_started == {}


def test_run_consumer_cancelled_leaves_no_task_behind(cfg: BusConfig, tmp_path: Path) -> None:
    """Cancelling `run_consumer` (a role shutting down) ends the task waiting on its stop event too, instead of
    leaving it pending on the loop (and, on a loop that is then dropped, never awaited)."""
    async def apply(batch: list[tuple[int, schemas.Event]]) -> None:
        return None

    async def go() -> set[str]:
        consumer = EventConsumer(cfg, "cancelled", apply, FilePositionStore(tmp_path / "p"), fetch_timeout=0.2)
        runner = asyncio.create_task(run_consumer(consumer, asyncio.Event()))
        await asyncio.sleep(0.5)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await asyncio.sleep(0)
        return {repr(t.get_coro()) for t in asyncio.all_tasks() if t is not asyncio.current_task()}

    assert asyncio.run(go()) == set()


def test_a_spool_replay_batch_lets_the_loop_serve_between_its_rows_and_keeps_their_order(cfg: BusConfig) -> None:
    """On a serving worker's loop a replay of the spool (`_drain_once`) publishes in batches of 1,000 rows; it
    yields to the loop every `_DRAIN_YIELD_EVERY` rows instead of holding requests for the whole batch (~4.5 ms
    measured), and its rows still reach the stream in order with one ack each."""
    from kassa.events import jetstream

    assert 0 < jetstream._DRAIN_YIELD_EVERY < jetstream._DRAIN_BATCH
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        bus = JetStreamBus(cfg, loop=runner.get_loop())

        async def go() -> tuple[int, list[int]]:
            ticks = 0
            publishing = True

            async def ticker() -> None:
                nonlocal ticks
                while publishing:
                    await asyncio.sleep(0)
                    ticks += 1

            rows = [(cfg.events_subject, f"replay-{i}", b"{}") for i in range(300)]
            task = asyncio.create_task(ticker())
            await asyncio.sleep(0)
            ticks = 0
            acks = await bus._publish(rows, yield_every=100)
            publishing = False
            await task
            await bus.aclose()
            return ticks, [a.seq for a in acks]

        ticks, seqs = runner.run(asyncio.wait_for(go(), 30))
    assert ticks >= 2, ticks  # the loop ran other tasks at least at rows 100 and 200
    assert seqs == sorted(seqs) and len(set(seqs)) == 300  # in order, each stored once


def test_event_ids_that_differ_only_in_what_a_nats_header_cannot_carry_are_not_duplicates(cfg: BusConfig) -> None:
    # nats-py strips a header value and turns CR/LF into spaces: " e1 " and "e1\n" were acked as duplicates of
    # "e1" (dropped; the SQLite log keeps each), and a blank id had no dedupe at all (each retry was stored)
    log = JetStreamEventLog.connect(cfg)
    try:
        def event(event_id: str) -> schemas.Event:
            return schemas.Event(event_id=event_id, type="click", decision_id="d1")

        async def go() -> None:
            ids = ["e1", " e1 ", "e1\n", "a\rb", "a\nb", "a b", " ", "\t", "=?ZTE="]
            first = await log.append([event(i) for i in ids], 1000.0)
            assert [e.event_id for e in first.new] == ids and first.duplicates == 0
            again = await log.append([event(i) for i in ids], 1001.0)  # a client's retry: every one a duplicate
            assert not again.new and again.duplicates == len(ids)

        asyncio.run(go())
        assert log.count() == 9
    finally:
        log.close()


def test_the_writers_consumers_write_what_nats_py_metadata_and_a_full_decode_would_have(cfg: BusConfig,
                                                                                          tmp_path: Path) -> None:
    """The decision-log writer's consumers read each message's sequence and stored time from its reply subject and
    keep the features as the publisher's JSON (bench/writer_cpu.py): the Parquet rows are the published records'
    `records_to_table`, and each archived event's ``received_at`` the ``msg.metadata.timestamp`` nats-py gives."""
    import sqlite3

    from kassa.events.consumers import EventArchiveConsumer
    from kassa.events.decision_log import records_to_table
    from tests.test_decision_log import ODD_FEATURES

    bus = JetStreamBus(cfg)
    publisher = DecisionPublisher(bus)
    log = JetStreamEventLog(bus)
    records = [msgspec.structs.replace(_record(i, 1_780_000_000.0 + i), features={**ODD_FEATURES, "i": i},
                                   candidate_signals=[" |r s_co", ""], candidate_offer_features=["", " |g x=ü"])
               if i % 2 else _record(i, 1_780_000_000.0 + i) for i in range(30)]
    events = [schemas.Event(event_id=f"ev-{i}", type="impression" if i % 3 else "order", decision_id=f"dec-{i}",
                            offer_id="a", timestamp=1_780_000_000.0 + i if i % 2 else None,
                            order=None if i % 3 else schemas.Order(id=f"o{i}", total=5.0)) for i in range(40)]
    root = tmp_path / "writer"
    try:
        for r in records:
            publisher.append(r)
        publisher.flush()
        bus.thread.call(log.append(events, 1_780_000_100.0), timeout=10)

        async def go() -> dict[str, float]:
            writer, archive = DecisionLogConsumer(cfg, root, batch=7), EventArchiveConsumer(cfg, root, batch=9)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(run_consumer(c, stop)) for c in (writer, archive)]
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (writer.written < len(records) or archive.written < len(events)):
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*tasks)
            nc = await nats.connect(cfg.url)  # what nats-py's metadata says of each event
            sub = await nc.jetstream().pull_subscribe(cfg.events_subject, stream=cfg.events_stream)
            msgs = await sub.fetch(len(events), timeout=5)
            await nc.close()
            return {msgspec.json.decode(m.data)["event_id"]: m.metadata.timestamp.timestamp() for m in msgs}

        stored = asyncio.run(go())
    finally:
        publisher.close()
        bus.close()
    assert read_decisions(root).sort_by("decision_id").equals(records_to_table(records).sort_by("decision_id"))
    with sqlite3.connect(root / "events.db") as conn:
        rows = conn.execute("SELECT event_id, type, decision_id, received_at, body FROM events ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == [e.event_id for e in events] and len(stored) == len(events)
    for (event_id, type_, decision_id, received_at, body), ev in zip(rows, events, strict=True):
        assert (type_, decision_id, received_at) == (ev.type, ev.decision_id, stored[event_id])
        assert msgspec.json.decode(body, type=schemas.Event).event_id == event_id


def test_the_decision_log_writer_checks_each_record_against_the_files_past_its_position_only(
        cfg: BusConfig, tmp_path: Path) -> None:
    """Every file the writer wrote stayed in the ranges each record was checked against (to skip what a file
    already holds after a redelivery): at a file per 0.5 s gather, 7,200 ranges after an hour, ~340 µs of CPU a
    record, growing for as long as the process ran. Only files past the position can hold a record to come."""
    writer = DecisionLogConsumer(cfg, tmp_path / "dlog")
    day = 1_780_000_000.0
    encode = msgspec.json.Encoder().encode

    async def go() -> None:
        for k in range(40):  # as `_handle` does: the handler, then the position
            batch = [(seq, encode(_record(seq, day + (seq % 2) * 86_400))) for seq in (2 * k + 1, 2 * k + 2)]
            await writer._write(batch)
            writer.last_seq = batch[-1][0]

    asyncio.run(go())
    assert writer.written == 80 and writer.files_written == 80
    assert sum(len(spans) for spans in writer._ranges.values()) <= 2  # the last batch's files (two dates)
    assert len(read_decisions(tmp_path / "dlog")) == 80
    # a redelivery after a crash between the files and the position: the last batch's records are not written again
    restarted = DecisionLogConsumer(cfg, tmp_path / "dlog")
    assert restarted._load_position() == 78

    async def again() -> None:
        restarted.last_seq = 78
        await restarted._write([(seq, encode(_record(seq, day + (seq % 2) * 86_400))) for seq in (79, 80)])

    asyncio.run(again())
    assert restarted.written == 0 and len(read_decisions(tmp_path / "dlog")) == 80
