"""Point-in-time training sets over full histories, each answer checked against a brute-force reference.

Batch views are joined against their source's every row (Parquet or CSV), push views against the offline
log: ties on event time (the later created version wins), TTL boundaries (exactly the TTL counts, 1 ms
more does not), versions created after the entity time (ignored on request), entity rows before any
feature row, customers with no rows, duplicate entity rows, nulls (kept) and defaults (only for missing or
stale values, or not at all).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kassa.cli import app
from kassa.features.definitions import Entity, FeatureRepo, FeatureView, Field, Source
from kassa.features.materialize import MaterializeError, materialize
from kassa.features.offline import OfflineStore
from kassa.features.online.memory import InMemoryOnlineStore

CUSTOMER = Entity(name="customer", join_key="customer_id")
T0 = 1_700_000_000_000_000  # 2023-11-14T22:13:20Z in microseconds
MS = 1_000
MINUTE = 60_000_000
HOUR = 60 * MINUTE
TS = pa.timestamp("us", tz="UTC")
FIELDS = [Field(name="orders", dtype="int", default=0), Field(name="segment", dtype="str", default="new")]
DEFAULTS = {"orders": 0, "segment": "new"}


@dataclass(frozen=True)
class Version:
    key: str
    ts: int  # event time, UTC microseconds
    created: int | None
    orders: int | None
    segment: str | None


def reference(history: Sequence[Version], rows: Sequence[tuple[str | None, int | None]], ttl_us: int | None, *,
              filter_created: bool, defaults: bool, null_is_missing: bool = False) -> list[dict[str, Any]]:
    """The answer by brute force: for each row, every version of its key scanned one by one."""
    out = []
    for key, t in rows:
        best: Version | None = None
        if key is not None and t is not None:
            for v in history:
                if v.key != key or v.ts > t or (filter_created and v.created is not None and v.created > t):
                    continue
                if best is None or (v.ts, v.created or -1) > (best.ts, best.created or -1):
                    best = v
        if best is not None and ttl_us is not None and t is not None and best.ts < t - ttl_us:
            best = None  # stale
        row = {}
        for name in ("orders", "segment"):
            value = getattr(best, name) if best is not None else None
            missing = best is None or (null_is_missing and value is None)
            row[name] = (DEFAULTS[name] if defaults else None) if missing else value
        out.append(row)
    return out


def random_history(rng: random.Random, keys: int = 20, per_key: int = 12) -> list[Version]:
    """Versions on a coarse 10-minute grid, so many share an event time; created times are unique per
    key and event time (on time, a little late, or a late correction hours after)."""
    history = []
    for k in range(keys):
        seen: set[tuple[int, int]] = set()
        for _ in range(per_key):
            ts = T0 + rng.randrange(36) * 10 * MINUTE
            created = ts + rng.choice([0, MS, 5 * MINUTE, 2 * HOUR, 7 * HOUR]) + rng.randrange(1000)
            if (ts, created) in seen:
                continue
            seen.add((ts, created))
            history.append(Version(
                f"c{k}", ts, created,
                None if rng.random() < 0.15 else rng.randrange(100),
                None if rng.random() < 0.15 else rng.choice(["vip", "new", "churned"]),
            ))
    rng.shuffle(history)  # file order must not matter
    return history


def random_rows(rng: random.Random, history: Sequence[Version], ttl_us: int, n: int = 400) -> list[tuple[str | None,
                                                                                                         int | None]]:
    """Entity rows that hit the edges: exactly at a version's event or created time, exactly at the TTL
    and 1 ms past it, before anything is known, customers with no rows, duplicates, a null key/time."""
    rows: list[tuple[str | None, int | None]] = []
    for _ in range(n):
        v = rng.choice(history)
        key = rng.choice([v.key, v.key, v.key, f"c{rng.randrange(20, 25)}"])  # c20..c24 have no rows
        t = rng.choice([v.ts, v.created, v.ts + ttl_us, v.ts + ttl_us + MS, v.ts - MS, T0 - HOUR,
                        T0 + rng.randrange(8 * HOUR)])
        rows.append((key, t))
    rows += rows[:30]  # duplicate entity rows
    rows += [(None, T0 + HOUR), ("c1", None)]
    rng.shuffle(rows)
    return rows


def history_table(history: Sequence[Version]) -> pa.Table:
    return pa.table({
        "customer_id": [v.key for v in history],
        "event_timestamp": pa.array([v.ts for v in history], TS),
        "created_timestamp": pa.array([v.created for v in history], TS),
        "orders": pa.array([v.orders for v in history], pa.int64()),
        "segment": pa.array([v.segment for v in history], pa.string()),
    })


def iso(us: int, zone: timezone) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)).astimezone(zone).isoformat()


def write_source(history: Sequence[Version], path: Path) -> str:
    """Parquet, or CSV with ISO times in a +02:00 zone (converted to UTC on reading)."""
    if path.suffix == ".csv":
        plus2 = timezone(timedelta(hours=2))
        lines = ["customer_id,event_timestamp,created_timestamp,orders,segment"]
        for v in history:
            lines.append(f"{v.key},{iso(v.ts, plus2)},{'' if v.created is None else iso(v.created, plus2)},"
                         f"{'' if v.orders is None else v.orders},{v.segment or ''}")
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(history_table(history), path)
    return str(path)


def batch_view(path: str, ttl: str | None = "1h", **source: Any) -> FeatureView:
    return FeatureView(name="customer_stats", kind="batch", entity="customer", ttl=ttl, fields=FIELDS,
                       source=Source(path=path, **source))


def entity_table(rows: Sequence[tuple[str | None, int | None]], tz: str = "UTC") -> pa.Table:
    return pa.table({"customer_id": pa.array([k for k, _ in rows], pa.string()),
                     "event_timestamp": pa.array([t for _, t in rows], pa.timestamp("us", tz=tz)),
                     "row": list(range(len(rows)))})


def features_of(table: pa.Table) -> list[dict[str, Any]]:
    return [{"orders": o, "segment": s} for o, s in zip(table.column("orders").to_pylist(),
                                                          table.column("segment").to_pylist(), strict=True)]


# -- against the brute-force reference ----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("filter_created", [False, True])
@pytest.mark.parametrize("defaults", [True, False])
def test_batch_source_history_join_matches_brute_force(tmp_path: Path, suffix: str, filter_created: bool,
                                                        defaults: bool) -> None:
    rng = random.Random(18)
    history = random_history(rng)
    rows = random_rows(rng, history, HOUR)
    view = batch_view(write_source(history, tmp_path / f"stats{suffix}"))
    # Entity times in another zone: the same instants.
    out = OfflineStore(tmp_path / "offline").training_set(
        entity_table(rows, tz="America/New_York"), [(view, ["orders", "segment"])], entities=[CUSTOMER],
        defaults=defaults, filter_by_created_timestamp=filter_created)
    assert out.column("row").to_pylist() == list(range(len(rows)))  # one row per input row, in order
    assert features_of(out) == reference(history, rows, HOUR, filter_created=filter_created, defaults=defaults)


@pytest.mark.parametrize("filter_created", [False, True])
def test_offline_log_join_matches_brute_force(tmp_path: Path, filter_created: bool) -> None:
    rng = random.Random(7)
    history = random_history(rng)
    rows = random_rows(rng, history, 2 * HOUR)
    view = FeatureView(name="customer_stats", kind="push", entity="customer", ttl="2h", fields=FIELDS)
    store = OfflineStore(tmp_path / "offline")
    store.append(view, history_table(history).rename_columns(
        ["entity_key", "event_timestamp", "created_timestamp", "orders", "segment"]))
    out = store.training_set(entity_table(rows), [(view, ["orders", "segment"])],
                             filter_by_created_timestamp=filter_created)
    # In the log a null is a field the push did not give: served, and joined, as the default.
    assert features_of(out) == reference(history, rows, 2 * HOUR, filter_created=filter_created, defaults=True,
                                         null_is_missing=True)


def test_history_join_without_ttl_matches_brute_force(tmp_path: Path) -> None:
    rng = random.Random(3)
    history = random_history(rng)
    rows = random_rows(rng, history, 10 * HOUR)
    view = batch_view(write_source(history, tmp_path / "stats.parquet"), ttl=None)
    out = OfflineStore(tmp_path / "offline").training_set(entity_table(rows), [(view, ["orders", "segment"])],
                                                          entities=[CUSTOMER])
    assert features_of(out) == reference(history, rows, None, filter_created=False, defaults=True)


# -- the edges, one at a time ---------------------------------------------------------------------------------


def join(tmp_path: Path, history: list[Version], rows: list[tuple[str | None, int | None]], **kw: Any) -> list[dict]:
    view = batch_view(write_source(history, tmp_path / "stats.parquet"))
    out = OfflineStore(tmp_path / "offline").training_set(entity_table(rows), [(view, ["orders", "segment"])],
                                                          entities=[CUSTOMER], **kw)
    return features_of(out)


def test_a_value_exactly_ttl_old_counts_and_one_millisecond_more_is_stale(tmp_path: Path) -> None:
    history = [Version("c1", T0, T0, 5, "vip")]
    rows: list[tuple[str | None, int | None]] = [("c1", T0 + HOUR), ("c1", T0 + HOUR + MS), ("c1", T0)]
    assert join(tmp_path, history, rows) == [{"orders": 5, "segment": "vip"}, DEFAULTS, {"orders": 5, "segment": "vip"}]


def test_the_later_created_version_wins_a_tie_on_event_time(tmp_path: Path) -> None:
    # The correction is written first in the file: file order must not decide.
    history = [Version("c1", T0, T0 + 10 * MINUTE, 2, "fixed"), Version("c1", T0, T0, 1, "typo")]
    rows: list[tuple[str | None, int | None]] = [("c1", T0 + 20 * MINUTE), ("c1", T0 + 5 * MINUTE)]
    assert join(tmp_path, history, rows) == [{"orders": 2, "segment": "fixed"}] * 2
    # Known as of each row: the correction did not exist yet at T0 + 5 min.
    assert join(tmp_path, history, rows, filter_by_created_timestamp=True) == [
        {"orders": 2, "segment": "fixed"}, {"orders": 1, "segment": "typo"}]


def test_versions_created_after_the_entity_time_can_be_ignored(tmp_path: Path) -> None:
    # A backfill written a day late for an event at T0: only visible with hindsight.
    history = [Version("c1", T0 - 30 * MINUTE, T0 - 30 * MINUTE, 1, "a"), Version("c1", T0, T0 + 24 * HOUR, 9, "b")]
    rows: list[tuple[str | None, int | None]] = [("c1", T0 + MINUTE)]
    assert join(tmp_path, history, rows) == [{"orders": 9, "segment": "b"}]
    assert join(tmp_path, history, rows, filter_by_created_timestamp=True) == [{"orders": 1, "segment": "a"}]


def test_source_nulls_stay_null_and_defaults_fill_only_missing_or_stale(tmp_path: Path) -> None:
    history = [Version("c1", T0, T0, None, None), Version("c2", T0 - 2 * HOUR, T0, 3, "vip")]
    rows: list[tuple[str | None, int | None]] = [("c1", T0), ("c2", T0), ("c3", T0), ("c1", T0 - MS)]
    assert join(tmp_path, history, rows) == [{"orders": None, "segment": None}, DEFAULTS, DEFAULTS, DEFAULTS]
    nothing = {"orders": None, "segment": None}
    assert join(tmp_path, history, rows, defaults=False) == [nothing] * 4


def test_duplicate_entity_rows_each_keep_their_row(tmp_path: Path) -> None:
    history = [Version("c1", T0, T0, 1, "a"), Version("c1", T0 + HOUR, T0 + HOUR, 2, "b")]
    rows: list[tuple[str | None, int | None]] = [("c1", T0 + HOUR), ("c1", T0), ("c1", T0 + HOUR), ("c1", T0)]
    assert [r["orders"] for r in join(tmp_path, history, rows)] == [2, 1, 2, 1]


def test_source_without_created_timestamps_still_joins(tmp_path: Path) -> None:
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"customer_id": ["c1", "c1"], "at": pa.array([T0, T0 + HOUR], TS),
                             "orders": [1, 2], "segment": ["a", "b"]}), path)
    view = batch_view(str(path), timestamp_field="at")
    out = OfflineStore(tmp_path / "offline").training_set(entity_table([("c1", T0 + 30 * MINUTE)]),
                                                          [(view, ["orders"])], entities=[CUSTOMER],
                                                          filter_by_created_timestamp=True)
    assert out.column("orders").to_pylist() == [1]
    missing = batch_view(str(path), timestamp_field="at", created_timestamp_field="written_at")
    with pytest.raises(ValueError, match=re.escape("has no column 'written_at' (source.created_timestamp_field)")):
        OfflineStore(tmp_path / "offline").training_set(entity_table([("c1", T0)]), [(missing, ["orders"])])


def test_bad_source_values_in_a_training_set_name_the_view_field_and_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"customer_id": ["c1"], "event_timestamp": pa.array([T0], TS),
                             "orders": [1.5], "segment": ["a"]}), path)
    message = "field 'orders': expected int, found a fractional value (entity key 'c1')"
    with pytest.raises(ValueError, match=re.escape(message)):
        OfflineStore(tmp_path / "o").training_set(entity_table([("c1", T0)]), [(batch_view(str(path)), ["orders"])])


# -- materialize ------------------------------------------------------------------------------------------


def test_materialize_keeps_the_later_created_of_rows_tied_on_event_time(tmp_path: Path) -> None:
    rng = random.Random(140)
    history = []
    for k in range(140):  # every key's newest rows tie on event time; the older write comes last in the file
        history += [Version(f"c{k}", T0 + HOUR, T0 + HOUR + MINUTE + rng.randrange(HOUR), k, "new-write"),
                    Version(f"c{k}", T0, T0, -1, "old-event"),
                    Version(f"c{k}", T0 + HOUR, T0 + HOUR, -k, "old-write")]
    view = batch_view(write_source(history, tmp_path / "stats.parquet"), ttl=None)
    store = InMemoryOnlineStore(clock=lambda: T0 / 1e6 + 7200)
    repo = FeatureRepo(entities=[CUSTOMER], views=[view])
    asyncio.run(materialize(repo, view, store, None, end=T0 / 1e6 + 7200))
    got = asyncio.run(store.read([("customer", f"c{k}") for k in range(140)], [view]))
    assert [r["customer_stats"].values["segment"] if r else None for r in got] == ["new-write"] * 140
    assert [r["customer_stats"].values["orders"] if r else None for r in got] == list(range(140))


def test_materialize_refuses_a_named_created_column_the_source_lacks(tmp_path: Path) -> None:
    path = write_source([Version("c1", T0, T0, 1, "a")], tmp_path / "s.parquet")
    view = batch_view(path, created_timestamp_field="written_at")
    with pytest.raises(MaterializeError, match="no column 'written_at'"):
        asyncio.run(materialize(FeatureRepo(entities=[CUSTOMER], views=[view]), view, None, None, end=T0 / 1e6))


# -- the CLI: apply, then training-set; no materialize -----------------------------------------------------


def test_cli_training_set_reads_the_full_source_history_without_materialize(tmp_path: Path) -> None:
    history = [Version("c1", T0, T0, 1, "new"), Version("c1", T0 + HOUR, T0 + HOUR, 4, None),
               Version("c1", T0 + HOUR, T0 + 3 * HOUR, 5, "vip"),  # a late correction of the same event
               Version("c2", T0 - 40 * 24 * HOUR, T0, 2, "old")]  # beyond the 30d TTL
    source = write_source(history, tmp_path / "stats.parquet")
    defs = tmp_path / "features.yaml"
    defs.write_text(json.dumps({
        "entities": [{"name": "customer", "join_key": "customer_id"}],
        "views": [{"name": "customer_stats", "kind": "batch", "entity": "customer", "ttl": "30d",
                   "source": {"path": source}, "fields": [{"name": "orders", "dtype": "int", "default": 0},
                                                          {"name": "segment", "dtype": "str", "default": "new"}]}],
    }))
    data = ["--data-dir", str(tmp_path / "data")]
    runner = CliRunner()
    r = runner.invoke(app, ["features", "apply", str(defs), "--yes", *data])
    assert r.exit_code == 0, r.output
    entities = tmp_path / "entities.csv"
    entities.write_text("customer_id,event_timestamp\n" + "".join(
        f"{k},{iso(t, UTC)}\n" for k, t in [("c1", T0 + 30 * MINUTE), ("c1", T0 + 2 * HOUR), ("c1", T0 + 4 * HOUR),
                                            ("c2", T0), ("c9", T0)]))
    out = tmp_path / "train.parquet"

    def run(*flags: str) -> list[tuple[Any, Any]]:
        r = runner.invoke(app, ["features", "training-set", "--entities", str(entities), "--features",
                                "customer_stats:*", "--out", str(out), "--json", *flags, *data])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output.strip().splitlines()[-1])["rows"] == 5
        t = pq.read_table(out)
        return list(zip(t.column("orders").to_pylist(), t.column("segment").to_pylist(), strict=True))

    assert run() == [(1, "new"), (5, "vip"), (5, "vip"), (0, "new"), (0, "new")]
    assert run("--filter-by-created-timestamp") == [(1, "new"), (4, None), (5, "vip"), (0, "new"), (0, "new")]
    assert run("--no-defaults") == [(1, "new"), (5, "vip"), (5, "vip"), (None, None), (None, None)]


def _one_view_applied(tmp_path: Path) -> list[str]:
    """A data dir with one batch view (``customer_stats``: c1 made 1 order at T0) applied; its ``--data-dir`` args."""
    source = write_source([Version("c1", T0, T0, 1, "new")], tmp_path / "stats.parquet")
    defs = tmp_path / "features.yaml"
    defs.write_text(json.dumps({
        "entities": [{"name": "customer", "join_key": "customer_id"}],
        "views": [{"name": "customer_stats", "kind": "batch", "entity": "customer", "ttl": "30d",
                   "source": {"path": source}, "fields": [{"name": "orders", "dtype": "int", "default": 0}]}],
    }))
    data = ["--data-dir", str(tmp_path / "data")]
    assert CliRunner().invoke(app, ["features", "apply", str(defs), "--yes", *data]).exit_code == 0
    return data


def test_a_training_set_that_fails_halfway_leaves_the_previous_file(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # `kassa features training-set --out` wrote the Parquet file in place: a full disk, Ctrl-C or SIGTERM while
    # pyarrow wrote it left a file without its footer where the last good training set had been.
    runner, data = CliRunner(), _one_view_applied(tmp_path)
    entities = tmp_path / "entities.csv"
    entities.write_text(f"customer_id,event_timestamp\nc1,{iso(T0 + HOUR, UTC)}\n")
    out = tmp_path / "sets" / "train.parquet"
    args = ["features", "training-set", "--entities", str(entities), "--features", "customer_stats:*",
            "--out", str(out), *data]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    before = out.read_bytes()

    real_write_table = pq.write_table

    def disk_full_halfway(table: pa.Table, where: Any, *a: Any, **kw: Any) -> None:
        sink = pa.BufferOutputStream()
        real_write_table(table, sink, *a, **kw)
        whole = sink.getvalue().to_pybytes()
        Path(where).write_bytes(whole[: len(whole) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", disk_full_halfway)
    r = runner.invoke(app, args)
    assert r.exit_code != 0
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["train.parquet"]
    assert pq.read_table(out).column("orders").to_pylist() == [1]
    assert "cannot write" in r.output and "No space left on device" in r.output  # one line, not a traceback


@pytest.mark.parametrize("where", ["folder", "under_a_file"])
def test_a_training_set_out_path_it_cannot_write_is_bad_usage(tmp_path: Path, where: str) -> None:
    # an --out that is a folder, or under a file, was an OSError traceback after the join
    runner, data = CliRunner(), _one_view_applied(tmp_path)
    entities = tmp_path / "entities.csv"
    entities.write_text(f"customer_id,event_timestamp\nc1,{iso(T0 + HOUR, UTC)}\n")
    out = tmp_path if where == "folder" else entities / "train.parquet"
    r = runner.invoke(app, ["features", "training-set", "--entities", str(entities), "--features", "customer_stats:*",
                            "--out", str(out), *data])
    assert r.exit_code == 2, (r.output, r.exception)
    text = " ".join(r.output.replace("│", " ").split())
    assert "Invalid value for --out:" in text and ("is a folder" in text or "cannot write to" in text), text


def _bad_entity_file(tmp_path: Path, case: str) -> Path:
    csv = tmp_path / "entities.csv"
    if case == "missing":
        return tmp_path / "nowhere.csv"
    if case == "folder":
        csv.mkdir()
    elif case == "no_timestamp_column":
        csv.write_text("customer_id,ts\nc1,2023-11-14\n")
    elif case == "no_join_key_column":
        csv.write_text("customer,event_timestamp\nc1,2023-11-14\n")
    elif case == "no_timestamp_column_parquet":
        pq.write_table(pa.table({"customer_id": ["c1"]}), tmp_path / "entities.parquet")
        return tmp_path / "entities.parquet"
    elif case == "bad_timestamp":
        csv.write_text("customer_id,event_timestamp\nc1,notatime\n")
    elif case == "empty":
        csv.write_text("")
    elif case == "ragged_csv":
        csv.write_text("customer_id,event_timestamp\nc1,2023-11-14,extra\n")
    elif case == "not_parquet":
        (tmp_path / "entities.txt").write_text("customer_id,event_timestamp\nc1,2023-11-14\n")
        return tmp_path / "entities.txt"
    return csv


@pytest.mark.parametrize(("case", "problem"), [
    ("missing", "no such file"),  # already exit 2
    ("folder", "is a folder"),  # was an OSError traceback
    # the rest were exit 1: "cannot join the entity rows of ...", as if the join, not the file, had failed
    ("no_timestamp_column", "has no timestamp column 'event_timestamp' (columns: customer_id, ts)"),
    ("no_timestamp_column_parquet", "has no timestamp column 'event_timestamp' (columns: customer_id)"),
    ("no_join_key_column", "has no join key column 'customer_id' for view 'customer_stats' (entity 'customer'; "
                           "columns: customer, event_timestamp)"),
    ("bad_timestamp", "cannot read column 'event_timestamp' as times: Invalid isoformat string: 'notatime'"),
    ("empty", "is not a readable CSV file: Empty CSV file"),
    ("ragged_csv", "is not a readable CSV file: CSV parse error: Expected 2 columns, got 3"),
    ("not_parquet", "is not a readable Parquet file (a .csv name reads it as CSV):"),
])
def test_a_bad_entity_file_is_bad_usage_naming_the_file_and_what_is_wrong(tmp_path: Path, case: str,
                                                                          problem: str) -> None:
    runner, data = CliRunner(), _one_view_applied(tmp_path)
    entities = _bad_entity_file(tmp_path, case)
    out = tmp_path / "train.parquet"
    r = runner.invoke(app, ["features", "training-set", "--entities", str(entities), "--features", "customer_stats:*",
                            "--out", str(out), *data],
                      env={"COLUMNS": "500"})  # Rich wraps at 80 columns, inside a deep temp path
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (r.output, r.exception)  # no traceback
    lines = [line.strip("│ ") for line in r.output.splitlines() if line.strip("│ ╭╮╰╯─")]
    [message] = [line for line in lines if line.startswith("Invalid value")]  # one line
    assert message.startswith("Invalid value for --entities: ") and str(entities) in message, message
    assert problem in message, message
    assert not out.exists()
