"""The decision-log writer on `events.backend: jetstream`: serving processes publish each decision's record to the
decisions stream, and one writer per deployment (by a lease) writes it to ``<data_dir>/decisions`` as Parquet:
`kassa learn` runs it (``roles.decision_log_writer: learner``, the default), `kassa log write` runs it alone.
Real NATS JetStream and Redis (tests/services.py), a stream prefix and a Redis key prefix per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import redis

from kassa import schemas
from kassa.app import Kassa
from kassa.config import Settings, load_settings
from kassa.events.decision_log import read_decisions
from kassa.roles.learner import LearnerRole
from tests import test_learner_jetstream
from tests.test_learner_jetstream import _settings_tree
from tests.test_roles import HEADERS, SRC, Project, _free_port, _wait_ready

Names = tuple[str, str, str, str]
jetstream_names = test_learner_jetstream.names  # the fixture: (NATS url, stream prefix, Redis url, key prefix)


def _settings(tree: dict, data_dir: Path, **roles: object) -> Settings:
    tree = {**tree, "data_dir": str(data_dir), "roles": {**tree["roles"], **roles}}
    return msgspec.convert(tree, Settings)


def _logged(data_dir: Path) -> list[str]:
    if not (data_dir / "decisions").is_dir():
        return []
    return list(read_decisions(data_dir).column("decision_id").to_pylist())


async def _decide(server: Kassa, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        req = msgspec.convert({"placement": "checkout", "customer": {"id": f"c{i}"},
                               "order": {"id": f"ord-{i}", "currency": "USD", "total": 20.0, "items": []}},
                              schemas.DecisionRequest)
        response = await server.engine.decide(req)  # a fallback answer (a loaded machine) is logged as well
        ids.append(response.decision_id)
    return ids


async def _wait_logged(data_dir: Path, n: int, seconds: float = 15.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(_logged(data_dir)) < n:
        await asyncio.sleep(0.1)
    return _logged(data_dir)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_kassa_learn_writes_the_decision_log_of_what_serving_processes_publish(
        tmp_path: Path, jetstream_names: Names, anyio_backend: str) -> None:
    tree = _settings_tree(tmp_path, *jetstream_names)
    server = Kassa(_settings(tree, tmp_path / "serve"), seed=1, role="serve")
    learner = LearnerRole(_settings(tree, tmp_path / "learn", lease_ttl_seconds=1.5))
    stop = asyncio.Event()
    task = asyncio.create_task(learner.run(stop))
    try:
        ids = await _decide(server, 25)
        logged = await _wait_logged(tmp_path / "learn", len(ids))
        assert sorted(logged) == sorted(ids)
        more = await _decide(server, 5, start=25)
        logged = await _wait_logged(tmp_path / "learn", len(ids) + len(more))
        await asyncio.sleep(0.5)  # nothing written twice after either
        assert sorted(_logged(tmp_path / "learn")) == sorted(ids + more)
        assert not _logged(tmp_path / "serve")  # the serving process publishes; it writes no Parquet itself
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await server.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_learner_with_the_writer_off_writes_no_decision_log(
        tmp_path: Path, jetstream_names: Names, anyio_backend: str) -> None:
    tree = _settings_tree(tmp_path, *jetstream_names)
    server = Kassa(_settings(tree, tmp_path / "serve"), seed=1, role="serve")
    learner = LearnerRole(_settings(tree, tmp_path / "learn", decision_log_writer="off"))
    stop = asyncio.Event()
    task = asyncio.create_task(learner.run(stop))
    try:
        deadline = time.monotonic() + 20
        while "checkout" not in learner.joiner.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "checkout" in learner.joiner.active
        ids = await _decide(server, 10)
        deadline = time.monotonic() + 15
        while len(learner.joiner) < len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(learner.joiner) == len(ids)  # the learner has read every decision...
        await asyncio.sleep(1.5)
        assert _logged(tmp_path / "learn") == []  # ...and written none of them to the decision log
        assert learner.writer is None
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)
        await server.stop()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_writer_whose_lease_was_taken_writes_no_more_and_says_so(
        tmp_path: Path, jetstream_names: Names, anyio_backend: str) -> None:
    from kassa.learn.online.lease import LeaseLost
    from kassa.roles.decision_log import DecisionLogWriterRole

    _, prefix, redis_url, _ = jetstream_names
    tree = _settings_tree(tmp_path, *jetstream_names)
    server = Kassa(_settings(tree, tmp_path / "serve"), seed=1, role="serve")
    stalls: list[str] = []
    writer = DecisionLogWriterRole(_settings(tree, tmp_path / "w", lease_ttl_seconds=1.5), on_stall=stalls.append)
    writer.start()
    try:
        await writer.round()
        assert writer.active
        ids = await _decide(server, 10)
        assert sorted(await _wait_logged(tmp_path / "w", len(ids))) == sorted(ids)
        # a successor took the lease over (this process paused past its TTL, say): the key holds its token now
        client = redis.Redis.from_url(redis_url)
        key = f"{prefix}:decision-log:lease:writer"
        assert client.get(key) is not None
        client.set(key, b"successor:1:x", px=60_000)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # its keeper's next renewal finds the lease gone
            try:
                writer.check()
            except LeaseLost:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(LeaseLost, match="decision-log writer"):
            writer.check()
        await _decide(server, 10, start=10)
        server.decision_log.flush()
        deadline = time.monotonic() + 5
        while writer.active and time.monotonic() < deadline:  # its next batch is fenced: the writer stops
            with contextlib.suppress(LeaseLost):
                await writer.round()
            await asyncio.sleep(0.05)
        assert not writer.active
        await asyncio.sleep(0.5)
        assert sorted(_logged(tmp_path / "w")) == sorted(ids)  # nothing of the second batch written
        assert not stalls
    finally:
        await writer.close()
        await server.stop()
    assert client.get(key) == b"successor:1:x"  # the lost lease was not released: it is the successor's


def test_kassa_log_write_refuses_the_sqlite_backend_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "kassa", "log", "write", "--data-dir", str(tmp_path / "d")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "events.backend: sqlite" in lines[0] and "nothing to run" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "d").exists()


def _publish(tree: dict, root: Path, n: int, every: float = 0.0, stop: threading.Event | None = None) -> list[str]:
    """Decisions made by a serving Kassa of this test process: ``n`` of them, or (``stop``) until it is set."""

    async def go() -> list[str]:
        server = Kassa(_settings(tree, root), seed=3, role="serve")
        ids: list[str] = []
        try:
            while (len(ids) < n) if stop is None else not stop.is_set():
                ids += await _decide(server, 1, start=len(ids))
                if every:
                    await asyncio.sleep(every)
            server.decision_log.flush()
        finally:
            await server.stop()
        return ids

    return asyncio.run(go())


def test_kassa_log_write_writes_the_log_and_stops_cleanly_on_sigterm_and_ctrl_c(
        tmp_path: Path, jetstream_names: Names) -> None:
    tree = _settings_tree(tmp_path, *jetstream_names)
    p = Project(tmp_path, **{**tree, "data_dir": str(tmp_path / "writer")})
    try:
        ids = _publish(tree, tmp_path / "serve", 20)
        first = p.start("log", "write", log="write-1.log")
        p.wait_log("write-1.log", r"decision-log writer active")
        deadline = time.monotonic() + 15
        while len(_logged(tmp_path / "writer")) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(_logged(tmp_path / "writer")) == sorted(ids)
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0, p.log("write-1.log")[-2000:]
        # The lease was released at the stop: the next writer takes it at once, and goes on from the files
        more = _publish(tree, tmp_path / "serve", 5)
        second = p.start("log", "write", log="write-2.log")
        p.wait_log("write-2.log", r"decision-log writer active", timeout=10)
        deadline = time.monotonic() + 15
        while len(_logged(tmp_path / "writer")) < len(ids) + len(more) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert sorted(_logged(tmp_path / "writer")) == sorted(ids + more)
        second.send_signal(signal.SIGINT)
        assert second.wait(20) == 130, p.log("write-2.log")[-2000:]
        assert "Traceback" not in p.log("write-1.log") + p.log("write-2.log")
    finally:
        p.stop()


def test_two_learners_write_the_log_once_and_the_standby_takes_the_writer_over_a_kill_9(
        tmp_path: Path, jetstream_names: Names) -> None:
    _, prefix, redis_url, _ = jetstream_names
    ttl = 1.5
    tree = _settings_tree(tmp_path, *jetstream_names)
    tree["roles"] = {**tree["roles"], "lease_ttl_seconds": ttl}
    # both learners on one data directory, as on the shared volume the decision log's readers use
    p = Project(tmp_path, **{**tree, "data_dir": str(tmp_path / "data")})
    stop = threading.Event()
    published: list[str] = []
    failures: list[BaseException] = []
    try:
        first = p.start("learn", log="learn-a.log")
        p.wait_log("learn-a.log", r"decision-log writer active")
        p.start("learn", log="learn-b.log")
        p.wait_log("learn-b.log", r"started as standby")
        holder = redis.Redis.from_url(redis_url).get(f"{prefix}:decision-log:lease:writer")
        assert holder is not None and f":{first.pid}:" in holder.decode()

        def stream() -> None:
            try:
                published.extend(_publish(tree, tmp_path / "serve", 0, every=0.01, stop=stop))
            except BaseException as exc:  # reported by the test thread
                failures.append(exc)

        driver = threading.Thread(target=stream, daemon=True)
        driver.start()
        deadline = time.monotonic() + 15
        while len(_logged(tmp_path / "data")) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_logged(tmp_path / "data")) >= 20
        assert "decision-log writer active" not in p.log("learn-b.log")  # one writer only
        os.killpg(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        took_over = p.wait_log("learn-b.log", r"decision-log writer active", timeout=15)
        time.sleep(1.0)  # the stream goes on with B writing
        stop.set()
        driver.join(30)
        assert not failures, failures
        assert published
        deadline = time.monotonic() + 15
        while len(_logged(tmp_path / "data")) < len(published) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        logged = _logged(tmp_path / "data")
        print(f"takeover {took_over - killed:.2f} s after kill -9; {len(published)} published, {len(logged)} logged")
        assert took_over - killed <= ttl + ttl / 3 + 2.0, took_over - killed
        assert len(logged) == len(set(logged)), "a decision written twice"
        assert sorted(logged) == sorted(published)
    finally:
        stop.set()
        p.stop()


def test_serve_with_the_learner_as_a_child_writes_the_decision_log_through_it(
        tmp_path: Path, jetstream_names: Names) -> None:
    tree = _settings_tree(tmp_path, *jetstream_names)
    p = Project(tmp_path, **{**tree, "data_dir": str(tmp_path / "data")})
    try:
        port = _free_port()
        p.start("serve", "--port", str(port), "--workers", "2", "--learner", "child", log="serve.log")
        _wait_ready(port)
        ids = []
        with httpx.Client() as client:
            for i in range(20):
                body = {"placement": "checkout", "customer": {"id": f"c{i}"},
                        "order": {"id": f"ord-{i}", "currency": "USD", "total": 20.0, "items": []}}
                r = client.post(f"http://127.0.0.1:{port}/v1/decisions", json=body, headers=HEADERS, timeout=10)
                assert r.status_code == 200, r.text
                ids.append(r.json()["decision_id"])
        deadline = time.monotonic() + 20
        while len(_logged(tmp_path / "data")) < len(ids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(_logged(tmp_path / "data")) == sorted(ids), p.log("serve.log")[-3000:]
    finally:
        p.stop()


def test_the_decision_log_writer_setting_is_checked() -> None:
    assert load_settings(None).roles.decision_log_writer == "learner"
    with pytest.raises(SystemExit, match="decision_log_writer"):
        load_settings(None, **{"roles.decision_log_writer": "sometimes"})


def test_decision_log_writer_off_as_written_in_the_docs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`roles.decision_log_writer: off` (docs/deploy.md) in a YAML file or as KASSA_ROLES__DECISION_LOG_WRITER=off:
    YAML 1.1 reads a bare `off` as false, which was refused ("Expected `str`, got `bool`")."""
    for name in [n for n in os.environ if n.startswith("KASSA_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "kassa.yaml"
    path.write_text("roles:\n  decision_log_writer: off\n")
    assert load_settings(path).roles.decision_log_writer == "off"
    monkeypatch.setenv("KASSA_ROLES__DECISION_LOG_WRITER", "off")
    assert load_settings(None).roles.decision_log_writer == "off"
    monkeypatch.setenv("KASSA_ROLES__DECISION_LOG_WRITER", "learner")
    assert load_settings(path).roles.decision_log_writer == "learner"


# ---------------------------------------------------------------------------------------------- the shadow log
def _shadow_model(server: Kassa, tmp: Path) -> str:
    """A tiny trained model of ``checkout`` registered at the shadow stage and loaded by ``server``: its version."""
    from kassa.learn.online.learner import OnlineLearner

    placement = server.catalog.snapshot.placements["checkout"].placement
    learner = OnlineLearner(placement, tmp / "shadow-learner")
    for k in range(60):
        learner.learn("shared |c country=US", f" |o id=o{k % 6}", float(k % 6 == 2), 1 / 6)
    path, _ = learner.snapshot()
    version = server.model_registry.register("checkout", path, schema_hash=server.schema_hash("checkout") or "",
                                             learner_args=learner.args, source="batch", stage="shadow").version
    server.learning.poll()
    serving = server.models.serving("checkout")
    assert serving is not None and serving.shadow is not None and serving.shadow.version == version
    return version


def _shadow_logged(data_dir: Path) -> list[dict]:
    if not (data_dir / "shadow" / "decisions").is_dir():
        return []
    return read_decisions(data_dir / "shadow").select(["decision_id", "model_version"]).to_pylist()


async def _decide_shadowed(server: Kassa, n: int, start: int) -> list[str]:
    ids = await _decide(server, n, start=start)
    server.shadow.drain(10_000)  # what the serving worker's registry follower does every 50 ms
    server.shadow_log.flush()
    return ids


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_writer_writes_the_shadow_log_the_serving_process_publishes_once_and_apart(
        tmp_path: Path, jetstream_names: Names, anyio_backend: str) -> None:
    import nats

    from kassa.events.factory import bus_config, run_decision_log_writer

    nats_url = jetstream_names[0]
    tree = _settings_tree(tmp_path, *jetstream_names)
    writer_settings = _settings(tree, tmp_path / "w")
    cfg = bus_config(writer_settings)
    # A decisions stream made by an older version (its one subject): the serving process's start adds the shadow's.
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name=cfg.decisions_stream, subjects=[cfg.decisions_subject],
                                    duplicate_window=cfg.dedupe_window_seconds)
    server = Kassa(_settings(tree, tmp_path / "serve"), seed=1, role="serve")

    async def write_until_logged(n: int) -> None:
        """A writer run until both logs hold ``n`` decisions (then half a second more), stopped as at a SIGTERM."""
        stop = asyncio.Event()
        task = asyncio.create_task(run_decision_log_writer(writer_settings, stop, compact=False, events=False))
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not task.done() and (
                    len(_shadow_logged(tmp_path / "w")) < n or len(_logged(tmp_path / "w")) < n):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # nothing more comes
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    try:
        shadow_version = _shadow_model(server, tmp_path)
        ids = await _decide_shadowed(server, 25, start=0)
        assert server.shadow.scored == 25 and server.shadow.dropped == 0
        await write_until_logged(len(ids))
        shadow = _shadow_logged(tmp_path / "w")
        assert sorted(r["decision_id"] for r in shadow) == sorted(ids)  # each decision's shadow record, once
        assert {r["model_version"] for r in shadow} == {shadow_version}
        served = read_decisions(tmp_path / "w").select(["decision_id", "model_version"]).to_pylist()
        assert sorted(r["decision_id"] for r in served) == sorted(ids)  # the served log as before...
        assert shadow_version not in {r["model_version"] for r in served}  # ...with no shadow record in it
        assert not list((tmp_path / "serve").rglob("*.parquet"))  # the serving process wrote no Parquet itself

        # A writer started again (a restart, a takeover) repeats nothing of either log, and goes on with both.
        more = await _decide_shadowed(server, 5, start=25)
        await write_until_logged(len(ids) + len(more))
        shadow = _shadow_logged(tmp_path / "w")
        assert sorted(r["decision_id"] for r in shadow) == sorted(ids + more)
        assert sorted(_logged(tmp_path / "w")) == sorted(ids + more)
        assert not list((tmp_path / "serve").rglob("*.parquet"))
        info = await nc.jetstream().stream_info(cfg.decisions_stream)
        assert sorted(info.config.subjects or []) == sorted([cfg.decisions_subject, cfg.shadow_decisions_subject])
        assert info.state.messages == 2 * len(ids + more)  # no shadow record deduplicated against its served one
    finally:
        await server.stop()
        await nc.close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_shadow_records_reach_the_stream_after_an_older_process_took_the_shadow_subject_away(
        tmp_path: Path, jetstream_names: Names, anyio_backend: str, caplog: pytest.LogCaptureFixture) -> None:
    import nats

    from kassa.events.factory import bus_config

    caplog.set_level("WARNING", logger="kassa.bus")
    tree = _settings_tree(tmp_path, *jetstream_names)
    server = Kassa(_settings(tree, tmp_path / "serve"), seed=1, role="serve")
    cfg = bus_config(server.settings)
    nc = await nats.connect(jetstream_names[0])
    js = nc.jetstream()
    try:
        _shadow_model(server, tmp_path)
        # A process of the previous version starting in a rolling upgrade sets the stream's one old subject again.
        config = (await js.stream_info(cfg.decisions_stream)).config
        assert cfg.shadow_decisions_subject in (config.subjects or [])
        config.subjects = [cfg.decisions_subject]
        await js.update_stream(config)
        ids = await _decide_shadowed(server, 5, start=0)  # the shadow batch finds no stream: spooled, acknowledged
        deadline = time.monotonic() + 15
        info = await js.stream_info(cfg.decisions_stream)
        while info.state.messages < 2 * len(ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            info = await js.stream_info(cfg.decisions_stream)
        assert cfg.shadow_decisions_subject in (info.config.subjects or [])  # put back by the spool's replay
        assert info.state.messages == 2 * len(ids)  # every served and every shadow record, once
        assert server.bus is not None and server.bus.spool_depth == 0
        assert "created them again" in caplog.text  # the replay found no stream for the subject and made it again
    finally:
        await server.stop()
        await nc.close()
