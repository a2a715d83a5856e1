"""`ModelStore`: the model each placement serves right now.

Publishing is one dict assignment of an immutable `VWModel`; a decision reads the reference once, so
a swap while requests are in flight never mixes versions inside one response.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kassa.learn.vw import VWModel, latest_snapshot, version_name

log = logging.getLogger("kassa.learn")


class ModelStore:
    def __init__(self) -> None:
        self._serving: dict[str, VWModel] = {}
        self.swaps = 0

    def get(self, placement_id: str) -> VWModel | None:
        return self._serving.get(placement_id)

    def publish(self, placement_id: str, model: VWModel) -> None:
        self._serving[placement_id] = model
        self.swaps += 1

    def versions(self) -> dict[str, str]:
        return {p: m.version for p, m in self._serving.items()}

    def load_latest(self, model_dir: Path, placement_id: str) -> VWModel | None:
        latest = latest_snapshot(model_dir / placement_id)
        if latest is None:
            return None
        seq, path, meta = latest
        try:
            model = VWModel(path, version_name(placement_id, seq), meta)
        except Exception:
            log.exception("could not load model snapshot %s; serving the baseline", path)
            return None
        self.publish(placement_id, model)
        return model
