"""The ``kassa`` command's entry point, for ``python -m kassa`` and the ``kassa`` script alike.

It owns how the command ends on a signal (README, "Exit codes and signals"):

- Ctrl-C (SIGINT): exit 130. It imports the CLI inside its own ``try`` (and its own few modules inside another):
  importing Typer, Rich and every command's module takes ~0.4-0.7 s, and a Ctrl-C in that time printed a
  traceback from whichever import it landed in. Once
  the CLI runs, Typer turns a Ctrl-C into exit 130 itself; this catches the rest and ends the same way, with one line.
- SIGTERM: exit 143 (128 + 15, what a shell reports for a process the signal killed) after the command's own
  cleanup: Python's default action killed the process on the spot, so no ``finally`` ran: `kassa demo` left its
  temporary data folder behind, `kassa train` its examples file, and a half-copied model file could stay in the
  registry's folder. A second SIGTERM during that cleanup ends the process at once. A library that turns the
  handler's exception into its own error (DuckDB's "Query interrupted") still ends the command with 143, quietly.
  Commands with a stop of their own replace this handler: `kassa serve` shuts down gracefully, then exits 143;
  `kassa learn` exits 0.
"""

from __future__ import annotations

import sys

try:  # `signal` brings enum, functools and collections: ~10 ms, longer on a loaded machine, where a Ctrl-C landed
    import os
    import signal
    from types import FrameType
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

TERMINATED_EXIT = 128 + signal.SIGTERM
_terminated = False


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    global _terminated
    _terminated = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while cleaning up ends the process at once
    raise SystemExit(TERMINATED_EXIT)


def _default_sigterm_in_child() -> None:
    # A forked worker (`kassa evaluate --workers`, `kassa stream`'s processor) is stopped by its parent with SIGTERM
    # and has nothing of the parent's to clean up.
    if signal.getsignal(signal.SIGTERM) is _exit_on_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    os.register_at_fork(after_in_child=_default_sigterm_in_child)
    try:
        from kassa.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        # The handler's exception can land where Python only prints it ("Exception ignored in ...": a finalizer a
        # garbage collection ran) and the command then went on to finish: still not a success.
        if _terminated and exc.code in (0, None):
            sys.exit(TERMINATED_EXIT)
        raise
    except Exception:
        # ... or in a library that turns it into an error of its own: DuckDB's "Query interrupted", an extension
        # or a module being imported. `kassa drift` stopped with SIGTERM printed that traceback and exited 1.
        if _terminated:
            sys.exit(TERMINATED_EXIT)
        raise


if __name__ == "__main__":
    main()
