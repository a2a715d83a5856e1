"""The first-day paper cuts of issue 16: readiness with no placements, start-up hints, the bind error
before "serving on", key-kind grammar, `kassa models list` at 80 columns, whole progress labels, and the
demo's keys, load-test command and progress lines when its output is redirected."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.learn.registry import ModelVersion
from tests.conftest import ADMIN, SECRET
from tests.test_api import assert_problem


def _bare(tmp_path: Path, **overrides: object) -> Kassa:
    return Kassa(load_settings(None, data_dir=str(tmp_path / "data"), **overrides))


def test_readyz_is_503_with_a_reason_until_there_is_a_placement(tmp_path: Path) -> None:
    kassa = _bare(tmp_path, admin_key=ADMIN)
    with TestClient(create_app(kassa)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["placements"] == 0 and "no placements" in r.json()["reason"]
        client.put("/v1/offers/o1", json={"id": "o1", "kind": "discount", "title": "Ten"},
                   headers={"Authorization": f"Bearer {ADMIN}"})
        client.put("/v1/placements/p1", json={"id": "p1", "offers": ["o1"]},
                   headers={"Authorization": f"Bearer {ADMIN}"})
        assert client.get("/readyz").json()["status"] == "ready"


def test_a_bare_start_gets_hints_for_keys_and_placements(tmp_path: Path) -> None:
    from kassa.server import start_up_hints

    hints = start_up_hints(_bare(tmp_path))
    assert len(hints) == 2
    assert "no API keys" in hints[0] and "kassa keys create" in hints[0] and "kassa init" in hints[0]
    assert "no placements" in hints[1] and "--catalog" in hints[1]
    assert start_up_hints(_bare(tmp_path / "k", secret_key=SECRET)) == hints[1:]  # keys given: one hint left


def test_a_busy_port_fails_before_anything_says_serving(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kassa.server import run_server

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = load_settings(None, data_dir=str(tmp_path / "data"), **{"server.port": port})
        with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exc:
            run_server(settings)
    assert f"cannot serve on 127.0.0.1:{port}" in str(exc.value)
    assert "serving on" not in caplog.text
    assert not (tmp_path / "data").exists()  # nothing was built


def test_key_kind_errors_use_the_right_article(client) -> None:
    body = assert_problem(client.get("/v1/offers", headers={"Authorization": f"Bearer {SECRET}"}), 403)
    assert "a secret key cannot do this; it needs an admin key" in body["detail"]


@pytest.mark.parametrize(("kind", "said"), [("impression", "an impression"), ("accept", "an accept"),
                                            ("click", "a click"), ("dismiss", "a dismiss")])
def test_event_type_errors_use_the_right_article(client, kind: str, said: str) -> None:
    # was "a impression event needs a `decision_id`"
    body = assert_problem(client.post("/v1/events", json={"events": [{"event_id": "e", "type": kind}]}), 422,
                          "events[0].decision_id")
    assert body["detail"] == f"{said} event needs a `decision_id`"


def _version(seq: int, stage: str = "archived") -> ModelVersion:
    return ModelVersion(
        version=f"order_confirmation@{seq}", placement="order_confirmation", seq=seq, stage=stage,  # type: ignore[arg-type]
        canary_share=0.1 if stage == "canary" else None, artifact="a", sha256="0" * 64, size_bytes=1,
        schema_hash="h", learner_args="", source="online", parent=f"order_confirmation@{seq - 1}",
        train_since=None, train_until=None, rows=47_937, metrics={"evaluation": {"passed": True}},
        created_at=1_800_000_000.0, stage_changed_at=1_800_000_000.0)


def test_models_list_fits_80_columns_without_cutting_versions() -> None:
    from kassa.learn.cli import models_table

    console = Console(width=80, record=True, color_system=None)
    console.print(models_table([_version(123, "production"), _version(122, "canary"), _version(121)]))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80, text
    for seq in (123, 122, 121):
        assert any(f"order_confirmation@{seq}" in line and "47,937" in line for line in lines), text
    assert "@122" in text and "canary 10%" in text


def test_progress_labels_are_not_cut() -> None:
    from kassa.learn.cli import _Stages

    bar = Progress(console=Console(width=120, record=True, color_system=None))
    stages = _Stages(bar)
    stages("score order_confirmation_random", 1, 2)
    assert [t.description for t in bar.tasks] == ["score order_confirmation_random"]


def test_the_demo_shows_its_keys_a_loadtest_command_and_progress_when_redirected(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import kassa.demo.run as demo
    from tests.test_demo import free_port

    monkeypatch.setattr(demo, "PROGRESS_EVERY_S", 0.2)
    demo.run_demo(headless=False, checkouts=400, seed=3, json_out=False, port=free_port(),
                  data_dir=str(tmp_path / "demo"), keep_serving=False)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "[kassa demo] " in text  # progress lines, not a live panel nobody sees
    assert "secret demo-secret" in text and "admin demo-admin" in text
    assert "kassa loadtest --url http://127.0.0.1:" in text
    assert "--secret-key demo-secret --webhook-secret demo-webhook-secret" in text


def test_command_lists_show_each_summary_as_one_sentence_not_broken_mid_line() -> None:
    # Typer's rich help kept the docstring's line breaks in the command lists: `kassa --help` showed
    # "candidate against production," and then "uniform-random and the logged policy" on a row of its own.
    import typer
    from typer.testing import CliRunner

    from kassa.cli import app, one_line_summaries

    root = typer.main.get_command(app)
    one_line_summaries(root)
    commands = {name: cmd for name, cmd in root.commands.items()}  # type: ignore[attr-defined]
    assert commands["evaluate"].short_help.startswith("Off-policy evaluation (IPS, SNIPS, DR with intervals) of a "
                                                       "candidate against production, uniform-random and")
    for group in ("keys", "models", "features"):
        for cmd in commands[group].commands.values():
            assert "\n" not in (cmd.short_help or ""), (group, cmd.name)
    out = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "250"}).output
    assert "candidate against production, uniform-random and the logged policy" in out
    out = CliRunner().invoke(app, ["keys", "--help"], env={"COLUMNS": "250"}).output
    assert "Running servers stop accepting it within a second" in out
