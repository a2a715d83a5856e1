"""Prometheus metrics of one Kassa process, in a registry of its own (no hidden globals).

Two kinds of series. Counters and histograms the services update as things happen (decisions, events,
learned examples, per-offer impressions, accepts and joined reward). And a `LiveState` read once per
scrape from the services themselves (model swaps, the serving versions, pending decisions, reward-join
lag, feature freshness): what a service already counts is not counted twice.

Per-offer series carry only offer ids of the catalog (anything else is counted as ``other``), so an event
naming made-up offers cannot grow the label set. The ``*_created`` series prometheus_client adds to every
counter and histogram are dropped by this registry alone (`_NoCreatedRegistry`): nothing global is changed
for other registries in the process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kassa.events.join import JoinedExample

from kassa.degraded import CircuitBreaker

_log = logging.getLogger("kassa.degraded")

_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
OTHER_OFFER = "other"


@dataclass(frozen=True, slots=True)
class FeatureFreshness:
    view: str
    age_seconds: float | None  # None: no value logged yet
    target_seconds: float


@dataclass(slots=True)
class LiveState:
    """What the services know at scrape time; `Kassa.live_state` builds it."""

    model_swaps: int = 0
    pending_decisions: int = 0
    join_lag_seconds: float = 0.0
    serving: list[tuple[str, str, str]] = field(default_factory=list)  # (placement, stage, version)
    freshness: list[FeatureFreshness] = field(default_factory=list)


class _NoCreatedRegistry(CollectorRegistry):
    """A registry whose exposition leaves out the ``*_created`` samples (one per counter and histogram
    child: they double the series count and no dashboard or alert of Kassa reads them)."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class _LiveCollector(Collector):
    def __init__(self, source: Callable[[], LiveState | None]) -> None:
        self.source = source

    def collect(self) -> Iterable[Metric]:
        state = self.source()
        if state is None:
            return []
        swaps = CounterMetricFamily("kassa_model_swaps", "Serving-set changes (publishes, promotions, rollbacks)")
        swaps.add_metric([], state.model_swaps)
        pending = GaugeMetricFamily("kassa_pending_decisions", "Decisions waiting for their reward window")
        pending.add_metric([], state.pending_decisions)
        lag = GaugeMetricFamily("kassa_reward_join_lag_seconds",
                                "How long the oldest decision whose reward window has ended waits to be joined")
        lag.add_metric([], state.join_lag_seconds)
        serving = GaugeMetricFamily("kassa_serving_model_info", "The model version serving each placement "
                                    "(1 per placement and stage)", labels=["placement", "stage", "version"])
        for placement, stage, version in state.serving:
            serving.add_metric([placement, stage, version], 1)
        age = GaugeMetricFamily("kassa_feature_age_seconds", "Age of a feature view's newest value "
                                "(views with no value yet are left out)", labels=["view"])
        target = GaugeMetricFamily("kassa_feature_freshness_target_seconds", "A feature view's freshness target",
                                   labels=["view"])
        for f in state.freshness:
            target.add_metric([f.view], f.target_seconds)
            if f.age_seconds is not None:
                age.add_metric([f.view], f.age_seconds)
        return [swaps, pending, lag, serving, age, target]


