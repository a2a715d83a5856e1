"""Degraded modes (issue 15): a circuit breaker in front of Redis, rate-limited warnings, and events that
are acknowledged once durably appended even when the streaming-feature write after it fails."""

from __future__ import annotations

import logging
import secrets
import time

import pytest
import redis
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.degraded import CircuitBreaker, CircuitOpen, RateLimitedWarning
from tests.conftest import PUB, decision_body, order
from tests.services import ThrowawayRedis


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_breaker_opens_after_consecutive_failures_and_one_probe_closes_it():
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker("dep", failures=3, reset_seconds=1.0, clock=clock, on_change=lambda o, n: changes.append((o, n)))
    for _ in range(2):
        b.allow()
        b.failure()
    b.allow()
    b.success()  # a success in between resets the count
    for _ in range(3):
        b.allow()
        b.failure()
    assert b.state == "open"
    with pytest.raises(CircuitOpen):
        b.allow()
    clock.t = 1.5
    b.allow()  # the one probe
    with pytest.raises(CircuitOpen):
        b.allow()  # everyone else still falls back while it is out
    b.failure()
    assert b.state == "open"
    clock.t = 3.0
    b.allow()
    b.success()
    assert b.state == "closed" and b.rejected == 2
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "open"), ("open", "half-open"),
                       ("half-open", "closed")]


def test_available_says_whether_a_call_would_go_ahead_without_taking_the_probe():
    clock = FakeClock()
    b = CircuitBreaker("dep", failures=1, reset_seconds=1.0, clock=clock)
    assert b.available()
    b.allow()
    b.failure()
    assert not b.available()
    clock.t = 1.0
    assert b.available() and b.available()  # asking does not use the probe up
    b.allow()
    assert not b.available()  # the probe is out
    b.success()
    assert b.available()


def test_a_probe_that_never_reports_back_does_not_keep_the_breaker_open_forever():
    clock = FakeClock()
    b = CircuitBreaker("dep", failures=1, reset_seconds=1.0, clock=clock)
    b.allow()
    b.failure()
    clock.t = 1.1
    b.allow()  # probe goes out, is cancelled, never reports
    clock.t = 2.2
    b.allow()  # a new probe may go


def test_rate_limited_warnings_write_one_line_per_interval_with_the_count_held_back(caplog):
    clock = FakeClock()
    warn = RateLimitedWarning(logging.getLogger("kassa.test"), "redis", interval=10.0, clock=clock)
    caplog.set_level(logging.WARNING)
    for i in range(1000):
        clock.t = i * 0.01  # 1000 failures in 10 s
        warn("read failed", ConnectionError("refused"))
    clock.t = 10.5
    warn("read failed", ConnectionError("refused"))
    lines = [r for r in caplog.records if r.name == "kassa.test"]
    assert len(lines) == 2
    assert lines[0].exc_info is not None and lines[1].exc_info is None  # one traceback, then none
    assert "999 similar" in lines[1].getMessage()


# --------------------------------------------------------------------------- a real Redis, killed
@pytest.fixture
def outage_redis():
    server = ThrowawayRedis().start()
    yield server
    server.kill()


def test_redis_killed_decisions_fall_back_fast_events_are_acked_and_all_heals(
        tmp_path, catalog_file, features_file, outage_redis, caplog):
    prefix = f"kassa-test-{secrets.token_hex(4)}"
    settings = load_settings(None, data_dir=str(tmp_path / "d"), catalog_file=str(catalog_file),
                             publishable_key=PUB, **{
                                 "features.definitions_file": str(features_file), "features.online_store": "redis",
                                 "features.redis_url": outage_redis.url, "features.key_prefix": prefix})
    kassa = Kassa(settings)
    caplog.set_level(logging.WARNING)
    raw = redis.Redis.from_url(outage_redis.url)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as c:
        def order_event(i: int) -> dict:
            return {"event_id": f"o-{i}", "type": "order", "customer": {"id": "c-out"},
                    "order": order(order_id=f"O-{i}")}

        assert c.post("/v1/events", json={"events": [order_event(0)]}).status_code == 200
        assert c.post("/v1/decisions", json=decision_body(customer="c-out")).json()["fallback"] is False
        outage_redis.kill()
        timings = []
        for i in range(1, 61):
            t0 = time.perf_counter()
            d = c.post("/v1/decisions", json=decision_body(customer="c-out"))
            timings.append(time.perf_counter() - t0)
            assert d.status_code == 200 and d.json()["fallback"] is True
            ack = c.post("/v1/events", json={"events": [order_event(i)]})
            assert ack.status_code == 200 and ack.json()["accepted"] == 1  # durably appended: acknowledged
        assert kassa.event_log.count() == 61
        timings.sort()
        assert timings[len(timings) // 2] < 0.02, timings  # the breaker answers without a connection attempt
        assert kassa.store.breaker.state in ("open", "half-open")  # type: ignore[attr-defined]
        metrics = c.get("/metrics").text
        assert 'kassa_circuit_open{dependency="redis"} 1.0' in metrics
        assert c.get("/readyz").status_code == 200  # on purpose: docs/deploy.md, "When a dependency is down"
        assert kassa.stream is not None and kassa.stream.pending_rows > 0
        assert "kassa_stream_backlog_rows" in metrics
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) <= 12, [r.getMessage() for r in warnings]  # not one per request
        assert sum(r.exc_info is not None for r in warnings) <= 3

        outage_redis.start()
        t_back = time.monotonic()
        while c.post("/v1/decisions", json=decision_body(customer="c-out")).json()["fallback"]:
            assert time.monotonic() - t_back < 5.0, "decisions did not recover within 5 s"
            time.sleep(0.05)
        # The restarted Redis is empty: the row there now was written from the backlog. (`pending_rows` drops
        # when a flush takes the rows, before their write is answered: wait for the row itself.)
        while kassa.stream.pending_rows or not raw.keys(f"{prefix}:customer:*c-out*"):
            assert time.monotonic() - t_back < 5.0, "the stream backlog was not written within 5 s"
            time.sleep(0.05)
    raw.close()


