"""Where model artifacts live when several processes serve: write + read time of one artifact, by store.

Measures, for a typical demo model (90 KB, what `kassa demo` registers) and a large one (8 MB), the median
of N round trips (write in one transaction, then read back whole in a new connection) for:
PostgreSQL ``bytea`` (a row in ``model_artifacts``), PostgreSQL large objects (``lo_import``-style writes
through ``pg_largeobject``), the NATS JetStream object store, and a shared folder (local disk standing in
for NFS: the lower bound of that option). Usage::

    python bench/artifact_store.py [--pg URL] [--nats URL] [--repeats 20] [--json]

Results and the choice: docs/adr/0006-meta-13a-metadata-on-postgresql.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import psycopg


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def bench_bytea(url: str, blob: bytes, repeats: int) -> tuple[float, float]:
    table = f"bench_art_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"CREATE TABLE {table} (name text primary key, body bytea not null)")
    writes, reads = [], []
    try:
        for i in range(repeats):
            t0 = time.perf_counter()
            with psycopg.connect(url) as c:
                c.execute(f"INSERT INTO {table} VALUES (%s, %s)", (f"a{i}", blob))
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with psycopg.connect(url) as c:
                got = c.execute(f"SELECT body FROM {table} WHERE name = %s", (f"a{i}",)).fetchone()
            reads.append(time.perf_counter() - t0)
            assert got is not None and bytes(got[0]) == blob
    finally:
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"DROP TABLE {table}")
    return _median_ms(writes), _median_ms(reads)


def bench_large_object(url: str, blob: bytes, repeats: int) -> tuple[float, float]:
    writes, reads, oids = [], [], []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            with psycopg.connect(url) as c:
                row = c.execute("SELECT lo_from_bytea(0, %s)", (blob,)).fetchone()
                assert row is not None
                oids.append(row[0])
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with psycopg.connect(url) as c:
                got = c.execute("SELECT lo_get(%s)", (oids[-1],)).fetchone()
            reads.append(time.perf_counter() - t0)
            assert got is not None and bytes(got[0]) == blob
    finally:
        with psycopg.connect(url, autocommit=True) as c:
            for oid in oids:
                c.execute("SELECT lo_unlink(%s)", (oid,))
    return _median_ms(writes), _median_ms(reads)


async def _bench_jetstream(url: str, blob: bytes, repeats: int) -> tuple[float, float]:
    import nats

    bucket = f"bench_art_{uuid.uuid4().hex[:8]}"
    writes, reads = [], []
    nc0 = await nats.connect(url)
    store = await nc0.jetstream().create_object_store(bucket)
    try:
        for i in range(repeats):
            t0 = time.perf_counter()
            nc = await nats.connect(url)
            await (await nc.jetstream().object_store(bucket)).put(f"a{i}", blob)
            await nc.close()
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            nc = await nats.connect(url)
            got = await (await nc.jetstream().object_store(bucket)).get(f"a{i}")
            await nc.close()
            reads.append(time.perf_counter() - t0)
            assert got.data == blob
    finally:
        del store
        await nc0.jetstream().delete_object_store(bucket)
        await nc0.close()
    return _median_ms(writes), _median_ms(reads)


def bench_folder(blob: bytes, repeats: int) -> tuple[float, float]:
    writes, reads = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(repeats):
            path = Path(d) / f"a{i}"
            t0 = time.perf_counter()
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            got = path.read_bytes()
            reads.append(time.perf_counter() - t0)
            assert got == blob
    return _median_ms(writes), _median_ms(reads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--nats", default="nats://127.0.0.1:4222")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {}
    for label, size in (("90KB", 90_000), ("8MB", 8_000_000)):
        blob = os.urandom(size)
        row: dict[str, list[float]] = {"pg_bytea": list(bench_bytea(args.pg, blob, args.repeats)),
                                       "pg_large_object": list(bench_large_object(args.pg, blob, args.repeats))}
        try:
            row["jetstream_object_store"] = list(asyncio.run(_bench_jetstream(args.nats, blob, args.repeats)))
        except Exception as exc:  # no NATS here: say so, measure the rest
            print(f"jetstream skipped: {exc!r}")
        row["local_folder_fsync"] = list(bench_folder(blob, args.repeats))
        results[label] = row
        if not args.json:
            for store, (w, r) in row.items():
                print(f"{label:>5} {store:<24} write {w:8.2f} ms  read {r:8.2f} ms (medians of {args.repeats})")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
