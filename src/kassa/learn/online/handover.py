"""`HandoverJoiner`: the reward join of a `kassa learn` that may be active or standby per placement.

Every learner (active or standby) joins every decision it reads, so its join state is warm when it takes
over. What differs is what happens when a decision closes:

- active for the placement: its examples go to the learner, unless the predecessor already learned them;
- standby: they are kept (bounded, ``keep`` per placement), because the active one may die before its
  next snapshot, and what it learned after that snapshot is not in any weights that survive it.

Decisions close in ``(deadline, decision_id)`` order (the joiner's heap), so "learned" is one watermark
per placement: every decision closed up to it. The active learner writes its watermark into each
snapshot's metadata (`snapshot_meta`); a learner taking over continues from the production snapshot and
learns exactly the kept examples above that snapshot's watermark: none twice in the published lineage,
none lost, while the standby kept them (``keep`` examples per placement, ~0.5 KB each).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kassa import schemas
from kassa.events.join import JoinedExample, PendingDecision
from kassa.learn.online.rewards import RewardJoiner

Mark = tuple[float, str]  # (deadline, decision_id): the order decisions close in


class HandoverJoiner(RewardJoiner):
    def __init__(self, definition: Callable[[str], schemas.RewardDefinition | None], keep: int = 200_000) -> None:
        super().__init__(definition)
        self.active: set[str] = set()
        self._marks: dict[str, Mark] = {}  # decision_id -> its close order, while open
        self._learned: dict[str, Mark] = {}  # placement -> highest mark handed to the learner (or inherited)
        self._kept: dict[str, deque[tuple[Mark, JoinedExample]]] = {}
        self._ready: list[JoinedExample] = []  # kept examples to learn first after a takeover
        self.keep = keep
        self.skipped = 0  # examples the predecessor had learned already

    def register(self, pending: PendingDecision) -> None:
        if pending.decision_id in self._pending:
            return  # read again (a tail restarted behind its last position): one join per decision
        super().register(pending)
        self._marks[pending.decision_id] = (pending.deadline, pending.decision_id)

    def activate(self, placement: str, watermark: Mark | None) -> int:
        """Become the learner of ``placement``, whose production snapshot has learned up to ``watermark``
        (None: no snapshot says; everything kept is learned). Returns how many kept examples will be."""
        self.active.add(placement)
        kept = self._kept.pop(placement, deque())
        ready = [ex for mark, ex in kept if watermark is None or mark > watermark]
        self.skipped += len(kept) - len(ready)
        if watermark is not None:
            self._learned[placement] = watermark
        if ready:
            top = max(m for m, _ in kept if watermark is None or m > watermark)
            before = self._learned.get(placement)
            self._learned[placement] = top if before is None else max(before, top)
        self._ready.extend(ready)
        return len(ready)

    def expire(self, now: float, limit: int = 10_000) -> list[JoinedExample]:
        out, self._ready = self._ready, []
        closed = super().expire(now, limit)
        done: set[str] = set()
        floors = dict(self._learned)  # as of this call: every slot of a decision closes in the same call
        for ex in closed:
            mark = self._marks.get(ex.decision_id, (0.0, ex.decision_id))
            done.add(ex.decision_id)
            if ex.placement in self.active:
                learned = floors.get(ex.placement)
                if learned is not None and mark <= learned:
                    self.skipped += 1
                    continue
                out.append(ex)
                self._learned[ex.placement] = mark
            else:
                kept = self._kept.get(ex.placement)
                if kept is None:
                    kept = self._kept[ex.placement] = deque(maxlen=self.keep)
                kept.append((mark, ex))
        for decision_id in done:
            self._marks.pop(decision_id, None)
        return out

    def watermark(self, placement: str) -> Mark | None:
        return self._learned.get(placement)

    def snapshot_meta(self, placement: str) -> dict[str, object]:
        """What a snapshot of ``placement`` records so that a successor learns exactly what it has not."""
        mark = self._learned.get(placement)
        return {} if mark is None else {"watermark": [mark[0], mark[1]]}


def watermark_of(meta: dict | None) -> Mark | None:
    """The watermark a snapshot's metadata carries (None for a model this scheme did not write)."""
    raw = (meta or {}).get("watermark")
    if isinstance(raw, (list, tuple)) and len(raw) == 2:
        return (float(raw[0]), str(raw[1]))
    return None
