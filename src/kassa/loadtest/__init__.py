"""Load generation: `kassa loadtest`, its profiles, report and capacity plan, and the benchmarks' client.

Modules: :mod:`~kassa.loadtest.client` (a low-overhead HTTP/1.1 keep-alive pool),
:mod:`~kassa.loadtest.openloop` (the single-process open-loop runner the benchmarks use),
:mod:`~kassa.loadtest.schedule` (fixed/Poisson arrival times with a ramp), :mod:`~kassa.loadtest.profiles`
(YAML scale profiles), :mod:`~kassa.loadtest.mix` (the request mix and its bytes), :mod:`~kassa.loadtest.idle`
(idle keep-alive connections), :mod:`~kassa.loadtest.worker` (one generator process),
:mod:`~kassa.loadtest.runner` (several processes, validity and the SLO verdict), :mod:`~kassa.loadtest.hist`
(HDR histograms), :mod:`~kassa.loadtest.report` (the HTML report), :mod:`~kassa.loadtest.plan` (capacity
plan) and :mod:`~kassa.loadtest.cli` (the commands). Every latency is timed from the request's *intended*
send time, so a stalling server cannot hide its stalls by slowing the generator down.
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
