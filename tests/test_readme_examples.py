"""Docs that run: every `curl` example of README.md (and its Python client example), parsed from the README
and run as written (bash, curl) against a live `kassa serve` with the demo's keys, on the examples catalog
and on the demo's own catalog.

Each ```sh block that calls curl runs in order, in one scratch folder (a block may read a file an earlier
one wrote), with the README's address swapped for the test server's. Every HTTP answer must be a 2xx.
What the README shows as an answer (a ```json block right after the example, or a ``# {...}`` comment line
inside it) must match one of the answers printed: the same keys (recursively; ``{…}`` stands for any
object, and an offer's ``content`` is the catalog's own data), the same JSON types, the same integers
(``rank``, ``accepted``, ``duplicates``, ``written``). On the examples catalog the offer content the
README shows must also be exactly what the server answered for that offer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.live_server import LiveKassa

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
README_URL = "http://127.0.0.1:8000"
DEMO_KEYS = {"publishable": "demo-publishable", "secret": "demo-secret", "admin": "demo-admin"}
STATUS = "KASSA-README-STATUS"
# curl as in the README, plus one line per answer on stderr with its status (stdout stays what a reader sees)
CURL = f"curl() {{ command curl -w '%{{stderr}}{STATUS} %{{http_code}} %{{url_effective}}\\n' \"$@\"; }}\n"
ANY = {"…": True}  # what `{…}` in the README is parsed to


@dataclass
class Example:
    line: int
    script: str
    expected: list[Any] = field(default_factory=list)


def examples(text: str) -> list[Example]:
    """The README's curl blocks with the answers shown for them, in order."""
    found: list[Example] = []
    blocks = list(re.finditer(r"^```(\w*)\n(.*?)^```\n?", text, re.S | re.M))
    for i, block in enumerate(blocks):
        lang, body = block.group(1), block.group(2)
        if lang != "sh" or not re.search(r"^\s*curl |\$\(curl |\| *curl ", body, re.M):
            continue
        example = Example(text[: block.start()].count("\n") + 1, body)
        for comment in re.findall(r"^# (\{.*)$", body, re.M):
            example.expected.append(_parse_shown(comment))
        after = blocks[i + 1] if i + 1 < len(blocks) else None
        if after is not None and after.group(1) == "json" and not text[block.end(): after.start()].strip():
            example.expected.append(_parse_shown(after.group(2)))
        found.append(example)
    return found


def _parse_shown(shown: str) -> Any:
    return json.loads(shown.replace("{…}", '{"…": true}').split(" (abridged)")[0])


def _matches(shown: Any, got: Any, path: str = "$") -> list[str]:
    """How ``got`` differs from what the README shows (empty when it matches)."""
    if shown == ANY:
        return [] if isinstance(got, dict) else [f"{path}: expected an object, got {got!r}"]
    if isinstance(shown, dict):
        if not isinstance(got, dict):
            return [f"{path}: expected an object, got {got!r}"]
        problems = [f"{path}.{key}: missing" for key in shown if key not in got]
        for key, value in shown.items():
            if key in got:
                sub = ANY if key == "content" else value  # an offer's content is the catalog's data
                problems += _matches(sub, got[key], f"{path}.{key}")
        return problems
    if isinstance(shown, list):
        if not isinstance(got, list) or len(got) != len(shown):
            return [f"{path}: expected {len(shown)} items, got {got!r}"]
        return [p for i, (s, g) in enumerate(zip(shown, got, strict=True)) for p in _matches(s, g, f"{path}[{i}]")]
    if isinstance(shown, bool) or shown is None:
        return [] if type(got) is type(shown) else [f"{path}: expected {type(shown).__name__}, got {got!r}"]
    if isinstance(shown, int):
        return [] if got == shown and not isinstance(got, bool) else [f"{path}: expected {shown}, got {got!r}"]
    if isinstance(shown, float):
        return [] if isinstance(got, int | float) and not isinstance(got, bool) else [f"{path}: not a number"]
    return [] if isinstance(got, type(shown)) else [f"{path}: expected {type(shown).__name__}, got {got!r}"]


def _answers(stdout: str) -> list[Any]:
    decoder = json.JSONDecoder()
    out, i = [], 0
    while i < len(stdout):
        if stdout[i].isspace():
            i += 1
            continue
        value, i = decoder.raw_decode(stdout, i)
        out.append(value)
    return out


