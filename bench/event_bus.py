"""Events acknowledged through JetStream per second from one process (issue 13: >= 20,000/s by 2 serving processes).

Open-ended throughput, not latency: ``--concurrency`` tasks each append batches of ``--batch`` events to a
`JetStreamEventLog` (publish with ``Nats-Msg-Id``, async acks, the append returns after every publish ack) for
``--seconds``; prints events/s acknowledged, the append P50/P99 and the process CPU per event. Also, with
``--spool``, the same load against an unreachable server: events/s acknowledged from the local spool.

``--bus-only``: the bus as a serving worker runs it, on the caller's own loop (`JetStreamBus(cfg, loop=...)`),
with pre-encoded rows handed straight to ``append_rows``: the process CPU per acknowledged message is then the
bus's publish and ack path alone (no event building or encoding, no hand-over to a bus thread). A serving
worker's appends are small (a decision's ~5 rows), so compare with ``--batch 5``.

    PYTHONPATH=src python bench/event_bus.py --url nats://127.0.0.1:4222 --seconds 10 --json
    PYTHONPATH=src python bench/event_bus.py --bus-only --batch 5 --seconds 8 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import nats
import uvloop

from kassa import schemas
from kassa.events.jetstream import BusConfig, JetStreamBus
from kassa.events.jetstream_log import JetStreamEventLog


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _timed(append: Callable[[int, int], Awaitable[int]], seconds: float, batch: int,
                 concurrency: int) -> dict[str, float]:
    """``concurrency`` writers calling ``append(writer, first_index)`` (it returns how many were acked) for
    ``seconds``: throughput, append latency and this process's CPU per acknowledged event."""
    latencies: list[float] = []
    acked = 0

    async def worker(w: int) -> None:
        nonlocal acked
        i = 0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            n = await append(w, i)
            latencies.append(time.perf_counter() - t0)
            acked += n
            i += batch

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    latencies.sort()
    return {"events": acked, "events_per_s": acked / wall, "append_p50_ms": statistics.median(latencies) * 1000,
            "append_p99_ms": latencies[int(len(latencies) * 0.99)] * 1000, "cpu_us_per_event": cpu / acked * 1e6}


async def _load(log: JetStreamEventLog, seconds: float, batch: int, concurrency: int) -> dict[str, float]:
    run = uuid.uuid4().hex[:8]

    async def append(w: int, i: int) -> int:
        events = [schemas.Event(event_id=f"{run}-{w}-{i + j}", type="click", decision_id=f"d{w}-{i}",
                                offer_id="o1") for j in range(batch)]
        return len((await log.append(events, time.time())).new)

    return await _timed(append, seconds, batch, concurrency)


async def _load_bus(bus: JetStreamBus, seconds: float, batch: int, concurrency: int) -> dict[str, float]:
    """`_load` on the bus's own loop with rows encoded beforehand: the bus's publish and ack path alone."""
    run = uuid.uuid4().hex[:8]
    subject = bus.cfg.events_subject
    body = msgspec.json.encode(schemas.Event(event_id="x" * 16, type="click", decision_id="d1", offer_id="o1"))

    async def append(w: int, i: int) -> int:
        return sum(await bus.append_rows([(subject, f"{run}-{w}-{i + j}", body) for j in range(batch)]))

    return {**await _timed(append, seconds, batch, concurrency), "spooled": bus.spooled_total}


def _bus_only(cfg: BusConfig, seconds: float, batch: int, concurrency: int) -> dict[str, float]:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # a serving worker's loop is uvloop's
        bus = JetStreamBus(cfg, loop=runner.get_loop())

        async def go() -> dict[str, float]:
            while bus.spooling:  # the first drain pass ends spooling once connected
                await asyncio.sleep(0.01)
            try:
                return await _load_bus(bus, seconds, batch, concurrency)
            finally:
                await bus.aclose()

        return runner.run(go())


async def _cleanup(cfg: BusConfig) -> None:
    nc = await nats.connect(cfg.url)
    js = nc.jetstream()
    for name in (cfg.events_stream, cfg.decisions_stream):
        with contextlib.suppress(Exception):  # best effort
            await js.delete_stream(name)
    await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--spool", action="store_true", help="also measure against an unreachable server (spool)")
    ap.add_argument("--bus-only", action="store_true",
                    help="pre-encoded rows to the bus on this loop (as a serving worker's): its publish/ack path")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, object] = {"batch": args.batch, "concurrency": args.concurrency}
    cfg = BusConfig(url=args.url, prefix="bench" + uuid.uuid4().hex[:6], spool_dir=Path(tempfile.mkdtemp()) / "spool")
    if args.bus_only:
        try:
            out["bus_only"] = _bus_only(cfg, args.seconds, args.batch, args.concurrency)
        finally:
            asyncio.run(_cleanup(cfg))
        print(json.dumps(out) if args.json else json.dumps(out, indent=2))
        return
    log = JetStreamEventLog.connect(cfg)
    try:
        out["jetstream"] = asyncio.run(_load(log, args.seconds, args.batch, args.concurrency))
        out["spooled_during_run"] = log.bus.spooled_total
    finally:
        log.close()
        asyncio.run(_cleanup(cfg))
    if args.spool:
        down = BusConfig(url="nats://127.0.0.1:1", prefix="benchdown", spool_dir=Path(tempfile.mkdtemp()) / "spool")
        slog = JetStreamEventLog.connect(down)
        try:
            out["spool"] = asyncio.run(_load(slog, args.seconds, args.batch, args.concurrency))
        finally:
            slog.bus.close(drain_timeout=0)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
