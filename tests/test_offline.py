"""Offline store, point-in-time training sets, materialization and the `kassa features` commands."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from kassa.cli import app
from kassa.events.decision_log import DecisionLogWriter, DecisionRecord
from kassa.features.definitions import Entity, FeatureRepo, FeatureView, Field, Source
from kassa.features.materialize import MaterializeError, materialize
from kassa.features.offline import OfflineStore, entities_from_decisions, resolve_features
from kassa.features.online.base import WriteItem
from kassa.features.online.memory import InMemoryOnlineStore

T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
HOUR = 3600.0
CUSTOMER = Entity(name="customer", join_key="customer_id")
PRODUCT = Entity(name="product", join_key="product_id")


def stats_view(ttl: str | None = None, path: str | None = None, **kw: object) -> FeatureView:
    """A push view (values in the offline log) or, given a source ``path``, a batch view."""
    base: dict[str, object] = dict(
        name="customer_stats", kind="batch" if path else "push", entity="customer", ttl=ttl,
        source=Source(path=path) if path else None,
        fields=[Field(name="orders", dtype="int", default=0), Field(name="segment", dtype="str", default="new"),
                Field(name="tags", dtype="list[str]", default=[])],
    )
    base.update(kw)
    return FeatureView(**base)  # type: ignore[arg-type]


def item(key: str, ts: float, orders: int, segment: str = "vip", tags: list[str] | None = None) -> WriteItem:
    return WriteItem(key, {"orders": orders, "segment": segment, "tags": tags or []}, ts)


@pytest.fixture
def offline(tmp_path: Path) -> OfflineStore:
    return OfflineStore(tmp_path / "offline")


# -- point-in-time correctness ------------------------------------------------------------------------


def test_training_set_never_leaks_a_value_from_after_the_row_time(offline: OfflineStore) -> None:
    view = stats_view()
    offline.append(view, [item("c1", T0, 1), item("c1", T0 + 100, 2), item("c1", T0 + 200, 99, "churned")])
    rows = [
        {"customer_id": "c1", "event_timestamp": T0 + 150},  # between the 2nd and the 3rd value
        {"customer_id": "c1", "event_timestamp": T0 + 100},  # exactly at the 2nd value: it counts
        {"customer_id": "c1", "event_timestamp": T0 - 10},  # before anything was known
        {"customer_id": "c2", "event_timestamp": T0 + 150},  # never seen
    ]
    # A naive join on the latest value per key would hand the model the future: orders=99, churned.
    latest = offline.read(view).to_pylist()[-1]
    assert (latest["orders"], latest["segment"]) == (99, "churned")

    out = offline.training_set(rows, [(view, ["orders", "segment"])]).to_pylist()
    assert [(r["orders"], r["segment"]) for r in out] == [(2, "vip"), (2, "vip"), (0, "new"), (0, "new")]
    assert [r["customer_id"] for r in out] == ["c1", "c1", "c1", "c2"]  # rows keep their order and columns
    assert all(r["orders"] != 99 for r in out)


def test_values_older_than_the_ttl_become_the_default(offline: OfflineStore) -> None:
    view = stats_view(ttl="1h")
    offline.append(view, [item("c1", T0, 5, tags=["a"])])
    rows = pa.table({
        "customer_id": ["c1", "c1", "c1"],
        "event_timestamp": pa.array([T0 + 30 * 60, T0 + HOUR, T0 + 2 * HOUR]),
    })
    out = offline.training_set(rows, [(view, ["orders", "tags"])]).to_pylist()
    assert [(r["orders"], r["tags"]) for r in out] == [(5, ["a"]), (5, ["a"]), (0, [])]


def test_expired_newest_value_does_not_fall_back_to_an_older_one(offline: OfflineStore) -> None:
    view = stats_view(ttl="1h")
    offline.append(view, [item("c1", T0, 1), item("c1", T0 + 3 * HOUR, 2)])
    out = offline.training_set([{"customer_id": "c1", "event_timestamp": T0 + 5 * HOUR}], [(view, ["orders"])])
    assert out.column("orders").to_pylist() == [0]


def test_training_set_joins_several_views_and_entities(offline: OfflineStore) -> None:
    stats = stats_view()
    product = FeatureView(name="product_stats", kind="push", entity="product",
                          fields=[Field(name="orders", dtype="int", default=-1), Field(name="price", dtype="float")])
    offline.append(stats, [item("c1", T0, 3)])
    offline.append(product, [WriteItem("p1", {"orders": 40, "price": 9.5}, T0 - HOUR)])
    rows = [{"customer_id": "c1", "product_id": "p1", "event_timestamp": T0 + 1},
            {"customer_id": "c1", "product_id": "p2", "event_timestamp": T0 - 1}]
    with pytest.raises(ValueError, match="clash: orders"):
        offline.training_set(rows, [(stats, ["orders"]), (product, ["orders"])])
    out = offline.training_set(rows, [(stats, ["orders"]), (product, ["orders", "price"])],
                               entities=[CUSTOMER, PRODUCT], full_names=True).to_pylist()
    assert [(r["customer_stats__orders"], r["product_stats__orders"], r["product_stats__price"]) for r in out] == [
        (3, 40, 9.5), (0, -1, None)]


def test_training_set_accepts_timestamps_and_files(offline: OfflineStore, tmp_path: Path) -> None:
    view = stats_view()
    offline.append(view, [item("c1", T0, 1), item("c1", T0 + HOUR, 2)])
    ts = pa.array([int((T0 + 10) * 1e6), int((T0 + HOUR + 10) * 1e6)], pa.timestamp("us", tz="UTC"))
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"customer_id": ["c1", "c1"], "at": ts}), path)
    out = offline.training_set(path, [(view, ["orders"])], timestamp_field="at")
    assert out.column("orders").to_pylist() == [1, 2]
    csv = tmp_path / "rows.csv"
    csv.write_text("customer_id,at\nc1,2023-11-14T22:13:30Z\nc1,2023-11-14 23:13:30\n")
    assert offline.training_set(csv, [(view, ["orders"])], timestamp_field="at").column("orders").to_pylist() == [1, 2]


def test_a_value_logged_twice_is_joined_once_latest_write_wins(offline: OfflineStore) -> None:
    view = stats_view()
    first = pa.table({"entity_key": ["c1"], "event_timestamp": [T0], "created_timestamp": [T0], "orders": [1]})
    again = pa.table({"entity_key": ["c1"], "event_timestamp": [T0], "created_timestamp": [T0 + 5], "orders": [7]})
    offline.append(view, first)
    offline.append(view, again)
    out = offline.training_set([{"customer_id": "c1", "event_timestamp": T0 + 1}], [(view, ["orders"])])
    assert out.num_rows == 1 and out.column("orders").to_pylist() == [7]


def test_offline_files_are_partitioned_by_date_and_read_by_range(offline: OfflineStore) -> None:
    view = stats_view()
    day = 86_400.0
    offline.append(view, [item("c1", T0, 1), item("c2", T0 + day, 2), item("c3", T0 + 2 * day, 3)])
    dates = sorted(p.parent.name for p in (offline.root / "customer_stats").glob("*/*.parquet"))
    assert dates == ["date=2023-11-14", "date=2023-11-15", "date=2023-11-16"]
    assert offline.read(view, T0 + 1, T0 + 2 * day).column("entity_key").to_pylist() == ["c2"]
    assert offline.read(view).schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert offline.newest("customer_stats") == T0 + 2 * day
    assert offline.newest("nothing") is None


def test_fields_added_after_data_was_logged_read_as_default(offline: OfflineStore) -> None:
    offline.append(stats_view(), [item("c1", T0, 1)])
    grown = stats_view(fields=[*stats_view().fields, Field(name="score", dtype="float", default=0.5)])
    out = offline.training_set([{"customer_id": "c1", "event_timestamp": T0}], [(grown, ["orders", "score"])])
    assert out.to_pylist()[0] | {} == {"customer_id": "c1", "event_timestamp": T0, "orders": 1, "score": 0.5}


def test_resolve_features_groups_refs_by_view() -> None:
    repo = FeatureRepo(entities=[CUSTOMER], views=[stats_view()])
    [(view, fields)] = resolve_features(repo, ["customer_stats:orders", "customer_stats:*"])
    assert view.name == "customer_stats"
    assert fields == ["orders", "segment", "tags"]
    with pytest.raises(ValueError, match="view 'customer_stats' has no field 'nope'"):
        resolve_features(repo, ["customer_stats:nope"])


def test_entity_rows_from_the_decision_log(tmp_path: Path, offline: OfflineStore) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    for i, (customer, ts) in enumerate([("c1", T0 + 10), ("c1", T0 + 300), (None, T0 + 20)]):
        writer.append(DecisionRecord(
            decision_id=f"d{i}", ts=ts, placement="order_confirmation", model_version="v1", request_id=None,
            customer_id=customer, features={"order_total": 10.0 * i}, candidates=["a", "b"],
            probabilities=[0.5, 0.5], chosen=["a"], chosen_probabilities=[0.5], explored=False, fallback=False,
            took_ms=1.0))
    writer.close()
    view = stats_view()
    offline.append(view, [item("c1", T0, 1), item("c1", T0 + 200, 2)])
    rows = entities_from_decisions(tmp_path, placement="order_confirmation", until=T0 + 1000)
    out = offline.training_set(rows, [(view, ["orders"])]).to_pylist()
    assert [(r["decision_id"], r["orders"], r["chosen"]) for r in out] == [
        ("d0", 1, ["a"]), ("d2", 0, ["a"]), ("d1", 2, ["a"])]
    assert json.loads(out[2]["features_json"]) == {"order_total": 10.0}


# -- materialization ----------------------------------------------------------------------------------


def write_source(path: Path, rows: list[dict]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_materialize_takes_the_latest_row_per_key_in_the_range(tmp_path: Path, offline: OfflineStore) -> None:
    src = write_source(tmp_path / "stats.parquet", [
        {"customer_id": "c1", "event_timestamp": T0, "orders": 1, "segment": "a", "tags": ["x"]},
        {"customer_id": "c1", "event_timestamp": T0 + 50, "orders": 2, "segment": "b", "tags": ["y"]},
        {"customer_id": "c1", "event_timestamp": T0 + 500, "orders": 3, "segment": "late", "tags": []},  # >= end
        {"customer_id": "c2", "event_timestamp": T0 - 500, "orders": 9, "segment": "early", "tags": []},  # < start
        {"customer_id": "c3", "event_timestamp": T0 + 10, "orders": None, "segment": None, "tags": None},
        {"customer_id": None, "event_timestamp": T0 + 10, "orders": 4, "segment": "x", "tags": []},
    ])
    view = stats_view(path=src)
    repo = FeatureRepo(entities=[CUSTOMER], views=[view])
    store = InMemoryOnlineStore(clock=lambda: T0 + 60)
    seen: list[tuple[int, int]] = []
    result = asyncio.run(materialize(repo, "customer_stats", store, offline, T0 - 100, T0 + 100,
                                     lambda done, total: seen.append((done, total)), chunk_size=1))
    assert (result.rows, result.online_written, result.offline_written) == (2, 2, 2)
    assert seen[-1] == (2, 2)
    rows = asyncio.run(store.read([("customer", "c1"), ("customer", "c2"), ("customer", "c3")], [view]))
    assert rows[0] is not None and rows[0]["customer_stats"].values == {"orders": 2, "segment": "b", "tags": ["y"]}
    assert rows[0]["customer_stats"].ts == T0 + 50
    assert rows[1] is None
    # Nulls in the source stay null (serving leaves them out); defaults are for missing or stale rows.
    assert rows[2] is not None and rows[2]["customer_stats"].values == {"orders": None, "segment": None, "tags": None}
    logged = offline.read(view).to_pylist()
    assert [(r["entity_key"], r["orders"]) for r in logged] == [("c3", None), ("c1", 2)]


def test_materialize_reads_csv_with_iso_timestamps(tmp_path: Path, offline: OfflineStore) -> None:
    src = tmp_path / "stats.csv"
    src.write_text("customer_id,ts,orders,segment\n7,2023-11-14T22:00:00Z,1,a\n7,2023-11-14T22:10:00Z,2,b\n")
    view = stats_view(path=str(src), source=Source(path=str(src), timestamp_field="ts"),
                      fields=[Field(name="orders", dtype="int"), Field(name="segment", dtype="str")])
    store = InMemoryOnlineStore(clock=lambda: T0)
    result = asyncio.run(materialize(FeatureRepo(entities=[CUSTOMER], views=[view]), view, store, None, end=T0))
    assert result.online_written == 1 and result.offline_written == 0
    [row] = asyncio.run(store.read([("customer", "7")], [view]))
    assert row is not None and row["customer_stats"].values == {"orders": 2, "segment": "b"}


@pytest.mark.parametrize(("rows", "message"), [
    ([{"customer_id": "c1", "event_timestamp": T0, "orders": "many", "segment": "a", "tags": []}],
     "view 'customer_stats' field 'orders': expected int, source column has type string"),
    ([{"customer_id": "c1", "event_timestamp": T0, "orders": 1.5, "segment": "a", "tags": []}],
     "view 'customer_stats' field 'orders': expected int, found a fractional value (entity key 'c1')"),
    ([{"customer_id": "c1", "event_timestamp": T0, "orders": 1, "segment": "x" * 300, "tags": []}],
     "view 'customer_stats' field 'segment': string of 300 characters exceeds max_length 256 (entity key 'c1')"),
    ([{"customer_id": "c1", "event_timestamp": T0, "orders": 1, "segment": "a", "tags": [1, 2]}],
     "view 'customer_stats' field 'tags': expected list[str], source column has type list<int64>"),
    ([{"customer_id": "c2", "event_timestamp": T0, "orders": 1, "segment": "a", "tags": ["y" * 257]}],
     "view 'customer_stats' field 'tags': string of 257 characters exceeds max_length 256 (entity key 'c2')"),
    ([{"customer_id": "c1", "event_timestamp": T0, "orders": 1, "tags": []}],
     "view 'customer_stats' field 'segment': source '{path}' has no such column"),
])
def test_invalid_source_values_name_the_view_and_field(tmp_path: Path, offline: OfflineStore, rows: list[dict],
                                                       message: str) -> None:
    view = stats_view(path=write_source(tmp_path / "bad.parquet", rows))
    store = InMemoryOnlineStore()
    with pytest.raises(MaterializeError, match=re.escape(message.format(path=tmp_path / "bad.parquet"))):
        asyncio.run(materialize(FeatureRepo(entities=[CUSTOMER], views=[view]), view, store, offline, end=T0 + 1))
    assert asyncio.run(store.read([("customer", "c1")], [view])) == [None]  # nothing half-written
    assert offline.read(view).num_rows == 0


def test_only_batch_views_materialize(offline: OfflineStore) -> None:
    push = FeatureView(name="signals", kind="push", entity="customer", fields=[Field(name="x", dtype="int")])
    with pytest.raises(MaterializeError, match="view 'signals': only batch views"):
        asyncio.run(materialize(FeatureRepo(entities=[CUSTOMER], views=[push]), push, None, offline))


# -- the CLI ------------------------------------------------------------------------------------------


DEFINITIONS = """
entities:
  - {{name: customer, join_key: customer_id}}