def _shown_contents(shown: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for offer in shown.get("offers", []) if isinstance(shown, dict) else []:
        if offer.get("content") not in (None, ANY):
            yield offer["offer_id"], offer["content"]


@pytest.fixture(scope="module", params=["examples", "demo"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKassa]:
    """`kassa serve` with the demo's keys: on examples/ (as the README says), or on the demo's catalog."""
    folder = tmp_path_factory.mktemp(f"readme-{request.param}")
    if request.param == "examples":
        catalog, features = ROOT / "examples" / "catalog.yaml", ROOT / "examples" / "features.yaml"
    else:
        from kassa.demo.run import DEMO_FEATURES
        from kassa.demo.simulator import World
        from kassa.demo.store import DemoStore

        store = DemoStore.build(1)
        catalog, features = folder / "demo-catalog.json", folder / "demo-features.yaml"
        catalog.write_bytes(msgspec.json.encode(store.catalog(World(store, 1).best_static_order())))
        features.write_text(DEMO_FEATURES)
    with LiveKassa(folder, catalog, DEMO_KEYS, features=features) as live:
        live.name = request.param  # type: ignore[attr-defined]
        yield live


def test_the_readme_has_curl_examples_with_answers_to_check() -> None:
    found = examples(README.read_text())
    assert len(found) >= 4, [e.line for e in found]
    assert sum(len(e.expected) for e in found) >= 4


def test_every_readme_curl_example_runs_as_written(server: LiveKassa, tmp_path: Path) -> None:
    bash, curl = shutil.which("bash"), shutil.which("curl")
    if bash is None or curl is None:
        pytest.fail("the README examples need bash and curl on PATH (Debian: `apt-get install curl`)", pytrace=False)
    text = README.read_text()
    assert README_URL in text
    for example in examples(text):
        script = "set -euo pipefail\n" + CURL + example.script.replace(README_URL, server.url)
        done = subprocess.run([bash, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        where = f"README.md line {example.line} (server: {server.name})"  # type: ignore[attr-defined]
        assert done.returncode == 0, f"{where} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        statuses = re.findall(rf"^{STATUS} (\d+) (\S+)$", done.stderr, re.M)
        assert statuses, f"{where}: no HTTP answer\n{done.stderr}"
        refused = [(int(code), url) for code, url in statuses if not 200 <= int(code) < 300]
        assert not refused, f"{where}: refused {refused}\n{done.stdout}"
        answers = _answers(done.stdout)
        for shown in example.expected:
            misses = [_matches(shown, got) for got in answers]
            assert any(not m for m in misses), f"{where}: no answer has the shape shown {shown}:\n{misses}"
            if server.name == "examples":  # type: ignore[attr-defined]
                served = {o["offer_id"]: o["content"] for got in answers for o in got.get("offers", [])}
                for offer_id, content in _shown_contents(shown):
                    if offer_id in served:  # the baseline explores: another offer may win a slot
                        assert served[offer_id] == content, f"{where}: {offer_id} content {served[offer_id]}"


def test_every_readme_python_example_runs_as_written(server: LiveKassa, tmp_path: Path) -> None:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
    assert blocks, "the README's client example is gone"
    for block in blocks:
        done = subprocess.run([sys.executable, "-c", block.replace(README_URL, server.url)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env=os.environ)
        assert done.returncode == 0, f"README python example failed:\n{block}\n{done.stderr[-3000:]}"


def test_shapes_are_compared_by_keys_types_and_integers() -> None:
    shown = _parse_shown('{"accepted":3,"duplicates":0,"offers":[{"rank":1,"score":2.0,"content":{…}}]}')
    assert _matches(shown, {"accepted": 3, "duplicates": 0, "unknown_decisions": [],
                            "offers": [{"rank": 1, "score": 4, "content": {"x": 1}}]}) == []
    assert _matches(shown, {"accepted": 2, "duplicates": 0, "offers": [{"rank": 1, "score": 2.0, "content": {}}]})
    assert _matches(shown, {"accepted": 3, "offers": [{"rank": 1, "score": 2.0, "content": {}}]})  # a key missing
    assert _matches(shown, {"accepted": 3, "duplicates": 0, "offers": []})
