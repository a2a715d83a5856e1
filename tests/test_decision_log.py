"""DecisionLogWriter / read_decisions: buffered Parquet decision log and its DuckDB reader."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kassa.events import decision_log
from kassa.events.decision_log import SCHEMA, DecisionLogWriter, DecisionRecord, read_decisions

DAY1 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC).timestamp()
DAY2 = datetime(2024, 3, 2, 0, 30, tzinfo=UTC).timestamp()


def rec(i: int, ts: float, placement: str = "checkout", **kw: object) -> DecisionRecord:
    base: dict[str, object] = dict(
        decision_id=f"d{i}",
        ts=ts,
        placement=placement,
        model_version="v1",
        request_id=f"r{i}" if i % 2 else None,
        customer_id=None if i % 2 else f"c{i}",
        features={"order_total": 12.5 + i, "items": i, "country": "DE", "returning": bool(i % 2), "x": None},
        candidates=["o1", "o2", "o3"],
        probabilities=[0.7, 0.2, 0.1],
        chosen=["o1", "o3"],
        chosen_probabilities=[0.7, 0.25],
        explored=i % 3 == 0,
        fallback=False,
        took_ms=1.25,
    )
    base.update(kw)
    return DecisionRecord(**base)  # type: ignore[arg-type]


def parquet_files(root: Path) -> list[Path]:
    return sorted((root / "decisions").glob("date=*/*.parquet"))


def test_round_trip_features_and_probabilities(tmp_path: Path) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    records = [rec(i, DAY1 + i) for i in range(5)]
    try:
        for r in records:
            writer.append(r)
        assert writer.pending == 5
        assert writer.flush() == 5
        assert writer.written == 5 and writer.pending == 0
    finally:
        writer.close()

    files = parquet_files(tmp_path)
    assert len(files) == 1
    assert files[0].parent.name == "date=2024-03-01"
    assert files[0].name.startswith("part-") and files[0].name.endswith(".parquet")

    table = read_decisions(tmp_path)
    assert table.schema == SCHEMA
    rows = table.to_pylist()
    assert len(rows) == 5
    for r, row in zip(records, rows, strict=True):
        assert row["decision_id"] == r.decision_id
        assert row["ts"] == r.ts
        assert json.loads(row["features_json"]) == r.features
        assert row["candidates"] == r.candidates
        assert row["probabilities"] == r.probabilities
        assert row["chosen"] == r.chosen
        assert row["chosen_probabilities"] == r.chosen_probabilities
        assert row["request_id"] == r.request_id and row["customer_id"] == r.customer_id
        assert row["explored"] == r.explored and row["took_ms"] == r.took_ms
    # Types survive JSON: the int feature is still an int, the bool a bool.
    feats = json.loads(rows[1]["features_json"])
    assert isinstance(feats["items"], int) and feats["returning"] is True and feats["x"] is None


def test_partitions_by_utc_date_and_filters(tmp_path: Path) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    writer.append(rec(1, DAY1, "checkout"))
    writer.append(rec(2, DAY1 + 60, "thank_you"))
    writer.append(rec(3, DAY2, "checkout"))
    writer.append(rec(4, DAY2 + 60, "thank_you"))
    writer.close()

    assert {p.parent.name for p in parquet_files(tmp_path)} == {"date=2024-03-01", "date=2024-03-02"}

    def ids(**kw: object) -> list[str]:
        return read_decisions(tmp_path, **kw).column("decision_id").to_pylist()  # type: ignore[arg-type]

    assert ids() == ["d1", "d2", "d3", "d4"]
    assert ids(placement="checkout") == ["d1", "d3"]
    assert ids(placement="nope") == []
    assert ids(since=DAY2) == ["d3", "d4"]
    assert ids(until=DAY2) == ["d1", "d2"]  # half-open: until is exclusive
    assert ids(since=DAY1 + 1, until=DAY2 + 1) == ["d2", "d3"]
    assert ids(placement="thank_you", since=DAY1 + 1) == ["d2", "d4"]


@pytest.mark.parametrize("missing", [("candidate_signals", "candidate_offer_features"), ("candidate_offer_features",)])
def test_files_written_before_a_column_was_added_read_it_as_null(tmp_path: Path, missing: tuple[str, ...]) -> None:
    # A data dir from before issue 14 (neither column), or from before the offer-feature column only.
    old = decision_log.records_to_table([rec(1, DAY1)]).drop_columns(list(missing))
    part = tmp_path / "decisions" / "date=2024-03-01"
    part.mkdir(parents=True)
    pq.write_table(old, part / "part-old.parquet")
    table = read_decisions(tmp_path)
    assert table.schema == SCHEMA and table.column("decision_id").to_pylist() == ["d1"]
    for name in missing:
        assert table.column(name).to_pylist() == [None]
    found = decision_log.find_decision(tmp_path, "d1", now=DAY1)
    assert found is not None and found.candidate_offer_features is None and found.candidates == ["o1", "o2", "o3"]
    # A newer file beside it: both read, the old one's missing columns as null.
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    writer.append(rec(2, DAY1 + 1, candidate_signals=["a", "b", "c"], candidate_offer_features=[" |g x=b1", "", ""]))
    writer.close()
    table = read_decisions(tmp_path)
    assert table.column("candidate_offer_features").to_pylist() == [None, [" |g x=b1", "", ""]]
    assert table.column("candidate_signals").to_pylist()[1] == ["a", "b", "c"]


def test_read_without_files_returns_empty_table_with_schema(tmp_path: Path) -> None:
    table = read_decisions(tmp_path)
    assert table.num_rows == 0 and table.schema == SCHEMA
    (tmp_path / "decisions" / "date=2024-03-01").mkdir(parents=True)
    assert read_decisions(tmp_path, placement="checkout").schema == SCHEMA


def test_close_flushes_buffer(tmp_path: Path) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    for i in range(10):
        writer.append(rec(i, DAY1 + i))
    assert parquet_files(tmp_path) == []
    writer.close()
    assert writer.written == 10
    assert not writer._thread.is_alive()
    assert read_decisions(tmp_path).num_rows == 10


def test_background_thread_flushes_periodically(tmp_path: Path) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=0.05)
    try:
        writer.append(rec(1, DAY1))
        deadline = time.monotonic() + 5
        while writer.written < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.written == 1
        assert pq.read_table(parquet_files(tmp_path)[0]).num_rows == 1
    finally:
        writer.close()


def test_max_buffer_wakes_flusher_early(tmp_path: Path) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600, max_buffer=20)
    try:
        for i in range(20):
            writer.append(rec(i, DAY1 + i))
        deadline = time.monotonic() + 5
        while writer.written < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.written == 20
    finally:
        writer.close()


def test_failed_flush_keeps_records_and_retries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    real_write = decision_log.pq.write_table
    try:
        for i in range(3):
            writer.append(rec(i, DAY1 + i))
        with monkeypatch.context() as m:

            def broken(*a: object, **kw: object) -> None:
                raise OSError("disk full")

            m.setattr(decision_log.pq, "write_table", broken)
            assert writer.flush() == 0  # does not raise
            assert writer.failed_flushes == 1
            assert writer.pending == 3 and writer.written == 0
            # No half-written or temp file is left behind.
            assert list((tmp_path / "decisions").rglob("*")) == [tmp_path / "decisions" / "date=2024-03-01"]
        assert decision_log.pq.write_table is real_write
        writer.append(rec(3, DAY1 + 3))
        assert writer.flush() == 4
    finally:
        writer.close()
    # Retried records keep their original order ahead of later ones.
    assert read_decisions(tmp_path).column("decision_id").to_pylist() == ["d0", "d1", "d2", "d3"]
    assert writer.written == 4


def test_partial_failure_only_retries_failed_partition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    real_write = decision_log.pq.write_table

    def fail_day2(table: object, where: Path, *a: object, **kw: object) -> None:
        if "2024-03-02" in str(where):
            raise OSError("bad disk")
        real_write(table, where, *a, **kw)

    try:
        writer.append(rec(1, DAY1))
        writer.append(rec(2, DAY2))
        monkeypatch.setattr(decision_log.pq, "write_table", fail_day2)
        assert writer.flush() == 1
        assert writer.pending == 1
        monkeypatch.setattr(decision_log.pq, "write_table", real_write)
        assert writer.flush() == 1
    finally:
        writer.close()
    assert read_decisions(tmp_path).column("decision_id").to_pylist() == ["d1", "d2"]


def test_many_flushes_produce_distinct_files(tmp_path: Path) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    try:
        for i in range(5):
            writer.append(rec(i, DAY1 + i))
            writer.flush()
    finally:
        writer.close()
    files = parquet_files(tmp_path)
    assert len(files) == 5 == writer.files_written
    assert read_decisions(tmp_path).num_rows == 5


def test_a_record_keeps_a_feature_value_beyond_what_writes_accept(tmp_path: Path) -> None:
    # Pushed features are bounded (±1e15) on write, batch sources are not: a served decision whose features
    # hold such a value still decodes from the bus (msgpack) and reads back from the files.
    import msgspec

    big = rec(1, DAY1, features={"ltv": 1e30, "n": 10**18})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(big), type=DecisionRecord).features == big.features
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    writer.append(big)
    writer.close()
    found = decision_log.find_decision(tmp_path, "d1", now=DAY1)
    assert found is not None and found.features == {"ltv": 1e30, "n": 10**18}


@pytest.mark.parametrize("damage", ["empty", "cut short"])
def test_a_damaged_file_is_named_with_what_to_do(tmp_path: Path, damage: str) -> None:
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    writer.append(rec(1, DAY1))
    writer.close()
    good = parquet_files(tmp_path)[0]
    bad = good.with_name("part-0-damaged.parquet")
    bad.write_bytes(b"" if damage == "empty" else good.read_bytes()[:100])
    # was DuckDB's InvalidInputException traceback out of `kassa train`, `kassa evaluate` and `kassa drift`
    with pytest.raises(decision_log.UnreadableDecisionLog, match="move it out of the folder") as info:
        read_decisions(tmp_path)
    assert str(bad) in str(info.value)


# ------------------------------------------------------------------ lookups by id
NOW = datetime(2027, 1, 15, 12, 0, tzinfo=UTC).timestamp()


def _new_id(ts: float, rest: int = 0xABC) -> str:
    """An id as `kassa.decide.engine` makes it: the second, then 64 random bits."""
    return f"{int(ts):08x}{rest:016x}"


def _damaged_partition(root: Path, ts: float) -> None:
    """A partition whose only file is not Parquet: any lookup that opens it raises."""
    part = root / "decisions" / f"date={decision_log._utc_date(ts)}"
    part.mkdir(parents=True)
    (part / "part-1-1.parquet").write_bytes(b"not parquet")


def test_a_lookup_reads_only_the_partitions_of_the_ids_time(tmp_path: Path) -> None:
    # Ids carry no date before this: an unknown id read every partition of the log's history, newest first.
    _damaged_partition(tmp_path, NOW - 100 * 86400)
    _damaged_partition(tmp_path, NOW - 2 * 86400)
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    made = NOW - 5 * 86400
    writer.append(rec(1, made, decision_id=_new_id(made)))
    writer.append(rec(2, NOW, decision_id=_new_id(NOW)))
    writer.close()
    assert decision_log.decision_id_time(_new_id(made)) == int(made)
    found = decision_log.find_decision(tmp_path, _new_id(made), now=NOW)
    assert found is not None and found.ts == made
    assert decision_log.find_decision(tmp_path, _new_id(NOW, 0xDEF), now=NOW) is None  # unknown: today's only
    base = tmp_path / "decisions"
    assert decision_log.lookup_partitions(base, _new_id(NOW, 0xDEF), now=NOW) == [
        base / f"date={decision_log._utc_date(NOW)}"]
    # a second just after midnight: the day before is read too, after its own
    midnight = datetime(2027, 1, 10, 0, 0, 5, tzinfo=UTC).timestamp()
    for ts in (midnight, midnight - 3600):
        (base / f"date={decision_log._utc_date(ts)}").mkdir(exist_ok=True)
    assert [p.name for p in decision_log.lookup_partitions(base, _new_id(midnight), now=NOW)] == [
        "date=2027-01-10", "date=2027-01-09"]


def test_an_id_without_a_time_is_looked_for_in_the_last_lookback_days_only(tmp_path: Path) -> None:
    # Random ids (made before ids carried their time), and ids whose time is in the future or has no partition.
    _damaged_partition(tmp_path, NOW - 100 * 86400)
    writer = DecisionLogWriter(tmp_path, flush_seconds=3600)
    writer.append(rec(1, NOW - 10 * 86400, decision_id="5b0c4f0e2a7d9c1e3f6a8b2d"))
    writer.append(rec(2, NOW - 40 * 86400, decision_id="0c195a68bf10202cb9bcbb9c"))
    writer.close()
    assert decision_log.decision_id_time("5b0c4f0e2a7d9c1e3f6a8b2d") is None  # 2018: before ids had a time
    assert decision_log.find_decision(tmp_path, "5b0c4f0e2a7d9c1e3f6a8b2d", now=NOW) is not None
    assert decision_log.find_decision(tmp_path, "0c195a68bf10202cb9bcbb9c", now=NOW) is None  # 40 days old
    found = decision_log.find_decision(tmp_path, "0c195a68bf10202cb9bcbb9c", now=NOW, lookback_days=60)
    assert found is not None and found.ts == NOW - 40 * 86400
    for unknown in ("ffffffff0000000000000000", _new_id(NOW - 3 * 86400), "d1", "x" * 24):
        assert decision_log.find_decision(tmp_path, unknown, now=NOW) is None  # never the damaged partition


def test_two_writers_sharing_a_directory_never_overwrite_each_others_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kassa serve --workers N` on the embedded backend: every worker writes the one data dir's decision log. Two
    flushes in the same millisecond with the same per-process sequence picked one name and one temporary name:
    one batch was lost and the other written twice."""
    monkeypatch.setattr(decision_log.time, "time", lambda: DAY1)  # every flush in one millisecond
    real_write = decision_log.pq.write_table
    both_written = threading.Barrier(2, timeout=5)

    def write_table(table: object, where: object) -> None:
        real_write(table, where)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_written.wait()  # both writers past their name check, neither renamed yet

    monkeypatch.setattr(decision_log.pq, "write_table", write_table)
    writers = [DecisionLogWriter(tmp_path, flush_seconds=3600) for _ in range(2)]
    for i, w in enumerate(writers):
        w.append(rec(i, DAY1 + i))
    threads = [threading.Thread(target=w.flush) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    both_written.abort()  # a retried write (the bug) must not wait for a partner
    for w in writers:
        w.close()
    assert sorted(read_decisions(tmp_path).column("decision_id").to_pylist()) == ["d0", "d1"]
    assert len(parquet_files(tmp_path)) == 2


# Feature values as the decide path logs them, with what JSON encodes in more than one way (escapes, non-ASCII,
# float forms, NaN as null): the JetStream writer keeps the publisher's JSON of them instead of decoding it.
ODD_FEATURES = {"s": 'quote " back \\ tab \t nl \n ctl \x01 del \x7f', "u": "Grüße ✓ 日本 \U0001f600", "e": "",
                "f1": 0.1, "f2": 1e-7, "f3": 1e22, "f4": -0.0, "f5": 123456789.123456789, "f6": 5e-324,
                "f7": 1.7976931348623157e308, "nan": float("nan"), "i": 2**63 - 1, "n": -7, "b": True, "f": False,
                "none": None, "cats": "a|b|c", "key with \"quote\"": 1.0}


def test_a_record_decoded_with_its_features_as_they_came_makes_the_same_table_row(tmp_path: Path) -> None:
    import msgspec

    records = [rec(1, DAY1, features=ODD_FEATURES, candidate_signals=[" |r s_co rk=1", " |r", ""],
                   candidate_offer_features=[" |g x=b1", "", " |g y=é"]),
               rec(2, DAY2, request_id=None, customer_id=None, features={}),
               rec(3, DAY2 + 1, features={"x": 1}, candidates=[], probabilities=[], chosen=[], chosen_probabilities=[])]
    published = [msgspec.json.Encoder().encode(r) for r in records]  # as `DecisionPublisher` encodes them
    before = decision_log.records_to_table([msgspec.json.decode(b, type=DecisionRecord) for b in published])
    encoded = [msgspec.json.decode(b, type=decision_log.EncodedDecisionRecord) for b in published]
    assert [f.name for f in msgspec.structs.fields(decision_log.EncodedDecisionRecord)] == [
        f.name for f in msgspec.structs.fields(DecisionRecord)]
    after = decision_log.records_to_table(encoded)
    assert after.equals(before)
    assert json.loads(after.column("features_json")[0].as_py())["u"] == ODD_FEATURES["u"]
    for table, name in ((before, "before.parquet"), (after, "after.parquet")):  # the same file
        pq.write_table(table, tmp_path / name)
    assert (tmp_path / "before.parquet").read_bytes() == (tmp_path / "after.parquet").read_bytes()


def test_the_memoised_utc_date_is_datetimes_up_to_the_microsecond_rounded_into_the_next_day() -> None:
    midnight = datetime(2024, 3, 2, tzinfo=UTC).timestamp()
    for ts in (DAY1, DAY2, midnight, midnight - 1e-6, midnight - 4e-7, midnight - 6e-7, midnight - 1.1e-6,
               midnight - 0.5e-6, midnight + 1e-7, 0.0, -0.3, -86_400.0, 1_780_000_000.25, 4e9):
        for _ in range(2):  # computed, then from the memo
            assert decision_log._utc_date(ts) == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d"), ts
