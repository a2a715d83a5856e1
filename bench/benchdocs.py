"""Shared by the bench scripts: rewrite one marked section of ``docs/benchmarks.md``."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = (
    "# Benchmarks\n\nFigures produced by the scripts in `bench/`; each section is rewritten by its "
    "script's `--write-docs` flag.\n"
)


def write_section(section: str, start: str, end: str, path: Path = DOCS) -> None:
    """Replace the text between ``start`` and ``end`` (markers included in ``section``), or append it."""
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
