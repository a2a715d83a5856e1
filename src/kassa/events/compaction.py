"""Compaction of the decision log: each closed hour's small files merged into one file.

The writers flush every 0.5 s (`DecisionLogWriter`, the JetStream `DecisionLogConsumer`), so a busy day holds up to
~172,800 files per writing process, and DuckDB pays ~0.1-0.15 ms per file on every query whatever it selects
(30,000 decisions in 10,000 files: 0.9 s for a bare ``count(*)``, ~60 ms in one file). `compact_decision_log`
merges the small files of each hour into one ``part-<start ms>-c<end ms>[-s<first>-<last>].parquet``.

- **Closed hours only.** A file is placed by the write time in its name (``part-<unixms>-...``), which every writer
  takes from its clock when it writes (a record's own time picks only the date partition). An hour is compacted
  once it ended ``grace_seconds`` (10 min) ago: no writer still names a file in it then. A small file that turns up
  in a compacted hour anyway (a writer stalled past the grace, a clock set back) is merged in on the next run.
- **One compactor per directory:** an exclusive ``flock`` on ``<dir>/.compact.lock``, taken without waiting. It
  needs nothing running (the operator command works on a stopped install), holds for any processes sharing the
  data dir (``kassa learn`` beside ``kassa serve``, an operator's command beside either, the JetStream writer
  role), and the kernel releases it when its holder dies, so a crash leaves no stale lock. The learner's lease
  would need PostgreSQL and a running learner. (``flock`` is per host: a directory shared over NFS by several
  hosts needs one host to compact it.)
- **Order of the steps**, and what a reader sees: the merged rows (schema `SCHEMA`, old files' missing
  `LATER_COLUMNS` as null, rows ordered by ``ts``, ``decision_id``) are written to ``.compact-<name>.tmp``, which
  readers skip, fsynced, renamed into place, the directory fsynced, then the small files removed. From the rename
  on, `decision_files` leaves out every small file the merged file covers, so a reader listing the directory sees
  either the small files or the merged file, never both; a listed small file removed before DuckDB opens it makes
  the read list again (`read_log`).
- **A crash at any step** loses and duplicates nothing: before the rename the small files are all there (the
  temporary file is removed by the next run); after it the merged file holds every row and the leftover small files
  are hidden. The next run removes a leftover small file once every decision id in it is in the merged file, and
  merges one that has ids the merged file lacks (a late file) by replacing the merged file under the same name.
- **The JetStream writer's position** is its files' names (``-s<first>-<last>``, `DecisionLogConsumer`): a merged
  file keeps the lowest first and highest last sequence of the files it merged. (A writer restarted while a merged
  file is its newest resumes from that file's lowest sequence, and skips the hour's records already in it.)

Run every few minutes by `LogCompactor` (below) where Kassa learns, and on demand by ``kassa log compact``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from kassa.events.decision_log import SCHEMA, file_span

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
GRACE_SECONDS = 600.0
_RANGE = re.compile(r"-s(\d+)-(\d+)\.parquet$")
_TMP_PREFIX = ".compact-"
_CHUNK = 200  # files read at once (see `_read`)


class CompactionBusy(Exception):
    """Another process is compacting the directory."""


@dataclass
class CompactionResult:
    hours: int = 0  # hours merged into a new file (or a late file merged into an existing one)
    files: int = 0  # small files merged
    rows: int = 0  # rows written to merged files
    removed: int = 0  # small files removed (merged now, or left by an interrupted run)
    seconds: float = 0.0
    merged: list[str] = field(default_factory=list)  # the merged files written


def pending_hours(directory: Path, before: float) -> list[tuple[Path, int, list[str]]]:
    """``(partition, hour start ms, small file names)`` of each hour ending at or before ``before`` (unix s) that
    has at least two small files and no merged file yet, oldest first."""
    out: list[tuple[Path, int, list[str]]] = []
    limit_ms = int(before * 1000)
    for part in sorted(p for p in Path(directory).glob("date=*") if p.is_dir()):
        hours: dict[int, list[str]] = {}
        merged: set[int] = set()
        for name in os.listdir(part):
            span = file_span(name)
            if span is None:
                continue
            start = span[0] - span[0] % HOUR_MS
            if span[1] is not None:
                merged.add(start)
            elif start + HOUR_MS <= limit_ms:
                hours.setdefault(start, []).append(name)
        out += [(part, h, sorted(names)) for h, names in sorted(hours.items()) if h not in merged and len(names) > 1]
    return out


def compact_decision_log(
    directory: Path,
    before: float | None = None,
    *,
    grace_seconds: float = GRACE_SECONDS,
    progress: Callable[[int, int], None] | None = None,
    threads: bool = True,
    crash_at: Callable[[str], None] | None = None,
) -> CompactionResult:
    """Merge each closed hour's small files of ``directory`` (``<root>/decisions``) into one file.

    ``before`` (unix seconds): only hours ending at or before it; at most (and by default) ``grace_seconds`` ago.
    ``progress(done, total)`` hears each hour done. ``threads``: read with Arrow's thread pool. ``crash_at(step)``
    is for tests: it is called at each step (``written``, ``renamed``, ``removed-one``) and may raise to stop
    there. Raises `CompactionBusy` when another process holds the directory's lock, ``ValueError`` for a
    ``before`` in an hour that may still be written.
    """
    started = time.monotonic()
    latest = time.time() - grace_seconds
    if before is None:
        before = latest
    elif before > latest:
        raise ValueError(f"before must be at least {grace_seconds:.0f} s ago (writers may still name files in an "
                         f"hour ending after {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(latest))} UTC)")
    directory = Path(directory)
    result = CompactionResult()
    if not directory.is_dir():
        return result
    step = crash_at or (lambda _step: None)
    with _lock(directory):
        for part in sorted(p for p in directory.glob("date=*") if p.is_dir()):
            _finish(part, result, step)
        todo = pending_hours(directory, before)
        for i, (part, hour, names) in enumerate(todo):
            path = _merge(part, hour, names, step, threads)
            result.hours += 1
            result.files += len(names)
            result.rows += pq.read_metadata(path).num_rows
            result.merged.append(str(path))
            for name in names:
                (part / name).unlink(missing_ok=True)
                result.removed += 1
                step("removed-one")
            _fsync_dir(part)
            if progress is not None:
                progress(i + 1, len(todo))
    result.seconds = time.monotonic() - started
    return result


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    fd = os.open(directory / ".compact.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CompactionBusy(f"another process is compacting {directory}") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _merge(part: Path, hour: int, names: list[str], step: Callable[[str], None], threads: bool = True) -> Path:
    """Write the merged file of ``names`` (one hour of ``part``) and rename it into place; its path."""
    ranges = [(int(m.group(1)), int(m.group(2))) for n in names if (m := _RANGE.search(n))]
    suffix = f"-s{min(f for f, _ in ranges)}-{max(last for _, last in ranges)}" if ranges else ""
    path = part / f"part-{hour}-c{hour + HOUR_MS}{suffix}.parquet"
    _write(path, _read([part / n for n in names], threads), step)
    return path


def _read(paths: list[Path], threads: bool = True) -> pa.Table:
    """The rows of ``paths`` with `SCHEMA` (a column an old file lacks is null), ordered by ts and decision_id.

    Read `_CHUNK` files at a time, each chunk's rows made contiguous: one Arrow dataset of an hour's 7,200 files
    (216,000 decisions, 45 MB of Arrow) took the process to ~775 MB RSS and 4.9 s; by chunks, ~270 MB and 2.9 s."""
    files = [str(p) for p in paths]
    parts = [ds.dataset(files[i:i + _CHUNK], schema=SCHEMA, format="parquet").to_table(use_threads=threads)
             .combine_chunks() for i in range(0, len(files), _CHUNK)]
    return pa.concat_tables(parts).sort_by([("ts", "ascending"), ("decision_id", "ascending")])


def _write(path: Path, table: pa.Table, step: Callable[[str], None]) -> None:
    tmp = path.parent / f"{_TMP_PREFIX}{path.name}.tmp"  # readers list *.parquet: never a half-written file
    try:
        pq.write_table(table, tmp, row_group_size=100_000)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        step("written")
        os.replace(tmp, path)
    except BaseException:
        # (a crash here leaves the temporary file, which the next run removes; the small files are all there)
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    step("renamed")


def _finish(part: Path, result: CompactionResult, step: Callable[[str], None]) -> None:
    """What an interrupted run left in ``part``: temporary files removed, small files a merged file covers removed
    (every id in the merged file) or merged in (a late file: ids the merged file lacks)."""
    names = os.listdir(part)
    for name in names:
        if name.startswith(_TMP_PREFIX) and name.endswith(".tmp"):
            (part / name).unlink(missing_ok=True)
    merged: dict[int, str] = {}
    small: dict[int, list[str]] = {}
    for name in names:
        span = file_span(name)
        if span is None:
            continue
        if span[1] is not None:
            merged[span[0]] = name
        else:
            small.setdefault(span[0] - span[0] % HOUR_MS, []).append(name)
    for hour, merged_name in merged.items():
        covered = sorted(small.get(hour, ()))
        if not covered:
            continue
        path = part / merged_name
        have = set(pq.read_table(path, columns=["decision_id"]).column("decision_id").to_pylist())
        late = [n for n in covered
                if not set(pq.read_table(part / n, columns=["decision_id"]).column("decision_id").to_pylist()) <= have]
        if late:
            log.warning("decision log: %d file(s) written into %s after it was compacted; merging them in",
                        len(late), path)
            old = _read([path])
            new = _read([part / n for n in late])
            ids = pc.is_in(new.column("decision_id"), value_set=old.column("decision_id"))
            table = pa.concat_tables([old, new.filter(pc.invert(ids))])
            _write(path, table.sort_by([("ts", "ascending"), ("decision_id", "ascending")]), step)
            result.hours += 1
            result.files += len(late)
        for name in covered:
            (part / name).unlink(missing_ok=True)
            result.removed += 1
            step("removed-one")
        _fsync_dir(part)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def has_work(directory: Path, before: float | None = None, grace_seconds: float = GRACE_SECONDS) -> bool:
    """Whether `compact_decision_log` would do anything in ``directory``: a closed hour to merge, or what an
    interrupted run left (a temporary file, a small file a merged one covers). One listing per partition."""
    limit_ms = int((time.time() - grace_seconds if before is None else before) * 1000)
    for part in Path(directory).glob("date=*"):
        small: dict[int, int] = {}
        merged: set[int] = set()
        for name in os.listdir(part):
            if name.startswith(_TMP_PREFIX):
                return True
            span = file_span(name)
            if span is None:
                continue
            hour = span[0] - span[0] % HOUR_MS
            if span[1] is not None:
                merged.add(hour)
            else:
                small[hour] = small.get(hour, 0) + 1
        if any(h in merged or (n > 1 and h + HOUR_MS <= limit_ms) for h, n in small.items()):
            return True
    return False


class LogCompactor:
    """Compacts ``directories`` every ``every_seconds`` in a child process (``python -m kassa.events.compaction``,
    at ``nice`` 10), started by a daemon thread only when `has_work` finds something to do.

    Not a thread of the process itself: merging an hour of 7,200 files (216,000 decisions, ~4 s) on a thread held
    the GIL often enough that another thread sleeping 1 ms woke up 3.4 ms late at p99 (7.8 ms at worst; idle:
    0.13-0.27 ms), and Arrow's allocator keeps a merge's ~170 MB peak in the process after it. With the merge in a
    child the same probe saw 0.85-1.05 ms at p99 (the 2-core VM shared with other work; max 7.6-8.7 ms, idle
    2.3-5.0). A child costs its start (~0.5 s of imports) once per round that has work and returns its memory.
    Stopping kills the child: every step of a merge is crash-safe (`compact_decision_log`). A directory another
    process is compacting is left to it; an error is logged and tried again the next round.

    Kassa runs one in the process that owns the learning (``kassa serve`` with the learner in process, or
    ``kassa learn``, which share the serving processes' data dir when the decision log is written in process) and
    in the JetStream decision-log writer role, never in a serving worker."""

    def __init__(self, directories: list[Path], every_seconds: float = 300.0, first_after: float = 30.0) -> None:
        self.directories = directories
        self.every_seconds = every_seconds
        self.first_after = first_after
        self.runs = 0  # rounds done
        self.merges = 0  # child processes run
        self._stop = threading.Event()
        self._child: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kassa-log-compactor", daemon=True)

    def start(self) -> LogCompactor:
        self._thread.start()
        return self

    def run_once(self) -> None:
        todo = [str(d) for d in self.directories if Path(d).is_dir() and has_work(d)]
        if todo and not self._stop.is_set():
            cmd = [sys.executable, "-m", "kassa.events.compaction", *todo]
            try:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                out, err = self._child.communicate()
                self.merges += 1
                for line in out.splitlines():
                    log.info("decision log compacted: %s", line)
                if self._child.returncode not in (0, -signal.SIGTERM):
                    log.error("decision log: compaction exited with %s: %s", self._child.returncode, err.strip())
            except Exception:
                log.exception("decision log: running the compaction failed")
            finally:
                self._child = None
        self.runs += 1

    def _run(self) -> None:
        if self._stop.wait(self.first_after):
            return
        while True:
            self.run_once()
            if self._stop.wait(self.every_seconds):
                return

    def close(self) -> None:
        """Stop; a merge running is killed (the next run finishes what it left)."""
        with self._lock:
            self._stop.set()
            if self._child is not None and self._child.poll() is None:
                self._child.terminate()
        if self._thread.is_alive():
            self._thread.join()


def main(argv: list[str] | None = None) -> int:
    """``python -m kassa.events.compaction DIR...``: what `LogCompactor` runs; one JSON line per directory merged."""
    with contextlib.suppress(OSError):
        os.nice(10)
    for directory in argv if argv is not None else sys.argv[1:]:
        try:
            result = compact_decision_log(Path(directory), threads=False)
        except CompactionBusy:
            continue  # another process is on it
        if result.files or result.removed:
            print(json.dumps({"directory": directory, "files": result.files, "hours": result.hours,
                              "rows": result.rows, "removed": result.removed, "seconds": round(result.seconds, 2)}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
