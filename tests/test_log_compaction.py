"""Decision-log compaction: a closed hour's small files merged into one, safe for readers and at every crash point."""

from __future__ import annotations

import fcntl
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kassa.api.dashboard.decision_window import DecisionLogWindow
from kassa.cli import app
from kassa.config import Settings
from kassa.events.compaction import HOUR_MS, CompactionBusy, LogCompactor, compact_decision_log
from kassa.events.consumers import _PART
from kassa.events.decision_log import SCHEMA, decision_files, find_decision, read_decisions, read_log, records_to_table
from tests.test_decision_log import rec

HOUR = int(datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)  # a closed hour's start, unix ms
PART = "date=2024-03-01"


def small_file(root: Path, write_ms: int, seq: int, ids: range, drop: tuple[str, ...] = (),
               name: str | None = None) -> Path:
    """A writer's file named for ``write_ms``, its records' ts out of order (newest first)."""
    part = root / "decisions" / PART
    part.mkdir(parents=True, exist_ok=True)
    records = [rec(i, HOUR / 1000 + 3600 - i) for i in ids]
    table = records_to_table(records)
    for col in drop:  # written before the column was added
        table = table.drop_columns([col])
    path = part / (name or f"part-{write_ms}-{seq}.parquet")
    pq.write_table(table, path)
    return path


def an_hour(root: Path) -> list[Path]:
    """Four small files in the hour, one an old file without `LATER_COLUMNS`, and one in the next hour."""
    files = [small_file(root, HOUR + 1000 * k, k, range(3 * k, 3 * k + 3)) for k in range(3)]
    files.append(small_file(root, HOUR + 5000, 9, range(9, 12), drop=("candidate_signals", "candidate_offer_features")))
    small_file(root, HOUR + HOUR_MS + 10, 1, range(100, 102))
    small_file(root, HOUR + HOUR_MS + 20, 2, range(102, 104))
    return files


def ids(root: Path) -> list[str]:
    return sorted(read_decisions(root).column("decision_id").to_pylist())


def names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "decisions" / PART).iterdir() if p.name != ".compact.lock")


def test_a_closed_hour_becomes_one_file_with_the_schema_in_ts_order(tmp_path: Path) -> None:
    an_hour(tmp_path)
    before = read_decisions(tmp_path)
    result = compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000)
    assert (result.hours, result.files, result.rows, result.removed) == (1, 4, 12, 4)
    merged = f"part-{HOUR}-c{HOUR + HOUR_MS}.parquet"
    # the next hour (not before the cut-off) is left as it was
    assert names(tmp_path) == [merged, f"part-{HOUR + HOUR_MS + 10}-1.parquet", f"part-{HOUR + HOUR_MS + 20}-2.parquet"]
    table = pq.read_table(tmp_path / "decisions" / PART / merged)
    assert table.schema.remove_metadata() == SCHEMA
    ts = table.column("ts").to_pylist()
    assert ts == sorted(ts) and table.num_rows == 12
    old = {r["decision_id"]: r for r in table.to_pylist()}
    assert old["d9"]["candidate_signals"] is None and old["d0"]["candidate_signals"] is None
    assert read_decisions(tmp_path).equals(before)  # the same rows, the same order
    assert find_decision(tmp_path, "d4", now=HOUR / 1000) is not None


def test_an_hour_that_may_still_be_written_is_refused(tmp_path: Path) -> None:
    an_hour(tmp_path)
    with pytest.raises(ValueError, match="at least 600 s ago"):
        compact_decision_log(tmp_path / "decisions", before=datetime.now(UTC).timestamp())
    result = compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS - 1) / 1000)
    assert result.hours == 0 and len(names(tmp_path)) >= 6


@pytest.mark.parametrize("crash", ["written", "renamed", "removed-one"])
def test_a_crash_at_any_step_loses_and_duplicates_nothing(tmp_path: Path, crash: str) -> None:
    an_hour(tmp_path)
    expected = ids(tmp_path)

    def stop(step: str) -> None:
        if step == crash:
            raise KeyboardInterrupt(step)

    with pytest.raises(KeyboardInterrupt):
        compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000, crash_at=stop)
    assert ids(tmp_path) == expected  # readers in between: each decision once
    if crash == "written":  # a kill -9 there leaves the temporary file: readers skip it, the next run removes it
        (tmp_path / "decisions" / PART / f".compact-part-{HOUR}-c{HOUR + HOUR_MS}.parquet.tmp").write_bytes(b"PAR1")
    result = compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000)
    assert ids(tmp_path) == expected
    assert result.removed == 4 - (crash == "removed-one")
    assert [n for n in names(tmp_path) if n.startswith("part-") and f"c{HOUR + HOUR_MS}" not in n] == [
        f"part-{HOUR + HOUR_MS + 10}-1.parquet", f"part-{HOUR + HOUR_MS + 20}-2.parquet"]
    assert not [n for n in names(tmp_path) if n.endswith(".tmp")]


def test_a_file_written_into_a_compacted_hour_is_merged_in(tmp_path: Path) -> None:
    an_hour(tmp_path)
    compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000)
    small_file(tmp_path, HOUR + 7000, 3, range(50, 52))  # a writer that stalled past the grace
    small_file(tmp_path, HOUR + 8000, 4, range(0, 2))  # ids the merged file has: removed, not doubled
    result = compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000)
    assert result.removed == 2
    assert ids(tmp_path) == sorted([f"d{i}" for i in (*range(12), 50, 51, *range(100, 104))])


def test_one_compaction_per_directory_at_a_time(tmp_path: Path) -> None:
    an_hour(tmp_path)
    fd = os.open(tmp_path / "decisions" / ".compact.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CompactionBusy, match="another process is compacting"):
            compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000)
    finally:
        os.close(fd)
    assert compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000).hours == 1


