"""The report file, the `--json` contract of `kassa loadtest`, and the capacity plan.

The report is rendered from a real short run against a Kassa server in this process and parsed back:
the three charts must carry series drawn from the embedded data. The CLI is run as a subprocess, the
way a user or a CI job runs it. The plan's search is checked with a scripted step runner, so its
arithmetic (stepping, bisection, node count, stopping at the generator's limit) is pinned exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kassa.config import load_settings
from kassa.loadtest.plan import nodes_needed, plan_capacity
from kassa.loadtest.profiles import parse_profile
from kassa.loadtest.report import DATA_ID, read_report_data, render_report
from kassa.loadtest.runner import LoadTestError, RunConfig, run_loadtest
from kassa.server import BackgroundServer
from tests.conftest import CATALOG, PUB
from tests.partial_writes import disk_full_halfway

REQUIRED = ("asked_rate", "achieved_rate", "p50_ms", "p99_ms", "p999_ms", "max_ms", "errors", "valid", "verdict")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("loadtest-report")
    (root / "catalog.yaml").write_text(CATALOG)
    settings = load_settings(None, data_dir=str(root / "data"), catalog_file=str(root / "catalog.yaml"),
                             publishable_key=PUB, admin_key="admin-key",
                             **{"server.port": _free_port(), "server.bench_endpoints": True})
    server = BackgroundServer(settings).start()
    try:
        yield server.url
    finally:
        server.stop()


class _Svg(HTMLParser):
    """Collects each chart's series (name -> drawn path data) and the data script's text."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, str]] = {}
        self.current: str | None = None
        self.verdict: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg" and (a.get("id") or "").startswith("chart-"):
            self.current = a["id"]
            self.charts[self.current or ""] = {}
        elif self.current and "series" in (a.get("class") or "").split():
            self.charts[self.current][a.get("data-name") or ""] = a.get("d") or "bars"
        elif tag == "section" and a.get("id") == "verdict":
            self.verdict = a.get("data-verdict")


def test_report_renders_charts_from_its_embedded_data(server_url: str, tmp_path: Path) -> None:
    profile = parse_profile({"name": "report test", "traffic": {"rate": 80}, "ramp_seconds": 1,
                             "duration_seconds": 2, "mix": {"decision": 1, "noop": 1}}, "<test>")
    result = run_loadtest(RunConfig(url=server_url, profile=profile, key=PUB))
    path = tmp_path / "report.html"
    from kassa.loadtest.report import write_report

    write_report(result, path)
    text = path.read_text()
    assert "<script src" not in text and "http://" not in text.replace(server_url, "")  # nothing fetched
    data = read_report_data(text)
    s = data["summary"]
    assert s["p99_ms"] == result["summary"]["p99_ms"] and s["verdict"] == result["summary"]["verdict"]
    assert "raw" not in data  # per-request arrays stay out of the file
    tl = data["timeline"]
    assert len(tl["t"]) == 3 and sum(tl["asked"]) == s["requests"] + sum(tl["asked"][:1])
    assert any(v is not None for v in tl["p99_ms"])
    assert {"all", "decision", "noop"} <= set(data["curves"]) and data["curves"]["all"][-1][0] == 100.0

    parser = _Svg()
    parser.feed(text)
    assert set(parser.charts) == {"chart-latency", "chart-percentiles", "chart-throughput"}
    assert {"p50", "p99", "max"} <= set(parser.charts["chart-latency"])
    assert parser.charts["chart-latency"]["p99"].startswith("M")
    assert {"all", "decision", "noop"} <= set(parser.charts["chart-percentiles"])
    assert parser.charts["chart-percentiles"]["all"].count("L") >= 5
    assert {"answered 2xx", "asked (schedule)", "errors"} <= set(parser.charts["chart-throughput"])
    assert parser.verdict == s["verdict"]
    assert f'id="{DATA_ID}"' in text


