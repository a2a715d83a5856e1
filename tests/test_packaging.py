"""What a new adopter runs first: the wheel installed in a clean venv, ``kassa --version``, ``kassa
snippet``, ``kassa init`` (a folder the server starts from), the LICENSE, and the old option names."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from starlette.testclient import TestClient
from typer.testing import CliRunner

import kassa
from kassa.cli import app, rewrite_aliases
from tests.partial_writes import disk_full_halfway

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_version_is_one_number_everywhere() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"kassa {kassa.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{kassa.__version__}"' in pyproject
    assert f"## {kassa.__version__} - " in (ROOT / "CHANGELOG.md").read_text()


def test_license_is_the_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_snippet_command_prints_the_tag_with_sri() -> None:
    from kassa.snippet.build import built

    result = CliRunner().invoke(app, ["snippet", "--base-url", "https://shop.example", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    s = built()
    assert info["integrity"] == s.integrity and info["integrity"].startswith("sha384-")
    assert info["script_tag"] == (f'<script async src="https://shop.example/v1/snippet.js?v={s.version}" '
                                  f'integrity="{s.integrity}" crossorigin="anonymous"></script>')
    plain = CliRunner().invoke(app, ["snippet"])
    assert plain.exit_code == 0 and s.integrity in plain.output and "<script" in plain.output


@pytest.mark.parametrize(("args", "message"), [
    (["--base-url", "notaurl"], "--base-url must be Kassa's public http(s):// URL"),  # was a broken tag
    (["--base-url", "javascript:alert(1)"], "--base-url must be Kassa's public http(s):// URL"),
    (["--out", "{dir}"], "cannot write the snippet to"),  # was an IsADirectoryError traceback
])
def test_snippet_refuses_a_base_url_or_out_path_it_cannot_use(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["snippet", *[a.format(dir=tmp_path) for a in args]])
    assert result.exit_code == 2 and "<script" not in result.output, result.output
    assert message in " ".join(result.output.split())


def test_init_writes_a_project_the_server_starts_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kassa.api.app import create_app
    from kassa.app import Kassa
    from kassa.config import load_settings

    folder = tmp_path / "shop"
    result = CliRunner().invoke(app, ["init", str(folder)])
    assert result.exit_code == 0, result.output
    assert "kassa serve --settings kassa.yaml" in result.output
    assert oct((folder / "kassa.yaml").stat().st_mode & 0o777) == "0o600"  # it holds the keys
    cfg = yaml.safe_load((folder / "kassa.yaml").read_text())
    assert cfg["admin_key"] in result.output and cfg["admin_key"].startswith("ka_")
    assert len({cfg["admin_key"], cfg["secret_key"], cfg["publishable_key"]}) == 3

    monkeypatch.chdir(folder)  # paths in kassa.yaml are relative to the project folder
    k = Kassa(load_settings("kassa.yaml"))
    with TestClient(create_app(k)) as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["placements"] == 1 and ready["offers"] == 4
        body = {"placement": "order_confirmation", "customer": {"id": "c-1"},
                "order": {"id": "1", "currency": "USD", "total": 120.0, "ship_country": "US",
                          "items": [{"sku": "TV", "category": "electronics", "qty": 1, "price": 120.0}]}}
        r = client.post("/v1/decisions", json=body, headers={"Authorization": f"Bearer {cfg['secret_key']}"})
        assert r.status_code == 200, r.text and r.json()["offers"]
        r = client.get("/v1/offers", headers={"Authorization": f"Bearer {cfg['admin_key']}"})
        assert r.status_code == 200
        assert {v.name for v in k.repo.views} == {"customer_signals", "customer_activity"}

    again = CliRunner().invoke(app, ["init", str(folder)])
    assert again.exit_code == 1 and "already has" in again.output  # nothing overwritten without --force


def test_init_force_that_fails_halfway_leaves_the_previous_settings(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # `kassa init --force` wrote kassa.yaml in place: a full disk, Ctrl-C or SIGTERM half-way left half a settings
    # file, its keys cut off, where the project's working one had been.
    folder = tmp_path / "shop"
    assert CliRunner().invoke(app, ["init", str(folder)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    disk_full_halfway(monkeypatch)
    result = CliRunner().invoke(app, ["init", str(folder), "--force"])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file left either


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_init_where_a_folder_cannot_be_is_one_line_not_a_traceback(tmp_path: Path, where: str) -> None:
    (tmp_path / "taken").write_text("x")
    folder = tmp_path / "taken" if where == "a-file" else tmp_path / "taken" / "shop"
    result = CliRunner().invoke(app, ["init", str(folder)], env={"COLUMNS": "500"})  # no wrap inside the path
    # was a FileExistsError / NotADirectoryError traceback
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert f"cannot write the project to {folder}" in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_a_cli_command_prints_no_alembic_plugin_lines(tmp_path: Path) -> None:
    # every command that opened the metadata DB printed 7 "INFO alembic.runtime.plugins: setup plugin" lines first
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for _ in range(2):  # the first run migrates a new data dir, the second finds it at head
        # (`keys create`: `keys list` refuses a data dir without Kassa data)
        run = subprocess.run([sys.executable, "-m", "kassa", "keys", "create", "admin",
                              "--data-dir", str(tmp_path / "d")],
                             capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 0, run.stderr
        assert "alembic.runtime.plugins" not in run.stderr and "setup plugin" not in run.stderr, run.stderr


def test_ctrl_c_while_the_cli_imports_exits_130_with_one_line() -> None:
    """A Ctrl-C in the ~0.5 s the `kassa` script spends importing the CLI printed a KeyboardInterrupt traceback."""
    import signal
    import time
    import tomllib

    module, function = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["kassa"].split(":")
    script = f"import sys\nfrom {module} import {function}\nsys.exit({function}())\n"  # what pip writes to bin/kassa
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    landed = 0
    for delay in (0.05, 0.1, 0.2, 0.3):
        proc = subprocess.Popen([sys.executable, "-c", script, "--version"], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        if proc.returncode == 0 and out.startswith("kassa "):
            continue  # too late: the imports were done and the command ran
        if proc.returncode == -signal.SIGINT and not err:
            continue  # too early: the interpreter had not installed its Ctrl-C handler yet (the shell says 130)
        if "KeyboardInterrupt" in err and "kassa" not in err:
            continue  # too early: in the interpreter's start-up, before any of Kassa's code ran
        assert (proc.returncode, err) == (130, "interrupted\n"), err
        landed += 1
        if landed == 2:
            break
    assert landed, "no Ctrl-C landed while the CLI imported"


@pytest.mark.parametrize("args", [["keys", "list"], ["keys", "create", "admin"], ["stream"]])
def test_a_data_dir_that_is_a_file_is_one_line_in_every_command(tmp_path: Path, args: list[str]) -> None:
    # the metadata DB's folder could not be made: a FileExistsError traceback in each command
    (tmp_path / "taken").write_text("x")
    result = CliRunner().invoke(app, [*args, "--data-dir", str(tmp_path / "taken")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"cannot use {tmp_path / 'taken'} as the data dir" in str(result.exception.code)


def test_old_config_option_is_a_hidden_alias() -> None:
    assert rewrite_aliases(["serve", "--config", "k.yaml"]) == ["serve", "--settings", "k.yaml"]
    assert rewrite_aliases(["models", "list", "-c=k.yaml"]) == ["models", "list", "--settings=k.yaml"]
    assert rewrite_aliases(["integrations", "sync", "shopify", "--config", "s.yaml"]) == [
        "integrations", "sync", "shopify", "--credentials", "s.yaml"]
    assert rewrite_aliases(["serve", "--", "--config"]) == ["serve", "--", "--config"]
    helps = [CliRunner().invoke(app, [*cmd, "--help"]).output for cmd in (["serve"], ["models", "list"])]
    assert all("--settings" in h and "--config" not in h for h in helps)
    missing = CliRunner().invoke(app, ["keys", "list", "--config", "/no/such/settings.yaml"])
    assert missing.exit_code != 0 and "/no/such/settings.yaml" in str(missing.exception or missing.output)


def test_wheel_installs_in_a_clean_venv_and_runs_the_demo(tmp_path: Path) -> None:
    """Builds the wheel, installs it (dependencies from the package index) into a fresh venv, and runs the
    installed ``kassa`` outside the source tree. About 30-90 s, most of it pip."""
    import shutil

    # Build from a copy of what the wheel is made of: building in place would leave build/ and an
    # egg-info in the source tree (which a PYTHONPATH=src pip would then take for an installed kassa).
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KASSA_CONFIG")}
    dist = tmp_path / "dist"
    run = {"capture_output": True, "text": True, "env": env}
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)],
                           timeout=300, **run)  # type: ignore[call-overload]
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = list(dist.glob("kassa-*.whl"))
    assert len(wheels) == 1 and f"kassa-{kassa.__version__}-" in wheels[0].name
    import zipfile

    names = set(zipfile.ZipFile(wheels[0]).namelist())
    for packaged in ("kassa/api/static/dashboard.css", "kassa/api/static/dashboard.js",
                     "kassa/api/static/vendor/swagger-ui/swagger-ui-bundle.js", "kassa/snippet/kassa.js",
                     "kassa/migrations/script.py.mako"):
        assert packaged in names, f"{packaged} is missing from the wheel"
    assert any(n.startswith("kassa/migrations/versions/0001") for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheels[0])], timeout=600,
                         **run)  # type: ignore[call-overload]
    assert pip.returncode == 0, pip.stderr[-3000:]
    exe = str(venv / "bin" / "kassa")
    version = subprocess.run([exe, "--version"], cwd=tmp_path, timeout=60, **run)  # type: ignore[call-overload]
    assert version.returncode == 0 and version.stdout.strip() == f"kassa {kassa.__version__}", version.stderr
    demo = subprocess.run([exe, "demo", "--headless", "--checkouts", "300", "--json", "--port", str(_free_port()),
                           "--data-dir", str(tmp_path / "demo")], cwd=tmp_path, timeout=300,
                          **run)  # type: ignore[call-overload]
    assert demo.returncode == 0, demo.stderr[-3000:]
    result = json.loads(demo.stdout.strip().splitlines()[-1])
    assert result["checkouts"] == 300 and result["p50_ms"] > 0
    import_path = subprocess.run([str(venv / "bin" / "python"), "-c", "import kassa; print(kassa.__file__)"],
                                 cwd=tmp_path, timeout=60, **run)  # type: ignore[call-overload]
    assert str(venv) in import_path.stdout  # the installed package ran, not the source tree


def _first_stderr_line(proc: subprocess.Popen[str], timeout: float) -> bool:
    """Wait until ``proc`` has written something to its stderr pipe (without reading it: `communicate` reads it
    all later); False if it has not within ``timeout`` seconds or exited first."""
    import select
    import time

    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stderr], [], [], 0.2)
        if ready:
            return True
    return False


def test_kassa_stream_into_a_pipe_prints_whole_progress_lines(tmp_path: Path) -> None:
    # Redirected, the Live status left its last frame unterminated: the log read "... writes 0stopped".
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(kassa.__file__).resolve().parents[1])}
    data = str(tmp_path / "d")
    applied = subprocess.run([sys.executable, "-m", "kassa", "features", "apply", "examples/features.yaml", "--yes",
                              "--data-dir", data], capture_output=True, text=True, env=env, timeout=120,
                             cwd=Path(__file__).resolve().parents[1])
    assert applied.returncode == 0, applied.stderr
    proc = subprocess.Popen([sys.executable, "-m", "kassa", "stream", "--data-dir", data],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # a line every 5 s once it runs: wait for the first one (a loaded machine can take seconds to start the
        # worker), then for part of the next period, so the stop lands mid-frame as it did when this was found
        assert _first_stderr_line(proc, timeout=90), "kassa stream printed nothing in 90 s"
        time.sleep(2.5)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    lines = err.splitlines()  # the CLI's console is stderr
    assert lines and lines[0].startswith("processed 0  lag 0 events") and lines[0].endswith("writes 0"), (out, err)
    assert lines[-1] == "stopped", (out, err)
    assert proc.returncode == 130, (out, err)  # a Ctrl-C; it was 0, as if the worker had finished


def _stand_in_command(tmp_path: Path, name: str, on_signal: str) -> subprocess.Popen[str]:
    """A `kassa NAME` command started through the real entry point that sleeps, doing ``on_signal`` (one statement)
    with whatever exception a signal raises in it; returned once it said it is ready."""
    script = tmp_path / f"{name}.py"
    script.write_text(
        "import sys, time\nfrom kassa.cli import app\n\n"
        f"@app.command('{name}')\ndef {name}() -> None:\n"
        "    print('ready', file=sys.stderr, flush=True)\n"
        f"    try:\n        time.sleep(30)\n    except BaseException:\n        {on_signal}\n\n"
        f"sys.argv = ['kassa', '{name}']\nfrom kassa.__main__ import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": str(Path(kassa.__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, text=True, stderr=subprocess.PIPE)
    assert proc.stderr is not None and proc.stderr.readline() == "ready\n"
    return proc


def test_a_sigterm_whose_exit_was_swallowed_still_ends_143(tmp_path: Path) -> None:
    # SIGTERM's exit can land in a finalizer, where Python prints it and goes on: `kassa evaluate` then finished and
    # exited 0 with a "SystemExit: 143" traceback above its table. Here a command that swallows it stands in.
    import signal
    import time

    proc = _stand_in_command(tmp_path, "swallow", "pass")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 143 and time.monotonic() - t0 < 5


def test_a_sigterm_a_library_turned_into_its_own_error_still_ends_143_without_a_traceback(tmp_path: Path) -> None:
    # DuckDB turns the handler's SystemExit into "RuntimeError: Query interrupted" (and an import under way into an
    # ImportError): `kassa drift` stopped with SIGTERM printed that traceback and exited 1. A stand-in does the same.
    import signal

    proc = _stand_in_command(tmp_path, "convert", "raise RuntimeError('Query interrupted') from None")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "Query interrupted" not in err, err


def test_ctrl_c_of_a_running_command_ends_with_the_line_interrupted(tmp_path: Path) -> None:
    # Typer turned it into exit 130 without a word: a log (or a half-drawn progress bar) just stopped.
    from tests.signals import stop_when

    stopped = stop_when(["serve", "--data-dir", str(tmp_path / "d"), "--port", str(_free_port())],
                        "Application startup complete")
    assert stopped.returncode == 130 and stopped.err.splitlines()[-1] == "interrupted", stopped.err
    assert "Traceback" not in stopped.err


def test_a_sigterm_during_a_native_import_is_delivered_once_the_import_is_done(tmp_path: Path) -> None:
    # DuckDB's bindings (nanobind) abort the process, exit 134 with a "critical error", when the SIGTERM handler's
    # SystemExit lands inside their module initialisation. A module that sends itself SIGTERM half-way through its
    # import stands in: imported through `import_whole` it finishes, and the command then ends with 143, quietly.
    import signal

    (tmp_path / "selfstop.py").write_text(
        "import os, signal, sys, time\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(0.2)\n"
        "print('imported whole', flush=True)\n")
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nfrom kassa.cli import app\nfrom kassa.nativeimport import import_whole\n\n"
        "@app.command('native')\ndef native() -> None:\n    import_whole('selfstop')\n    print('not reached')\n\n"
        "sys.argv = ['kassa', 'native']\nfrom kassa.__main__ import main\nmain()\n")
    env = {**os.environ, "PYTHONPATH": f"{Path(kassa.__file__).resolve().parents[1]}:{tmp_path}"}
    proc = subprocess.run([sys.executable, str(script)], env=env, text=True, capture_output=True, timeout=60)
    assert proc.stdout == "imported whole\n", (proc.stdout, proc.stderr)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr
