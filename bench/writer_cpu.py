"""CPU per message of the decision-log writer's two JetStream consumers catching up on a stream (issue 13).

`kassa learn` runs the decision-log writer role (`kassa.roles.decision_log`): `DecisionLogConsumer` (the decisions
stream to Parquet) and `EventArchiveConsumer` (the events stream to ``<data_dir>/events.db``), both on
`DurableConsumer`. This bench owns their CPU per message without the HTTP topology: process CPU time (every
thread: the event loop and the ``to_thread`` workers that write the files), which a busy shared machine moves
far less than wall time. It publishes ``--decisions`` decision records shaped like the decide path's (50
candidates with their probabilities, retrieval signal lines and offer-feature lines, ~25 features; what
`DecisionPublisher` sends) and ``3 x --decisions`` events of the topology bench's checkout mix
(bench/topology_events.py `EventMix`, appended as a serving process appends them) to streams of their own prefix,
then alternates ``--repeats`` times:

- ``fetch_decisions`` / ``fetch_events``: the no-op baseline, a bare nats-py pull loop over the same stream
  (a durable consumer configured as `DurableConsumer` configures it, ``fetch`` of ``--batch``, the batch's last
  message acked; nothing decoded): what receiving the messages costs this process on this machine right now;
- ``decision_log``: a fresh `DecisionLogConsumer` writing the whole stream into a temporary directory;
- ``event_archive``: a fresh `EventArchiveConsumer` copying the whole stream into a temporary ``events.db``.

Each consumer is timed from its first fetch until everything was handed to its handler and written (its start,
the connect and the consumer's creation, is left out). Prints the median CPU µs per message of each (with the
min and max over the repeats), each consumer's median over its baseline's, and the load average. The streams
and the temporary directories are deleted at the end.

    PYTHONPATH=src python bench/writer_cpu.py --decisions 20000 --repeats 5 [--json]

An A/B of two checkouts on one stream: ``--publish-only`` publishes and prints the prefix, then runs of each
checkout (``PYTHONPATH=<its src>``) with ``--prefix <it> --decisions <the same> --keep`` alternate; the last run
without ``--keep`` deletes the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats
import pyarrow.parquet as pq
from nats.js import api

from kassa import schemas
from kassa.decide.retrieval import signals
from kassa.events.consumers import DecisionLogConsumer, DurableConsumer, EventArchiveConsumer
from kassa.events.decision_log import DecisionRecord, loggable_features
from kassa.events.jetstream import BusConfig, JetStreamBus
from kassa.events.jetstream_log import JetStreamEventLog
from topology_events import EventMix

CANDIDATES = 50


def _cpu() -> float:
    return time.process_time()  # every thread of the process


def decision_record(rng: random.Random, i: int, now: float) -> DecisionRecord:
    """A record as `DecisionEngine.decide` builds it for a product placement with retrieval and offer views."""
    kept = [f"prod-{p}" for p in rng.sample(range(2_000), CANDIDATES)]
    weights = [rng.random() for _ in kept]
    total = sum(weights)
    probs = [w / total for w in weights]
    sig = []
    for rank in range(CANDIDATES):
        key = signals.quantise(rng.randrange(1, 8), rng.random(), rng.random() * 5, rng.choice((0, 0, 1, 3)),
                               rng.random() * 90, rng.randrange(-1, 4), rng.random() * 0.1, rng.random() * 0.1,
                               rng.random(), rng.randrange(-1, 6))
        sig.append(signals.suffix(key, rank))
    views = [f" |g cat=c{rng.randrange(30)} price_b={rng.randrange(8)} margin:{rng.random():.3f}"
             if rng.random() < 0.8 else "" for _ in kept]
    features = {f"f{k}": round(rng.random() * 100, 3) for k in range(16)}
    features |= {"orders_30d": rng.randrange(20), "device": rng.choice(("mobile", "desktop")), "country": "US",
                 "categories": [f"cat-{rng.randrange(30)}" for _ in range(3)], "returning": rng.random() < 0.5,
                 "segment": None, "cart_total": round(rng.random() * 300, 2), "lang": "de-DE"}
    chosen = kept[:3]
    return DecisionRecord(
        decision_id=f"{int(now)}-{i:08d}-{rng.getrandbits(32):08x}", ts=now - 60 + i / 1000, placement="checkout",
        model_version="checkout@7", request_id=f"req-{i}", customer_id=f"c-{rng.randrange(20_000)}",
        features=loggable_features(features), candidates=kept, probabilities=probs, chosen=chosen,
        chosen_probabilities=[probs[0], probs[1], probs[2]], explored=rng.random() < 0.1, fallback=False,
        took_ms=rng.random() * 3, candidate_signals=sig, candidate_offer_features=views)


def publish(cfg: BusConfig, decisions: int, events: int, seed: int) -> None:
    bus = JetStreamBus(cfg)
    log = JetStreamEventLog(bus, own_bus=True)
    rng, enc = random.Random(seed), msgspec.json.Encoder().encode
    mix = EventMix(seed, [f"prod-{i}" for i in range(50)])
    now = time.time()

    async def go() -> None:
        for start in range(0, decisions, 1000):
            recs = [decision_record(rng, i, now) for i in range(start, min(decisions, start + 1000))]
            await bus.append_rows([(cfg.decisions_subject, r.decision_id, enc(r)) for r in recs])
        evs: list[schemas.Event] = []
        k = 0
        while len(evs) < events:
            evs += [msgspec.convert(e, schemas.Event) for e in mix.checkout("w", k)]
            k += 1
        for start in range(0, events, 1000):
            await log.append(evs[start:start + 1000], now - (events - start) / 20_000)

    try:
        bus.thread.call(go(), timeout=600)
    finally:
        log.close()


async def bare_fetch(cfg: BusConfig, kind: str, n: int, batch: int, durable: str) -> tuple[float, float]:
    """(CPU s, wall s) of a plain nats-py pull loop over the whole stream: fetch, ack the batch's last message."""
    nc = await nats.connect(cfg.url)
    js = nc.jetstream()
    stream = cfg.events_stream if kind == "events" else cfg.decisions_stream
    subject = cfg.events_subject if kind == "events" else cfg.decisions_subject
    config = api.ConsumerConfig(durable_name=durable, ack_policy=api.AckPolicy.ALL, ack_wait=30.0,
                                max_ack_pending=max(batch * 2, 1000), filter_subject=subject)
    try:
        sub = await js.pull_subscribe(subject, durable=durable, stream=stream, config=config)
        got = 0
        c0, w0 = _cpu(), time.perf_counter()
        while got < n:
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                msgs = await sub.fetch(batch, timeout=1.0)
                got += len(msgs)
                await msgs[-1].ack()
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        with contextlib.suppress(Exception):
            await js.delete_consumer(stream, durable)
        return cpu, wall
    finally:
        await nc.close()


