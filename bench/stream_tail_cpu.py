"""CPU per event of `kassa stream` tailing JetStream into Redis, measured without the HTTP topology (issue 13).

Owns the robust half of the `kassa stream` numbers: process CPU time (every thread: the NATS bus thread, the
read worker thread, the event loop) per event, which a busy shared machine barely moves, where the
freshness of bench/topology_events.py swings with every other process on the cores. It publishes ``--events``
events of the topology bench's checkout mix (bench/topology_events.py `EventMix`: an order, three impressions,
an accept for ~10 %) to a JetStream stream of its own, then alternates ``--repeats`` times:

- ``read``: `JetStreamEventLog.read` of the whole stream in batches of ``--batch`` (what reading costs);
- ``tail``: a fresh `StreamProcessor` with the example feature views catching up on the whole stream into
  the Redis online store under a key prefix of its own (read, decode, aggregate, write).

and reports the median CPU µs per event of each (and the spread), with the load average. The stream and the
Redis keys are deleted at the end.

    PYTHONPATH=src python bench/stream_tail_cpu.py --events 200000 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

from kassa import schemas
from kassa.events.jetstream import BusConfig, JetStreamBus
from kassa.events.jetstream_log import JetStreamEventLog
from kassa.features.definitions import load_repo
from kassa.features.online.redis import RedisOnlineStore
from kassa.features.streaming.processor import StreamProcessor
from topology_events import EventMix

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_PAUSES: list[float] = []  # seconds the loop spent in each checkpoint save (encode on the loop, or fork)
MAIN_THREAD_CPU: list[float] = []  # of each tail: the event loop's thread (aggregate, write); the rest reads


def publish(log: JetStreamEventLog, n: int, seed: int) -> None:
    mix = EventMix(seed, [f"offer-{i}" for i in range(50)])
    decode = msgspec.convert
    events: list[schemas.Event] = []
    k = 0
    while len(events) < n:
        events += [decode(e, schemas.Event) for e in mix.checkout("cpu", k)]
        k += 1
    events = events[:n]
    now = time.time()

    async def go() -> None:
        for i in range(0, n, 1000):
            # event times spread over the last minutes, like a live stream read a little behind
            await log.append(events[i:i + 1000], now - (n - i) / 20_000)

    asyncio.run(go())


def read_all(log: JetStreamEventLog, batch: int) -> int:
    seq, total = 0, 0
    while True:
        rows = log.read(seq, batch)
        if not rows:
            return total
        seq = rows[-1][0]
        total += len(rows)


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (forked checkpoint writers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(fn: Any) -> Any:
    def timed(*a: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a)
        if asyncio.iscoroutine(out):
            async def wait() -> Any:
                res = await out
                CHECKPOINT_PAUSES.append(time.perf_counter() - t0)
                return res
            return wait()
        CHECKPOINT_PAUSES.append(time.perf_counter() - t0)
        return out
    return timed


def tail_all(log: JetStreamEventLog, views: list[Any], redis_url: str, prefix: str, batch: int,
             freeze: bool, checkpoint: Path | None, checkpoint_every: float) -> int:
    async def go() -> int:
        t0 = time.thread_time()
        store = RedisOnlineStore(redis_url, prefix, views=views)
        try:
            proc = StreamProcessor(views, store, log, batch_size=batch, checkpoint_path=checkpoint,
                                   checkpoint_interval=checkpoint_every)
            if freeze:  # what `kassa stream` does (`StreamProcessor.run(own_process=True)`)
                from kassa.features.streaming.processor import HeapFreezer

                proc.heap = HeapFreezer()
                proc.fork_checkpoints = True
            for name in ("save_checkpoint", "_checkpoint_in_child"):  # the loop's pause per checkpoint
                if hasattr(proc, name):
                    setattr(proc, name, _timed(getattr(proc, name)))
            total = 0
            while True:
                n = await proc.catch_up()
                total += n
                if n == 0:
                    MAIN_THREAD_CPU.append(time.thread_time() - t0)
                    if getattr(proc, "_child", None) is not None:
                        proc._reap_child(True)  # its CPU then counts (children's times)
                    return total
        finally:
            if freeze:
                gc.unfreeze()
            await store.clear()
            await store.close()

    return asyncio.run(go())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phases", default="read,tail")
    p.add_argument("--features", default=str(ROOT / "examples" / "features.yaml"))
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoint-every", type=float, default=0.0, help="seconds between checkpoints (0: none)")
    p.add_argument("--no-freeze-heap", dest="freeze_heap", action="store_false",
                   help="tail without `HeapFreezer` (before it existed)")
    p.add_argument("--publish-only", action="store_true", help="publish, print the prefix, keep the stream")
    p.add_argument("--prefix", help="measure the stream a --publish-only run left")
    p.add_argument("--keep", action="store_true", help="keep the stream at the end (for another run)")
    args = p.parse_args(argv)
    prefix = args.prefix or f"sfcpu{uuid.uuid4().hex[:8]}"
    views = [v for v in load_repo(args.features).views if v.kind == "stream"]
    bus = JetStreamBus(BusConfig(url=args.nats_url, prefix=prefix, spool_dir=Path(f"/tmp/{prefix}-spool")))
    log = JetStreamEventLog(bus, own_bus=True)
    results: dict[str, list[float]] = {ph: [] for ph in args.phases.split(",")}
    loads: list[float] = []
    try:
        if args.prefix is None:
            t0 = time.perf_counter()
            publish(log, args.events, args.seed)
            print(f"published {args.events:,} events in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.publish_only:
            print(prefix)
            return 0
        for r in range(args.repeats):
            for ph in results:
                loads.append(os.getloadavg()[0])
                c0, w0 = _cpu(), time.perf_counter()
                if ph == "read":
                    n = read_all(log, args.batch)
                else:
                    ckpt = Path(f"/tmp/{prefix}-r{r}.checkpoint") if args.checkpoint_every else None
                    n = tail_all(log, views, args.redis_url, f"{prefix}r{r}", args.batch, args.freeze_heap, ckpt,
                                 args.checkpoint_every or 60.0)
                    if ckpt is not None:
                        ckpt.unlink(missing_ok=True)
                cpu, wall = _cpu() - c0, time.perf_counter() - w0
                assert n == args.events, (ph, n)
                results[ph].append(cpu / n * 1e6)
                if CHECKPOINT_PAUSES:
                    print(f"  {len(CHECKPOINT_PAUSES)} checkpoints, loop paused max "
                          f"{max(CHECKPOINT_PAUSES) * 1e3:.1f} ms, median "
                          f"{statistics.median(CHECKPOINT_PAUSES) * 1e3:.1f} ms", file=sys.stderr)
                    CHECKPOINT_PAUSES.clear()
                main = f" (event loop thread {MAIN_THREAD_CPU[-1] / n * 1e6:.1f})" if ph == "tail" else ""
                print(f"{ph} #{r + 1}: {cpu / n * 1e6:.1f} µs CPU/event{main}, {n / wall:,.0f} events/s wall, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        async def drop() -> None:
            js = bus.js
            if js is not None:
                with contextlib.suppress(Exception):
                    await js.delete_stream(bus.cfg.events_stream)
                with contextlib.suppress(Exception):
                    await js.delete_stream(bus.cfg.decisions_stream)

        if not args.publish_only and not args.keep:
            with contextlib.suppress(Exception):
                bus.thread.call(drop(), timeout=10)
        log.close()
    if args.publish_only:
        return 0
    out = {ph: {"median_us": round(statistics.median(v), 2), "min_us": round(min(v), 2), "max_us": round(max(v), 2)}
           for ph, v in results.items()}
    out["load_average"] = [round(min(loads), 1), round(max(loads), 1)]  # type: ignore[assignment]
    print(json.dumps(out) if args.json else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
