"""`ModelSync`: keeps a process's `ModelStore` equal to the registry's production, canary and shadow versions.

Loading a version verifies its checksum and feature-schema hash first; a version that fails is refused
(logged, counted, remembered) and the previous set keeps serving.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from kassa.learn.registry import ArtifactError, ModelRegistry, ModelVersion, Serving
from kassa.learn.serving.loader import ServingModel, load_serving
from kassa.learn.serving.store import ModelStore, ServingSet

log = logging.getLogger("kassa.learn")


class ModelSync:
    """Loads the registry's serving versions into a `ModelStore` (at start and on every poll).

    ``expected_schema(placement)`` gives the feature-schema hash the placement has now; ``None`` skips the
    check (a placement that no longer exists)."""

    def __init__(self, registry: ModelRegistry, store: ModelStore,
                 expected_schema: Callable[[str], str | None],
                 keep_recent: int = 4) -> None:
        self.registry = registry
        self.store = store
        self.expected_schema = expected_schema
        self._loaded: dict[str, ServingModel] = {}  # version -> loaded model, shared by sets
        # Recently served models stay loaded a while, so a rollback swaps back without loading anything.
        self._recent: OrderedDict[str, ServingModel] = OrderedDict()
        self.keep_recent = keep_recent
        self._keys: dict[str, tuple] = {}
        self.refused: dict[str, str] = {}  # version -> why
        self._lock = threading.Lock()  # the learning task and API calls may poll at the same time

    def sync(self) -> list[str]:
        """Bring every placement's serving set up to date; returns the placements that changed."""
        with self._lock:
            return self._sync()

    def _sync(self) -> list[str]:
        changed = []
        wanted = self.registry.serving()
        for placement, serving in wanted.items():
            if self._keys.get(placement) == serving.key:
                continue
            if self._apply(placement, serving):
                changed.append(placement)
        live = {m.version for s in wanted.values() for m in (s.production, s.canary, s.shadow) if m is not None}
        for version in list(self._loaded):
            if version not in live:
                self._recent[version] = self._loaded.pop(version)
        for version in live:
            self._recent.pop(version, None)
        while len(self._recent) > self.keep_recent:
            self._recent.popitem(last=False)
        return changed

    def _load(self, mv: ModelVersion | None) -> ServingModel | None:
        if mv is None:
            return None
        model = self._loaded.get(mv.version) or self._recent.pop(mv.version, None)
        if model is not None:
            self._loaded[mv.version] = model
            return model
        why = self.refused.get(mv.version)
        if why is not None:
            raise ArtifactError(why)
        try:
            path = self.registry.verify(mv, self.expected_schema(mv.placement))
            model = load_serving(path, mv.version, mv.metrics, mv.sha256)
        except Exception as exc:
            why = exc.detail if isinstance(exc, ArtifactError) else f"{mv.version}: could not load: {exc}"
            self.refused[mv.version] = why
            log.error("refused model %s: %s; the previous version keeps serving", mv.version, why)
            raise ArtifactError(why) from None
        self._loaded[mv.version] = model
        return model

    def _apply(self, placement: str, serving: Serving) -> bool:
        current = self.store.serving(placement) or ServingSet()
        parts: dict[str, ServingModel | None] = {}
        for stage in ("production", "canary", "shadow"):
            mv = getattr(serving, stage)
            try:
                parts[stage] = self._load(mv)
            except ArtifactError:
                parts[stage] = getattr(current, stage)  # keep what serves now
        share = serving.canary.canary_share or 0.0 if serving.canary is not None and parts["canary"] else 0.0
        new = ServingSet(parts["production"], parts["canary"] if share > 0 else None, share, parts["shadow"])
        self._keys[placement] = serving.key
        if new == current:
            return False
        self.store.publish_set(placement, new)
        log.info("serving %s: production=%s canary=%s (%.0f%%) shadow=%s", placement,
                 _v(new.production), _v(new.canary), share * 100, _v(new.shadow))
        return True

    def adopt(self, model: ServingModel) -> None:
        """Remember a model this process loaded itself (the online learner's snapshot) so the next
        poll does not load the same version a second time."""
        with self._lock:
            self._loaded[model.version] = model


def _v(model: ServingModel | None) -> str | None:
    return model.version if model is not None else None
