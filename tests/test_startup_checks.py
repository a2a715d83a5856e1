"""A damaged data dir (issue 15): the start stops with a message naming the file and what to do, and an
empty or unreadable metadata DB is never "ready"; a damaged cache file (the catalog stamp) just heals."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.startup import DamagedDataDir


def first_run(settings, clock) -> None:
    kassa = Kassa(settings, clock=clock)
    with TestClient(create_app(kassa)):
        pass  # start and stop: every file of the data dir written once


def assert_names(exc: pytest.ExceptionInfo, name: str) -> None:
    message = str(exc.value)
    assert name in message and "What to do" in message, message
    assert len(message.splitlines()) <= 3  # a message, not a traceback


def test_a_metadata_db_truncated_to_zero_bytes_stops_the_start(settings, clock):
    first_run(settings, clock)
    (settings.data_path / "kassa.db").write_bytes(b"")
    with pytest.raises(DamagedDataDir) as exc:
        Kassa(settings, clock=clock)
    assert_names(exc, "kassa.db")
    assert "0 bytes" in str(exc.value)


@pytest.mark.parametrize("damage", ["garbage", "half"])
def test_a_garbage_or_truncated_metadata_db_stops_the_start_naming_it(settings, clock, damage):
    first_run(settings, clock)
    db = settings.data_path / "kassa.db"
    for suffix in ("-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    if damage == "garbage":
        db.write_bytes(os.urandom(8192))
    else:
        raw = db.read_bytes()
        db.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DamagedDataDir) as exc:
        Kassa(settings, clock=clock)
    assert_names(exc, "kassa.db")


def test_a_garbage_event_log_stops_the_start_naming_it(settings, clock):
    first_run(settings, clock)
    events = settings.data_path / "events.db"
    for suffix in ("-wal", "-shm"):
        events.with_name(events.name + suffix).unlink(missing_ok=True)
    events.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(DamagedDataDir) as exc:
        Kassa(settings, clock=clock)
    assert_names(exc, "events.db")


def test_a_garbage_online_snapshot_stops_the_start_naming_it(settings, clock):
    first_run(settings, clock)
    (settings.data_path / "online.snapshot").write_bytes(b"\x07")  # msgpack for the int 7
    with pytest.raises(DamagedDataDir) as exc:
        Kassa(settings, clock=clock)
    assert_names(exc, "online.snapshot")


def test_a_garbage_catalog_stamp_just_reloads_the_catalog_file(settings, clock):
    first_run(settings, clock)
    (settings.data_path / "catalog_file.sha256").write_bytes(b"\xff\xfe\x00garbage")
    kassa = Kassa(settings, clock=clock)
    assert len(kassa.catalog.snapshot.offers) == 11


def test_a_new_metadata_db_loads_the_catalog_file_whatever_the_old_stamp_says(settings, clock):
    first_run(settings, clock)
    for name in ("kassa.db", "kassa.db-wal", "kassa.db-shm"):
        (settings.data_path / name).unlink(missing_ok=True)
    kassa = Kassa(settings, clock=clock)
    assert len(kassa.catalog.snapshot.offers) == 11
    with TestClient(create_app(kassa)) as c:
        assert c.get("/readyz").json()["offers"] == 11


@pytest.mark.parametrize(("setting", "content", "message"), [
    ("catalog_file", None, "No such file or directory"),
    ("catalog_file", "offers: [\n  - id: x\n", "not valid YAML"),
    ("catalog_file", "offers: [{id: x, kind: nope, title: t}]\n", "Invalid enum value 'nope'"),
    ("catalog_file", "dir", "Is a directory"),
    ("features.definitions_file", None, "No such file or directory"),
    ("features.definitions_file", "entities: [\n", "not valid YAML"),
    # a stream path the stream processor cannot read: its DefinitionError traceback
    ("features.definitions_file", "entities: [{name: customer, join_key: customer_id}]\nviews: [{name: v, kind: "
     "stream, entity: customer, source: {events: [order]}, fields: [{name: x, dtype: float, agg: sum, of: "
     "order.totl, window: 7d}]}]\n", "view 'v' field 'x': unknown event path 'order.totl'"),
])
def test_a_missing_or_invalid_catalog_or_definitions_file_stops_the_start_naming_it(
        settings, clock, tmp_path, setting, content, message):
    # were tracebacks of FileNotFoundError, ValueError or IsADirectoryError from `kassa serve`
    path = tmp_path / "given.yaml"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    if setting == "catalog_file":
        settings.catalog_file = str(path)
    else:
        settings.features.definitions_file = str(path)
    with pytest.raises(SystemExit) as exc:
        Kassa(settings, clock=clock)
    text = str(exc.value)
    assert text.startswith("cannot start: ") and str(path) in text and setting in text and message in text, text


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_a_data_dir_that_is_a_file_stops_the_start_naming_it(settings, clock, tmp_path, where):
    (tmp_path / "taken").write_text("x")
    settings.data_dir = str(tmp_path / "taken") if where == "file" else str(tmp_path / "taken" / "data")
    with pytest.raises(DamagedDataDir) as exc:
        Kassa(settings, clock=clock)
    assert_names(exc, settings.data_dir)


def test_a_missing_relative_catalog_file_says_where_it_was_looked_for(settings, clock, tmp_path, monkeypatch):
    # `kassa serve --settings shop/kassa.yaml` run from outside shop/ looked for catalog.yaml in the current
    # directory and said only "No such file or directory"
    (tmp_path / "here" / "shop").mkdir(parents=True)
    (tmp_path / "here" / "shop" / "catalog.yaml").write_text("offers: []\n")
    monkeypatch.chdir(tmp_path / "here")
    settings.catalog_file = "catalog.yaml"
    with pytest.raises(SystemExit) as exc:
        Kassa(settings, clock=clock)
    assert str(exc.value).endswith("catalog.yaml: No such file or directory (relative paths are read from the "
                                   f"current directory, {tmp_path / 'here'})")


@pytest.mark.parametrize("args", [
    # these made the mistyped data dir and a fresh empty database in it, then said nothing was applied
    ["features", "get", "customer", "c1"], ["features", "freshness"], ["features", "materialize"],
    ["features", "training-set", "--features", "customer:*", "--out", "{tmp}/set.parquet", "--from-decisions"],
    ["stream"],
    # and these already refused it (kept so)
    ["models", "list"], ["models", "show", "checkout@1"], ["drift", "--placement", "checkout"],
    ["evaluate", "--placement", "checkout", "--candidate", "checkout@1"], ["keys", "list"],
])
def test_a_read_only_command_refuses_a_data_dir_without_kassa_data_and_creates_nothing(tmp_path, args):
    from typer.testing import CliRunner

    from kassa.cli import app

    typo = tmp_path / "typo"
    result = CliRunner().invoke(app, [*(a.replace("{tmp}", str(tmp_path)) for a in args), "--data-dir", str(typo)],
                                env={"COLUMNS": "500"})  # Rich's box wraps at 80 columns, inside a deep temp path
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and f"no Kassa data in {typo}" in text, (text, result.exception)
    assert not typo.exists()


@pytest.mark.parametrize(("args", "said"), [
    (["--learner", "foo"], "'foo' is not one of inprocess, child, external"),
    (["--workers", "-1"], "must be 0 (one per core) or more"),
])
def test_a_bad_serve_option_is_bad_usage_exit_2_before_anything_starts(tmp_path: Path, args: list[str],
                                                                         said: str) -> None:
    # `--learner foo` was "invalid configuration" with exit 1, as if a settings file were wrong; the README's
    # exit codes say a bad value is 2, as `--port abc` already was
    from typer.testing import CliRunner

    from kassa.cli import app

    result = CliRunner().invoke(app, ["serve", *args, "--data-dir", str(tmp_path / "d")], env={"COLUMNS": "500"})
    text = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and said in text, (text, result.exception)
    assert not (tmp_path / "d").exists()  # refused before a data dir was made
