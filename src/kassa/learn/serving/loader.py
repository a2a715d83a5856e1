"""One loader for serving: a verified VW artifact becomes the `ServingModel` a decision scores with.

The numpy `LinearModel` when its policy is covered (a swap is an array load, ~0.2 ms), VW itself otherwise
(a load + free of ~3 ms in C++ holding the GIL, so swaps of such models pause requests).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from kassa.learn.serving.linear import LinearModel
from kassa.learn.serving.sidecar import SidecarError, UnsupportedModel, export
from kassa.learn.serving.vw import VWModel

log = logging.getLogger("kassa.learn")


class ServingModel(Protocol):
    """What the decision engine, the shadow scorer and the model store need from a loaded model."""

    path: Path
    version: str
    meta: dict

    def pmf(self, shared: str, action_lines: list[str]) -> list[float]: ...


def load_serving(vw_path: Path, version: str, meta: dict | None = None,
                 source_sha256: str | None = None) -> ServingModel:
    """The serving copy of a (verified) VW artifact: its `LinearModel`, exporting the sidecar first when it
    is missing or stale (one VW load, logged); VW itself when the settings are not covered."""
    try:
        return LinearModel.open(vw_path, version, meta, source_sha256)
    except SidecarError as why:
        log.info("rebuilding the linear model of %s: %s", version, why)
    try:
        export(vw_path)
        return LinearModel.open(vw_path, version, meta, source_sha256)
    except UnsupportedModel as why:
        log.warning("serving %s with Vowpal Wabbit itself (%s); swaps of it pause requests for a few ms",
                    version, why)
    return VWModel(Path(vw_path), version, meta)
