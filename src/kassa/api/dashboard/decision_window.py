"""The decision log's last day as the dashboard reads it: the few columns its pages need, each Parquet file read once.

The log is many small files: the writer flushes every 0.5 s (`DecisionLogWriter.flush_seconds`), so a day holds up
to ~172,800 of them, one per decision or two at modest traffic. A DuckDB query over the log pays ~0.1-0.15 ms per
file whatever it selects (measured on the shared 2-core VM: 30,000 decisions in 10,000 files, 1.1-1.5 s for the
placement page's query, 0.9 s for a bare ``count(*)``; the same decisions in one file, ~60 ms), and every placement
view, every overview refresh (each 5 s) and the explorer's list ran such a query. A written file never changes
(the writer renames it into place), so `DecisionLogWindow` keeps the rows of every file it has read, of the date
partitions from ``span_seconds`` ago on, and on each read lists those partitions and reads only the files it has
not seen. A view then costs the files written since the last one, not the whole day.

It holds what the query would return, by the same rules: rows with ``ts >= since``, newest first, at most
``max_rows``, as the query's ``ORDER BY ts DESC LIMIT`` keeps the newest rows. New files are read newest first and
no further once ``max_rows`` rows are read (a busy day's first read stops there), held files are dropped oldest
first past it, and older files are skipped from then on. A file is dated by the time in its name, so a file
holding rows older than a later file's can go first: the writer's spool replays are the only such files. A file
gone from the directory (removed by an operator, retention or compaction) is dropped; a ``since`` before the
window's first partition is not served (`rows` returns None, the caller queries the log). The files are listed by
the log's reader rule (`kassa.events.decision_log.decision_files`): once an hour's merged file is in place its small
files are not listed, so they are dropped and the merged file read, each decision held once; a merged file is dated
by its hour's end, so it is read even when older small files of its hour were skipped past ``max_rows``. A listed
file removed before it is read (merged meanwhile) makes the read list again; what was read is kept.

Reads serialize on a lock; the returned list is the caller's. Memory (tracemalloc; ids of placements, versions and
offers, and each distinct list of shown offers, interned): ~23 MB for 100,000 rows showing 2 of 4 offers, ~28 MB at
the peak of the first read (as named tuples fetched in one list: ~32 MB, peak ~100 MB); ~13 MB for 30,000 rows
showing 3 of 300 offers was measured before, with named tuples.

The first read after a start is the costly one (~1 s of CPU for ~130,000 rows, 2026-12-07): DuckDB reads into Arrow
with the GIL released, the rows become Python objects a batch at a time, and `DecisionRow` is not tracked by the
garbage collector, so the event loop of the serving process is not kept waiting (it waited up to 90-420 ms at a time,
`bench/dashboard_first_view.py`); `state.Dashboard.warm` starts it when the login form is asked for.
"""

from __future__ import annotations

import os
import re
import threading
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from kassa.events.decision_log import decision_files, read_log, serving_duckdb

_PART = re.compile(r"part-(\d+)-(\d+)\.parquet$")
_MERGED = re.compile(r"part-\d+-c(\d+)[-.]")
# files per DuckDB query when many are new (the first read of a day): the first chunk is small and each next one
# twice the last, up to `_MAX_CHUNK` (bounds the SQL text), so a busy day's big files stop the read near ``max_rows``
_FIRST_CHUNK = 64
_MAX_CHUNK = 2000
# rows converted to Python objects at a time (`DecisionLogWindow._read`)
_BATCH = 2048


class DecisionRow(msgspec.Struct, frozen=True, gc=False):
    """The columns of a decision the dashboard's tables and charts read. Not tracked by the garbage collector (it
    holds strings, numbers and a tuple of strings, so it is never in a cycle): a window of 100,000 named tuples was
    100,000 more objects for every full collection of the serving process to walk."""

    decision_id: str
    ts: float
    placement: str
    model_version: str
    chosen: tuple[str, ...]
    fallback: bool
    took_ms: float


def _file_key(name: str) -> tuple[int, int, str]:
    """A file's place in time: the write time (unix ms) and sequence the writer puts in its name (a compacted
    hour's file: the hour's end)."""
    m = _PART.search(name)
    if m:
        return int(m.group(1)), int(m.group(2)), name
    m = _MERGED.search(name)
    return (int(m.group(1)), 0, name) if m else (0, 0, name)


def _file_key_of_path(path: str) -> tuple[int, int, str]:
    return _file_key(os.path.basename(path))


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


