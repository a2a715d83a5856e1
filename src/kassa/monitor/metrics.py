"""Prometheus metrics of one Kassa process, in a registry of its own (no hidden globals)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kassa.degraded import CircuitBreaker

_log = logging.getLogger("kassa.degraded")

_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
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
        self.errors = Counter("kassa_http_errors", "Problem responses", ["status"], registry=r)
        self.learned = Counter("kassa_learned_examples", "Examples learned", ["placement"], registry=r)
        self.pending = Gauge("kassa_pending_decisions", "Decisions waiting for their reward window", registry=r)
        self.model_swaps = Gauge("kassa_model_swaps", "Model snapshots published", registry=r)
        self.feature_defaults = Counter(
            "kassa_feature_defaults", "Feature views served as defaults (missing or stale)", ["view"], registry=r
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
        self._default_children: dict[str, Counter] = {}
        self._children: dict[tuple[str, bool], tuple[Counter, Histogram]] = {}

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

    def observe_feature_default(self, view: str) -> None:
        child = self._default_children.get(view)
        if child is None:
            child = self._default_children[view] = self.feature_defaults.labels(view)
        child.inc()

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
