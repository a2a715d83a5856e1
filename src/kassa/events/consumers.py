"""Durable JetStream consumers: the reward joiner/learner, the streaming-feature processor, the decision-log writer.

`DurableConsumer` pulls batches from a durable pull consumer in stream order, hands each batch to a handler,
then acknowledges it (``AckPolicy.ALL``: one ack covers the batch). Exactly-once *effect* comes from a
`PositionStore` the handler's effect and the position share: the last stream sequence applied.

- On start the consumer is (re)created at ``position + 1``. Redelivery after a crash therefore resumes in
  order right away, instead of waiting ``ack_wait`` while newer messages overtake the unacknowledged ones.
- Messages at or below the position (applied, but the ack was lost in a crash) are acknowledged unapplied.
- The position is saved after the handler and before the ack; the one window left (a crash between the
  effect and the save) re-applies one batch. A position kept in the same store as the effect (one
  transaction, or the effect's own checkpoint as `DecisionLogConsumer` and the stream processor do) closes it.

Without a position store the durable consumer's ack floor is the position: at-least-once, in order.

`DecisionLogConsumer` is the decision-log writer process: it writes each batch's records as Parquet files
named ``part-<unixms>-s<first>-<last>.parquet`` under the usual date partitions (the same layout
`read_decisions` reads), so the files themselves are its position: a batch redelivered after a crash skips
every record already in a file covering its sequence. Two writers on one directory would each skip and rewrite
the other's ranges, so one writer runs per deployment, by a lease (`kassa.roles.decision_log`): its ``fence``,
called before each file is renamed into place, raises `Fenced` once the lease can no longer be shown to be its own,
and the consumer stops there, nothing written or acknowledged. `EventArchiveConsumer` is its sibling for events,
run by the same role: it copies the events stream into ``<data_dir>/events.db`` (the embedded event log's table),
which is what batch training, off-policy evaluation and the training-set tools read
(`kassa.learn.offline.dataset`); its position is a row in that file, written in the same transaction as the
events, so a redelivered batch changes nothing. `EventConsumer` decodes events for a handler (the reward joiner in
``kassa learn``); `run_consumer` runs any of them until a stop event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import msgspec
import nats.errors
import nats.js.errors
import pyarrow.parquet as pq
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from kassa import schemas
from kassa.events.decision_log import EncodedDecisionRecord, _utc_date, records_to_table
from kassa.events.jetstream import BusConfig, ack_delivery, close_connection, connect, ensure_streams, take_queued_first

log = logging.getLogger("kassa.bus")


class PositionStore(Protocol):
    def load(self) -> int:
        """The last stream sequence whose effect is stored (0: none)."""
        ...

    def save(self, seq: int) -> None: ...


class FilePositionStore:
    """The position in a small file, replaced atomically and fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0

    def save(self, seq: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(str(seq))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class CallbackPosition:
    """A position kept by the handler's own state (e.g. a checkpoint that also holds the state)."""

    def __init__(self, load: Callable[[], int], save: Callable[[int], None] | None = None) -> None:
        self._load, self._save = load, save

    def load(self) -> int:
        return self._load()

    def save(self, seq: int) -> None:
        if self._save is not None:
            self._save(seq)


Handler = Callable[[list[tuple[int, bytes]]], Awaitable[None]]


class Fenced(Exception):
    """Raised by a handler that may apply nothing more (its writer's lease is lost): the consumer stops at once,
    without retrying the batch or acknowledging it."""


class DurableConsumer:
    """One durable pull consumer on the events or decisions stream; see the module doc."""

    def __init__(self, cfg: BusConfig, kind: str, durable: str, handler: Handler,
                 position: PositionStore | None = None, *, batch: int = 500, ack_wait: float = 30.0,
                 fetch_timeout: float = 1.0, gather_seconds: float = 0.0) -> None:
        if kind not in ("events", "decisions"):
            raise ValueError("kind must be 'events' or 'decisions'")
        self.cfg = cfg
        self.stream = cfg.events_stream if kind == "events" else cfg.decisions_stream
        # The one subject read (the consumer's filter): the decisions stream binds the shadow's too (`BusConfig.
        # stream_subjects`), which a subclass may read instead by setting this before `start`.
        self.subject = cfg.events_subject if kind == "events" else cfg.decisions_subject
        self.durable = durable
        self.handler = handler
        self.position = position
        self.batch = batch
        self.ack_wait = ack_wait
        self.fetch_timeout = fetch_timeout
        # After a fetch that came back short of ``batch``, keep fetching for up to this long and hand the handler
        # one batch: a writer then makes one file (one transaction) per ``gather_seconds`` at a steady trickle,
        # not one per fetch. What it holds is unacknowledged, so a crash loses nothing: it is redelivered.
        self.gather_seconds = gather_seconds
        self.applied = 0  # messages handed to the handler
        self.skipped = 0  # redelivered messages at or below the position, acked unapplied
        self.last_seq = 0
        # When a dict (a subclass's), `_handle` fills it with each fresh message's stored time (`ack_delivery`)
        self._stored_at: dict[int, float] | None = None
        self._nc: NATS | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        self._nc = await connect(self.cfg, name=f"{self.cfg.name}-{self.durable}")
        js = self._nc.jetstream()
        await ensure_streams(js, self.cfg)
        config = api.ConsumerConfig(durable_name=self.durable, ack_policy=api.AckPolicy.ALL, ack_wait=self.ack_wait,
                                    max_ack_pending=max(self.batch * 2, 1000), filter_subject=self.subject)
        if self.position is not None:
            self.last_seq = await asyncio.to_thread(self.position.load)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_consumer(self.stream, self.durable)
            config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.last_seq + 1
        self._sub = await js.pull_subscribe(self.subject, durable=self.durable, stream=self.stream, config=config)
        take_queued_first(self._sub._sub)  # `fetch` takes what is already here without a task per message

    async def run(self) -> None:
        """Fetch, handle and acknowledge until `stop`; a failed batch is retried (nothing is acked)."""
        if self._sub is None:
            await self.start()
        assert self._sub is not None
        self._stop.clear()
        while not self._stop.is_set():
            try:
                msgs = await self._sub.fetch(self.batch, timeout=self.fetch_timeout)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as exc:
                log.warning("consumer %s: fetch failed (%s); retrying", self.durable, exc)
                await asyncio.sleep(self.cfg.reconnect_wait_seconds)
                continue
            if msgs and self.gather_seconds > 0 and len(msgs) < self.batch:
                msgs = await self._gather(msgs)
            if msgs:
                await self._handle(msgs)

    async def _gather(self, msgs: list[Msg]) -> list[Msg]:
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gather_seconds
        while len(msgs) < self.batch and not self._stop.is_set():
            left = deadline - loop.time()
            if left <= 0.001:
                break
            try:
                msgs += await self._sub.fetch(self.batch - len(msgs), timeout=left)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            except nats.errors.Error as exc:  # write what was gathered; the next fetch says it again
                log.debug("consumer %s: fetch while gathering failed (%s)", self.durable, exc)
                break
        return msgs

    async def _handle(self, msgs: list[Msg]) -> None:
        # The stream sequence from the reply subject (`ack_delivery`), not nats-py's ``metadata`` (dataclasses and a
        # datetime per message); with `take_queued_first` in `start`, the bulk of the writer's cut in CPU per message
        # (bench/writer_cpu.py; docs/benchmarks.md, issue 13)
        fresh: list[tuple[int, bytes]] = []
        stored_at, last = self._stored_at, self.last_seq
        if stored_at is not None:
            stored_at.clear()
        for m in msgs:
            seq, at, _ = ack_delivery(m.reply)
            if seq > last:
                fresh.append((seq, m.data))
                if stored_at is not None:
                    stored_at[seq] = at
        self.skipped += len(msgs) - len(fresh)
        while fresh:
            try:
                await self.handler(fresh)
                break
            except Fenced:
                raise
            except Exception:
                log.exception("consumer %s: handler failed on %d messages; retrying", self.durable, len(fresh))
                await asyncio.sleep(1.0)
                if self._stop.is_set():
                    return  # unacked: redelivered to the next run
        if fresh:
            self.last_seq = fresh[-1][0]
            self.applied += len(fresh)
            if self.position is not None:
                await asyncio.to_thread(self.position.save, self.last_seq)
        with contextlib.suppress(nats.errors.Error):
            await msgs[-1].ack()  # AckPolicy.ALL: acknowledges the whole batch

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await close_connection(self._nc)
            self._nc = None
            self._sub = None


class EventConsumer(DurableConsumer):
    """A durable consumer of events, decoded: ``apply`` gets ``(seq, Event)`` pairs in stream order."""

    def __init__(self, cfg: BusConfig, durable: str,
                 apply: Callable[[list[tuple[int, schemas.Event]]], Awaitable[None]],
                 position: PositionStore | None = None, **kwargs: float) -> None:
        decoder = msgspec.json.Decoder(schemas.Event)

        async def handler(batch: list[tuple[int, bytes]]) -> None:
            await apply([(seq, decoder.decode(data)) for seq, data in batch])

        super().__init__(cfg, "events", durable, handler, position, **kwargs)  # type: ignore[arg-type]


class _ArchivedEvent(msgspec.Struct):
    """The fields of a `schemas.Event` the archive's columns take (its body is stored as it came): decoding the
    whole event (customer, order and items) for them was ~2 µs of CPU an event of the checkout mix (0.4 µs now)."""

    event_id: str
    type: str
    decision_id: str | None = None
    timestamp: float | None = None


class EventArchiveConsumer(DurableConsumer):
    """The events stream copied into ``<root>/events.db``, exactly once, in stream order (see the module doc).

    Each row keeps the time JetStream stored the event as its ``received_at`` (what the embedded log records: when
    a serving process took it), its ``event_id`` unique as there; the stream position is a row of
    ``archive_position`` committed with the batch's events."""

    def __init__(self, cfg: BusConfig, root: str | Path, durable: str = "event-archive", *, batch: int = 5000,
                 **kwargs: float) -> None:
        from kassa.events.log import SqliteEventLog, set_pragmas  # the table's one definition, and its pragmas

        self.path = Path(root) / "events.db"
        SqliteEventLog(self.path).close()  # creates the file and its table when nothing wrote them yet
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        set_pragmas(self._conn)
        self._conn.execute("CREATE TABLE IF NOT EXISTS archive_position (stream TEXT PRIMARY KEY, seq INTEGER)")
        self._conn.commit()
        self._decoder = msgspec.json.Decoder(_ArchivedEvent)
        self.written = 0  # events inserted (duplicates of an event_id already there are not)
        super().__init__(cfg, "events", durable, self._write, CallbackPosition(self._load_position),
                         batch=batch, **kwargs)
        self._stored_at = {}  # filled by `_handle`: each event's stored time, its ``received_at``

    def _load_position(self) -> int:
        row = self._conn.execute("SELECT seq FROM archive_position WHERE stream = ?", (self.stream,)).fetchone()
        return int(row[0]) if row else 0

    async def _write(self, batch: list[tuple[int, bytes]]) -> None:
        rows = []
        stored_at, decode = self._stored_at or {}, self._decoder.decode
        for seq, data in batch:
            ev = decode(data)
            stored = stored_at.get(seq)
            # the value nats-py's ``msg.metadata.timestamp.timestamp()`` gave (a datetime: microseconds)
            at = (datetime.fromtimestamp(stored, UTC).timestamp() if stored else None) or ev.timestamp or time.time()
            rows.append((ev.event_id, ev.type, ev.decision_id, at, data))
        self.written += await asyncio.to_thread(self._insert, rows, batch[-1][0])

    def _insert(self, rows: Sequence[tuple[str, str, str | None, float, bytes]], last_seq: int) -> int:
        conn = self._conn
        with conn:  # one transaction: the events and the position, or neither
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO events (event_id, type, decision_id, received_at, body) "
                             "VALUES (?, ?, ?, ?, ?)", rows)
            added = conn.total_changes - before
            conn.execute("INSERT INTO archive_position (stream, seq) VALUES (?, ?) "
                         "ON CONFLICT(stream) DO UPDATE SET seq = excluded.seq", (self.stream, last_seq))
        return added

    async def close(self) -> None:
        await super().close()
        self._conn.close()


