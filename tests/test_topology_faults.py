"""Faults of the scale-out topology (issue 13), with real processes under an open-loop load.

`kill -9` of each role, twice, while decisions stream in at a fixed rate, each followed by its events:

- a serving worker of `kassa serve --workers 2 --learner child` (the supervisor forks it again),
- the learner child of the same command (the supervisor starts it again; it takes the file lease back),
- the single-process embedded `kassa serve` (restarted by the test, like systemd would).

What must hold afterwards: every event acknowledged to the client (2xx) is in the event log (by event_id,
count-exact); every decision answered at least 1 s before a kill is in the decision log; its reward is
joined and learned. For the split roles the learner's lineage counters (`GET /v1/models`:
``rewarded_decisions``, ``reward_sum``, restored from each snapshot's metadata) must equal exactly what the
durable logs say it had to learn: every decision record once, every stored accept once. For the embedded
process, the state journal (``state.db``) read right after each kill must hold every such decision still
inside its reward window with its reward credited, and the restarted process must join exactly those.

Plus JetStream stopped under HTTP event load: a serving process on the JetStream backend acks every event
while a throwaway nats-server is down (spooled) and, once it is back, the stream holds every acked event
once, in order per decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import pytest
import yaml

from kassa.events.decision_log import read_decisions
from kassa.events.jetstream import BusConfig
from kassa.events.jetstream_log import JetStreamEventLog
from kassa.events.join import PendingDecision
from tests.services import start_nats
from tests.test_roles import ADMIN, HEADERS, Project, _children, _free_port, _wait_ready
from tests.test_roles import project as project  # the fixture: projects in tmp_path, stopped after

WAIT = 3.0  # the placement's reward window: decisions answered in the last 3 s before a kill are still open
CATALOG_WAIT = {
    "offers": [{"id": f"o{k}", "kind": "partner", "title": f"Offer {k}", "value": 1 + k,
                "content": {"headline": f"offer {k}"}} for k in range(6)],
    "placements": [{"id": "checkout", "slots": 2, "offers": [f"o{k}" for k in range(6)], "policy": "squarecb",
                    "reward": {"wait_seconds": WAIT, "weights": {"accept": 1.0}}}],
}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


@dataclass
class Answered:
    decision_id: str
    at: float  # wall clock when the answer reached the client
    offers: list[str]
    fallback: bool = False  # answered from defaults (e.g. state unreachable): not registered for learning


@dataclass
class OpenLoop:
    """Decisions at a fixed rate whatever the server does (open loop), each followed by its impression and
    an accept of slot 1's offer. Runs on its own thread and event loop; records what was acknowledged."""

    port: int
    rate: float = 30.0
    answered: dict[str, Answered] = field(default_factory=dict)
    acked_events: list[str] = field(default_factory=list)
    failed: int = 0
    why: list[str] = field(default_factory=list)  # the first failures, for the assertion message
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> OpenLoop:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)

    async def _run(self) -> None:
        url = f"http://127.0.0.1:{self.port}"
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=32)
        timeout = httpx.Timeout(10.0, pool=30.0)
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, limits=limits, timeout=timeout) as client:
            tasks: set[asyncio.Task[None]] = set()
            start, i = time.monotonic(), 0
            while not self._stop.is_set():
                due = start + i / self.rate
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                task = asyncio.create_task(self._one(client, i))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, client: httpx.AsyncClient, i: int) -> None:
        body = {"placement": "checkout", "customer": {"id": f"c{i % 40}"},
                "order": {"id": f"ord-{i}", "currency": "USD", "total": 20.0, "items": []}}
        try:
            r = await client.post("/v1/decisions", json=body)
        except httpx.HTTPError as exc:
            self._fail(f"decision: {exc!r}")
            return
        if r.status_code != 200:
            self._fail(f"decision: {r.status_code} {r.text[:200]}")
            return
        dec = r.json()
        did, offers = dec["decision_id"], [o["offer_id"] for o in dec["offers"]]
        self.answered[did] = Answered(did, time.time(), offers, bool(dec.get("fallback")))
        if not offers:
            return
        events = [{"event_id": f"{did}-i", "type": "impression", "decision_id": did, "offer_id": offers[0]},
                  {"event_id": f"{did}-a", "type": "accept", "decision_id": did, "offer_id": offers[0]}]
        try:
            r = await client.post("/v1/events", json={"events": events})
        except httpx.HTTPError as exc:
            self._fail(f"events: {exc!r}")
            return
        if 200 <= r.status_code < 300:
            self.acked_events.extend(e["event_id"] for e in events)
        else:
            self._fail(f"events: {r.status_code} {r.text[:200]}")

    def _fail(self, why: str) -> None:
        self.failed += 1
        if len(self.why) < 5:
            self.why.append(why)


