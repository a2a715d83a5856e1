"""The TypeScript client (`clients/typescript/`): compiled with tsc, its unit tests and its tests against a
live `kassa serve` run with Node's built-in test runner. Node.js and npm are required: a machine without
them fails here saying how to get them (never a skip, CI included)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import ADMIN, CATALOG, FEATURES, PUB, SECRET
from tests.live_server import LiveKassa

SDK = Path(__file__).parent.parent / "clients" / "typescript"
LOCALISED = {
    "id": "magazine", "kind": "partner", "title": "Magazine", "value": 3, "disclosure": "Sponsored",
    "content": {"headline": "3 free issues", "cta": "Add for {price}"}, "prices": {"USD": 25.99, "EUR": 23.99},
    "content_by_locale": {"nl": {"headline": "3 gratis nummers", "cta": "Toevoegen voor {price}",
                                 "disclosure": "Gesponsord"}},
}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the TypeScript client's tests need Node.js 18+ and npm "
                    "(Debian: `apt-get install nodejs npm`)", pytrace=False)
    return path


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> str:
    done = subprocess.run(args, cwd=SDK, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"`{' '.join(args)}` exited with {done.returncode}:\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def built() -> Path:
    """The SDK installed from its lock file (npm ci, when node_modules is missing or older) and compiled."""
    npm = _tool("npm")
    _tool("node")
    stamp = SDK / "node_modules" / ".package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < (SDK / "package-lock.json").stat().st_mtime:
        _run([npm, "ci", "--no-audit", "--no-fund"])
    _run([npm, "run", "build"])
    return SDK / "dist"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKassa]:
    folder = tmp_path_factory.mktemp("ts-client")
    catalog = yaml.safe_load(CATALOG)
    catalog["offers"].append(LOCALISED)
    catalog["placements"].append({"id": "localised", "slots": 1, "offers": ["magazine"], "policy": "baseline",
                                  "exploration": 0.0, "latency_budget_ms": 10000})
    (folder / "catalog.json").write_text(json.dumps(catalog))
    (folder / "features.yaml").write_text(FEATURES)
    with LiveKassa(folder, folder / "catalog.json", {"publishable": PUB, "secret": SECRET, "admin": ADMIN},
                   features=folder / "features.yaml") as live:
        yield live


def test_the_typescript_client_compiles_and_passes_its_unit_tests(built: Path) -> None:
    output = _run([_tool("node"), "--test", str(built / "test" / "client.test.js")])
    assert "# fail 0" in output and "# pass 8" in output, output[-3000:]


def test_the_typescript_client_works_against_a_live_server(built: Path, server: LiveKassa) -> None:
    env = {**os.environ, "KASSA_URL": server.url, "KASSA_PUBLISHABLE_KEY": PUB, "KASSA_SECRET_KEY": SECRET}
    output = _run([_tool("node"), "--test", str(built / "test" / "live.test.js")], env=env)
    assert "# fail 0" in output and "# pass 5" in output, output[-3000:]
