"""Writes that fail half-way, for the tests that pin "an output file is whole or the previous one"."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest


def disk_full_halfway(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `Path.write_text` and `Path.write_bytes` write the first half of their data, then fail as a full disk
    does: what a one-call writer left behind when it was stopped or failed mid-write."""

    def half(self: Path, data: str | bytes, *args: Any, **kwargs: Any) -> int:
        raw = data.encode("utf-8") if isinstance(data, str) else data
        with open(self, "wb") as fh:
            fh.write(raw[: len(raw) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", half)
    monkeypatch.setattr(Path, "write_bytes", half)
