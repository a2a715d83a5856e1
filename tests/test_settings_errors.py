"""A settings error names where the bad value came from: the file, the environment variable or the option."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kassa.config import load_settings


def _error(monkeypatch: pytest.MonkeyPatch, path: Path | None, env: dict[str, str] | None = None,
           **overrides: object) -> str:
    for name in [n for n in os.environ if n.startswith("KASSA_")]:
        monkeypatch.delenv(name)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        load_settings(path, **overrides)
    return str(exc.value)


def test_a_bad_value_in_the_file_names_the_file_and_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kassa.yaml"
    path.write_text("server:\n  port: notanint\n")
    message = _error(monkeypatch, path)
    assert message.startswith(f"invalid configuration in {path}: ")
    assert "$.server.port" in message


def test_an_unknown_top_level_field_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kassa.yaml"
    path.write_text("srever:\n  port: 1\n")
    assert _error(monkeypatch, path) == f"invalid configuration in {path}: Object contains unknown field `srever`"


def test_a_bad_environment_variable_is_named_not_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "kassa.yaml"
    path.write_text("server:\n  host: 127.0.0.1\n")
    message = _error(monkeypatch, path, {"KASSA_SERVER__PORT": "abc"})
    assert message.startswith("invalid configuration (environment variable KASSA_SERVER__PORT): ")
    assert str(path) not in message


def test_a_bad_option_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    message = _error(monkeypatch, None, **{"server.port": 99999})
    assert message.startswith("invalid configuration (command-line option for server.port): ")


@pytest.mark.parametrize(("env", "message"), [
    # were tracebacks at the first connection (redis-py's ValueError, or int() of the host)
    ({"KASSA_FEATURES__ONLINE_STORE": "redis", "KASSA_FEATURES__REDIS_URL": "localhost:6379"},
     "features.redis_url: 'localhost:6379' is not a Redis URL"),
    ({"KASSA_STATE__BACKEND": "redis", "KASSA_STATE__REDIS_URL": "notaurl"},
     "state.redis_url: 'notaurl' is not a Redis URL"),
    ({"KASSA_STATE__BACKEND": "redis", "KASSA_STATE__REDIS_URL": "rediss://h:6379/0"},
     "state.redis_url: 'rediss://h:6379/0': this connection speaks plain TCP only"),
    ({"KASSA_ROLES__REDIS_URL": "redis://h:abc/0"}, "roles.redis_url: 'redis://h:abc/0': the port is not a number"),
    ({"KASSA_FEATURES__REDIS_URL": "redis://h:6379/x"}, "the database after the last / must be a number"),
])
def test_a_redis_url_kassa_cannot_use_is_refused_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    error = _error(monkeypatch, None, env)
    assert error.startswith("invalid configuration (environment variable KASSA_") and message in error, error


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://:secret@db:6380", "rediss://h:6379/1",
                                 "unix:///run/redis.sock"])
def test_usable_redis_urls_load(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    for name in [n for n in os.environ if n.startswith("KASSA_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("KASSA_FEATURES__REDIS_URL", url)
    assert load_settings(None).features.redis_url == url


@pytest.mark.parametrize(("name", "value"), [
    # 0 s between change-feed reads kept an idle server at ~90 % of a core; a negative poll the same
    ("KASSA_METADATA__POLL_SECONDS", "0"), ("KASSA_LEARN__REGISTRY_POLL_SECONDS", "-1"),
    ("KASSA_DECISION_LOG_FLUSH_SECONDS", "0"), ("KASSA_STATE__FLUSH_MS", "0"), ("KASSA_ROLES__LEASE_TTL_SECONDS", "0"),
    ("KASSA_LEARN__SNAPSHOT_EVERY_SECONDS", "-1"), ("KASSA_FEATURES__BREAKER_FAILURES", "0"),
    ("KASSA_LEARN__LEARNING_RATE", "0"),
])
def test_an_interval_or_count_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    error = _error(monkeypatch, None, {name: value})
    assert error.startswith(f"invalid configuration (environment variable {name}): Expected "), error


def test_a_metadata_url_that_is_not_a_url_is_refused_naming_the_file_and_an_example(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # was taken as a SQLite file called `notaurl` in the current directory: an empty catalog, not a word
    path = tmp_path / "kassa.yaml"
    path.write_text("metadata:\n  url: notaurl\n")
    monkeypatch.chdir(tmp_path)
    message = _error(monkeypatch, path)
    assert message.startswith(f"invalid configuration in {path}: metadata.url: 'notaurl' is not a database URL "
                              "(e.g. postgresql+psycopg://"), message
    assert not (tmp_path / "notaurl").exists()


@pytest.mark.parametrize(("env", "message"), [
    ({"KASSA_METADATA__URL": "/var/lib/kassa/meta.db"}, "metadata.url: '/var/lib/kassa/meta.db' is not a database URL"),
    ({"KASSA_METADATA__URL": "mysql://k@db/kassa"}, "the metadata database is SQLite or PostgreSQL"),
    ({"KASSA_METADATA__URL": "postgresql+psycopg2://k@db/kassa"}, "with psycopg 3: use postgresql+psycopg://"),
    ({"KASSA_METADATA__URL": "postgresql+psycopg://k@db:abc/kassa"}, "metadata.url: 'postgresql+psycopg://k@db:abc/"
                                                                     "kassa': the port is not a number"),
    ({"KASSA_METADATA__URL": "sqlite://"}, "is an in-memory database"),
    # nats-py read a bare word as a host on port 4222: a bus that spooled everything, "no servers available"
    ({"KASSA_EVENTS__NATS_URL": "notaurl"}, "events.nats_url: 'notaurl' is not a NATS URL (nats://"),
    ({"KASSA_EVENTS__NATS_URL": "nats://h:abc"}, "events.nats_url: 'nats://h:abc': the port is not a number"),
    # a traceback once the data dir and its database were made
    ({"KASSA_LEARN__DRIFT_WEBHOOK_URL": "notaurl"}, "learn.drift_webhook_url: 'notaurl' is not an http:// or https://"),
])
def test_a_metadata_nats_or_webhook_url_kassa_cannot_use_is_refused_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    error = _error(monkeypatch, None, env)
    assert error.startswith("invalid configuration (environment variable KASSA_") and message in error, error


@pytest.mark.parametrize(("name", "url"), [
    ("KASSA_METADATA__URL", "postgresql+psycopg://kassa:secret@db:5432/kassa"),
    ("KASSA_METADATA__URL", "postgresql://kassa@db/kassa"),  # SQLAlchemy 2.1's default PostgreSQL driver: psycopg
    ("KASSA_METADATA__URL", "postgresql+psycopg:///kassa?host=/run/postgresql"),
    ("KASSA_METADATA__URL", "sqlite:////var/lib/kassa/kassa.db"),
    ("KASSA_EVENTS__NATS_URL", "nats://127.0.0.1:4222"), ("KASSA_EVENTS__NATS_URL", "tls://user:pw@nats:4222"),
    ("KASSA_LEARN__DRIFT_WEBHOOK_URL", "https://hooks.example.com/kassa-drift"),
])
def test_usable_metadata_nats_and_webhook_urls_load(monkeypatch: pytest.MonkeyPatch, name: str, url: str) -> None:
    for env in [n for n in os.environ if n.startswith("KASSA_")]:
        monkeypatch.delenv(env)
    monkeypatch.setenv(name, url)
    settings = load_settings(None)
    assert url in (settings.metadata.url, settings.events.nats_url, settings.learn.drift_webhook_url)


@pytest.mark.parametrize(("env", "message"), [
    # NATS refused to create the streams ("duplicates window can not be larger then max age"): every process started
    # ready, said "NATS ... unreachable at start" of a NATS that answered, spooled every event for ever and logged
    # "NATS disconnected" twice a second
    ({"KASSA_EVENTS__RETENTION_SECONDS": "3600"}, "events.dedupe_window_seconds (7200) must not exceed "
                                                  "events.retention_seconds (3600)"),
    ({"KASSA_EVENTS__RETENTION_SECONDS": "-5"}, "$.events.retention_seconds"),
    ({"KASSA_EVENTS__DEDUPE_WINDOW_SECONDS": "-1"}, "$.events.dedupe_window_seconds"),
    ({"KASSA_EVENTS__ACK_TIMEOUT_SECONDS": "-1"}, "$.events.ack_timeout_seconds"),  # every publish "timed out"
    ({"KASSA_EVENTS__REPLICAS": "0"}, "$.events.replicas"),
    ({"KASSA_ROLES__INPUT_SETTLE_SECONDS": "-1"}, "$.roles.input_settle_seconds"),
])
def test_event_stream_settings_nats_would_refuse_are_refused_at_load(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str) -> None:
    error = _error(monkeypatch, None, env)
    assert error.startswith("invalid configuration (environment variable KASSA_") and message in error, error


def test_a_retention_that_keeps_the_dedupe_window_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    for env in [n for n in os.environ if n.startswith("KASSA_")]:
        monkeypatch.delenv(env)
    monkeypatch.setenv("KASSA_EVENTS__RETENTION_SECONDS", "86400")
    assert load_settings(None).events.retention_seconds == 86400
    monkeypatch.setenv("KASSA_EVENTS__RETENTION_SECONDS", "3600")
    monkeypatch.setenv("KASSA_EVENTS__DEDUPE_WINDOW_SECONDS", "600")
    assert load_settings(None).events.dedupe_window_seconds == 600


def test_an_unknown_log_level_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # uvicorn raised KeyError: 'loud' in every worker of `kassa serve --workers N`, which the supervisor started
    # again every second, for ever, each with its traceback
    error = _error(monkeypatch, None, {"KASSA_LOG_LEVEL": "loud"})
    assert error.startswith("invalid configuration (environment variable KASSA_LOG_LEVEL): "), error
    assert "$.log_level" in error
    monkeypatch.setenv("KASSA_LOG_LEVEL", "warning")
    assert load_settings(None).log_level == "warning"
