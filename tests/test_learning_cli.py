"""`kassa train`, `kassa evaluate`, `kassa models …` and `kassa drift` on a data dir a live server wrote."""

from __future__ import annotations

import json
import random
import re
from datetime import UTC, datetime

import pytest
from typer.testing import CliRunner

from kassa.cli import app
from tests.conftest import decision_body, order
from tests.signals import stop_when

runner = CliRunner()


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture
def logged(client, kassa, clock) -> str:
    """A data dir with 400 closed decisions: buyers accept the warranty far more than anything else."""
    rng = random.Random(7)
    for i in range(400):
        d = client.post("/v1/decisions", json=decision_body(customer=f"c{i}", limit=1, order=order())).json()
        offer = d["offers"][0]["offer_id"]
        if rng.random() < (0.6 if offer == "warranty" else 0.05):
            client.post("/v1/events", json={"events": [{"event_id": f"e{i}", "type": "accept",
                                                       "decision_id": d["decision_id"], "offer_id": offer}]})
        clock.advance(1)
    clock.advance(120)
    kassa.decision_log.flush()
    return str(kassa.settings.data_path)


def test_train_evaluate_promote_rollback_and_drift_from_the_cli(logged, kassa):
    trained = _json(runner.invoke(app, ["train", "--placement", "order_confirmation", "--holdout", "0.25",
                                        "--data-dir", logged, "--json"]))
    version = trained["version"]
    # 400 decisions one second apart; the last 60 are still inside their 60 s reward window when the data
    # ends (the test clock runs ahead of the wall clock), so 340 are closed: 255 trained on, 85 held out.
    assert trained["decisions"] == 255 and version.startswith("order_confirmation@")
    result = _json(runner.invoke(app, ["evaluate", "--placement", "order_confirmation", "--candidate", version,
                                       "--baseline", "none", "--data-dir", logged, "--json"]))
    assert result["rows"] == 85  # the held-out quarter only
    policies = result["evaluation"]["policies"]
    assert {version, "uniform_random", "logged"} <= set(policies)
    assert result["gate"]["passed"] is False and "no production" in result["gate"]["reason"]
    refused = runner.invoke(app, ["models", "promote", version, "--to", "production", "--data-dir", logged])
    assert refused.exit_code == 1 and "failed the promotion gate" in refused.output
    forced = _json(runner.invoke(app, ["models", "promote", version, "--to", "production", "--force",
                                       "--data-dir", logged, "--json"]))
    assert forced["stage"] == "production"
    listed = _json(runner.invoke(app, ["models", "list", "--data-dir", logged, "--json"]))
    assert [v["version"] for v in listed["versions"] if v["stage"] == "production"] == [version]
    shown = _json(runner.invoke(app, ["models", "show", version, "--data-dir", logged, "--json"]))
    assert shown["history"][0]["to"] == "production" and "forced" in shown["history"][0]["reason"]
    # The server's online learner had published production snapshots before; rollback restores the last one.
    restored = _json(runner.invoke(app, ["models", "rollback", "--placement", "order_confirmation",
                                         "--reason", "test", "--data-dir", logged, "--json"]))
    assert restored["source"] == "online" and restored["stage"] == "production"
    assert _json(runner.invoke(app, ["models", "show", version, "--data-dir", logged, "--json"]))["stage"] == "archived"
    small = runner.invoke(app, ["drift", "--placement", "order_confirmation", "--last", "150", "--data-dir", logged,
                                "--json"])
    drift = _json(small)
    assert drift["reference_n"] == 150 and drift["live_n"] == 150
    assert {r["kind"] for r in drift["rows"]} <= {"reward_rate", "offer_rate"}
    assert "fewer than 500 decisions" in " ".join(small.output.split())