def _stored_events(data: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(data / "events.db")) as conn:
        return [row[0] for row in conn.execute("SELECT event_id FROM events ORDER BY seq")]


def _decision_records(data: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(data / "decision_records.db")) as conn:
        return [row[0] for row in conn.execute("SELECT decision_id FROM decision_records ORDER BY seq")]


def _logged_decisions(data: Path) -> set[str]:
    return set(read_decisions(data).column("decision_id").to_pylist())


def _served_at(root: Path) -> dict[str, float]:
    """decision_id -> when the server made it (the decision log's ts; the client reads the answer later)."""
    table = read_decisions(root).select(["decision_id", "ts"]).to_pydict()
    return dict(zip(table["decision_id"], table["ts"], strict=True))


def _open_at_kill(load: OpenLoop, kill: float, served_at: dict[str, float]) -> list[Answered]:
    """Decisions answered at least 1 s before ``kill`` whose reward window was still open at it (by the server's
    time of the decision, with 0.2 s to spare: a slow answer can be read long after the decision was made)."""
    return [a for a in load.answered.values() if a.at <= kill - 1.0 and not a.fallback
            and served_at.get(a.decision_id, a.at) + WAIT > kill + 0.2]


def _safe(load: OpenLoop, kills: list[tuple[float, float]]) -> list[Answered]:
    """Decisions answered at least 1 s before every kill that followed them. A kill is (when the signal was
    sent, when the role was back): an answer the client read between the two may have left the killed process
    just before the signal, so it is not counted as answered after the kill either."""
    return [a for a in load.answered.values() if all(not (k - 1.0 < a.at <= back) for k, back in kills)]


def _lineage(port: int) -> dict[str, float]:
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=ADMIN_HEADERS, timeout=10).json()["models"]
    row = next(m for m in models if m["placement"] == "checkout")
    return {"decisions": row["rewarded_decisions"], "reward": row["reward_sum"], "examples": row["learned_examples"]}


def _assert_events_and_decision_log(load: OpenLoop, data: Path, kills: list[tuple[float, float]]) -> list[Answered]:
    stored = _stored_events(data)
    assert len(stored) == len(set(stored)), "an event stored twice"
    missing = set(load.acked_events) - set(stored)
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"
    safe = _safe(load, kills)
    logged = _logged_decisions(data)
    lost = [a for a in safe if a.decision_id not in logged]
    assert not lost, (f"{len(lost)} of {len(safe)} decisions answered >= 1 s before a kill missing from the log: "
                      f"{[(a.decision_id, [round(k - a.at, 3) for k, _ in kills]) for a in lost[:5]]}")
    return safe


def _split_roles(project, **settings: object) -> tuple[Project, int, subprocess.Popen[bytes]]:  # type: ignore[no-untyped-def]
    p = project(**settings)
    (p.root / "catalog.yaml").write_text(yaml.safe_dump(CATALOG_WAIT))
    port = _free_port()
    proc = p.start("serve", "--port", str(port), "--workers", "2", "--learner", "child", log="serve.log")
    _wait_ready(port)
    p.wait_log("serve.log", r"learner active for checkout")
    return p, port, proc


def _learner_and_workers(supervisor: int) -> tuple[int | None, list[int]]:
    learner, workers = None, []
    for pid in _children(supervisor):
        with contextlib.suppress(OSError):
            if "\x00learn\x00" in Path(f"/proc/{pid}/cmdline").read_text():
                learner = pid
            else:
                workers.append(pid)
    return learner, workers


def _wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s: {what}")
        time.sleep(0.1)


