"""Importing DuckDB without letting a Ctrl-C or SIGTERM abort the process.

Kassa imports DuckDB lazily (only offline work needs it: ~0.2 s). Its bindings are a nanobind extension, and an
exception raised inside their module initialisation is not an error Python can report: nanobind prints a critical
error and the process aborts (exit 134, no cleanup). `kassa`'s SIGTERM handler raises ``SystemExit(143)`` and
Python's Ctrl-C raises ``KeyboardInterrupt`` wherever the main thread is, so a stop that landed during that import
(seen in 1 of 8 SIGTERMs sent to `kassa drift` in its first second) aborted instead of ending with 143 / 130.

`import_duckdb` holds both signals back for the import (on the main thread, the only one Python runs handlers on)
and delivers the first one that arrived right after it, to the handler that was in place: the command then stops as
it would have a moment earlier.
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_held() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM are noted, not handled; on leaving, the first noted one is raised again to the
    handlers that were in place. Off the main thread (where no Python handler runs): nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in _HELD}
    for sig in _HELD:
        signal.signal(sig, lambda signum, _frame: arrived.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if arrived:
            signal.raise_signal(arrived[0])


def import_whole(name: str) -> ModuleType:
    """``import name``, with a Ctrl-C or SIGTERM that arrives during it delivered once it is done."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    with signals_held():
        return importlib.import_module(name)


def import_duckdb() -> ModuleType:
    """``import duckdb``, with a stop during it delivered after it (see the module doc)."""
    return import_whole("duckdb")
