"""Decisions + events per second `kassa learn` reads from JetStream (``roles.learner_input: jetstream``).

Publishes ``--decisions`` join records (`PendingDecision`, msgpack, learner lines of the size the engine writes
for a 6-offer placement) and one event per decision to fresh streams, then times a `JetStreamInput` reading
all of them back from the start (``settle_seconds=0``: the bench measures reading, not waiting), twice: the
input alone, and the input feeding a `HandoverJoiner` (``register`` / ``observe``: what a learner's round does
with a batch before learning). Prints messages/s and the process CPU per message.

    PYTHONPATH=src python bench/learner_input.py --decisions 50000 --json [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import nats

from kassa import schemas
from kassa.events.jetstream import BusConfig, JetStreamBus
from kassa.events.join import PendingDecision
from kassa.learn.online.handover import HandoverJoiner
from kassa.learn.online.inputs import JetStreamInput

START, END = "<!-- bench:learner_input:start -->", "<!-- bench:learner_input:end -->"


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _pending(run: str, i: int, now: float) -> PendingDecision:
    shared = "|u " + " ".join(f"f{k}:{(i * 7 + k) % 97 / 10}" for k in range(20)) + " device=mobile country=US"
    actions = [f"|a offer=o{k} kind=partner value:{k + 1} |r pop:0.{k} co:0.{i % 9}" for k in range(6)]
    return PendingDecision(f"{run}-{i}", "checkout", now, now + 600.0, shared, ["o1", "o2"], actions[:2],
                           [0.6, 0.3], f"c{i % 5000}", ["sku-1", "sku-2"], version="checkout@3",
                           candidates=actions, top_index=1)


async def _publish(cfg: BusConfig, n: int) -> None:
    bus = JetStreamBus(cfg)
    try:
        run, now = uuid.uuid4().hex[:8], time.time()
        pack, enc = msgspec.msgpack.Encoder().encode, msgspec.json.Encoder().encode
        for start in range(0, n, 1000):
            ids = range(start, min(n, start + 1000))
            records = [(cfg.records_subject, f"{run}-{i}", pack(_pending(run, i, now))) for i in ids]
            events = [(cfg.events_subject, f"{run}-{i}-a", enc(schemas.Event(
                event_id=f"{run}-{i}-a", type="accept" if i % 3 == 0 else "click", decision_id=f"{run}-{i}",
                offer_id="o1", timestamp=now))) for i in ids]
            await asyncio.wrap_future(bus.thread.submit(bus.append_rows(records + events)))
    finally:
        bus.close()


async def _read(cfg: BusConfig, n: int, join: bool) -> dict[str, float]:
    source = await JetStreamInput(cfg, lookback_seconds=3600, settle_seconds=0.0).start()
    joiner = HandoverJoiner(lambda _p: schemas.RewardDefinition())
    try:
        cpu0, t0 = _cpu(), time.perf_counter()
        decisions = events = 0
        while decisions < n or events < n:
            batch = await source.poll(5000)
            decisions += len(batch.decisions)
            events += len(batch.events)
            if join:
                for pending in batch.decisions:
                    joiner.register(pending)
                for event in batch.events:
                    joiner.observe(event)
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"read only {decisions} decisions and {events} events in 300 s")
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    finally:
        await source.close()
    total = decisions + events
    return {"decisions": decisions, "events": events, "seconds": round(wall, 2),
            "messages_per_s": round(total / wall), "cpu_us_per_message": round(cpu / total * 1e6, 1)}


async def _cleanup(cfg: BusConfig) -> None:
    nc = await nats.connect(cfg.url)
    for name, _ in cfg.streams():
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(name)
    await nc.close()


def _section(out: dict) -> str:
    a, b = out["input"], out["input_and_join"]
    return (f"{START}\n## `kassa learn` reading JetStream (`bench/learner_input.py`)\n\n"
            f"{out['decisions']:,} join records and {out['decisions']:,} events read back from the start of their "
            f"streams by `JetStreamInput` (batches of 5,000; load average {out['load_average']} at the start):\n\n"
            "| | messages/s | CPU µs/message |\n|---|---:|---:|\n"
            f"| input alone | {a['messages_per_s']:,} | {a['cpu_us_per_message']} |\n"
            f"| input + `HandoverJoiner.register`/`observe` | {b['messages_per_s']:,} | {b['cpu_us_per_message']} |\n"
            f"{END}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--decisions", type=int, default=50_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    cfg = BusConfig(url=args.url, prefix="benchli" + uuid.uuid4().hex[:6], join_records=True,
                    spool_dir=Path(tempfile.mkdtemp()) / "spool")
    out: dict[str, object] = {"decisions": args.decisions,
                              "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg())}
    try:
        asyncio.run(_publish(cfg, args.decisions))
        out["input"] = asyncio.run(_read(cfg, args.decisions, join=False))
        out["input_and_join"] = asyncio.run(_read(cfg, args.decisions, join=True))
    finally:
        asyncio.run(_cleanup(cfg))
    if args.write_docs:
        from benchdocs import write_section

        write_section(_section(out), START, END)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
