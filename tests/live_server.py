"""A live `kassa serve` in a subprocess, for tests that talk to Kassa the way a store's code does.

`LiveKassa` starts ``python -m kassa serve`` on a free port with a catalog, optional feature definitions
and keys passed the documented way (``KASSA_*`` environment variables), waits until ``/readyz`` answers
200, and stops the process it started (terminate, then kill) on exit. A server that does not come up
fails the test with the tail of its log; nothing is skipped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveKassa:
    def __init__(self, folder: Path, catalog: Path, keys: dict[str, str], features: Path | None = None,
                 startup_timeout: float = 90.0) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "kassa-serve.log"
        self.env = {**os.environ, "KASSA_LOG_LEVEL": "warning"}
        self.env.pop("KASSA_CONFIG", None)
        for kind, key in keys.items():  # publishable, secret, admin
            self.env[f"KASSA_{kind.upper()}_KEY"] = key
        if features is not None:
            self.env["KASSA_FEATURES__DEFINITIONS_FILE"] = str(features)
        self.args = [sys.executable, "-m", "kassa", "serve", "--catalog", str(catalog), "--data-dir",
                     str(folder / "data"), "--port", str(self.port)]
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LiveKassa:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.folder)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"`kassa serve` exited with {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.1)
        self.__exit__(None, None, None)
        self._fail(f"`kassa serve` was not ready on {self.url} within {self.startup_timeout:.0f} s")
        raise AssertionError  # unreachable: _fail raises

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _fail(self, why: str) -> None:
        pytest.fail(f"{why}; its log:\n{self.log_tail()}", pytrace=False)
