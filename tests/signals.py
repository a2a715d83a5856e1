"""Stop a real ``python -m kassa`` process with a signal once it is doing its work, for the exit-code tests.

The CLI's contract with scripts and CI (README, "Exit codes and signals"): a Ctrl-C (SIGINT) exits 130, a SIGTERM
143 (0 for `kassa learn`), with no traceback and nothing half-written. A test starts the command, waits until
``ready()`` says the work is under way (a file it writes, a line it printed), sends the signal and returns what the
process said.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import kassa

SRC = str(Path(kassa.__file__).resolve().parents[1])


@dataclass
class Stopped:
    returncode: int
    out: str
    err: str


def kassa_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC, **extra}


def stop_when(args: Sequence[str], ready: Callable[[], bool] | str, sig: signal.Signals = signal.SIGINT, *,
              env: dict[str, str] | None = None, cwd: Path | None = None, wait: float = 30.0) -> Stopped:
    """Run ``python -m kassa ARGS``; send ``sig`` once ``ready()`` holds, or once stderr says ``ready`` (a str)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        def said() -> str:
            err.seek(0)
            return err.read()

        is_ready = (lambda: ready in said()) if isinstance(ready, str) else ready
        proc = subprocess.Popen([sys.executable, "-m", "kassa", *args], stdout=out, stderr=err, text=True,
                                env=env or kassa_env(), cwd=cwd)
        try:
            deadline = time.monotonic() + wait
            while not is_ready():
                if proc.poll() is not None:
                    raise AssertionError(f"{args} ended (status {proc.returncode}) before it was ready:\n{said()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{args} was not ready within {wait} s:\n{said()}")
                time.sleep(0.05)
            proc.send_signal(sig)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        return Stopped(proc.returncode, out.read(), said())
