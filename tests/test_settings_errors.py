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