def test_evaluate_says_a_too_small_sample_once(logged, kassa):
    # the gate's caption, a "sample too small" line and "not promoted" each said it: three times with --promote
    version = _json(runner.invoke(app, ["train", "--placement", "order_confirmation", "--holdout", "0.25",
                                        "--data-dir", logged, "--json"]))["version"]
    for baseline in ("production", "none"):
        result = runner.invoke(app, ["evaluate", "--placement", "order_confirmation", "--candidate", version,
                                     "--baseline", baseline, "--min-ess", "5000", "--promote", "--data-dir", logged])
        text = " ".join(result.output.split())
        # exit 3: a CI job promoting on a pass cannot tell a blocked promotion from a done one by exit 0
        assert result.exit_code == 3 and text.count("below the minimum 5000") == 1, text
        assert "not promoted" in text


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--placement", "nope"], "unknown placement"),
    (["train", "--placement", "order_confirmation", "--holdout", "1.5"], "must be in [0, 1)"),
    (["train", "--placement", "order_confirmation", "--since", "yesterday-ish"], "not a time"),
    # was a ValueError traceback
    (["train", "--placement", "order_confirmation", "--every", "soon"], "Invalid value for --every: not a duration"),
    (["train", "--placement", "order_confirmation", "--every", "0s"], "must be a positive duration"),
    (["train", "--placement", "order_confirmation", "--learning-rate", "-1"], "Invalid value for --learning-rate"),
    (["train", "--placement", "order_confirmation", "--passes", "0"], "Invalid value for '--passes'"),
    (["evaluate", "--placement", "order_confirmation", "--candidate", "order_confirmation@99"],
     "unknown model version"),
    (["evaluate", "--placement", "order_confirmation", "--candidate", "x", "--estimator", "magic"],
     "must be one of"),
    (["models", "promote", "order_confirmation@1", "--to", "live"], "must be one of"),
    # were OPEInputError tracebacks after the scoring
    (["evaluate", "--placement", "order_confirmation", "--candidate", "order_confirmation@1", "--level", "1.5"],
     "Invalid value for --level: must be between 0 and 1"),
    (["evaluate", "--placement", "order_confirmation", "--candidate", "order_confirmation@1", "--max-weight", "-1"],
     "Invalid value for --max-weight: must be a positive number"),
    (["models", "list", "--stage", "live"], "stage must be one of"),
    # a mistyped placement was an empty table
    (["models", "list", "--placement", "order_confirmaton"],
     "Invalid value for --placement: unknown placement 'order_confirmaton' (known: cross_sell, order_confirmation)"),
    (["drift", "--placement", "order_confirmation", "--last", "10"], "at least 100"),
    # unknown versions were NotFound tracebacks (this table once accepted the exception's text)
    (["evaluate", "--placement", "order_confirmation", "--candidate", "order_confirmation@1", "--baseline", "nope"],
     "Invalid value for --baseline: unknown model version 'nope'"),
    (["models", "show", "order_confirmation@99"], "Invalid value for VERSION: unknown model version"),
    (["models", "promote", "order_confirmation@99", "--to", "shadow"], "unknown model version"),
    # a bad canary share was a refused stage change (exit 1), not the bad value it is
    (["models", "promote", "order_confirmation@1", "--to", "canary", "--share", "2"],
     "Invalid value for --share: must be between 0 and 1 (exclusive), got 2"),
    (["models", "promote", "order_confirmation@1", "--to", "canary"],
     "Invalid value for --share: a canary needs its traffic share"),
    (["models", "promote", "order_confirmation@1", "--to", "shadow", "--share", "0.1"],
     "Invalid value for --share: only a canary takes a traffic share"),
    # --workers 0 meant the default and a negative count one process, silently
    (["evaluate", "--placement", "order_confirmation", "--candidate", "order_confirmation@1", "--workers", "0"],
     "Invalid value for --workers: must be at least 1, got 0"),
])
def test_cli_refuses_bad_input_clearly(logged, args, message):
    result = runner.invoke(app, [*args, "--data-dir", logged])
    assert result.exit_code == 2, (result.output, result.exception)  # a usage error, not a traceback
    text = " ".join(result.output.replace("│", " ").split())
    assert message in text, text


