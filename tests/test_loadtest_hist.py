"""The load test's HDR summary percentiles: nearest rank, never a rank below the one the percentile names."""

from __future__ import annotations

import numpy as np
import pytest

from kassa.loadtest import hist


@pytest.mark.parametrize(("n", "q", "rank"), [(507, 99.9, 507), (507, 99.0, 502), (1020, 99.0, 1010),
                                              (1000, 99.9, 999), (100, 99.0, 99), (3, 50.0, 2), (1, 99.9, 1)])
def test_summary_percentiles_are_the_nearest_rank(n: int, q: float, rank: int) -> None:
    # Latencies of 1, 2, ..., n ms: the value of rank r is r ms (HDR rounds it up by less than 0.1 %).
    h = hist.from_seconds(np.arange(1, n + 1) / 1e3)
    value_ms = hist.value_at_percentile(h, q) / 1e3
    assert rank <= value_ms < rank * 1.001, (n, q, value_ms)


def test_the_p999_of_507_latencies_is_the_slowest() -> None:
    # hdrh rounded the rank 506.49 to 506: the P99.9 (506 ms) was below the slowest (507 ms) it stands for.
    latencies = np.arange(1, 508) / 1e3
    s = hist.summary_ms(hist.from_seconds(latencies), float(latencies.max()))
    assert s["p999"] is not None and s["max"] == 507.0 and s["p999"] >= 507.0
    assert s["p99"] is not None and s["p99"] >= 502.0
