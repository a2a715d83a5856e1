"""Drift detection: is live traffic still the traffic the model learned from, and does it still pay?

Kassa reports three kinds of drift of a placement's traffic between a reference window (the previous
window, or a fixed one such as the training window) and the live window: **feature drift** per logged
feature (PSI, and KS for numeric features), **prediction drift** of the policy's top-slot probability
and first choice, and **reward-rate drift** of the reward per decision and of each offer's reward per
impression. The modules, one concept each (each imports only modules listed before it):

* `config` — severities, special names and `DriftConfig` (thresholds, window sizes);
* `statistics` — PSI and its chi-square significance, binned PSI, two-sample KS, Welch's z;
* `cusum` — the reward-rate detector (multi-chart CUSUM, its threshold and guarantee);
* `window` — the bounded summary of one window of decisions and outcomes (`Window`);
* `report` — `DriftRow` and `DriftReport` (JSON and table forms);
* `distribution` — feature and prediction rows of one window against another;
* `offline` — one-off comparisons from the decision log (``kassa drift``: `compare`,
  `window_from_decisions`);
* `metrics` — Prometheus metrics (`DriftMetrics`); `alerts` — the log and webhook hook (`AlertHook`);
* `monitor` — the streaming monitor of one placement (`DriftMonitor`);
* `watch` — one serving process's monitors (`DriftWatch`).

Code inside Kassa imports from those modules. This package re-exports only the embedding API shown in
``docs/drift.md``: `DriftConfig`, `DriftMonitor`, `DriftMetrics`, `AlertHook`, `compare` and
`window_from_decisions`.
"""

from kassa.monitor.drift.alerts import AlertHook
from kassa.monitor.drift.config import DriftConfig
from kassa.monitor.drift.metrics import DriftMetrics
from kassa.monitor.drift.monitor import DriftMonitor
from kassa.monitor.drift.offline import compare, window_from_decisions

__all__ = ["AlertHook", "DriftConfig", "DriftMetrics", "DriftMonitor", "compare", "window_from_decisions"]