def test_cli_refuses_an_empty_window_and_a_baseline_it_cannot_compare(logged, kassa):
    registry = kassa.model_registry
    v = registry.versions("order_confirmation", limit=1)[0].version
    mv = registry.get(v)
    other = registry.register("cross_sell", registry.path(mv), schema_hash=mv.schema_hash,
                              learner_args=mv.learner_args, source="batch").version
    evaluate = ["evaluate", "--placement", "order_confirmation", "--candidate", v]
    for args, message in [
        # both selected no decision and said only "nothing to train on" / "no closed decisions to evaluate on"
        (["train", "--placement", "order_confirmation", "--since", "1h", "--until", "2h"],
         "Invalid value for --since: the window is empty: it starts at"),
        ([*evaluate, "--since", "2026-12-08", "--until", "2026-12-01"],
         "the window is empty: it starts at 2026-12-08 00:00:00 and ends at 2026-12-01 00:00:00"),
        # the baseline's rows were merged into the candidate's: one policy in the table, no comparison
        ([*evaluate, "--baseline", v], f"Invalid value for --baseline: {v} is the candidate itself"),
        # another placement's model was scored on this placement's log without a word
        ([*evaluate, "--baseline", other], f"Invalid value for --baseline: {other} serves cross_sell, not "
                                            "order_confirmation"),
    ]:
        result = runner.invoke(app, [*args, "--data-dir", logged])
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert message in " ".join(result.output.replace("│", " ").split()), (args, result.output)


def test_cli_names_a_damaged_decision_log_file(client, kassa):
    client.post("/v1/decisions", json=decision_body(customer="c1", limit=1, order=order()))
    kassa.decision_log.flush()
    data = str(kassa.settings.data_path)
    good = sorted(kassa.settings.data_path.glob("decisions/date=*/*.parquet"))[0]
    bad = good.with_name("part-0-damaged.parquet")
    bad.write_bytes(good.read_bytes()[:100])  # e.g. a copy cut short by a full disk
    for args in (["train", "--placement", "order_confirmation"],  # `kassa evaluate` reads it the same way
                 ["drift", "--placement", "order_confirmation", "--last", "100"]):
        result = runner.invoke(app, [*args, "--data-dir", data])
        # was DuckDB's InvalidInputException traceback
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (args, result.output)
        text = " ".join(result.output.split())
        assert "unreadable decision log: cannot read the decision log in" in text and bad.name in text, text


def test_drift_fail_on_alert_exits_3_when_a_window_holds_no_decisions(client, kassa):
    # "not enough data" was exit 0, what a healthy check answers: cron could not tell nothing was checked
    client.post("/v1/decisions", json=decision_body(customer="c1", limit=1, order=order()))
    kassa.decision_log.flush()
    drift = ["drift", "--placement", "order_confirmation", "--since", "2020-01-01", "--until", "2020-01-02",
             "--data-dir", str(kassa.settings.data_path)]
    result = runner.invoke(app, [*drift, "--fail-on-alert"])
    assert result.exit_code == 3 and "not enough data" in result.output, (result.output, result.exception)
    assert runner.invoke(app, drift).exit_code == 0  # without --fail-on-alert: a report, as before


def test_train_every_stopped_with_ctrl_c_between_runs_exits_130(logged):
    # "stopped" and exit 0, as if the schedule had ended by itself
    stopped = stop_when(["train", "--placement", "order_confirmation", "--every", "1h", "--data-dir", logged],
                        "next run in 1h")
    assert stopped.returncode == 130 and stopped.err.rstrip().endswith("stopped"), stopped.err
    assert "Traceback" not in stopped.err and "registered order_confirmation@" in " ".join(stopped.err.split())


