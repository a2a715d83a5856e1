"""Load generation for Kassa's benchmarks.

Owns the low-overhead HTTP/1.1 keep-alive client (:mod:`kassa.loadtest.client`) and the open-loop
runner that measures latency from each request's *intended* send time, so a stalling server cannot
hide its stalls by slowing the generator down (:mod:`kassa.loadtest.openloop`).
"""

from kassa.loadtest.client import ConnectionPool, ProtocolError, RequestTimeout
from kassa.loadtest.openloop import OpenLoopResult, arrival_offsets, run_open_loop

__all__ = [
    "ConnectionPool",
    "OpenLoopResult",
    "ProtocolError",
    "RequestTimeout",
    "arrival_offsets",
    "run_open_loop",
]