def _accepts(data: Path) -> dict[str, float]:
    """decision_id -> when its accept was stored (the event log's received_at)."""
    with contextlib.closing(sqlite3.connect(data / "events.db")) as conn:
        return {row[0][:-2]: row[1] for row in
                conn.execute("SELECT event_id, received_at FROM events WHERE event_id LIKE '%-a'")}


def _records(data: Path) -> list[PendingDecision]:
    decoder = msgspec.msgpack.Decoder(PendingDecision)
    with contextlib.closing(sqlite3.connect(data / "decision_records.db")) as conn:
        return [decoder.decode(row[0]) for row in conn.execute("SELECT body FROM decision_records ORDER BY seq")]


def _assert_learned_exactly_what_was_recorded(p: Project, port: int) -> dict:
    """The learner's lineage (production snapshot metadata) learns every decision record exactly once, and
    every accept stored inside its decision's reward window as its reward: nothing lost, nothing twice, across
    the kills. An accept stored after the window (its POST queued for seconds on this loaded machine) is late
    by definition; the learner may still count one stored within its closing slack (``input_settle_seconds``
    plus a poll), so those bound the reward from above."""
    data = p.root / "data"
    time.sleep(0.5)  # a worker's record writer commits every 20 ms: the last answers' records land first
    records = _records(data)
    assert len(records) == len({r.decision_id for r in records})
    accepts = _accepts(data)
    in_window = sum(1 for r in records if r.decision_id in accepts and accepts[r.decision_id] <= r.deadline)
    in_slack = sum(1 for r in records if r.decision_id in accepts and accepts[r.decision_id] <= r.deadline + 1.0)
    got: dict[str, float] = {}

    def done() -> bool:
        got.update(_lineage(port))
        return got["decisions"] >= len(records)

    # Everything closes WAIT + settle after the last decision; the learner then snapshots within a second.
    _wait_for(done, 20, f"the learner's lineage reaching {len(records)} decisions: {got}\n"
                        f"{p.log('serve.log')[-3000:]}")
    time.sleep(1.2)  # a late duplicate would show in the next snapshot (every second)
    got = _lineage(port)
    assert got["decisions"] == len(records), (got, len(records))
    assert got["examples"] == 2 * len(records), (got, len(records))  # two slots each
    assert in_window <= got["reward"] <= in_slack, (got, in_window, in_slack)
    return {**got, "accepts_in_window": in_window, "accepts_late": len(records) - in_window}


def test_kill_9_of_a_serving_worker_twice_loses_no_acked_event_nor_decision_nor_reward(project) -> None:  # type: ignore[no-untyped-def]
    p, port, proc = _split_roles(project)
    data = p.root / "data"
    load = OpenLoop(port).start()
    kills: list[tuple[float, float]] = []
    try:
        for round_ in range(2):
            time.sleep(2.5)
            _, workers = _learner_and_workers(proc.pid)
            assert len(workers) == 2, workers
            victim = workers[round_ % 2]
            killed = time.time()
            os.kill(victim, signal.SIGKILL)
            kills.append((killed, killed + 0.5))
            p.wait_log("serve.log", rf"worker \d \(pid {victim}\) exited", timeout=10)
            _wait_for(lambda: len(_learner_and_workers(proc.pid)[1]) == 2, 15, "the worker forked again")
        time.sleep(2.0)
    finally:
        load.stop()
    answered_before = len(load.answered)
    assert answered_before > 150, (answered_before, load.failed)
    # the workers' decision-log buffers are written at a graceful stop; the learner is checked first
    got = _assert_learned_exactly_what_was_recorded(p, port)
    records = set(_decision_records(data))
    safe = _safe(load, kills)
    unrecorded = [a.decision_id for a in safe if a.decision_id not in records]
    assert not unrecorded, f"{len(unrecorded)} decisions answered >= 1 s before a kill never reached the learner"
    p.stop()
    _assert_events_and_decision_log(load, data, kills)
    print(f"worker kills: {len(load.answered)} answered, {load.failed} failed requests, "
          f"{len(load.acked_events)} acked events, learned {got}")