class _CounterCollector(Collector):
    """A counter whose value another component keeps (read at each scrape); with ``label``, one series per
    key of the dict ``value`` returns."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float],
                 label: str | None = None, values: Callable[[], dict[str, float]] | None = None) -> None:
        self.name, self.documentation, self.value = name, documentation, value
        self.label, self.values = label, values

    def collect(self) -> Iterable[Metric]:
        if self.label is not None and self.values is not None:
            family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
            for key, value in self.values().items():
                family.add_metric([key], value)
            return [family]
        family = CounterMetricFamily(self.name, self.documentation)
        family.add_metric([], self.value())
        return [family]


class Metrics:
    def __init__(self) -> None:
        self.registry = r = _NoCreatedRegistry()
        self.decisions = Counter("kassa_decisions", "Decisions served", ["placement", "fallback"], registry=r)
        self.decision_seconds = Histogram(
            "kassa_decision_seconds", "Server-side decision time", ["placement"], buckets=_BUCKETS, registry=r
        )
        self.events = Counter("kassa_events", "Events accepted", ["type"], registry=r)
        self.duplicates = Counter("kassa_event_duplicates", "Duplicate events ignored", registry=r)
        self.unknown_decisions = Counter(
            "kassa_event_unknown_decisions",
            "Accepted outcome events whose decision id is unknown or past its reward window (no reward joins)",
            registry=r,
        )
        # Events and decision records acknowledged from the local spool and not yet in JetStream (0 embedded).
        self.spool_depth = Gauge("kassa_event_spool_depth", "Messages in the local spool awaiting JetStream",
                                 registry=r)
        self.errors = Counter("kassa_http_errors", "Problem responses", ["status"], registry=r)
        self.learned = Counter("kassa_learned_examples", "Examples learned by the online learner", ["placement"],
                               registry=r)
        self.feature_defaults = Counter(
            "kassa_feature_defaults", "Feature views served as defaults (missing or stale)", ["view"], registry=r
        )
        self.impressions = Counter("kassa_offer_impressions", "Offers shown in a decision", ["placement", "offer"],
                                   registry=r)
        self.accepts = Counter("kassa_offer_accepts", "Accept events per offer", ["offer"], registry=r)
        self.joined = Counter("kassa_offer_joined", "Shown offers whose reward window closed (joined examples)",
                              ["placement", "offer"], registry=r)
        # A gauge, not a counter: a refund's reward weight may be negative.
        self.reward = Gauge("kassa_offer_reward", "Sum of joined reward per shown offer", ["placement", "offer"],
                            registry=r)
        # The catalog's offer ids, read per observation (`Kassa` points it at the live snapshot).
        self.known_offers: Callable[[], Container[str]] = lambda: ()
        self.live: Callable[[], LiveState | None] = lambda: None
        r.register(_LiveCollector(lambda: self.live()))
        # State writes of served decisions given up after the state backend stayed unavailable past its retry
        # window (`RedisDecisionState.dropped`; 0 on the embedded backend, which writes locally).
        self.dropped_state_writes: Callable[[], int] = lambda: 0
        # Refund events the reward joiner applied: `taken_back` changed an open decision's reward, `unmatched`
        # found no open conversion of its order (past the reward window, or none): the learner keeps that reward.
        # `taken_back_on_order` counts orders that came after such a refund (held) and were taken back at once.
        self.refunds: Callable[[], dict[str, float]] = lambda: {}
        r.register(_CounterCollector("kassa_refunds", "Refund events by what they did to the reward join",
                                     lambda: 0.0, "result", lambda: self.refunds()))
        r.register(_CounterCollector("kassa_state_writes_dropped", "State writes of served decisions (idempotency, "
                                     "frequency caps, profiles, reward join) given up while the state backend "
                                     "was unavailable", lambda: self.dropped_state_writes()))
        # Rollout safety (issue 17): what the shadow queue dropped, every guardrail check and its outcome
        # (pass, or the guardrail breached), rollbacks by reason (a guardrail, or manual), learner restarts.
        self.shadow_dropped = Counter(
            "kassa_shadow_dropped", "Shadow requests dropped because the shadow queue was full", ["placement"],
            registry=r,
        )
        self.guardrail_evaluations = Counter(
            "kassa_guardrail_evaluations", "Canary guardrail checks by outcome (pass, latency, error_rate, reward)",
            ["placement", "outcome"], registry=r,
        )
        self.rollbacks = Counter(
            "kassa_rollbacks", "Production or canary rollbacks by reason (latency, error_rate, reward, manual)",
            ["placement", "reason"], registry=r,
        )
        self.learner_restarts = Counter(
            "kassa_learner_restarts", "Online learner restarts from a version it did not publish (promotion, "
            "rollback)", ["placement"], registry=r,
        )
        self.stream_backlog = Gauge(
            "kassa_stream_backlog_rows",
            "Streaming-feature rows changed by acknowledged events and not yet written to the online store",
            registry=r,
        )
        self.stream_lag_events = Gauge(
            "kassa_stream_lag_events", "Event-log rows the streaming-feature tail has not read yet", registry=r
        )
        self.circuit_open = Gauge(
            "kassa_circuit_open", "1 while a dependency's circuit breaker is open or half-open", ["dependency"],
            registry=r,
        )
        self.circuit_rejected = Counter(
            "kassa_circuit_rejected", "Calls failed fast because the dependency's breaker was open", ["dependency"],
            registry=r,
        )
        self.snapshots_held = Counter(
            "kassa_snapshots_held", "Online snapshots not published because OPE on recent traffic found them "
            "worse than what serves or had too small an ESS (issue 14)", ["placement", "reason"], registry=r,
        )
        self.learner_fenced = Counter(
            "kassa_learner_fenced", "Online snapshots the registry refused because another learner took the "
            "placement's lease over since (the refused learner exits 75)", ["placement"], registry=r,
        )
        self._default_children: dict[str, Counter] = {}
        self._children: dict[tuple[str, bool], tuple[Counter, Histogram]] = {}
        self._shown: dict[tuple[str, str], Counter] = {}
        self._event_children: dict[str, Counter] = {}  # per event type, looked up once (~30 events/request)
        self._joined: dict[tuple[str, str], Counter] = {}  # (placement, offer label)
        self._reward: dict[tuple[str, str], Gauge] = {}

    def observe_decision(self, placement: str, fallback: bool, seconds: float) -> None:
        # Label lookups cost more than the increment: keep the children per (placement, fallback).
        pair = self._children.get((placement, fallback))
        if pair is None:
            pair = self._children[(placement, fallback)] = (
                self.decisions.labels(placement, "true" if fallback else "false"),
                self.decision_seconds.labels(placement),
            )
        pair[0].inc()
        pair[1].observe(seconds)

    def observe_shown(self, placement: str, offers: Sequence[str]) -> None:
        """The offers of one decision (engine ids, always catalog offers)."""
        shown = self._shown
        for offer in offers:
            child = shown.get((placement, offer))
            if child is None:
                child = shown[(placement, offer)] = self.impressions.labels(placement, offer)
            child.inc()

    def observe_event(self, event_type: str, offer_id: str | None) -> None:
        child = self._event_children.get(event_type)
        if child is None:
            child = self._event_children[event_type] = self.events.labels(event_type)
        child.inc()
        if event_type == "accept" and offer_id is not None:
            self.accepts.labels(self._offer_label(offer_id)).inc()

    def observe_learned(self, placement: str, n: int) -> None:
        self.learned.labels(placement).inc(n)

    def observe_joined(self, examples: Sequence[JoinedExample]) -> None:
        # Every example of a closed decision passes here (3 per decision in `kassa learn`): the children are
        # kept per (placement, offer label), as `labels()` costs several times the increment.
        known = self.known_offers()
        joined, rewards = self._joined, self._reward
        for ex in examples:
            key = (ex.placement, ex.offer_id if ex.offer_id in known else OTHER_OFFER)
            child = joined.get(key)
            if child is None:
                child = joined[key] = self.joined.labels(*key)
            child.inc()
            if ex.reward:
                gauge = rewards.get(key)
                if gauge is None:
                    gauge = rewards[key] = self.reward.labels(*key)
                gauge.inc(ex.reward)

    def observe_feature_default(self, view: str) -> None:
        child = self._default_children.get(view)
        if child is None:
            child = self._default_children[view] = self.feature_defaults.labels(view)
        child.inc()

    def _offer_label(self, offer_id: str) -> str:
        return offer_id if offer_id in self.known_offers() else OTHER_OFFER

    def watch_breaker(self, breaker: CircuitBreaker, dependency: str) -> None:
        """Export a breaker's state, and log each change of it (one line, not one per request)."""
        gauge = self.circuit_open.labels(dependency)
        gauge.set(0)
        self.circuit_rejected.labels(dependency)
        total = self.circuit_rejected.labels(dependency)
        seen = [0]

        def changed(old: str, new: str) -> None:
            gauge.set(0 if new == "closed" else 1)
            total.inc(breaker.rejected - seen[0])
            seen[0] = breaker.rejected
            if new == "open" and old == "closed":
                _log.warning("%s: circuit open after %d failures; failing fast, probing every %.1f s",
                             dependency, breaker.consecutive, breaker.reset_seconds)
            elif new == "closed":
                _log.warning("%s: circuit closed; the dependency answers again", dependency)

        breaker.on_change = changed

    def render(self) -> bytes:
        return generate_latest(self.registry)
