"""`ShadowScorer`: a shadow model scores every request without touching the answer or its latency.

The decision path only appends a `ShadowRequest` (the learner lines it already built) to a bounded
queue. The learning loop drains it in slices: the shadow model computes its distribution over the same
candidates, samples the ranking it would have shown, and the result goes to a separate decision log
(``<data_dir>/shadow/decisions/...``) with the same schema and the same ``decision_id`` as the served
decision. Off-policy evaluation of the shadow then needs no re-scoring: its probability of each logged
action is in its own log (`kassa evaluate --shadow`, `kassa.learn.offline.shadow_eval`). When the queue is
full (the loop fell behind) requests are dropped and counted, never blocking a decision.
"""

from __future__ import annotations

import collections
import logging
import random
from collections.abc import Callable

from kassa.decide.policy import fill_slots, pmf_policy
from kassa.decide.sinks import ShadowRequest
from kassa.events.decision_log import DecisionRecord, DecisionSink, loggable_features

log = logging.getLogger("kassa.learn")


class ShadowScorer:
    def __init__(self, writer: DecisionSink, max_queue: int = 20_000, seed: int | None = None,
                 on_drop: Callable[[str], None] | None = None) -> None:
        self.writer = writer
        self.on_drop = on_drop  # hears the placement of each dropped request (the Prometheus counter)
        self._queue: collections.deque[ShadowRequest] = collections.deque()
        self.max_queue = max_queue
        self.rng = random.Random(seed)
        self.dropped = 0
        self.scored = 0
        self.failed = 0

    def submit(self, request: ShadowRequest) -> None:
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(request.placement)
            return
        self._queue.append(request)

    def __len__(self) -> int:
        return len(self._queue)

    def drain(self, limit: int = 64) -> int:
        n = 0
        queue = self._queue
        while queue and n < limit:
            req = queue.popleft()
            n += 1
            try:
                policy = pmf_policy(req.model, req.shared, req.action_lines, "greedy")
            except Exception:
                self.failed += 1
                log.exception("shadow model %s failed to score", req.model.version)
                continue
            ranking = fill_slots(policy, policy.n, req.slots, self.rng)
            self.writer.append(DecisionRecord(
                decision_id=req.decision_id, ts=req.ts, placement=req.placement, model_version=req.model.version,
                request_id=req.request_id, customer_id=req.customer_id, features=loggable_features(req.features),
                candidates=req.candidates, probabilities=[float(p) for p in policy.pmf],
                chosen=[req.candidates[i] for i in ranking.chosen], chosen_probabilities=ranking.probabilities,
                explored=ranking.explored, fallback=False, took_ms=0.0,
            ))
            self.scored += 1
        return n