def test_kill_9_of_the_learner_child_twice_learns_every_decision_once(project) -> None:  # type: ignore[no-untyped-def]
    p, port, proc = _split_roles(project)
    data = p.root / "data"
    # Other traffic first: more events inside a restarted learner's look-back than it reads in one poll
    # (5,000), as a store has after a minute at ~100 events/s. It must read up to them before closing anything.
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=HEADERS, timeout=30) as client:
        for b in range(28):  # (the body limit allows ~250 of these per request)
            batch = [{"event_id": f"other-{b}-{i}", "type": "click", "decision_id": f"other-{b}-{i // 10}",
                      "offer_id": "o1"} for i in range(250)]
            assert client.post("/v1/events", json={"events": batch}).status_code == 200
    load = OpenLoop(port).start()
    try:
        for _ in range(2):
            time.sleep(2.0)
            learner, _ = _learner_and_workers(proc.pid)
            assert learner is not None
            before = p.log("serve.log").count("learner active for checkout")
            os.kill(learner, signal.SIGKILL)
            _wait_for(lambda: p.log("serve.log").count("learner active for checkout") > before, 15,  # noqa: B023
                      "the learner started again and active")
        time.sleep(2.0)
    finally:
        load.stop()
    assert len(load.answered) > 150, (len(load.answered), load.failed)
    # (a learner's death does not stop serving; slow answers on this loaded machine may still time out)
    assert load.failed < len(load.answered) / 10, load.why
    got = _assert_learned_exactly_what_was_recorded(p, port)
    records = set(_decision_records(data))
    assert all(a.decision_id in records for a in load.answered.values())  # no worker died: every one recorded
    p.stop()
    _assert_events_and_decision_log(load, data, [])
    print(f"learner kills: {len(load.answered)} answered, {len(load.acked_events)} acked events, learned {got}")


def _journal(data: Path) -> dict[str, PendingDecision]:
    decoder = msgspec.msgpack.Decoder(PendingDecision)
    with contextlib.closing(sqlite3.connect(data / "state.db")) as conn:
        return {row[0]: decoder.decode(row[1]) for row in conn.execute("SELECT id, blob FROM pending")}


