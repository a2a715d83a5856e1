"""Prometheus metrics of one Kassa process, in a registry of its own (no hidden globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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

    def render(self) -> bytes:
        return generate_latest(self.registry)
