"""Feature-definition files `load_repo` cannot read, decode or import: one line naming the file (second-day
paper cuts)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from kassa.cli import app
from kassa.features.definitions import DefinitionError, load_repo

runner = CliRunner()


@pytest.mark.parametrize(("name", "content", "message"), [
    ("features.yaml", b"\xff\xfeentities: []\n", "features.yaml: not UTF-8 text (byte 0"),
    ("features.py", b"import os\nraise RuntimeError('no database here')\n",
     "features.py, line 2: importing it raised RuntimeError: no database here"),
    ("features.py", b"views = [\n", "features.py: importing it raised SyntaxError: '[' was never closed"),
])
def test_a_definitions_file_that_cannot_be_decoded_or_imported_is_one_line_naming_it(
        tmp_path: Path, name: str, content: bytes, message: str) -> None:
    # were UnicodeDecodeError / the file's own exception as a traceback from `kassa features apply`
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DefinitionError) as info:
        load_repo(path)
    assert message in str(info.value) and str(path) in str(info.value), info.value
    r = runner.invoke(app, ["features", "apply", str(path), "--yes", "--data-dir", str(tmp_path / "data")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception  # not a traceback
    assert "".join(message.split()) in "".join(r.output.split()), r.output


@pytest.mark.parametrize("what", ["missing", "directory"])
def test_a_missing_or_directory_definitions_file_is_one_line_naming_it(tmp_path: Path, what: str) -> None:
    path = tmp_path / "features.yaml"
    if what == "directory":
        path.mkdir()
    # a wide console: Rich wraps at 80 columns, inside the path itself when the temp folder is deep (pytest-xdist)
    r = runner.invoke(app, ["features", "apply", str(path), "--yes", "--data-dir", str(tmp_path / "data")],
                      env={"COLUMNS": "500"})
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception
    assert "invalid definitions" in r.output and "features.yaml" in r.output, r.output
