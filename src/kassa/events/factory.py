"""Choose the event-log backend from ``settings.events``: the embedded SQLite log, or JetStream with its spool.

``backend: sqlite`` (the default) keeps everything as it was: ``<data_dir>/events.db`` and Parquet decision
files written in-process. ``backend: jetstream`` connects one `JetStreamBus` per process (it spools locally
under ``spool_dir`` while NATS is unreachable, so opening it never fails for that reason). The runners at the
end start the durable consumers of the other roles (the decision-log writer, which `kassa learn` or `kassa log write`
runs under a lease: `kassa.roles.decision_log`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from kassa.config import Settings
from kassa.events.compaction import LogCompactor
from kassa.events.consumers import (
    DecisionLogConsumer,
    EventArchiveConsumer,
    run_consumer,
)
from kassa.events.decision_log import DecisionLogWriter, DecisionRecord
from kassa.events.jetstream import BusConfig, JetStreamBus
from kassa.events.jetstream_log import DecisionPublisher, JetStreamEventLog, JoinRecordPublisher
from kassa.events.log import EventLog, SqliteEventLog
from kassa.events.records import DecisionRecordLog


def bus_config(settings: Settings, name: str = "kassa") -> BusConfig:
    ev = settings.events
    return BusConfig(url=ev.nats_url, prefix=ev.prefix,
                     spool_dir=Path(ev.spool_dir) if ev.spool_dir else settings.data_path / "spool",
                     dedupe_window_seconds=ev.dedupe_window_seconds, replicas=ev.replicas,
                     retention_seconds=ev.retention_seconds, ack_timeout_seconds=ev.ack_timeout_seconds, name=name,
                     join_records=settings.roles.learner_input == "jetstream")


def open_bus(settings: Settings, name: str = "kassa", loop: asyncio.AbstractEventLoop | None = None
             ) -> JetStreamBus | None:
    """The process's JetStream bus, or None for the embedded SQLite backend; on ``loop`` when given (a serving
    worker's server loop, not running yet), else on a thread of its own."""
    if settings.events.backend != "jetstream":
        return None
    return JetStreamBus(bus_config(settings, name), loop=loop)


def open_event_log(settings: Settings, bus: JetStreamBus | None = None) -> EventLog:
    """The event log of ``settings``; on JetStream it uses ``bus`` (or opens one it then owns)."""
    if settings.events.backend != "jetstream":
        return SqliteEventLog(settings.data_path / "events.db")
    if bus is None:
        return JetStreamEventLog.connect(bus_config(settings))
    return JetStreamEventLog(bus)


def open_decision_publisher(bus: JetStreamBus,
                            on_written: Callable[[list[DecisionRecord]], None] | None = None) -> DecisionPublisher:
    return DecisionPublisher(bus, on_written=on_written)


def open_shadow_log(settings: Settings, bus: JetStreamBus | None) -> DecisionLogWriter | DecisionPublisher:
    """Where the shadow models' records go (`kassa.learn.shadow.ShadowScorer`): ``<data_dir>/shadow`` written here
    on the embedded backend; on JetStream the shadow subject of the decisions stream, which the decision-log writer
    writes to its own ``<data_dir>/shadow/decisions``: a serving worker's data dir is its own (an emptyDir, a VM's
    disk) where `kassa evaluate` never looks and a restart loses what it holds."""
    if bus is None:
        return DecisionLogWriter(settings.data_path / "shadow", flush_seconds=settings.decision_log_flush_seconds)
    return DecisionPublisher(bus, shadow=True)


def open_join_records(settings: Settings, bus: JetStreamBus | None) -> JoinRecordPublisher | DecisionRecordLog:
    """Where a serving worker hands its decisions to `kassa learn`: the join records stream when the learner
    reads JetStream (``roles.learner_input: jetstream``), else ``<data_dir>/decision_records.db``."""
    if bus is not None and settings.roles.learner_input == "jetstream":
        return JoinRecordPublisher(bus)
    return DecisionRecordLog(settings.data_path / "decision_records.db")


# ---------------------------------------------------------------------------------------------- consumer runners
async def run_decision_log_writer(settings: Settings, stop: asyncio.Event | None = None,
                                  on_written: Callable[[int], None] | None = None,
                                  fence: Callable[[], None] | None = None, compact: bool = True,
                                  events: bool = True) -> None:
    """The decision-log writer, until ``stop``: decision records from JetStream to ``<data_dir>/decisions`` Parquet,
    the shadow models' to ``<data_dir>/shadow/decisions`` (a consumer of their own subject, files and position),
    and (``events``) the events stream to ``<data_dir>/events.db``, so batch training, off-policy evaluation and
    training sets read there what the embedded backend writes. One per deployment, by a lease whose check is
    ``fence`` (`kassa.roles.decision_log`, run by `kassa learn` and `kassa log write`): two would each re-create the
    durable consumers from their own files and write records twice (the event archive's rows are unique by event id,
    so a second writer there repeats nothing). ``compact``: also merge each closed hour's small files
    (`kassa.events.compaction`; a learner's `Kassa` does). ``on_written``: called with each decision file's number
    of records."""
    # One Parquet file and one events.db transaction per `decision_log_flush_seconds` at a steady trickle, as the
    # embedded writer's flushes: a file per fetch was a file, an fsync and a directory fsync every few milliseconds
    # (40 files for 40 decisions a few tens of ms apart; tests/test_event_archive.py).
    gather = settings.decision_log_flush_seconds
    consumer = DecisionLogConsumer(bus_config(settings, "kassa-decision-log"), settings.data_path,
                                   on_written=on_written, fence=fence, gather_seconds=gather)
    shadow = DecisionLogConsumer(bus_config(settings, "kassa-shadow-log"), settings.data_path, fence=fence,
                                 gather_seconds=gather, shadow=True)
    archive = (EventArchiveConsumer(bus_config(settings, "kassa-event-archive"), settings.data_path,
                                    gather_seconds=gather) if events else None)
    compactor = LogCompactor([settings.data_path / "decisions", shadow.dir]).start() if compact else None
    tasks = [asyncio.create_task(run_consumer(c, stop), name=f"kassa-writer-{c.durable}")
             for c in (consumer, shadow, archive) if c is not None]
    try:
        # The first to fail (a fenced writer, a consumer's error) stops the others: the role exits as one.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()  # each closes its connection in `run_consumer`
        await asyncio.gather(*tasks, return_exceptions=True)
        if compactor is not None:
            await asyncio.to_thread(compactor.close)