def _small_run_summary() -> dict[str, Any]:
    """The summary of a small, invalid, failing run, as `runner.summarize` writes it."""
    return {"profile": "p", "profile_source": "", "url": "http://x", "asked_rate": 10.0, "achieved_rate": 9.0,
            "duration_s": 1.0, "ramp_s": 0.0, "schedule": "fixed", "requests": 10, "p50_ms": 1.0, "p90_ms": 2.0,
            "p99_ms": 3.0, "p999_ms": 4.0, "max_ms": 5.0, "mean_ms": 1.0, "errors": 1, "error_rate": 0.1,
            "errors_by_kind": {"http_500": 1}, "first_errors": {"decision http 500": "<boom> & </script>"},
            "valid": False, "invalid_reasons": ["the generator fell behind"], "verdict": "FAIL",
            "verdict_reason": "run invalid: the generator fell behind", "warnings": ["w <b>"],
            "slo": {"p99_ms": 200.0, "error_rate": 0.001, "p50_ms": None, "p999_ms": None, "max_ms": None,
                    "min_throughput_ratio": 0.95},
            "mix": {"decision": 1.0}, "by_type": {}, "rate_derivation": "--rate 10",
            "server": {"took_ms": {"p50": None, "p99": None, "max": None}, "metrics": {"available": False}},
            "generator": {"workers": 1, "lag_limit_ms": 10.0, "cpu_us_per_request": None, "cpu_util_per_worker": [],
                          "max_outstanding": 0, "fd_limit": {"soft": 1, "hard": 1},
                          "send_lag_ms": {"p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}},
            "idle_connections": {"asked": 0, "opened_at_start": 0, "seconds_to_open": 0, "held_at_end": 0,
                                 "min_held": 0, "failed": {}, "closed_by_server": 0, "reopened": 0,
                                 "refresh_requests": 0, "refresh_failed": 0},
            "started_at": "now", "machine": {"cpu": "c", "cores": 2, "platform": "p", "python": "3", "loadavg_1m": 1}}


def test_a_report_that_fails_halfway_leaves_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `kassa loadtest run --report` wrote the page with one write_text straight into the file: a full disk, Ctrl-C
    # or SIGTERM half-way left half a page where the last run's report had been.
    from kassa.loadtest.report import write_report

    result = {"summary": _small_run_summary(), "timeline": {"t": [0], "asked": [10], "answered": [9], "errors": [1],
                                                          "p50_ms": [1.0], "p99_ms": [2.0], "max_ms": [3.0],
                                                          "lag_p99_ms": [0.1]}, "curves": {"all": [[0.0, 1.0]]}}
    path = write_report(result, tmp_path / "report.html")
    before = path.read_bytes()
    disk_full_halfway(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_report(result, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_report_of_an_invalid_failing_run_says_so() -> None:
    s = _small_run_summary()
    result = {"summary": s, "timeline": {"t": [0], "asked": [10], "answered": [9], "errors": [1], "p50_ms": [1.0],
                                         "p99_ms": [float("nan")], "max_ms": [None], "lag_p99_ms": [0.1]},
              "curves": {"all": [[0.0, 1.0], [100.0, 5.0]]}}
    text = render_report(result)
    assert 'data-verdict="FAIL"' in text and "Run invalid." in text
    assert "<boom>" not in text and "&lt;boom&gt;" in text  # error bodies are escaped
    data = read_report_data(text)  # a "</script>" inside the data cannot end the block early
    assert data["summary"]["first_errors"]["decision http 500"] == "<boom> & </script>"
    assert data["timeline"]["p99_ms"] == [None]  # NaN is not JSON


def _kassa(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KASSA_PUBLISHABLE_KEY": PUB}
    return subprocess.run([sys.executable, "-m", "kassa", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_json_contract_and_exit_code(server_url: str) -> None:
    out = _kassa("loadtest", "--url", server_url, "--rate", "40", "--duration", "1", "--json")
    last = out.stdout.strip().splitlines()[-1]
    s = json.loads(last)
    assert all(k in s for k in REQUIRED), sorted(s)
    assert s["asked_rate"] == 40.0 and s["verdict"] in ("PASS", "FAIL") and isinstance(s["valid"], bool)
    assert s["errors"] == 0 and s["by_type"]["decision"]["requests"] == 40
    expected_rc = 0 if s["verdict"] == "PASS" else (3 if not s["valid"] else 1)
    assert out.returncode == expected_rc, out.stderr
    assert "decision" in out.stderr  # the summary table goes to stderr, the JSON alone to stdout


def test_cli_input_errors_exit_2_with_a_message(server_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ntraffic: {rate: 10}\nmix: {decisons: 1}\n")
    out = _kassa("loadtest", "--url", server_url, "--profile", str(bad))
    assert out.returncode == 2 and "mix.decisons: unknown field (did you mean `decision`?)" in out.stderr
    out = _kassa("loadtest", "--url", "https://example.com", "--rate", "1", "--duration", "1")
    assert out.returncode == 2 and "http://host:port" in out.stderr
    out = _kassa("loadtest", "--rate", "1", "--duration", "1")
    assert out.returncode == 2 and "--url is required" in out.stderr
    out = _kassa("loadtest", "--url", server_url)
    assert out.returncode == 2 and "--profile" in out.stderr


@pytest.mark.parametrize("option", ["--timeout", "--max-lag-ms"])
def test_a_timeout_or_lag_limit_of_zero_or_less_is_refused(option: str) -> None:
    from typer.testing import CliRunner

    from kassa.cli import app

    runner = CliRunner()
    for value in ("0", "-1"):
        for args in (["--rate", "1", "--duration", "1"], ["plan", "--profile", "black-friday-peak"]):
            out = runner.invoke(app, ["loadtest", *args, "--url", "http://127.0.0.1:1", option, value])
            assert out.exit_code == 2 and f"Invalid value for '{option}'" in out.output, out.output


def test_a_report_path_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from kassa.cli import app

    (tmp_path / "a-file").write_text("")
    runner = CliRunner()
    # The URL is unreachable: the --report error coming first shows nothing was run (it was a traceback after it).
    for report, said in ((tmp_path, "is a folder"), (tmp_path / "a-file" / "r.html", "cannot create its folder")):
        out = runner.invoke(app, ["loadtest", "--url", "http://127.0.0.1:1", "--rate", "1", "--duration", "1",
                                  "--report", str(report)], env={"COLUMNS": "500"})  # no wrap inside the path
        assert out.exit_code == 2 and f"--report {report}: {said}" in " ".join(out.output.split()), out.output
    nested = tmp_path / "new" / "folder" / "r.html"  # a missing folder is made, as before
    out = runner.invoke(app, ["loadtest", "--url", "http://127.0.0.1:1", "--rate", "1", "--duration", "1",
                              "--report", str(nested)])
    assert out.exit_code == 2 and "cannot reach" in out.output and nested.parent.is_dir(), out.output


def test_ctrl_c_before_the_run_says_nothing_was_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    # Ctrl-C while the generator opens its connections: the message was "; no report" (a KeyboardInterrupt's
    # text is empty, and the exception itself is true).
    from typer.testing import CliRunner

    from kassa.cli import app

    def interrupted(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("kassa.loadtest.runner.run_loadtest", interrupted)
    out = CliRunner().invoke(app, ["loadtest", "--url", "http://127.0.0.1:1", "--rate", "1", "--duration", "1"])
    assert out.exit_code == 130
    assert "interrupted before the measured window: nothing was measured; no report" in " ".join(out.output.split())


def test_plan_subcommand_runs_steps(server_url: str, tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("name: noop floor\ntraffic: {rate: 300}\nmix: {noop: 1}\nschedule: fixed\n"
                    "slo: {p99_ms: 1000, min_throughput_ratio: 0.5}\ncapacity: {headroom: 0.5, spare_nodes: 1}\n")
    out = _kassa("loadtest", "plan", "--profile", str(prof), "--url", server_url, "--start-rate", "100",
                 "--step-seconds", "1", "--factor", "3", "--max-rate", "300", "--refine", "0", "--json",
                 "--max-lag-ms", "1000")
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert [st["rate"] for st in plan["steps"]] == [100.0, 300.0], out.stderr
    if all(st["verdict"] == "PASS" for st in plan["steps"]):
        # 300/s at 50 % of 300/s: 2 nodes, plus the spare; a lower bound, because --max-rate stopped it.
        assert plan["max_rate"] == 300.0 and plan["nodes"] == 3 and plan["exact"] is False
        assert "--max-rate" in plan["note"] and out.returncode == 0


def _scripted(capacity: float, generator_limit: float = math.inf) -> Any:
    """A step runner for a node that meets the SLO up to ``capacity`` and a generator that stops at a limit."""
    def run(cfg: RunConfig) -> dict[str, Any]:
        rate = cfg.steady_rate
        valid = rate <= generator_limit
        ok = rate <= capacity
        return {"summary": {
            "verdict": "PASS" if ok and valid else "FAIL", "valid": valid, "p50_ms": 1.0,
            "p99_ms": 10.0 if ok else 500.0, "p999_ms": 20.0, "error_rate": 0.0, "achieved_rate": rate,
            "verdict_reason": "ok" if ok else "P99 500 ms > 200 ms", "generator": {"send_lag_ms": {"p99_ms": 0.1}}}}
    return run


def _base(rate: float = 1000.0) -> RunConfig:
    profile = parse_profile({"name": "p", "traffic": {"rate": rate}, "capacity": {"headroom": 0.3,
                                                                                  "spare_nodes": 1}}, "<test>")
    return RunConfig(url="http://127.0.0.1:1", profile=profile)


def test_plan_steps_up_then_bisects_and_sizes_the_fleet() -> None:
    seen: list[float] = []
    plan = plan_capacity(_base(1000.0), start_rate=50, factor=2, refine=3, run=_scripted(capacity=300.0),
                         on_step=lambda rec: seen.append(rec["rate"]))
    assert seen == [50, 100, 200, 400, 300, 350, 325]
    assert plan["max_rate"] == 300.0 and plan["exact"] is True
    assert plan["nodes"] == math.ceil(1000 / (300 * 0.7)) + 1 == 6
    assert plan["per_node_rate"] == 210.0 and "needs 5 node(s) + 1 spare = 6" in plan["summary"]


def test_plan_stops_at_the_generator_limit_and_calls_it_a_lower_bound() -> None:
    plan = plan_capacity(_base(1000.0), start_rate=100, factor=2, run=_scripted(capacity=10_000, generator_limit=500))
    assert [st["rate"] for st in plan["steps"]] == [100, 200, 400, 800]
    assert plan["max_rate"] == 400.0 and plan["exact"] is False
    assert "generator could not keep" in plan["note"] and "lower bound" in plan["summary"]
    # the figure follows "up to at least", the reason comes after it
    assert plan["summary"].startswith("one node meets the SLO up to at least 400.0 requests/s (a lower bound: ")


def test_plan_refuses_steps_too_short_for_the_slo_percentile() -> None:
    # 20 requests a step: every step would be invalid (too few latencies for a P99), read as the generator's limit.
    with pytest.raises(LoadTestError, match=r"first step measures 20 requests .* a P99 needs at least 100"):
        plan_capacity(_base(), start_rate=20, step_seconds=1, run=_scripted(capacity=1000))
    profile = parse_profile({"name": "p", "traffic": {"rate": 500}, "slo": {"p999_ms": 500}}, "<test>")
    base = RunConfig(url="http://127.0.0.1:1", profile=profile)
    with pytest.raises(LoadTestError, match=r"P99.9 needs at least 1,000"):
        plan_capacity(base, start_rate=50, step_seconds=15, run=_scripted(capacity=1000))
    # The default first rate (50/s) rises to what a 15 s step needs for a P99.9: 1,000 / 15 s.
    plan = plan_capacity(base, step_seconds=15, run=_scripted(capacity=1000), max_steps=1)
    assert plan["steps"][0]["rate"] == round(1000 / 15, 2)


def test_plan_stops_at_a_ctrl_c_instead_of_reading_the_cut_step_as_the_generator_limit() -> None:
    from kassa.loadtest.runner import RunInterrupted

    scripted = _scripted(capacity=10_000)

    def run(cfg: RunConfig) -> dict[str, Any]:
        res = scripted(cfg)
        if cfg.steady_rate > 150:  # the third step is cut short: invalid, as the generator's limit would be
            res["summary"].update(interrupted=True, valid=False, verdict="FAIL")
        return res

    with pytest.raises(RunInterrupted, match=r"during the step at 200.0/s after 2 complete step\(s\)"):
        plan_capacity(_base(), start_rate=50, factor=2, run=run)


def test_plan_when_nothing_passes() -> None:
    plan = plan_capacity(_base(), start_rate=50, run=_scripted(capacity=10))
    assert plan["nodes"] is None and plan["max_rate"] is None and "no step met the SLO" in plan["summary"]


def test_nodes_needed() -> None:
    assert nodes_needed(418.0, 600.0, 0.3, 1) == 2
    assert nodes_needed(420.0, 600.0, 0.3, 0) == 1  # exactly at 70 %: one is enough
    assert nodes_needed(5000.0, 400.0, 0.3, 1) == 19


def _topology_json(p99_by_workers: dict[int, dict[float, float]], errors: int = 0) -> dict[str, Any]:
    """The shape `bench/topology.py --json` ends with: per worker count, per rate, P99 and errors."""
    return {"benchmark": "topology", "duration": 10.0, "date": "2026-12-06 17:00 UTC", "settings": "embedded",
            "runs": [{"workers": w, "rates": {f"{rate:g}": {"client_p99_ms": p99, "errors": errors,
                                                              "event_errors": 0, "valid": True}
                                               for rate, p99 in rates.items()}}
                     for w, rates in p99_by_workers.items()]}


def test_plan_from_measured_figures_uses_the_highest_rate_within_the_slo_and_the_worker_curve(
        tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("name: measured\ntraffic: {rate: 3000}\nslo: {p99_ms: 50}\n"
                    "capacity: {headroom: 0.25, spare_nodes: 1}\n")
    measured = tmp_path / "topology.json"
    # One worker meets 50 ms at 1,000/s only; two meet it at 2,000/s but not 3,000/s.
    measured.write_text("progress lines a bench prints first\n" + json.dumps(_topology_json(
        {1: {1000: 12.0, 2000: 900.0}, 2: {1000: 6.0, 2000: 30.0, 3000: 400.0}})))
    out = _kassa("loadtest", "plan", "--profile", str(prof), "--measured", str(measured), "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["source"] == "measured" and plan["workers"] == 2 and plan["max_rate"] == 2000.0
    assert plan["exact"] is True  # 3,000/s was measured and failed
    # 3,000/s at 75 % of 2,000/s per node: 2 nodes, plus the spare.
    assert plan["per_node_rate"] == 1500.0 and plan["nodes"] == 3
    assert [(c["workers"], c["max_rate"]) for c in plan["curve"]] == [(1, 1000.0), (2, 2000.0)]
    assert [st["verdict"] for st in plan["steps"]] == ["PASS", "PASS", "FAIL"]

    one = _kassa("loadtest", "plan", "--profile", str(prof), "--measured", str(measured), "--measured-workers",
                 "1", "--json")
    plan1 = json.loads(one.stdout.strip().splitlines()[-1])
    assert plan1["max_rate"] == 1000.0 and plan1["nodes"] == 4 + 1  # ceil(3000 / 750) + the spare


def test_plan_from_measured_figures_says_when_it_is_only_a_lower_bound_or_when_nothing_passed(
        tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("name: measured\ntraffic: {rate: 100}\nslo: {p99_ms: 50}\n")
    allpass = tmp_path / "pass.json"
    allpass.write_text(json.dumps(_topology_json({2: {1000: 5.0, 2000: 9.0}})))
    plan = json.loads(_kassa("loadtest", "plan", "--profile", str(prof), "--measured", str(allpass),
                             "--json").stdout.strip().splitlines()[-1])
    assert plan["max_rate"] == 2000.0 and plan["exact"] is False and "still met the SLO" in plan["note"]
    lagging = _topology_json({2: {1000: 5.0, 2000: 9.0, 3000: 900.0}})
    for rate in ("2000", "3000"):  # the generator fell behind: latency still counts from the intended send time
        lagging["runs"][0]["rates"][rate]["valid"] = False
    lagged = tmp_path / "lagged.json"
    lagged.write_text(json.dumps(lagging))
    plan = json.loads(_kassa("loadtest", "plan", "--profile", str(prof), "--measured", str(lagged),
                             "--json").stdout.strip().splitlines()[-1])
    # 2,000/s met the SLO even with the lag added: a pass, but only a lower bound; 3,000/s failing while the
    # generator lagged says nothing of the server.
    assert plan["max_rate"] == 2000.0 and plan["exact"] is False and "fell behind at 3,000/s" in plan["note"]
    errors = tmp_path / "errors.json"
    errors.write_text(json.dumps(_topology_json({2: {1000: 5.0}}, errors=500)))  # 5 % of 10,000 failed
    out = _kassa("loadtest", "plan", "--profile", str(prof), "--measured", str(errors), "--json")
    assert out.returncode != 0 and json.loads(out.stdout.strip().splitlines()[-1])["nodes"] is None


@pytest.mark.parametrize(("change", "said"), [
    ({"duration": None}, '"duration" (the seconds measured at each rate) must be a number above 0, got None'),
    ({"duration": 0}, '"duration" (the seconds measured at each rate) must be a number above 0, got 0'),
    ({"runs": [{"workers": 1}]}, 'runs[0]: expected {"workers": N, "rates": {RATE: {...}}}'),
    ({"runs": [{"workers": 1, "rates": {"500": {"client_p99_ms": "fast"}}}]},
     "runs[0].rates.500.client_p99_ms: expected a number of ms, got 'fast'"),
])
def test_plan_from_measured_figures_names_what_is_missing_or_wrong(change: dict[str, Any], said: str) -> None:
    # No duration made 3 errors at 500/s an error rate of 300 %; the others were "'rates'" and a TypeError.
    from kassa.loadtest.plan import plan_from_measured

    measured = {"benchmark": "topology", "duration": 10,
                "runs": [{"workers": 1, "rates": {"500": {"client_p99_ms": 50, "errors": 3}}}], **change}
    profile = parse_profile({"name": "p", "traffic": {"rate": 618}}, "<test>")
    with pytest.raises(ValueError) as err:
        plan_from_measured(profile, {k: v for k, v in measured.items() if v is not None})
    assert str(err.value) == said


def test_plan_refuses_a_file_that_is_not_a_topology_result_and_needs_url_or_measured(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("name: measured\ntraffic: {rate: 100}\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"benchmark": "decision_latency"}')
    out = _kassa("loadtest", "plan", "--profile", str(prof), "--measured", str(bad))
    assert out.returncode == 2 and "not a bench/topology.py --json result" in " ".join(out.stderr.split())
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json at all")
    out = _kassa("loadtest", "plan", "--profile", str(prof), "--measured", str(garbage))
    assert out.returncode == 2 and "not JSON" in " ".join(out.stderr.split())
    out = _kassa("loadtest", "plan", "--profile", str(prof))
    assert out.returncode == 2 and "either --url" in " ".join(out.stderr.split())


def test_a_request_type_with_few_latencies_is_drawn_and_tabled_only_as_far_as_they_go() -> None:
    """2 accepts were drawn out to 99.99 % and their P99.9 given like the decisions' (the slower of the two)."""
    from kassa.loadtest import hist

    s = _small_run_summary()
    curves: dict[str, Any] = {}
    for name, n in (("decision", 5000), ("accept", 2)):
        h = hist.from_seconds(np.arange(1, n + 1) / 1e5)
        s["by_type"][name] = {"requests": n, "errors": 0, **{f"{k}_ms": v for k, v in hist.summary_ms(h).items()},
                              "latencies": n, "thin_percentiles": hist.thin_percentiles(n)}
        curves[name] = hist.percentile_curve(h, up_to=hist.supported_percentile(n))
    curves["all"] = hist.percentile_curve(hist.from_seconds(np.arange(1, 5003) / 1e5))
    assert curves["accept"][-1][0] == 50.0 and max(p for p, _ in curves["accept"]) == 50.0  # 1 - 1/2
    assert curves["decision"][-1][0] == 99.98 and curves["all"][-1][0] == 100.0
    assert s["by_type"]["accept"]["thin_percentiles"] == ["p50", "p90", "p99", "p999"]
    assert s["by_type"]["decision"]["thin_percentiles"] == ["p999"]  # 5 of 5,000 beyond its P99.9
    assert hist.thin_percentiles(10_000) == [] and hist.thin_percentiles(1_000) == ["p999"]
    assert hist.thin_percentiles(999) == ["p99", "p999"]  # 9 beyond its P99
    text = render_report({"summary": s, "timeline": {"t": [0], "asked": [10], "answered": [9], "errors": [1],
                                                     "p50_ms": [1.0], "p99_ms": [1.0], "max_ms": [1.0],
                                                     "lag_p99_ms": [0.1]}, "curves": curves})
    rows = {m.group(1): m.group(0) for m in re.finditer(r"<tr><td>(\w+)</td>.*?</tr>", text)}
    assert rows["accept"].count("†") == 4 and rows["decision"].count("†") == 1
    assert 'data-testid="thin-percentiles"' in text and "fewer than 10" in text


def _fake_run(unknown: float | None, orphans: int = 0) -> dict[str, Any]:
    """`summarize` of a fake 2 s run at 200/s, half decisions and half impression beacons, every one answered
    200 in 1 ms, the server's /metrics showing ``unknown`` as kassa_event_unknown_decisions_total's rise."""
    from kassa.loadtest.profiles import REQUEST_TYPES
    from kassa.loadtest.runner import summarize

    n = 400
    intended = np.arange(n) / 200.0
    result = {
        "type": np.array([REQUEST_TYPES.index("decision" if i % 2 else "impression") for i in range(n)],
                         dtype=np.int8),
        "intended": intended, "send_lag": np.zeros(n, dtype=np.float32), "latency": np.full(n, 0.001),
        "done": intended + 0.001, "status": np.full(n, 200, dtype=np.int16), "took_ms": np.full(n, 0.5),
        "scheduled": n, "sent": n, "cpu_seconds": 0.1, "wall_seconds": 2.0, "max_outstanding": 1,
        "orphan_beacons": orphans, "pool_connect_errors": 0, "first_errors": {}, "warnings": [],
        "idle": {"asked": 0, "held": 0, "min_held": 0, "failed": {}, "closed_by_server": 0, "reopened": 0,
                 "refresh_sent": 0, "refresh_failed": 0, "refresh_unanswered": 0},
    }
    ready = [{"idle": {"held": 0}, "idle_open_seconds": 0.0}]
    metrics = {"available": False} if unknown is None else {
        "available": True, "counters": {"kassa_decisions_total": 200.0,
                                        **({"kassa_event_unknown_decisions_total": unknown} if unknown else {})},
        "histograms": []}
    profile = parse_profile({"name": "fake", "traffic": {"rate": 200}, "ramp_seconds": 0, "duration_seconds": 2,
                             "schedule": "fixed", "mix": {"decision": 1, "impression": 1}}, "<test>")
    return summarize(RunConfig(url="http://fake", profile=profile), [result], ready, metrics,
                     meta={"workers": 1, "fd_limit": {"soft": 1024, "hard": 1024}, "started_at": "now",
                           "machine": {"cpu": "c", "cores": 2, "platform": "p", "python": "3", "loadavg_1m": 1}})


def test_beacon_events_not_joined_to_their_decisions_are_a_warning_in_the_summary_and_report() -> None:
    # kassa_event_unknown_decisions_total showed only in the report's server-counters table: a run whose
    # beacons outlived the server's reward window (the demo's 1 s) read as a clean PASS
    warned = _fake_run(unknown=30)["summary"]
    [warning] = [w for w in warned["warnings"] if "not joined" in w]
    assert warning.startswith("30 beacon events were not joined to their decisions") and "15.0% of the 200 " \
        "beacons sent" in warning and "reward window may be shorter than the beacons' delay" in warning, warning
    text = render_report({"summary": warned, "timeline": {"t": [0], "asked": [10], "answered": [10], "errors": [0],
                                                          "p50_ms": [1.0], "p99_ms": [1.0], "max_ms": [1.0],
                                                          "lag_p99_ms": [0.0]}, "curves": {"all": [[0.0, 1.0]]}})
    assert "30 beacon events were not joined to their decisions" in text
    for quiet in (_fake_run(unknown=2), _fake_run(unknown=None), _fake_run(unknown=0),
                  _fake_run(unknown=30, orphans=29)):  # 1 % of 200 at most; no /metrics; orphans name none
        assert not [w for w in quiet["summary"]["warnings"] if "not joined" in w], quiet["summary"]["warnings"]
