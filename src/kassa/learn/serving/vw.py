"""`VWModel`: a model snapshot loaded into Vowpal Wabbit for prediction only.

It serves (and `kassa evaluate` scores) the models whose settings the numpy scorer does not cover.
Each request parses only the shared context line; each offer's action example is parsed once per model and
cached, which cuts a 50-action predict from ~400 µs (parse everything) to ~60 µs.
"""

from __future__ import annotations

from pathlib import Path

import vowpalwabbit

_LT = vowpalwabbit.LabelType.CONTEXTUAL_BANDIT
_MAX_CACHED = 50_000


class VWModel:
    """A model snapshot loaded into VW for prediction only (serving and evaluating models whose
    settings `kassa.learn.serving.linear.LinearModel` does not cover). Immutable once published."""

    def __init__(self, path: Path, version: str, meta: dict | None = None) -> None:
        self.path = path
        self.version = version
        self.meta = meta or {}
        self.workspace = vowpalwabbit.Workspace(f"--quiet -i {path}", enable_logging=False)
        self._examples: dict[str, vowpalwabbit.Example] = {}

    def _action(self, line: str) -> vowpalwabbit.Example:
        ex = self._examples.get(line)
        if ex is None:
            if len(self._examples) >= _MAX_CACHED:
                self._examples.clear()
            parsed = self.workspace.parse(line, _LT)
            ex = parsed[0] if isinstance(parsed, list) else parsed
            self._examples[line] = ex
        return ex

    def pmf(self, shared: str, action_lines: list[str]) -> list[float]:
        """The policy's probability for each action, in the order given."""
        ws = self.workspace
        parsed = ws.parse(shared, _LT)
        shared_ex = parsed[0] if isinstance(parsed, list) else parsed
        try:
            probs = ws.predict([shared_ex, *[self._action(line) for line in action_lines]])
        finally:
            ws.finish_example([shared_ex])
        return list(probs)