# a compacted hour's file (`kassa.events.compaction`) keeps the lowest first and highest last sequence it merged
_PART = re.compile(r"part-\d+-(?:c\d+-)?s(\d+)-(\d+)\.parquet$")


class DecisionLogConsumer(DurableConsumer):
    """The decision-log writer: decision records from JetStream to date-partitioned Parquet, exactly once.

    ``shadow``: the shadow models' records instead (their subject of the decisions stream) to
    ``<root>/shadow/decisions``, by a durable consumer of their own. Each consumer reads its subject only and
    positions itself by its own directory's files, so the two never skip or wait for each other's sequences."""

    def __init__(self, cfg: BusConfig, root: str | Path, durable: str | None = None, *, batch: int = 5000,
                 on_written: Callable[[int], None] | None = None,
                 fence: Callable[[], None] | None = None, shadow: bool = False, **kwargs: float) -> None:
        """``fence``: called before each file is renamed into place; it raises `Fenced` when this writer may write
        no more (its lease lost), and the file is not written. ``on_written``: called with the number of records of
        each file written."""
        self.root = Path(root)
        self.fence = fence
        self.dir = self.root / "shadow" / "decisions" if shadow else self.root / "decisions"
        self.written = 0
        self.files_written = 0
        self.on_written = on_written
        self._decoder = msgspec.json.Decoder(EncodedDecisionRecord)  # the features stay the JSON they came as
        self._ranges: dict[str, list[tuple[int, int]]] = {}  # date -> (first, last) of files past the position
        super().__init__(cfg, "decisions", durable or ("shadow-decision-log" if shadow else "decision-log"),
                         self._write, CallbackPosition(self._load_position), batch=batch, **kwargs)
        if shadow:
            self.subject = cfg.shadow_decisions_subject

    def _load_position(self) -> int:
        """The highest sequence any file covers; ranges of files are kept to skip their records."""
        ranges: dict[str, list[tuple[int, int]]] = {}
        top = 0
        for path in self.dir.glob("date=*/part-*.parquet"):
            m = _PART.search(path.name)
            if m is None:
                continue  # written by the embedded DecisionLogWriter: no sequence in its name
            first, last = int(m.group(1)), int(m.group(2))
            ranges.setdefault(path.parent.name.removeprefix("date="), []).append((first, last))
            top = max(top, last)
        self._ranges = ranges
        # Resume from the lowest first-sequence among the newest files, so a batch cut short across dates is
        # redelivered whole; `_write` then skips what is already in a file.
        recent = [first for spans in ranges.values() for first, last in spans if last == top]
        return (min(recent) - 1) if recent else top

    def _forget_ranges_below(self, position: int) -> None:
        """Forget the files that end at or below ``position``: `_handle` hands over only what is past it, so none of
        them can hold a record of a batch to come. Kept, every file this process wrote stayed in the ranges each
        record is checked against: at one file per 0.5 s gather, 7,200 files after an hour, ~340 µs of CPU a record."""
        for date, spans in list(self._ranges.items()):
            kept = [span for span in spans if span[1] > position]
            if kept:
                self._ranges[date] = kept
            else:
                del self._ranges[date]

    def _already_written(self, date: str, seq: int) -> bool:
        return any(first <= seq <= last for first, last in self._ranges.get(date, ()))

    async def _write(self, batch: list[tuple[int, bytes]]) -> None:
        self._forget_ranges_below(self.last_seq)
        decode = self._decoder.decode
        by_date: dict[str, list[EncodedDecisionRecord]] = {}
        for seq, data in batch:
            rec = decode(data)
            date = _utc_date(rec.ts)
            if not self._already_written(date, seq):
                by_date.setdefault(date, []).append(rec)
        first, last = batch[0][0], batch[-1][0]
        for date, rows in by_date.items():
            await asyncio.to_thread(self._write_file, date, first, last, rows)
            self._ranges.setdefault(date, []).append((first, last))
            self.written += len(rows)
            if self.on_written is not None:
                try:
                    self.on_written(len(rows))
                except Exception:
                    log.exception("decision log: on_written callback failed")

    def _write_file(self, date: str, first: int, last: int, records: list[EncodedDecisionRecord]) -> Path:
        part_dir = self.dir / f"date={date}"
        part_dir.mkdir(parents=True, exist_ok=True)
        path = part_dir / f"part-{int(time.time() * 1000)}-s{first}-{last}.parquet"
        tmp = part_dir / f".{path.name}.tmp"  # readers glob *.parquet: never a half-written file
        try:
            pq.write_table(records_to_table(records), tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            if self.fence is not None:
                self.fence()  # the last moment a lost lease can keep the file out of the log
            os.replace(tmp, path)
            dir_fd = os.open(part_dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself is the position: make it durable
            finally:
                os.close(dir_fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.files_written += 1
        return path


async def run_consumer(consumer: DurableConsumer, stop: asyncio.Event | None = None) -> None:
    """Run ``consumer`` until ``stop`` is set (or the task is cancelled), then close its connection."""
    await consumer.start()
    task = asyncio.create_task(consumer.run(), name=f"kassa-consumer-{consumer.durable}")
    # The stop watcher ends with the runner on every path (cancelled too): left pending, it outlives the runner
    # and, on a loop dropped before it ran, is finalized as "coroutine 'Event.wait' was never awaited".
    stopper = asyncio.create_task(stop.wait()) if stop is not None else None
    try:
        if stopper is not None:
            await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
            consumer.stop()
        await task  # raises what killed the consumer
    finally:
        for t in (stopper, task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        await consumer.close()
