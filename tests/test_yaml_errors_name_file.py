"""Every YAML file Kassa reads names that file in a syntax error's position, not ``"<unicode string>"``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kassa.catalog.store import read_catalog_file
from kassa.config import load_settings
from kassa.features.definitions import load_repo
from kassa.integrations.config import ConfigError, load_integration_settings
from kassa.loadtest.profiles import load_profile

BROKEN = "a: 1\nb: [2,\nc: 3\n"  # an unclosed flow sequence: the error is at line 4


def _message(load: Callable[[Path], Any], path: Path) -> str:
    with pytest.raises((SystemExit, ValueError, ConfigError)) as info:  # each loader has its own error type
        load(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("name", "load"),
    [
        ("kassa.yaml", load_settings),
        ("catalog.yaml", read_catalog_file),
        ("features.yaml", load_repo),
        ("profile.yaml", load_profile),
        ("shopify.yaml", lambda p: load_integration_settings("shopify", p)),
    ],
)
def test_yaml_syntax_error_names_the_file_and_line(tmp_path: Path, name: str, load: Callable[[Path], Any]) -> None:
    path = tmp_path / name
    path.write_text(BROKEN)
    message = _message(load, path)
    assert f'in "{path}", line 4' in message, message
    assert "<unicode string>" not in message and "<byte string>" not in message