views:
  - name: customer_stats
    kind: batch
    entity: customer
    source: {{path: "{source}"}}
    ttl: 30d
    freshness_target: 1h
    fields:
      - {{name: orders, dtype: int, default: 0}}
      - {{name: segment, dtype: {segment_type}, default: {segment_default}}}
"""


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_cli_apply_materialize_get_freshness_training_set(tmp_path: Path) -> None:
    runner = CliRunner()
    data = ["--data-dir", str(tmp_path / "data")]
    now = time.time()
    source = write_source(tmp_path / "stats.parquet", [
        {"customer_id": "c1", "event_timestamp": now - 600, "orders": 1, "segment": "new"},
        {"customer_id": "c1", "event_timestamp": now - 300, "orders": 4, "segment": "vip"},
        {"customer_id": "c2", "event_timestamp": now - 7200, "orders": 2, "segment": "new"},
    ])
    defs = tmp_path / "features.yaml"
    defs.write_text(DEFINITIONS.format(source=source, segment_type="str", segment_default="new"))

    # no data dir yet: not made (a wide console: Rich's error box wraps at 80 columns, anywhere in the sentence)
    r = runner.invoke(app, ["features", "get", "customer_stats", "c1", *data], env={"COLUMNS": "500"})
    assert r.exit_code == 2 and "kassa features apply" in " ".join(r.output.split()), r.output
    assert not (tmp_path / "data").exists()

    r = runner.invoke(app, ["features", "apply", str(defs), "--yes", *data])
    assert r.exit_code == 0, r.output
    assert "customer_stats" in r.output and "add" in r.output

    # a mistyped view named no alternative
    r = runner.invoke(app, ["features", "get", "customer_stat", "c1", *data])
    assert r.exit_code == 1 and "unknown view 'customer_stat' (known: customer_stats)" in r.output, r.output
    r = runner.invoke(app, ["features", "materialize", "--view", "customer_stat", *data])
    assert r.exit_code == 1 and "unknown view 'customer_stat' (batch views: customer_stats)" in r.output, r.output

    r = runner.invoke(app, ["features", "materialize", "--json", *data])
    assert r.exit_code == 0, r.output
    assert last_json(r.output)["views"][0] | {"seconds": 0} == {
        "view": "customer_stats", "rows": 2, "online_written": 2, "offline_written": 2, "seconds": 0}

    # A new process: the values come back from the embedded store's snapshot.
    r = runner.invoke(app, ["features", "get", "customer_stats", "c1", "--json", *data])
    assert r.exit_code == 0, r.output
    got = last_json(r.output)
    assert got["found"] and got["values"] == {"orders": 4, "segment": "vip"}
    assert 290 < got["age_seconds"] < 400
    r = runner.invoke(app, ["features", "get", "customer_stats", "nobody", "--json", *data])
    assert r.exit_code == 1 and last_json(r.output)["found"] is False

    r = runner.invoke(app, ["features", "freshness", "--json", *data])
    assert r.exit_code == 0, r.output
    [fresh] = last_json(r.output)["views"]
    assert fresh["view"] == "customer_stats" and fresh["fresh"] is True and fresh["target_seconds"] == 3600
    r = runner.invoke(app, ["features", "freshness", *data])
    assert "fresh" in r.output

    entities = tmp_path / "entities.csv"
    entities.write_text(f"customer_id,event_timestamp\nc1,{now - 400}\nc1,{now}\nc2,{now}\n")
    out = tmp_path / "train.parquet"
    r = runner.invoke(app, ["features", "training-set", "--entities", str(entities), "--features",
                            "customer_stats:orders,customer_stats:segment", "--out", str(out), "--json", *data])
    assert r.exit_code == 0, r.output
    assert last_json(r.output)["rows"] == 3
    # The source's full history, not only the materialized (newest) values: at now-400 c1 had 1 order.
    assert pq.read_table(out).column("orders").to_pylist() == [1, 4, 2]

    # No decision logged (in the window): said so; it wrote an empty file and "wrote 0 rows", exit 0.
    out.unlink()
    r = runner.invoke(app, ["features", "training-set", "--from-decisions", "--features", "customer_stats:*",
                            "--out", str(out), "--since", "2026-11-01", "--json", *data])
    assert r.exit_code == 1 and not out.exists(), r.output
    assert "no logged decisions from 2026-11-01T00:00:00+00:00 in " in " ".join(r.output.split())
    r = runner.invoke(app, ["features", "training-set", "--from-decisions", "--features", "customer_stats:*",
                            "--out", str(out), "--since", "1h", "--until", "2h", *data])
    assert r.exit_code == 2 and "the window is empty" in r.output, r.output
    # Decision filters with an entity file were ignored: every row of the file was joined.
    r = runner.invoke(app, ["features", "training-set", "--entities", str(entities), "--features",
                            "customer_stats:*", "--out", str(out), "--placement", "order_confirmation", *data])
    assert r.exit_code == 2 and "goes with --from-decisions" in " ".join(r.output.replace("│", " ").split())
    # A damaged decision-log file is named (was DuckDB's InvalidInputException traceback).
    damaged = tmp_path / "data" / "decisions" / "date=2026-11-01" / "part-0.parquet"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"")
    r = runner.invoke(app, ["features", "training-set", "--from-decisions", "--features", "customer_stats:*",
                            "--out", str(out), *data])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert "part-0.parquet" in r.output and "move it out of the folder" in " ".join(r.output.split())

    # Retyping a field is refused without --allow-destructive, and nothing changes.
    defs.write_text(DEFINITIONS.format(source=source, segment_type="int", segment_default=0))
    r = runner.invoke(app, ["features", "apply", str(defs), "--yes", *data])
    assert r.exit_code == 1 and "allow-destructive" in r.output
    r = runner.invoke(app, ["features", "apply", str(defs), "--yes", "--allow-destructive", *data])
    assert r.exit_code == 0, r.output


def test_cli_apply_reports_invalid_definitions(tmp_path: Path) -> None:
    defs = tmp_path / "bad.yaml"
    defs.write_text("entities: [{name: customer, join_key: customer_id}]\n"
                    "views: [{name: v, kind: batch, entity: shopper, fields: [{name: x, dtype: int}]}]\n")
    r = CliRunner().invoke(app, ["features", "apply", str(defs), "--yes", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 1 and "unknown entity 'shopper'" in r.output


def test_cli_apply_reports_a_stream_path_typo(tmp_path: Path) -> None:
    defs = tmp_path / "bad.yaml"
    defs.write_text("entities: [{name: customer, join_key: customer_id}]\n"
                    "views: [{name: v, kind: stream, entity: customer, source: {events: [order]}, fields: "
                    "[{name: x, dtype: float, agg: sum, of: order.totl, window: 7d}]}]\n")
    r = CliRunner().invoke(app, ["features", "apply", str(defs), "--yes", "--data-dir", str(tmp_path / "d")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output  # was a DefinitionError traceback
    assert "invalid definitions: view 'v' field 'x': unknown event path 'order.totl'" in " ".join(r.output.split())


def test_cli_times_read_as_kassa_train_reads_them() -> None:
    """`kassa features training-set --from-decisions --since 7d` was "not an ISO-8601 time" while
    `kassa train|evaluate|drift --since 7d` took it."""
    import typer

    from kassa.features.cli import _epoch

    assert _epoch("2026-11-01", "--since") == 1_793_491_200.0
    assert _epoch("2026-11-01T12:00:00+01:00", "--since") == 1_793_491_200.0 + 11 * 3600
    assert _epoch("1793491200", "--since") == 1_793_491_200.0
    assert abs(_epoch("7d", "--since") - (time.time() - 7 * 86_400)) < 5  # type: ignore[operator]
    assert _epoch(None, "--since") is None
    with pytest.raises(typer.BadParameter, match="duration ago like 7d"):
        _epoch("7x", "--since")


def test_cli_apply_without_an_answer_says_to_pass_yes(tmp_path: Path) -> None:
    # with stdin closed (CI, a pipe) the question ended in a bare "Aborted."
    defs = tmp_path / "defs.yaml"
    defs.write_text("entities: [{name: customer, join_key: customer_id}]\n"
                    "views: [{name: v, kind: push, entity: customer, fields: [{name: x, dtype: int, default: 0}]}]\n")
    data = ["--data-dir", str(tmp_path / "d")]
    r = CliRunner().invoke(app, ["features", "apply", str(defs), *data], input="")
    assert r.exit_code == 1 and "pass --yes (-y) to apply without asking" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["features", "apply", str(defs), *data], input="n\n")
    assert r.exit_code == 1 and "not applied" in r.output
    r = CliRunner().invoke(app, ["features", "apply", str(defs), *data], input="y\n")
    assert r.exit_code == 0 and "applied" in r.output


def test_cli_says_which_redis_it_could_not_reach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `kassa features get|materialize` on an unreachable Redis online store were ConnectionRefusedError tracebacks
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    defs = tmp_path / "defs.yaml"
    defs.write_text("entities: [{name: customer, join_key: customer_id}]\n"
                    "views: [{name: v, kind: push, entity: customer, fields: [{name: x, dtype: int, default: 0}]}]\n")
    data = ["--data-dir", str(tmp_path / "d")]
    assert CliRunner().invoke(app, ["features", "apply", str(defs), "--yes", *data]).exit_code == 0
    monkeypatch.setenv("KASSA_FEATURES__ONLINE_STORE", "redis")
    monkeypatch.setenv("KASSA_FEATURES__REDIS_URL", f"redis://127.0.0.1:{port}/0")
    r = CliRunner().invoke(app, ["features", "get", "v", "c-1", *data])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert f"cannot reach the Redis online store at redis://127.0.0.1:{port}/0 (features.redis_url)" in text, text


def test_materialize_refuses_while_a_server_serves_the_embedded_store(tmp_path: Path, catalog_file: Path) -> None:
    """The embedded online store lives in the server's memory: materialize beside it reported its rows written,
    the server never served them and overwrote online.snapshot with its own rows when it stopped."""
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings
    from tests.conftest import PUB

    source = write_source(tmp_path / "stats.parquet", [
        {"customer_id": "c1", "event_timestamp": time.time() - 60, "orders": 3, "segment": "vip"}])
    defs = tmp_path / "features.yaml"
    defs.write_text(DEFINITIONS.format(source=source, segment_type="str", segment_default="new"))
    data = ["--data-dir", str(tmp_path / "data")]
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog_file),
                             publishable_key=PUB, **{"features.definitions_file": str(defs)})
    runner = CliRunner()
    with TestClient(create_app(Kassa(settings))):
        r = runner.invoke(app, ["features", "materialize", *data])
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert "a running Kassa server holds the embedded online store" in " ".join(r.output.split())
        r = runner.invoke(app, ["features", "get", "customer_stats", "c1", *data])
        assert "this reads online.snapshot as it saved it when it last stopped" in " ".join(r.output.split())
    r = runner.invoke(app, ["features", "materialize", "--json", *data])  # stopped: the file is the store
    assert r.exit_code == 0 and last_json(r.output)["views"][0]["online_written"] == 1, r.output
    r = runner.invoke(app, ["features", "get", "customer_stats", "c1", "--json", *data])
    assert last_json(r.output)["values"]["orders"] == 3 and "running Kassa server" not in r.output
