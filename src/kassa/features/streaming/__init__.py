"""The streaming-feature engine: windowed aggregates of the event log per entity, kept fresh in the online store.

This package owns the ``stream`` feature views at run time: how an event becomes updates of entity rows
(`StreamAggregator`), and the worker that tails the durable event log, applies events, writes the
changed rows to the online store and checkpoints its position (`StreamProcessor`). The modules, one
concept each (each imports only modules listed before it):

* `paths` — what a field's ``of`` reads from an event (`compile_path`);
* `keys` — the entity keys an event updates (`extract_keys`) and its event time (`event_time`);
* `fields` — one field's plan and the reader that computes its value from the live buckets;
* `plan` — how a view's definition becomes bucket operations (`plan_view`);
* `aggregator` — the windowed state and its exactness contract (`StreamAggregator`);
* `processor` — the log tail, online-store writes and checkpoints (`StreamProcessor`).

Code inside Kassa imports from those modules; this package re-exports only the two engine classes.
"""

from kassa.features.streaming.aggregator import StreamAggregator
from kassa.features.streaming.processor import StreamProcessor

__all__ = ["StreamAggregator", "StreamProcessor"]