async def consume(consumer: DurableConsumer, n: int) -> tuple[float, float]:
    """(CPU s, wall s) of ``consumer`` from its first fetch until ``n`` messages are handled (written)."""
    await consumer.start()
    try:
        c0, w0 = _cpu(), time.perf_counter()
        task = asyncio.create_task(consumer.run())
        deadline = w0 + 600
        while consumer.applied < n and not task.done() and time.perf_counter() < deadline:
            await asyncio.sleep(0.005)
        cpu, wall = _cpu() - c0, time.perf_counter() - w0
        consumer.stop()
        await task
        assert consumer.applied == n, (consumer.durable, consumer.applied, n)
        js = consumer._nc.jetstream() if consumer._nc is not None else None
        if js is not None:
            with contextlib.suppress(Exception):
                await js.delete_consumer(consumer.stream, consumer.durable)
        return cpu, wall
    finally:
        await consumer.close()


def phase(name: str, cfg: BusConfig, n: int, batch: int, tag: str) -> tuple[float, float]:
    if name.startswith("fetch_"):
        return asyncio.run(bare_fetch(cfg, name.removeprefix("fetch_"), n, batch, f"bench-{name}-{tag}"))
    root = Path(tempfile.mkdtemp(prefix=f"writer-cpu-{name}-"))
    try:
        if name == "decision_log":
            dl = DecisionLogConsumer(cfg, root, f"bench-dl-{tag}", batch=batch, fetch_timeout=0.2)
            out = asyncio.run(consume(dl, n))
            rows = sum(pq.ParquetFile(p).metadata.num_rows for p in (root / "decisions").glob("date=*/*.parquet"))
            assert rows == n == dl.written, (rows, n, dl.written)
            return out
        ea = EventArchiveConsumer(cfg, root, f"bench-ea-{tag}", batch=batch, fetch_timeout=0.2)
        out = asyncio.run(consume(ea, n))
        assert ea.written == n, (ea.written, n)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def drop(cfg: BusConfig) -> None:
    nc = await nats.connect(cfg.url)
    try:
        for name, _ in cfg.streams():
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(name)
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=20_000, help="decision records (events: 3 times as many)")
    p.add_argument("--batch", type=int, default=5000, help="fetch size (the writer's consumers use 5,000)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--phases", default="fetch_decisions,decision_log,fetch_events,event_archive")
    p.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as one line of JSON")
    p.add_argument("--publish-only", action="store_true", help="publish, print the prefix, keep the streams")
    p.add_argument("--prefix", help="measure the streams a --publish-only run left (of as many --decisions)")
    p.add_argument("--keep", action="store_true", help="keep the streams at the end (for another run)")
    args = p.parse_args(argv)
    prefix = args.prefix or f"wcpu{uuid.uuid4().hex[:8]}"
    cfg = BusConfig(url=args.nats_url, prefix=prefix, spool_dir=Path(f"/tmp/{prefix}-spool"))
    counts = {"decisions": args.decisions, "events": 3 * args.decisions}
    phases = args.phases.split(",")
    results: dict[str, list[float]] = {ph: [] for ph in phases}
    loads: list[float] = []
    try:
        if args.prefix is None:
            t0 = time.perf_counter()
            publish(cfg, counts["decisions"], counts["events"], args.seed)
            print(f"published {counts['decisions']:,} decision records and {counts['events']:,} events in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if args.publish_only:
            print(prefix)
            return 0
        for r in range(args.repeats):
            for ph in phases:
                n = counts["events" if ph in ("fetch_events", "event_archive") else "decisions"]
                loads.append(os.getloadavg()[0])
                cpu, wall = phase(ph, cfg, n, args.batch, f"{os.getpid()}-{r}")
                results[ph].append(cpu / n * 1e6)
                print(f"{ph} #{r + 1}: {cpu / n * 1e6:.1f} µs CPU/message, {n / wall:,.0f} messages/s wall, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    finally:
        if not (args.publish_only or args.keep):
            asyncio.run(drop(cfg))
        shutil.rmtree(cfg.spool_dir, ignore_errors=True)
    out: dict[str, object] = {"decisions": counts["decisions"], "events": counts["events"], "batch": args.batch,
                              "repeats": args.repeats}
    for ph, v in results.items():
        out[ph] = {"median_us": round(statistics.median(v), 2), "min_us": round(min(v), 2),
                   "max_us": round(max(v), 2)}
    for ph, base in (("decision_log", "fetch_decisions"), ("event_archive", "fetch_events")):
        if results.get(ph) and results.get(base):
            out[f"{ph}_over_baseline"] = round(statistics.median(results[ph]) / statistics.median(results[base]), 2)
    out["load_average"] = [round(min(loads), 1), round(max(loads), 1)]
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