def _served_here(port: int) -> tuple[int, int]:
    """Decisions this server process made (`kassa_decisions_total`): (not fallback, all). Counted by the server,
    because a decision whose answer timed out on the client was still made. A fallback decision (budget spent,
    state slow) is registered for learning too unless its state write was dropped, so it may or may not join."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=ADMIN_HEADERS, timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith("kassa_decisions_total{")]
    normal = sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'fallback="false"' in line)
    return int(normal), int(sum(float(line.rsplit(" ", 1)[1]) for line in lines))


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_kill_9_of_the_embedded_server_twice_keeps_acked_events_decisions_and_their_rewards(project) -> None:  # type: ignore[no-untyped-def]
    p = project()
    (p.root / "catalog.yaml").write_text(yaml.safe_dump(CATALOG_WAIT))
    data = p.root / "data"
    port = _free_port()
    proc = p.start("serve", "--port", str(port), log="serve.log")
    _wait_ready(port)
    load = OpenLoop(port).start()
    kills: list[tuple[float, float]] = []
    journals: list[dict[str, PendingDecision]] = []
    try:
        for _ in range(2):
            time.sleep(3.0)
            killed = time.time()
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            journals.append(_journal(data))
            proc = p.start("serve", "--port", str(port), log="serve.log")
            _wait_ready(port)
            kills.append((killed, time.time()))
        time.sleep(2.0)
    finally:
        load.stop()
    assert len(load.answered) > 100, (len(load.answered), load.failed)
    acked = set(load.acked_events)
    served_at = _served_at(data)
    for (kill, _), journal in zip(kills, journals, strict=True):
        # still open at the kill and answered >= 1 s before it: journaled, with its accept credited if acked
        at_risk = _open_at_kill(load, kill, served_at)
        assert at_risk
        lost = [a.decision_id for a in at_risk if a.decision_id not in journal]
        assert not lost, f"{len(lost)} of {len(at_risk)} open decisions not in the state journal after kill -9"
        uncredited = [a.decision_id for a in at_risk if f"{a.decision_id}-a" in acked
                      and (journal[a.decision_id].rewards or {}).get(a.offers[0]) != 1.0]
        assert not uncredited, f"{len(uncredited)} acked accepts not credited in the journal"
    # The last process restored the second kill's journal and joins it, plus what it answered itself.
    # (0.3 s after the signal: in-flight answers of the dead process are read by then, and the new one starts
    # in seconds, not in 0.3 s)
    restored = journals[-1]
    mine = [a for a in load.answered.values() if a.at > kills[-1][0] + 0.3 and a.decision_id not in restored]
    time.sleep(0.5)  # (the load has stopped: nothing more is served)
    normal, served = _served_here(port)
    want_decisions, at_most = len(restored) + normal, len(restored) + served
    restored_reward = sum((r.rewards or {}).get(r.offers[0], 0.0) for r in restored.values())
    text = ""

    def joined() -> bool:
        nonlocal text
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=ADMIN_HEADERS, timeout=10).text
        return _metric_sum(text, "kassa_offer_joined_total") >= 2 * want_decisions

    try:
        _wait_for(joined, WAIT + 10, f"{want_decisions} decisions joined by the restarted server")
    except AssertionError:
        raise AssertionError(f"want {want_decisions} decisions ({len(restored)} restored, the rest served "
                             "since); got " + "\n".join(ln for ln in text.splitlines() if "joined" in ln
                                                        or "reward" in ln or "pending" in ln)) from None
    time.sleep(1.0)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=ADMIN_HEADERS, timeout=10).text
    assert 2 * want_decisions <= _metric_sum(text, "kassa_offer_joined_total") <= 2 * at_most
    # The reward: what the journal had credited, plus each later decision's accept if it was stored inside
    # the reward window (an accept queued for seconds on this loaded machine is late by definition; one
    # stored in the loop's closing slack may still count).
    served_at = _served_at(data)
    accepts = _accepts(data)
    late = [accepts[a.decision_id] - served_at.get(a.decision_id, a.at) - WAIT for a in mine
            if a.decision_id in accepts]
    low = restored_reward + sum(1 for x in late if x <= 0)
    high = restored_reward + sum(1 for x in late if x <= 0.5)
    assert low <= _metric_sum(text, "kassa_offer_reward") <= high, (text, low, high)
    want_reward = _metric_sum(text, "kassa_offer_reward")
    p.stop()
    _assert_events_and_decision_log(load, data, kills)
    print(f"embedded kills: {len(load.answered)} answered, {load.failed} failed, {len(acked)} acked events, "
          f"{len(restored)} restored, reward {want_reward}")


def _spool_depth(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=ADMIN_HEADERS, timeout=10).text
    return _metric_sum(text, "kassa_event_spool_depth")


@pytest.mark.parametrize("workers", [1, 2])
def test_jetstream_stopped_under_http_event_load_acks_spools_and_loses_nothing(project, workers: int) -> None:  # type: ignore[no-untyped-def]
    """One process (the bus on a thread of its own) or two serving workers (each with its bus on its server's
    loop, its own spool)."""
    nats_server = start_nats()  # a throwaway server of this test's own: never the shared one
    prefix = "t" + uuid.uuid4().hex[:10]
    cfg = BusConfig(url=nats_server.url, prefix=prefix, spool_dir=Path(nats_server.store) / "reader-spool")
    p = project(events={"backend": "jetstream", "nats_url": nats_server.url, "prefix": prefix})
    try:
        port = _free_port()
        split = ("--workers", "2", "--learner", "external") if workers == 2 else ()
        p.start("serve", "--port", str(port), *split, log="serve.log")
        _wait_ready(port)
        keys = []
        for i in range(8):
            r = httpx.post(f"http://127.0.0.1:{port}/v1/decisions", headers=HEADERS, timeout=10,
                           json={"placement": "checkout", "customer": {"id": f"c{i}"},
                                 "order": {"id": f"o{i}", "currency": "USD", "total": 5.0, "items": []}})
            assert r.status_code == 200, r.text
            keys.append((r.json()["decision_id"], r.json()["offers"][0]["offer_id"]))
        acked: list[tuple[float, str]] = []
        failures: list[str] = []
        stop = threading.Event()

        def writer(decision_id: str, offer_id: str) -> None:
            # One key's events in order: the next is posted once the previous is acknowledged.
            n = 0
            with httpx.Client(headers=HEADERS, timeout=10) as client:
                while not stop.is_set():
                    ids = [f"{decision_id}-{n}", f"{decision_id}-{n + 1}"]
                    body = {"events": [{"event_id": e, "type": "click", "decision_id": decision_id,
                                        "offer_id": offer_id} for e in ids]}
                    try:
                        r = client.post(f"http://127.0.0.1:{port}/v1/events", json=body)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        return
                    if not 200 <= r.status_code < 300 or r.json()["accepted"] != 2:
                        failures.append(f"{r.status_code} {r.text}")
                        return
                    acked.extend((time.monotonic(), e) for e in ids)
                    n += 2
                    time.sleep(0.02)

        threads = [threading.Thread(target=writer, args=k, daemon=True) for k in keys]
        for t in threads:
            t.start()
        time.sleep(1.5)
        nats_server.kill()
        down_at = time.monotonic()
        depths = []
        while time.monotonic() - down_at < 4.0:
            depths.append(_spool_depth(port))
            time.sleep(0.25)
        nats_server.start()  # same port, same store directory
        up_at = time.monotonic()
        time.sleep(2.0)
        stop.set()
        for t in threads:
            t.join(15)
        assert not failures, failures[:5]
        during = [e for at, e in acked if down_at < at < up_at]
        assert len(during) > 50, len(during)  # acknowledged while JetStream was away
        assert max(depths) > 0, depths  # ...from the spool
        if workers == 1:
            _wait_for(lambda: _spool_depth(port) == 0, 20, "the spool drained")
        else:  # /metrics answers from either worker: a graceful stop replays what each still holds
            p.stop()
        reader = JetStreamEventLog.connect(cfg)
        try:
            stored: list[str] = []
            after = 0
            while rows := reader.read(after, 5000):
                stored += [ev.event_id for _, ev in rows]
                after = rows[-1][0]
        finally:
            reader.close()
        assert len(stored) == len(set(stored)), "an event stored twice"
        assert sorted(stored) == sorted(e for _, e in acked)  # count-exact: every acknowledged event, nothing else
        for decision_id, _ in keys:  # order kept per key
            nums = [int(e.rsplit("-", 1)[1]) for e in stored if e.rsplit("-", 1)[0] == decision_id]
            assert nums == list(range(len(nums))), decision_id
        print(f"JetStream outage: {len(acked)} events acked, {len(during)} while NATS was down "
              f"(spool depth up to {max(depths):.0f}), all {len(stored)} in the stream in order")
    finally:
        p.stop()  # before NATS goes: a clean stop drains the bus
        nats_server.stop()  # its store directory (and so the streams) goes with it


def test_kill_9_of_kassa_serve_on_redis_and_jetstream_twice_keeps_acked_events_decisions_and_rewards(
        project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The production backends: per-buyer and join state in Redis, events and decision records on JetStream.
    After each `kill -9`, Redis still holds every decision answered >= 1 s before it and still inside its window,
    with its acknowledged accept credited; the restarted server joins exactly those plus its own; the streams
    hold every acknowledged event and every such decision record."""
    import asyncio

    import nats
    import redis

    from kassa.config import load_settings
    from kassa.events.factory import run_decision_log_writer
    from tests.services import ensure_nats, ensure_redis

    redis_url, nats_url = ensure_redis(), ensure_nats()
    prefix = "t" + uuid.uuid4().hex[:10]
    p = project(state={"backend": "redis", "redis_url": redis_url, "key_prefix": prefix},
                events={"backend": "jetstream", "nats_url": nats_url, "prefix": prefix})
    (p.root / "catalog.yaml").write_text(yaml.safe_dump(CATALOG_WAIT))
    r = redis.Redis.from_url(redis_url)
    cfg = BusConfig(url=nats_url, prefix=prefix, spool_dir=tmp_path / "reader-spool")

    def joined_state() -> dict[str, dict[str, float]]:
        """Open decisions in Redis -> their credited rewards by offer."""
        ids = [m.decode() for m in r.zrange(f"{prefix}:join:due", 0, -1)]
        out = {}
        for decision_id in ids:
            raw = r.hgetall(f"{prefix}:join:r:{decision_id}")
            out[decision_id] = {k.decode(): float(v) for k, v in raw.items() if not k.startswith(b"#")}
        return out

    port = _free_port()
    try:
        proc = p.start("serve", "--port", str(port), log="serve.log")
        _wait_ready(port)
        load = OpenLoop(port).start()
        kills: list[tuple[float, float]] = []
        states: list[dict[str, dict[str, float]]] = []
        try:
            for _ in range(2):
                time.sleep(2.5)
                killed = time.time()
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                time.sleep(0.5)  # commands the dead process wrote to its socket are still executed by Redis
                states.append(joined_state())
                proc = p.start("serve", "--port", str(port), log="serve.log")
                _wait_ready(port)
                kills.append((killed, time.time()))
            time.sleep(1.5)
        finally:
            load.stop()
        assert len(load.answered) > 100, (len(load.answered), load.failed, load.why)
        acked = set(load.acked_events)
        restored = states[-1]
        time.sleep(0.5)  # (the load has stopped: nothing more is served)
        normal, served = _served_here(port)
        want_decisions, at_most = len(restored) + normal, len(restored) + served
        text = ""

        def joined() -> bool:
            nonlocal text
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=ADMIN_HEADERS, timeout=10).text
            return _metric_sum(text, "kassa_offer_joined_total") >= 2 * want_decisions

        _wait_for(joined, WAIT + 10, f"{want_decisions} decisions joined by the restarted server")
        time.sleep(1.0)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=ADMIN_HEADERS, timeout=10).text
        assert 2 * want_decisions <= _metric_sum(text, "kassa_offer_joined_total") <= 2 * at_most, (
            text, want_decisions, at_most)
        assert r.zcard(f"{prefix}:join:due") == 0
        p.stop()

        # the streams: every acknowledged event once; every decision answered >= 1 s before a kill
        reader = JetStreamEventLog.connect(cfg)
        try:
            stored: list[str] = []
            after = 0
            while rows := reader.read(after, 5000):
                stored += [ev.event_id for _, ev in rows]
                after = rows[-1][0]
        finally:
            reader.close()
        assert len(stored) == len(set(stored)), "an event stored twice"
        missing = acked - set(stored)
        assert not missing, f"{len(missing)} acknowledged events lost"
        writer = load_settings(None, data_dir=str(tmp_path / "writer"),
                               **{"events.backend": "jetstream", "events.nats_url": nats_url, "events.prefix": prefix})

        safe = _safe(load, kills)

        async def write_log() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(run_decision_log_writer(writer, stop))
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                with contextlib.suppress(Exception):  # no file yet
                    if {a.decision_id for a in safe} <= _logged_decisions(writer.data_path):
                        break
            stop.set()
            await task

        asyncio.run(write_log())
        logged = _logged_decisions(writer.data_path)
        for (kill, _), state in zip(kills, states, strict=True):
            # (a decision answered with `fallback: true`, Redis too slow for its budget, is not registered for
            # learning: ADR 0011; counted and reported, not required)
            at_risk = _open_at_kill(load, kill, _served_at(writer.data_path))
            assert at_risk
            lost = [a.decision_id for a in at_risk if a.decision_id not in state]
            assert not lost, f"{len(lost)} of {len(at_risk)} open decisions not in Redis after kill -9"
            uncredited = [a.decision_id for a in at_risk if f"{a.decision_id}-a" in acked
                          and state[a.decision_id].get(a.offers[0]) != 1.0]
            assert not uncredited, f"{len(uncredited)} acked accepts not credited in Redis"
        lost_records = [a.decision_id for a in safe if a.decision_id not in logged]
        assert not lost_records, f"{len(lost_records)} of {len(safe)} decisions missing from the decision stream"
        fallbacks = sum(1 for a in load.answered.values() if a.fallback)
        print(f"redis+jetstream kills: {len(load.answered)} answered ({fallbacks} fallback), {load.failed} failed, "
              f"{len(acked)} acked "
              f"events, {len(restored)} restored from Redis, {len(logged)} decision records")
    finally:
        p.stop()

        async def drop_streams() -> None:
            nc = await nats.connect(nats_url)
            for name in (cfg.events_stream, cfg.decisions_stream):
                with contextlib.suppress(Exception):
                    await nc.jetstream().delete_stream(name)
            await nc.close()

        with contextlib.suppress(Exception):
            asyncio.run(drop_streams())
        for key in r.scan_iter(f"{prefix}:*", count=1000):
            r.delete(key)
        r.close()
