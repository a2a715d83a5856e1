"""Where a decision goes after it is answered: the interfaces the engine hands its results to.

The engine registers each answered decision with a reward sink (the reward joiner in `kassa.learn.online`)
and, when a shadow model is set, queues a `ShadowRequest` for the shadow scorer (`kassa.learn.shadow`). The
engine knows only these small protocols, so `decide` imports nothing of the learning loop above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from kassa.events.join import PendingDecision
from kassa.learn.serving.loader import ServingModel


class RewardSink(Protocol):
    def register(self, pending: PendingDecision) -> None: ...


@dataclass(slots=True)
class ShadowRequest:
    decision_id: str
    ts: float
    placement: str
    model: ServingModel
    shared: str
    action_lines: list[str]
    candidates: list[str]
    features: dict[str, Any]
    customer_id: str | None
    request_id: str | None
    slots: int


class ShadowSink(Protocol):
    def submit(self, request: ShadowRequest) -> None: ...