OFFER_VIEWS = """
entities:
  - {name: customer, join_key: customer_id}
  - {name: offer, join_key: offer_id}
views:
  - name: offer_performance
    kind: stream
    entity: offer
    source: {events: [impression, accept]}
    ttl: 1d
    fields:
      - {name: impressions_1h, dtype: int, agg: sum, of: type=impression, window: 1h, default: 0}
"""


def test_redis_down_at_start_with_offer_views_starts_serves_and_heals(tmp_path, catalog_file, outage_redis, caplog):
    # The offer feature cache subscribed and loaded at start without a guard: a Redis down when the server
    # started was "Application startup failed" and a traceback, against "never fails the page".
    defs = tmp_path / "features.yaml"
    defs.write_text(OFFER_VIEWS)
    prefix = f"kassa-test-{secrets.token_hex(4)}"
    settings = load_settings(None, data_dir=str(tmp_path / "d"), catalog_file=str(catalog_file),
                             publishable_key=PUB, **{
                                 "features.definitions_file": str(defs), "features.online_store": "redis",
                                 "features.redis_url": outage_redis.url, "features.key_prefix": prefix})
    outage_redis.kill()
    kassa = Kassa(settings)
    assert kassa.offer_cache is not None
    caplog.set_level(logging.WARNING)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as c:
        assert c.get("/readyz").status_code == 200
        d = c.post("/v1/decisions", json=decision_body(customer="c-down"))
        assert d.status_code == 200 and d.json()["offers"]
        assert any("Redis unreachable at start" in r.getMessage() for r in caplog.records)
        outage_redis.start()
        raw = redis.Redis.from_url(outage_redis.url)
        t0 = time.monotonic()
        while not kassa.offer_cache._subscribed:  # the cache subscribed and loaded once Redis answered
            assert time.monotonic() - t0 < 10.0, "the offer feature cache did not recover"
            time.sleep(0.05)
        assert raw.pubsub_numsub(kassa.store.channel)[0][1] >= 1  # type: ignore[attr-defined]
        while c.post("/v1/decisions", json=decision_body(customer="c-down")).json()["fallback"]:
            assert time.monotonic() - t0 < 10.0, "decisions did not recover"
            time.sleep(0.05)
        raw.close()


def test_redis_state_down_logs_a_few_lines_and_exports_its_breaker(tmp_path, catalog_file, outage_redis,
                                                                                caplog):
    # With state.backend redis and Redis down, the shared reward joiner (a step every 0.1 s) logged a WARNING
    # with a full traceback per step, and the breaker a line each time it reopened (every retry_seconds):
    # 371 joiner tracebacks and 38 breaker lines in 20 s from two workers (5,862 log lines).
    settings = load_settings(None, data_dir=str(tmp_path / "d"), catalog_file=str(catalog_file),
                             publishable_key=PUB, **{"state.backend": "redis", "state.redis_url": outage_redis.url,
                                                     "state.key_prefix": f"kassa-test-{secrets.token_hex(4)}"})
    outage_redis.kill()
    kassa = Kassa(settings)
    caplog.set_level(logging.WARNING, logger="kassa.state")
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as c:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            d = c.post("/v1/decisions", json=decision_body(customer="c-down"))
            assert d.status_code == 200 and d.json()["fallback"] is True
            time.sleep(0.05)
        lines = [r for r in caplog.records if r.name == "kassa.state" and r.levelno >= logging.WARNING]
        assert 1 <= len(lines) <= 4, [r.getMessage() for r in lines]
        assert sum(r.exc_info is not None for r in lines) <= 1
        # the state backend's breaker is exported (the `redis` one is the online store's, not used here)
        assert 'kassa_circuit_open{dependency="redis_state"} 1.0' in c.get("/metrics").text
        outage_redis.start()
        t_back = time.monotonic()
        while c.post("/v1/decisions", json=decision_body(customer="c-down")).json()["fallback"]:
            assert time.monotonic() - t_back < 5.0, "decisions did not recover within 5 s"
            time.sleep(0.05)
        assert 'kassa_circuit_open{dependency="redis_state"} 0.0' in c.get("/metrics").text
