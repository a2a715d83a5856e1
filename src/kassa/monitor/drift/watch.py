"""One serving process's drift monitors (`DriftWatch`): a `DriftMonitor` per placement, created on first
sight, sharing one `DriftMetrics` and one `AlertHook`; fed by the decision-log writer and the learning
task, checked on the learning task's schedule.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from kassa.monitor.drift.alerts import AlertHook
from kassa.monitor.drift.config import DriftConfig
from kassa.monitor.drift.metrics import DriftMetrics
from kassa.monitor.drift.monitor import DriftMonitor
from kassa.monitor.drift.report import DriftReport

if TYPE_CHECKING:
    from kassa.events.decision_log import DecisionRecord
    from kassa.events.join import JoinedExample


class DriftWatch:
    """Every placement's `DriftMonitor` in one serving process, with the shared metrics and alert hook.

    Fed off the request path: decision records from the decision-log writer's thread as each batch is
    written, closed decisions from the learning task; `check` runs on the learning task's schedule."""

    def __init__(self, registry: CollectorRegistry, webhook_url: str | None = None,
                 config: DriftConfig | None = None) -> None:
        self.metrics = DriftMetrics(registry)
        self.hook = AlertHook(webhook_url)
        self.config = config or DriftConfig()
        self.monitors: dict[str, DriftMonitor] = {}
        self._lock = threading.Lock()
        self.last_reports: dict[str, DriftReport] = {}

    def monitor(self, placement: str) -> DriftMonitor:
        m = self.monitors.get(placement)
        if m is None:
            with self._lock:
                m = self.monitors.get(placement)
                if m is None:
                    m = self.monitors[placement] = DriftMonitor(placement, self.config, metrics=self.metrics,
                                                                hook=self.hook)
        return m

    def observe_records(self, records: Iterable[DecisionRecord]) -> None:
        for record in records:
            if not record.fallback:
                self.monitor(record.placement).observe_record(record)

    def observe_joined(self, examples: Sequence[JoinedExample]) -> None:
        placements = {ex.placement for ex in examples}
        for placement in placements:
            self.monitor(placement).observe_joined(examples)

    def check(self, now: float | None = None) -> list[DriftReport]:
        reports = [m.check(now) for m in list(self.monitors.values())]
        for r in reports:
            self.last_reports[r.placement] = r
        return reports

    def rebase(self, placement: str) -> None:
        m = self.monitors.get(placement)
        if m is not None:
            m.rebase()

    def close(self) -> None:
        self.hook.close()
