"""The streaming drift monitor of one placement (`DriftMonitor`): fed incrementally, checked periodically.

The live window is tumbling: when it holds ``window`` decisions it is closed; with
``rolling_reference`` (the default) closed windows become the reference one window behind
(``reference_lag``), so each window is judged against a recent one: a slow trend (a buyer base
maturing, a policy learning) is absorbed, a change is reported when it happens.

Each check reports the distribution rows (`kassa.monitor.drift.distribution`) of the live window
against the reference, and **reward-rate drift**: the reward per decision, and each offer's reward per
impression, against the reference rates, judged by banks of CUSUM charts (`kassa.monitor.drift.cusum`)
that this monitor arms from the reference's rates and restarts as the reference rolls.

Wiring: a `DriftMonitor` per placement is fed decision records (`observe_record`) and closed decisions'
rewards (`observe_joined`) off the request path; a periodic task calls `check`, which updates the
`DriftMetrics` and hands new alerts to the `AlertHook`. `kassa.monitor.drift.watch.DriftWatch` holds
one per placement in a serving process.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from kassa.monitor.drift.alerts import AlertHook
from kassa.monitor.drift.config import REWARD, DriftConfig, Severity
from kassa.monitor.drift.cusum import RateCusum, cusum_threshold
from kassa.monitor.drift.distribution import distribution_rows
from kassa.monitor.drift.metrics import DriftMetrics
from kassa.monitor.drift.report import DriftReport, DriftRow
from kassa.monitor.drift.window import Moments, Window, decision_action, decision_score

if TYPE_CHECKING:
    from kassa.events.decision_log import DecisionRecord
    from kassa.events.join import JoinedExample


class DriftMonitor:
    """Drift of one placement's live traffic, fed incrementally, checked periodically.

    Feed it off the request path (``observe_record`` from the decision-log tap, ``observe_joined`` or
    ``observe_outcome`` when rewards close) and call ``check`` from a periodic task. Memory is bounded by
    the config (three windows of reservoirs and counts, at most ``max_offers`` offer detectors), whatever
    the traffic. Thread-safe: one lock, held briefly by ``observe_*``.

    Without an explicit reference (``set_reference``), the first full live window becomes it. With
    ``rolling_reference`` (the default) closed windows replace it as they close, ``reference_lag`` windows
    behind the live one, so each window is judged against a recent one; without it the reference stays
    (say, the serving model's training window) and reward detectors stay alarmed until ``rebase``.
    """

    def __init__(self, placement: str, config: DriftConfig | None = None, reference: Window | None = None,
                 metrics: DriftMetrics | None = None, hook: AlertHook | None = None, seed: int = 0) -> None:
        self.placement = placement
        self.config = config or DriftConfig()
        self.metrics = metrics
        self.hook = hook
        self._seed = seed
        self._lock = threading.Lock()
        self.reference: Window | None = None
        self.live = self._new_window()
        self.last_live: Window | None = None  # the last closed live window
        self.windows_closed = 0
        self._reward: list[RateCusum] = []
        self._offers: dict[str, list[RateCusum]] = {}
        self._offer_h = 1.0
        self._active: set[tuple[str, str]] = set()  # (kind, feature) alerting at the last check
        self.alerts_raised = 0
        if reference is not None:
            self.set_reference(reference)

    def _new_window(self) -> Window:
        self._seed += 1
        return Window(self.config, self._seed)

    # -- feeding (cheap; called for every decision and every closed decision)
    def observe_decision(self, features: Mapping[str, Any], score: float | None = None,
                         action: str | None = None, version: str | None = None) -> None:
        with self._lock:
            self.live.add_decision(features, score, action, version)
            if self.live.decisions >= self.config.window:
                self._close_window()

    def observe_record(self, record: DecisionRecord) -> None:
        """A logged decision of this placement (others are ignored)."""
        if record.placement == self.placement:
            self.observe_decision(record.features, decision_score(record.probabilities),
                                  decision_action(record.candidates, record.probabilities), record.model_version)

    def observe_outcome(self, rewards: Sequence[tuple[str, float]]) -> None:
        """One closed decision: ``(offer_id, reward)`` per offer shown."""
        with self._lock:
            self.live.add_outcome(rewards)
            total = 0.0
            for offer_id, reward in rewards:
                total += reward
                for c in self._offers.get(offer_id, ()):
                    c.update(reward)
            for c in self._reward:
                c.update(total)

    def observe_joined(self, examples: Iterable[JoinedExample]) -> None:
        """Closed decisions as the reward joiner emits them (one example per shown slot, a decision's
        slots together); examples of other placements are ignored."""
        current: str | None = None
        outcome: list[tuple[str, float]] = []
        for ex in examples:
            if ex.placement != self.placement:
                continue
            if ex.decision_id != current:
                if outcome:
                    self.observe_outcome(outcome)
                current, outcome = ex.decision_id, []
            outcome.append((ex.offer_id, ex.reward))
        if outcome:
            self.observe_outcome(outcome)

    # -- references
    def set_reference(self, reference: Window) -> None:
        """Compare against ``reference`` from now on (e.g. the training window of the serving model);
        every detector restarts from its rates."""
        with self._lock:
            self.reference = reference
            self._active.clear()
            self._arm(reset=True)

    def rebase(self) -> None:
        """Accept the present as normal: the newest window with enough decisions becomes the reference and
        every detector restarts (after an alert was handled, or a new model was promoted)."""
        with self._lock:
            newest = self.live if self.live.decisions >= self.config.min_samples or self.last_live is None \
                else self.last_live
            self.reference = newest
            if newest is self.live:
                self.last_live = self.live
                self.live = self._new_window()
            self._active.clear()
            self._arm(reset=True)

    def _directions(self) -> tuple[Literal["down", "up"], ...]:
        d = self.config.reward_direction
        return ("down", "up") if d == "both" else (d,)

    def _baseline(self, m: Moments, direction: str) -> float:
        se = math.sqrt(m.var / m.n) if m.n > 1 else 0.0
        shift = self.config.reference_z * se
        return max(m.mean - shift, 1e-9) if direction == "down" else m.mean + shift

    def _bank(self, m: Moments, changes: Sequence[float], threshold: float) -> list[RateCusum]:
        return [RateCusum(self._baseline(m, d), c, threshold, d) for d in self._directions() for c in changes]

    def _arm(self, reset: bool) -> None:
        """(Re)create the reward detectors from the reference's rates; statistics carry over unless reset."""
        ref = self.reference
        cfg = self.config
        if reset:
            self._reward, self._offers = [], {}
        if ref is None:
            return
        dirs = len(self._directions())
        if ref.rewards.n >= cfg.min_reference_decisions and ref.rewards.mean > 0:
            h = cusum_threshold(cfg.arl, dirs * len(cfg.reward_changes))
            if not self._reward:
                self._reward = self._bank(ref.rewards, cfg.reward_changes, h)
            else:
                for c in self._reward:
                    c.rebase(self._baseline(ref.rewards, c.direction))
        eligible = {o: m for o, m in ref.offers.items() if m.n >= cfg.min_offer_impressions and m.sum > 0}
        for o in list(self._offers):
            if o not in eligible and not any(c.alarmed for c in self._offers[o]):
                del self._offers[o]  # no longer shown enough to judge
        h = self._offer_h = cusum_threshold(cfg.arl, max(1, len(eligible) * dirs * len(cfg.offer_changes)))
        for o, m in eligible.items():
            bank = self._offers.get(o)
            if bank is None:
                self._offers[o] = self._bank(m, cfg.offer_changes, h)
                continue
            for c in bank:
                c.rebase(self._baseline(m, c.direction))
                c.threshold = h

    def _close_window(self) -> None:
        closed = self.live
        self.live = self._new_window()
        self.windows_closed += 1
        if self.reference is None:
            self.reference = closed
            self._arm(reset=True)
        elif self.config.rolling_reference:
            # Always roll, alerts or not, so a change is reported when it happens and then becomes the new
            # normal (a frozen reference would make every later window drift from it, and every detector
            # alert). The reference lags one window behind the live one: a change that lands late in a
            # window is still judged against the window before it for one more full window, instead of
            # against a reference it has half contaminated.
            previous = self.last_live
            self.reference = previous if self.config.reference_lag and previous is not None else closed
            alarmed_reward = any(c.alarmed for c in self._reward)
            alarmed = [o for o, bank in self._offers.items() if any(c.alarmed for c in bank)]
            self._arm(reset=False)
            # A rate that alarmed has had its say: its detectors restart from the newest window (the new
            # level) instead of alarming again at the same change against the lagged reference.
            cfg = self.config
            if alarmed_reward:
                self._reward = self._bank(closed.rewards, cfg.reward_changes, self._reward[0].threshold) \
                    if closed.rewards.n >= cfg.min_reference_decisions and closed.rewards.mean > 0 else []
            for o in alarmed:
                m = closed.offers.get(o)
                if m is not None and m.n >= cfg.min_offer_impressions and m.sum > 0:
                    self._offers[o] = self._bank(m, cfg.offer_changes, self._offer_h)
                else:
                    self._offers.pop(o, None)
        self.last_live = closed

    # -- checking
    def check(self, now: float | None = None) -> DriftReport:
        """Compare the live window with the reference; update metrics; notify the hook of new alerts."""
        cfg = self.config
        with self._lock:
            ref = self.reference
            live = self.live if self.live.decisions >= cfg.min_samples or self.last_live is None else self.last_live
            rows = distribution_rows(ref, live) if ref is not None and ref is not live else []
            rows += self._reward_rows(ref)
            report = DriftReport(self.placement, time.time() if now is None else now,
                                 ref.decisions if ref is not None else 0, live.decisions, rows)
            alerting = {(r.kind, r.feature) for r in report.alerts}
            new = [r for r in report.alerts if (r.kind, r.feature) not in self._active]
            self._active = alerting
            self.alerts_raised += len(new)
        if self.metrics is not None:
            self.metrics.record(report, new)
        if self.hook is not None and new:
            self.hook.notify(report, new)
        return report

    def _reward_rows(self, ref: Window | None) -> list[DriftRow]:
        rows: list[DriftRow] = []
        if ref is None:
            return rows

        def row(feature: str, kind: str, bank: list[RateCusum], ref_m: Moments, live_m: Moments | None
                ) -> DriftRow:
            worst = max(bank, key=lambda c: (c.alarmed, c.statistic / c.threshold))
            ratio = worst.statistic / worst.threshold
            severity: Severity = "alert" if worst.alarmed else "warn" if ratio >= 0.5 else "ok"
            detail: dict[str, Any] = {"method": "cusum", "direction": worst.direction, "change": worst.change,
                                      "reference_rate": ref_m.mean, "baseline": worst.baseline,
                                      "threshold": worst.threshold, "observations": worst.n}
            if live_m is not None and live_m.n:
                detail["live_rate"] = live_m.mean
            if worst.alarmed_after is not None:
                detail["alarmed_after"] = worst.alarmed_after
            return DriftRow(feature, kind, 1.0 if worst.alarmed else ratio, None, severity, ref_m.n,
                            live_m.n if live_m is not None else 0, detail)

        if self._reward:
            rows.append(row(REWARD, "reward_rate", self._reward, ref.rewards, self.live.rewards))
        for o in sorted(self._offers):
            rows.append(row(o, "offer_rate", self._offers[o], ref.offers.get(o, Moments()), self.live.offers.get(o)))
        return rows

    @property
    def memory_bound(self) -> int:
        """Values held by the monitor's windows and detectors (for tests of the memory bound)."""
        held = sum(w.size_bound for w in (self.reference, self.live, self.last_live) if w is not None)
        return held + len(self._reward) + sum(len(cs) for cs in self._offers.values())