class DecisionLogWindow:
    """The rows of the decision log's files in the date partitions from ``span_seconds`` before ``now`` on."""

    def __init__(self, directory: Path, span_seconds: float = 24 * 3600.0, max_rows: int = 100_000,
                 first_chunk: int = _FIRST_CHUNK) -> None:
        self.directory = directory
        self.first_chunk = first_chunk
        self.span_seconds = span_seconds
        self.max_rows = max_rows
        self.files_read = 0  # Parquet files read so far (each once, unless dropped and needed again)
        self._lock = threading.Lock()
        self._files: dict[str, list[DecisionRow]] = {}  # path -> its rows
        self._held = 0
        self._floor: tuple[int, int, str] | None = None  # files at or before this one were dropped (max_rows)
        self._newest: list[DecisionRow] | None = None  # every held row, newest first (None: rebuild)
        self._names: dict[str, str] = {}  # interned placement, version and offer ids
        self._shown: dict[tuple[str, ...], tuple[str, ...]] = {}  # interned lists of shown offers

    def rows(self, since: float, now: float) -> list[DecisionRow] | None:
        """Held rows with ``ts >= since``, newest first, after reading the files written since the last read; None
        when ``since`` is before the window (the caller reads the log)."""
        first_date = _date(now - self.span_seconds)
        if _date(since) < first_date:
            return None
        with self._lock:
            # again when compaction removed a listed file
            read_log(lambda: self._update(first_date), base=self.directory)
            newest = self._newest
            if newest is None:
                # ties (one clock tick) newest written first: the files newest first, each file's rows reversed
                files = sorted(self._files, key=_file_key_of_path, reverse=True)
                newest = self._newest = sorted((r for p in files for r in reversed(self._files[p])),
                                               key=lambda r: r.ts, reverse=True)
            if len(newest) > self.max_rows:
                newest = newest[:self.max_rows]
            # newest first: the rows at or after ``since`` are a prefix
            lo, hi = 0, len(newest)
            while lo < hi:
                mid = (lo + hi) // 2
                if newest[mid].ts >= since:
                    lo = mid + 1
                else:
                    hi = mid
            return newest[:lo]

    def file_of(self, decision_id: str, now: float) -> str | None:
        """The file holding a decision, when the window holds it (after reading what is new): the explorer reads
        that one file rather than the whole log."""
        with self._lock:
            first_date = _date(now - self.span_seconds)
            read_log(lambda: self._update(first_date), base=self.directory)
            for path, rows in self._files.items():
                if any(r.decision_id == decision_id for r in rows):
                    return path
        return None

    # ------------------------------------------------------------------ keeping up
    def _listing(self, first_date: str) -> dict[str, tuple[int, int, str]]:
        out: dict[str, tuple[int, int, str]] = {}
        try:
            partitions = [e for e in os.scandir(self.directory)
                          if e.is_dir() and e.name.startswith("date=") and e.name[5:] >= first_date]
        except FileNotFoundError:
            return out
        for partition in partitions:
            for path in decision_files(partition.path):  # not a temp file, nor a small file a merged one covers
                key = _file_key(os.path.basename(path))
                if self._floor is None or key > self._floor:
                    out[path] = key
        return out

    def _update(self, first_date: str) -> None:
        listed = self._listing(first_date)
        gone = [p for p in self._files if p not in listed]
        for path in gone:
            self._held -= len(self._files.pop(path))
        # newest first, and no further once ``max_rows`` are held: a busy day's first read (up to ~172,800 files,
        # millions of rows) stops at what the pages can show instead of reading it all and dropping most
        new = sorted((p for p in listed if p not in self._files), key=listed.__getitem__, reverse=True)
        if gone or new:  # (before reading: a read that fails part way keeps what it read, and is listed again)
            self._newest = None
        i, chunk, read = 0, self.first_chunk, 0
        while i < len(new) and read < self.max_rows:
            read += self._read(new[i:i + chunk])
            i += chunk
            chunk = min(2 * chunk, _MAX_CHUNK)
        if i < len(new):  # left unread: older than what is held, and skipped from now on
            self._floor = max(self._floor, listed[new[i]]) if self._floor is not None else listed[new[i]]
        if self._held > self.max_rows:
            self._evict(listed)

    def _read(self, paths: list[str]) -> int:
        """Read and hold ``paths``; the number of rows they hold. DuckDB reads them into Arrow (the GIL released),
        then the rows become Python objects ``_BATCH`` at a time: a day's first read took ~130,000 rows with
        ``fetchall`` in one call, each row's offers a list, and the event loop waited up to ~420 ms at a time for the
        GIL (the conversion and the full garbage collections all those new objects set off)."""
        files = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
        sql = (f"SELECT filename, decision_id, ts, placement, model_version, chosen, fallback, took_ms "
               f"FROM read_parquet([{files}], filename = true)")
        con = serving_duckdb()
        try:
            table = con.sql(sql).to_arrow_table()
        finally:
            con.close()
        names, shown = self._names, self._shown
        by_file: dict[str, list[DecisionRow]] = {p: [] for p in paths}
        for batch in table.to_batches(max_chunksize=_BATCH):
            # each row's offers sliced from the batch's flat list, not a list per row: those were ~130,000 objects
            # the collector tracks, alive long enough to be promoted and walked by full collections
            lists = batch.column(5)
            flat = lists.flatten().to_pylist()
            offsets = lists.offsets.to_pylist()
            base = offsets[0]
            columns = [batch.column(i).to_pylist() for i in (0, 1, 2, 3, 4, 6, 7)]
            for i, (filename, decision_id, ts, placement, version, fallback, took_ms) in enumerate(
                    zip(*columns, strict=True)):
                offers = tuple(flat[offsets[i] - base:offsets[i + 1] - base])
                by_file[filename].append(DecisionRow(
                    decision_id, ts, names.setdefault(placement, placement), names.setdefault(version, version),
                    # one tuple per distinct list of shown offers, its ids interned
                    shown.get(offers) or shown.setdefault(offers, tuple(names.setdefault(o, o) for o in offers)),
                    bool(fallback), took_ms))
        for path, rows in by_file.items():
            self._files[path] = rows
            self._held += len(rows)
        self.files_read += len(paths)
        return table.num_rows

    def _evict(self, listed: dict[str, tuple[int, int, str]]) -> None:
        """Drop the oldest files while the rest still hold ``max_rows``; later listings skip them."""
        for path in sorted(self._files, key=listed.__getitem__):
            n = len(self._files[path])
            if self._held - n < self.max_rows:
                break
            del self._files[path]
            self._held -= n
            self._floor = listed[path]
        self._newest = None
        if len(self._names) > 4 * self.max_rows:  # ids come and go (offers renamed): do not grow for ever
            self._names = {}
        if len(self._shown) > self.max_rows:
            self._shown = {}
