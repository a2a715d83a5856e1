"""Decision-log compaction: reads over many small files before and after, and the merge's own time and memory.

Owns the compaction benchmark (`kassa.events.compaction`). It writes a decision log of ``--files`` small files
(``--per-file`` decisions each, one file per 0.5 s flush as `DecisionLogWriter` names them, so the files span a
few hours of a past day) and times, each ``--repeats`` times, `read_decisions` (what ``kassa evaluate`` and
``kassa train`` read) and a DuckDB ``count(*)`` over the files; then compacts the log and times both again on the
merged files. Separately it writes one day-sized hour (``--hour-files`` files, 7,200 at two flushes a second) and
compacts it in a fresh child process, with Arrow's thread pool and without (as the automatic `LogCompactor` runs),
reporting its time, its peak RSS and the child's RSS before it (imports). ``--json`` ends the output with one
JSON object.

    python bench/log_compaction.py --files 10000 --per-file 3 --hour-files 7200 --hour-per-file 30 --json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from kassa.events.compaction import compact_decision_log
from kassa.events.decision_log import DecisionRecord, log_files, parquet_list, read_decisions, records_to_table

START_MS = int(datetime(2026, 11, 2, 9, 0, tzinfo=UTC).timestamp() * 1000)


def write_log(root: Path, files: int, per_file: int) -> None:
    part = root / "decisions" / "date=2026-11-02"
    part.mkdir(parents=True, exist_ok=True)
    n = 0
    for k in range(files):
        write_ms = START_MS + 500 * k
        records = []
        for _ in range(per_file):
            records.append(DecisionRecord(
                decision_id=f"d{n:09d}", ts=write_ms / 1000 - 0.2, placement="checkout", model_version="v1",
                request_id=None, customer_id=f"c{n % 5000}", features={"order_total": 30.0 + n % 70, "items": n % 7,
                                                                      "country": "DE", "returning": n % 2 == 0},
                candidates=["o1", "o2", "o3", "o4"], probabilities=[0.4, 0.3, 0.2, 0.1], chosen=["o1"],
                chosen_probabilities=[0.4], explored=n % 10 == 0, fallback=False, took_ms=1.5))
            n += 1
        pq.write_table(records_to_table(records), part / f"part-{write_ms}-{k + 1}.parquet")


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def reads(root: Path, repeats: int) -> dict[str, Any]:
    import duckdb

    def count() -> int:  # the files a reader lists (`log_files`)
        files = log_files(root / "decisions")
        return int(duckdb.sql(f"SELECT count(*) FROM read_parquet({parquet_list(files)})").fetchall()[0][0])

    def count_glob() -> int:  # a bare DuckDB glob, as the readers ran before compaction existed
        glob = str(root / "decisions" / "*" / "*.parquet")
        return int(duckdb.sql(f"SELECT count(*) FROM read_parquet('{glob}')").fetchall()[0][0])

    read_s, table = timed(lambda: read_decisions(root), repeats)
    count_s, n = timed(count, repeats)
    glob_s, _ = timed(count_glob, repeats)
    return {"files": len(log_files(root / "decisions")), "decisions": n, "read_decisions_s": round(read_s, 3),
            "duckdb_count_s": round(count_s, 3), "duckdb_glob_count_s": round(glob_s, 3),
            "rows_read": table.num_rows}


def peak_rss_kb() -> int:
    """This process's peak RSS: VmHWM (ru_maxrss survives exec, so it would be the parent's when that was larger)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(folder: Path, threads: bool) -> dict[str, Any]:
    base = peak_rss_kb()
    result = compact_decision_log(folder / "decisions", threads=threads)
    peak = peak_rss_kb()
    return {"threads": threads, "seconds": round(result.seconds, 2), "files": result.files, "rows": result.rows,
            "baseline_rss_mb": round(base / 1024, 1), "peak_rss_mb": round(peak / 1024, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--per-file", type=int, default=3)
    p.add_argument("--hour-files", type=int, default=7_200)
    p.add_argument("--hour-per-file", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only-hour", action="store_true", help="only the day-sized hour's compaction")
    p.add_argument("--json", action="store_true", help="end with one JSON object")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--no-threads", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, not args.no_threads)))
        return
    out: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="kassa-compact-") as tmp:
        root = Path(tmp) / "log"
        if not args.only_hour:
            write_log(root, args.files, args.per_file)
            out["before"] = reads(root, args.repeats)
            print(f"before: {out['before']}", file=sys.stderr)
            result = compact_decision_log(root / "decisions")
            out["compaction"] = {"hours": result.hours, "files": result.files, "seconds": round(result.seconds, 2)}
            out["after"] = reads(root, args.repeats)
            print(f"after: {out['after']}", file=sys.stderr)
        out["hour"] = []
        for threads in (True, False):
            hour = Path(tmp) / f"hour-{threads}"
            write_log(hour, min(args.hour_files, 7_200), args.hour_per_file)  # one hour: 7,200 flushes at most
            cmd = [sys.executable, __file__, "--child", str(hour)] + ([] if threads else ["--no-threads"])
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out["hour"].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"hour: {out['hour'][-1]}", file=sys.stderr)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
