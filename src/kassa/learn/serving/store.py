"""`ModelStore`: the models each placement serves right now (production, canary with its share, shadow).

A placement's serving set is one immutable object replaced by a single dict assignment; a decision reads it
once, so a swap while requests are in flight never mixes versions inside one response. `kassa.learn.sync`
keeps the store equal to the registry.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, replace

from kassa.learn.serving.loader import ServingModel

log = logging.getLogger("kassa.learn")


@dataclass(frozen=True, slots=True)
class ServingSet:
    production: ServingModel | None = None
    canary: ServingModel | None = None
    canary_share: float = 0.0
    shadow: ServingModel | None = None

    def pick(self, unit: str | None) -> ServingModel | None:
        """The model that serves this request: the canary for a stable ``canary_share`` of units
        (customers, else sessions), production for everyone else and for anonymous requests."""
        if self.canary is not None and unit is not None and in_canary(unit, self.canary_share):
            return self.canary
        return self.production


def in_canary(unit: str, share: float) -> bool:
    # crc32 is stable across processes and restarts (Python's hash() is salted per process).
    return (zlib.crc32(unit.encode()) & 0xFFFFFFFF) < share * 4294967296.0


class ModelStore:
    def __init__(self) -> None:
        self._serving: dict[str, ServingSet] = {}
        self.swaps = 0

    def get(self, placement_id: str) -> ServingModel | None:
        s = self._serving.get(placement_id)
        return s.production if s is not None else None

    def serving(self, placement_id: str) -> ServingSet | None:
        return self._serving.get(placement_id)

    def publish(self, placement_id: str, model: ServingModel) -> None:
        """Replace the production model, keeping the placement's canary and shadow."""
        current = self._serving.get(placement_id) or ServingSet()
        self._serving[placement_id] = replace(current, production=model)
        self.swaps += 1

    def publish_set(self, placement_id: str, serving: ServingSet) -> None:
        self._serving[placement_id] = serving
        self.swaps += 1

    def versions(self) -> dict[str, str]:
        return {p: s.production.version for p, s in self._serving.items() if s.production is not None}
