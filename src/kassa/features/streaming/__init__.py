"""The streaming-feature engine (being split into modules; see `kassa.features.streaming.aggregator` for now)."""

from kassa.features.streaming.aggregator import StreamAggregator, StreamProcessor, extract_keys

__all__ = ["StreamAggregator", "StreamProcessor", "extract_keys"]
