"""The ``kassa`` command's entry point, for ``python -m kassa`` and the ``kassa`` script alike.

It imports the CLI inside its own ``try``: importing Typer, Rich and every command's module takes ~0.4-0.7 s, and a
Ctrl-C in that time printed a traceback from whichever import it landed in. Once the CLI runs, Typer turns a
Ctrl-C into exit 130 itself; this catches the rest and ends the same way, with one line.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from kassa.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