def test_drift_fail_on_alert_exits_4_on_an_alert_and_a_usage_error_stays_2(client, kassa, clock):
    # An alert was exit 2, Typer's code for a usage error: a CI job could not tell drift in its traffic from a
    # mistyped option in its own command line.
    for i in range(1_000):  # the traffic moves from phones to desktops halfway: the newest 500 against the 500 before
        client.post("/v1/decisions", json=decision_body(customer=f"c{i}", limit=1, order=order(),
                                                        context={"device": "mobile" if i < 500 else "desktop"}))
        clock.advance(1)
    kassa.decision_log.flush()
    drift = ["drift", "--placement", "order_confirmation", "--last", "500", "--fail-on-alert",
             "--data-dir", str(kassa.settings.data_path)]
    alert = runner.invoke(app, [*drift, "--json"])
    report = json.loads(alert.stdout.strip().splitlines()[-1])
    assert alert.exit_code == 4 and report["alerts"], (alert.output, alert.exception)
    assert any(r["feature"] == "device" and r["severity"] == "alert" for r in report["rows"]), report["rows"]
    typo = runner.invoke(app, [*drift, "--fail-on-alerts"])
    assert typo.exit_code == 2 and "No such option" in typo.output, typo.output


@pytest.mark.parametrize("window", ["--since", "--until", "--reference-since", "--reference-until"])
def test_drift_refuses_last_with_a_time_window(tmp_path, window):
    # the time windows were ignored without a word (refused before any data is read)
    result = runner.invoke(app, ["drift", "--placement", "order_confirmation", "--last", "150", window, "2h",
                                 "--data-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert (f"Invalid value for {window}: --last picks both windows by count; give either --last or the time "
            "windows") in " ".join(result.output.replace("│", " ").split())


def test_evaluate_on_one_decision_says_so_and_how_to_get_more(client, kassa, clock):
    for i in range(2):  # the second decision closes the first one's reward window, and stays pending itself
        client.post("/v1/decisions", json=decision_body(customer=f"c{i}", limit=1, order=order()))
        clock.advance(120)
    kassa.decision_log.flush()
    data = ["--data-dir", str(kassa.settings.data_path)]
    version = _json(runner.invoke(app, ["train", "--placement", "order_confirmation", "--json", *data]))["version"]
    evaluate = ["evaluate", "--placement", "order_confirmation", "--candidate", version, "--baseline", "none"]
    result = runner.invoke(app, [*evaluate, "--since", "2020-01-01", *data])
    # was OPEInputError's traceback: "need at least 2 logged rows to estimate a confidence interval"
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    text = " ".join(result.output.split())
    assert "only 1 closed decision to evaluate on for order_confirmation in the window 2020-01-01 00:00:00 .. now" \
        in text and "an interval needs at least 2" in text
    result = runner.invoke(app, [*evaluate, *data])  # the default window: after the candidate's training
    text = " ".join(result.output.split())
    # not the decision it was trained on: train_until was that decision's own time, and the window includes it
    assert "no closed decisions to evaluate on" in text and "(1 still pending;" in text, text
    assert result.exit_code == 1 and "the window starts where the candidate's training ended: train with " \
        "--holdout 0.2" in text


def test_cli_without_data_says_where_it_looked(tmp_path):
    result = runner.invoke(app, ["models", "list", "--data-dir", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no Kassa data" in " ".join(result.output.split())


def test_models_show_prints_the_whole_checksum_and_schema_hash_at_80_columns(logged, kassa):
    # they were cut to "a406b520…" at 80 columns: the artifact's checksum could not be read off to check it
    version = kassa.model_registry.versions("order_confirmation", None, limit=1)[0]
    result = runner.invoke(app, ["models", "show", version.version, "--data-dir", logged], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    text = "".join(result.stdout.replace("│", " ").split())
    assert version.sha256 in text and version.schema_hash in text


@pytest.mark.parametrize("option", ["--report", "--png"])
def test_evaluate_refuses_a_report_it_cannot_write_before_scoring(logged, kassa, tmp_path, option):
    # a folder, or a path under a file, was an OSError traceback after the scoring, the verdict already recorded
    version = _json(runner.invoke(app, ["train", "--placement", "order_confirmation", "--holdout", "0.25",
                                        "--data-dir", logged, "--json"]))["version"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    for path, message in ((tmp_path, "is a folder"), (a_file / "ope.out", "cannot write to")):
        result = runner.invoke(app, ["evaluate", "--placement", "order_confirmation", "--candidate", version,
                                     option, str(path), "--data-dir", logged])
        assert result.exit_code == 2, (result.output, result.exception)
        text = " ".join(result.output.replace("│", " ").split())
        assert f"Invalid value for {option}:" in text and message in text, text
    assert "evaluation" not in kassa.model_registry.get(version).metrics  # refused before any work


def test_cli_without_data_says_where_a_relative_data_dir_resolves(tmp_path, monkeypatch):
    # a relative data_dir is read from the current folder: "no Kassa data in .kassa" did not say which one
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["models", "list", "--data-dir", "shop-data"])
    assert result.exit_code == 2
    text = "".join(result.output.replace("│", " ").split())
    assert "".join(str(tmp_path / "shop-data").split()) in text, result.output


def test_training_set_from_decisions_refuses_an_unknown_placement_as_train_does(logged, kassa, tmp_path):
    # `kassa features training-set --from-decisions --placement nope` said "no logged decisions of nope" and
    # exited 1, as if the placement existed and had served nothing; `kassa train|evaluate|drift` say it is unknown
    out = tmp_path / "train.parquet"
    args = ["features", "training-set", "--from-decisions", "--features", "customer_signals:ltv", "--out", str(out),
            "--data-dir", logged]
    result = runner.invoke(app, [*args, "--placement", "order_confirmaton"], env={"COLUMNS": "500"})
    assert result.exit_code == 2, (result.output, result.exception)
    text = " ".join(result.output.replace("│", " ").split())
    assert ("Invalid value for --placement: unknown placement 'order_confirmaton' "
            "(known: cross_sell, order_confirmation)") in text, text
    assert not out.exists()
    # a known placement with no decision in the window is still "no logged decisions" (exit 1), and one with
    # decisions makes the training set
    result = runner.invoke(app, [*args, "--placement", "cross_sell"], env={"COLUMNS": "500"})
    assert result.exit_code == 1 and "no logged decisions of cross_sell" in result.output, result.output
    result = runner.invoke(app, [*args, "--placement", "order_confirmation", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["rows"] == 400 and out.exists()


def test_models_show_prints_metric_times_as_utc_dates_not_unix_seconds(logged, kassa):
    # the metrics' times (an evaluation's at/since/until, a snapshot's snapshot_at) were raw unix seconds,
    # 1800000400.0, beside created_at printed as 2027-01-15 08:06:40
    version = _json(runner.invoke(app, ["train", "--placement", "order_confirmation", "--holdout", "0.25",
                                        "--data-dir", logged, "--json"]))["version"]
    _json(runner.invoke(app, ["evaluate", "--placement", "order_confirmation", "--candidate", version,
                              "--baseline", "none", "--since", "1800000000", "--data-dir", logged, "--json"]))
    shown = _json(runner.invoke(app, ["models", "show", version, "--data-dir", logged, "--json"]))
    evaluation = shown["metrics"]["evaluation"]
    assert isinstance(evaluation["at"], float) and evaluation["since"] == 1_800_000_000  # --json: unchanged
    result = runner.invoke(app, ["models", "show", version, "--data-dir", logged], env={"COLUMNS": "500"})
    assert result.exit_code == 0, result.output
    assert '"since": "2027-01-15 08:00:00"' in result.stdout, result.stdout
    at = datetime.fromtimestamp(evaluation["at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert f'"at": "{at}"' in result.stdout, result.stdout
    assert not re.search(r"\b1[78]\d{8}\b", result.stdout), result.stdout  # no unix time anywhere

    snapshot = kassa.model_registry.versions("order_confirmation", None, limit=50)
    online = next(v for v in snapshot if "snapshot_at" in v.metrics)
    result = runner.invoke(app, ["models", "show", online.version, "--data-dir", logged], env={"COLUMNS": "500"})
    assert result.exit_code == 0, result.output
    at = datetime.fromtimestamp(online.metrics["snapshot_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert f'"snapshot_at": "{at}"' in result.stdout, result.stdout