def test_the_jetstream_writers_sequences_stay_in_the_merged_name(tmp_path: Path) -> None:
    small_file(tmp_path, 0, 0, range(3), name=f"part-{HOUR + 10}-s101-140.parquet")
    small_file(tmp_path, 0, 0, range(3, 6), name=f"part-{HOUR + 20}-s141-180.parquet")
    compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000)
    [merged] = [n for n in names(tmp_path) if n.startswith("part-")]
    assert merged == f"part-{HOUR}-c{HOUR + HOUR_MS}-s101-180.parquet"
    m = _PART.search(merged)  # what `DecisionLogConsumer` resumes from
    assert m is not None and (m.group(1), m.group(2)) == ("101", "180")


def test_readers_see_each_decision_once_while_the_small_files_are_removed(tmp_path: Path) -> None:
    an_hour(tmp_path)
    window = DecisionLogWindow(tmp_path / "decisions", span_seconds=86400.0)
    now, since = HOUR / 1000 + 7200, HOUR / 1000 - 3600
    assert len(window.rows(since, now) or []) == 16

    def stop(step: str) -> None:
        if step == "renamed":
            raise KeyboardInterrupt(step)

    with pytest.raises(KeyboardInterrupt):
        compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000, crash_at=stop)
    part = tmp_path / "decisions" / PART
    assert len(names(tmp_path)) == 7  # the merged file and every small file
    assert [os.path.basename(f) for f in decision_files(part)] == [  # what readers read: no small file twice
        f"part-{HOUR}-c{HOUR + HOUR_MS}.parquet", f"part-{HOUR + HOUR_MS + 10}-1.parquet",
        f"part-{HOUR + HOUR_MS + 20}-2.parquet"]
    rows = window.rows(since, now) or []
    assert sorted(r.decision_id for r in rows) == ids(tmp_path) and len(rows) == 16


def test_a_read_lists_again_when_a_listed_file_was_removed(tmp_path: Path) -> None:
    import duckdb

    path = small_file(tmp_path, HOUR, 1, range(2))
    listings = [[str(tmp_path / "gone.parquet")], [str(path)]]  # compaction removed the first listing's file

    def read() -> int:
        files = listings.pop(0)
        return len(duckdb.sql(f"SELECT * FROM read_parquet({files!r})").fetchall())

    assert read_log(read) == 2


def test_kassa_log_compact(tmp_path: Path) -> None:
    an_hour(tmp_path)
    expected = ids(tmp_path)
    runner = CliRunner()
    out = runner.invoke(app, ["log", "compact", "--data-dir", str(tmp_path), "--before", "2024-03-01T13:00"])
    assert out.exit_code == 0, out.output
    assert "decisions: 4 files merged into 1 (12 decisions), 4 removed" in " ".join(out.output.split())
    assert ids(tmp_path) == expected
    bad = runner.invoke(app, ["log", "compact", "--data-dir", str(tmp_path), "--before", "noon"])
    assert bad.exit_code == 2 and "not a time: 'noon'" in bad.output
    empty = runner.invoke(app, ["log", "compact", "--data-dir", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "no decision log in" in empty.output


def test_the_compactor_merges_closed_hours_in_a_child_and_leaves_a_busy_directory(tmp_path: Path) -> None:
    an_hour(tmp_path)
    expected = ids(tmp_path)
    fd = os.open(tmp_path / "decisions" / ".compact.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another process compacting: the child leaves it, and says nothing
    try:
        busy = LogCompactor([tmp_path / "decisions", tmp_path / "shadow" / "decisions"])
        busy.run_once()
    finally:
        os.close(fd)
    assert (busy.runs, busy.merges) == (1, 1) and len(names(tmp_path)) == 6
    compactor = LogCompactor([tmp_path / "decisions"], first_after=0.0).start()
    try:
        deadline = time.monotonic() + 20
        while compactor.runs < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        compactor.close()
    assert ids(tmp_path) == expected and len(names(tmp_path)) == 2  # both hours: closed long ago
    again = LogCompactor([tmp_path / "decisions"])
    again.run_once()
    assert again.merges == 0  # nothing to do: no child started


def test_the_process_that_learns_runs_a_compactor_and_a_serving_worker_does_not(settings: Settings) -> None:
    import asyncio

    from kassa.app import Kassa

    for role, runs in (("all", True), ("serve", False)):
        kassa = Kassa(settings, role=role)  # type: ignore[arg-type]
        try:
            assert (kassa.compactor is not None) is runs, role
            if kassa.compactor is not None:
                assert kassa.compactor.directories == [settings.data_path / "decisions",
                                                       settings.data_path / "shadow" / "decisions"]
        finally:
            asyncio.run(kassa.stop())


def test_the_dashboard_window_lists_again_when_a_listed_file_is_merged_before_it_is_read(tmp_path: Path) -> None:
    files = an_hour(tmp_path)
    expected = ids(tmp_path)

    class Racing(DecisionLogWindow):
        """Compaction runs between the window's listing and its read of the files."""
        raced = False

        def _listing(self, first_date: str) -> dict[str, tuple[int, int, str]]:
            listed = super()._listing(first_date)
            if not self.raced:
                self.raced = True
                compact_decision_log(tmp_path / "decisions", before=(HOUR + HOUR_MS) / 1000)
            return listed

    window = Racing(tmp_path / "decisions", span_seconds=86400.0, first_chunk=2)
    rows = window.rows(HOUR / 1000 - 3600, HOUR / 1000 + 7200) or []
    assert not any(f.exists() for f in files)
    assert sorted(r.decision_id for r in rows) == expected and len(rows) == 16
