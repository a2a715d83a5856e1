"""SqliteEventLog: durable, deduplicated, ordered group-commit append."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from kassa.events.log import AppendResult, SqliteEventLog
from kassa.schemas import Event


def ev(event_id: str, type_: str = "click", **kw: object) -> Event:
    return Event(event_id=event_id, type=type_, **kw)  # type: ignore[arg-type]


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dir" / "events.db"


def test_creates_parent_dirs_and_sets_wal(log_path: Path) -> None:
    log = SqliteEventLog(log_path)
    try:
        assert log_path.exists()
        assert log.count() == 0
        with log._engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    finally:
        log.close()


def test_duplicates_within_and_across_batches_counted_once(log_path: Path) -> None:
    log = SqliteEventLog(log_path)

    async def main() -> tuple[AppendResult, AppendResult]:
        first = await log.append([ev("a"), ev("b"), ev("a"), ev("c"), ev("b")], received_at=100.0)
        second = await log.append([ev("c"), ev("d"), ev("a"), ev("d")], received_at=200.0)
        return first, second

    try:
        first, second = asyncio.run(main())
        assert [e.event_id for e in first.new] == ["a", "b", "c"]
        assert first.duplicates == 2
        assert [e.event_id for e in second.new] == ["d"]
        assert second.duplicates == 3
        assert log.count() == 4
        assert [e.event_id for _, e in log.read()] == ["a", "b", "c", "d"]
    finally:
        log.close()


def test_timestamp_filled_only_when_missing(log_path: Path) -> None:
    log = SqliteEventLog(log_path)
    original = ev("x")
    try:
        result = asyncio.run(log.append([original, ev("y", timestamp=5.0)], received_at=123.5))
        assert [e.timestamp for e in result.new] == [123.5, 5.0]
        assert original.timestamp is None  # the caller's struct is not mutated
        assert [e.timestamp for _, e in log.read()] == [123.5, 5.0]
        with sqlite3.connect(log_path) as raw:
            assert raw.execute("SELECT received_at FROM events ORDER BY seq").fetchall() == [
                (123.5,),
                (123.5,),
            ]
    finally:
        log.close()


def test_empty_append(log_path: Path) -> None:
    log = SqliteEventLog(log_path)
    try:
        result = asyncio.run(log.append([], received_at=1.0))
        assert result.new == [] and result.duplicates == 0
    finally:
        log.close()


def test_acknowledged_event_survives_restart(log_path: Path) -> None:
    full = ev(
        "e1",
        "conversion",
        decision_id="d1",
        offer_id="o1",
        value=42.5,
        timestamp=10.0,
    )
    log = SqliteEventLog(log_path)
    asyncio.run(log.append([full, ev("e2", "impression", decision_id="d1")], received_at=11.0))
    log.close()

    # An independent connection sees the committed rows (they are not only in our process).
    with sqlite3.connect(log_path) as raw:
        assert raw.execute("SELECT event_id, type, decision_id FROM events ORDER BY seq").fetchall() == [
            ("e1", "conversion", "d1"),
            ("e2", "impression", "d1"),
        ]

    reopened = SqliteEventLog(log_path)
    try:
        assert reopened.count() == 2
        rows = reopened.read()
        assert rows[0][1] == full
        assert rows[1][1].timestamp == 11.0
        # Dedupe state is the log itself, so it holds across restarts too.
        again = asyncio.run(reopened.append([ev("e1"), ev("e3")], received_at=12.0))
        assert again.duplicates == 1
        assert [e.event_id for e in again.new] == ["e3"]
        assert [s for s, _ in reopened.read()] == [1, 2, 3]
    finally:
        reopened.close()


def test_concurrent_appends_land_exactly_once(log_path: Path) -> None:
    log = SqliteEventLog(log_path)
    n_tasks, per_task = 200, 5

    async def main() -> list[AppendResult]:
        # Every task shares half its ids with the next one, so the same id races in concurrent appends.
        async def one(i: int) -> AppendResult:
            ids = [f"t{i}-{k}" for k in range(per_task)] + [f"t{(i + 1) % n_tasks}-{k}" for k in range(2)]
            return await log.append([ev(x) for x in ids], received_at=float(i))

        return await asyncio.gather(*(one(i) for i in range(n_tasks)))

    try:
        results = asyncio.run(main())
        new_ids = [e.event_id for r in results for e in r.new]
        expected = {f"t{i}-{k}" for i in range(n_tasks) for k in range(per_task)}
        assert len(new_ids) == len(set(new_ids)) == len(expected)
        assert set(new_ids) == expected
        assert sum(r.duplicates for r in results) == n_tasks * 2
        stored = [e.event_id for _, e in log.read(limit=10_000)]
        assert sorted(stored) == sorted(expected)
        assert log.count() == len(expected)
    finally:
        log.close()


def test_read_order_seqs_and_paging(log_path: Path) -> None:
    log = SqliteEventLog(log_path)

    async def main() -> None:
        for b in range(5):
            await log.append([ev(f"b{b}-{k}") for k in range(4)], received_at=float(b))

    try:
        asyncio.run(main())
        everything = log.read()
        seqs = [s for s, _ in everything]
        assert seqs == list(range(1, 21))
        assert [e.event_id for _, e in everything] == [f"b{b}-{k}" for b in range(5) for k in range(4)]
        # Page through with the cursor, as a replaying worker would.
        pages, cursor = [], 0
        while page := log.read(after_seq=cursor, limit=6):
            pages.append(page)
            cursor = page[-1][0]
        assert [len(p) for p in pages] == [6, 6, 6, 2]
        assert [row for p in pages for row in p] == everything
        assert log.read(after_seq=20) == []
    finally:
        log.close()


def test_close_flushes_pending_and_rejects_new_appends(log_path: Path) -> None:
    log = SqliteEventLog(log_path)

    async def main() -> None:
        tasks = [asyncio.ensure_future(log.append([ev(f"p{i}")], received_at=1.0)) for i in range(50)]
        await asyncio.sleep(0)  # let every task enqueue its append
        log.close()  # blocks until the writer drained the queue
        results = await asyncio.gather(*tasks)
        assert sum(len(r.new) for r in results) == 50
        with pytest.raises(RuntimeError):
            await log.append([ev("late")], received_at=2.0)

    asyncio.run(main())
    reopened = SqliteEventLog(log_path)
    try:
        assert reopened.count() == 50
    finally:
        reopened.close()


def test_cancelled_append_is_still_committed(log_path: Path) -> None:
    log = SqliteEventLog(log_path)

    async def main() -> None:
        task = asyncio.ensure_future(log.append([ev("c1")], received_at=1.0))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A later append goes through the same writer, so once it is acked c1 is decided too.
        assert (await log.append([ev("c1")], received_at=2.0)).duplicates == 1

    try:
        asyncio.run(main())
        assert log.count() == 1
    finally:
        log.close()


def test_commit_failure_propagates_to_caller(log_path: Path) -> None:
    log = SqliteEventLog(log_path)

    def boom(group: object) -> list[AppendResult]:
        raise OSError("disk full")

    try:
        log._write = boom  # type: ignore[method-assign]
        with pytest.raises(OSError, match="disk full"):
            asyncio.run(log.append([ev("z")], received_at=1.0))
    finally:
        log.close()
