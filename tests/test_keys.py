"""API keys across processes (issue 15): created and revoked keys reach a running server within a second,
a revoked key stays revoked across restarts (also when it is still in the settings), `keys revoke` takes
the id `keys list` prints, and each key has its own rate limit (429 + Retry-After)."""

from __future__ import annotations

import logging
import time

import pytest
from starlette.testclient import TestClient
from typer.testing import CliRunner

from kassa.api.app import create_app
from kassa.app import Kassa
from kassa.cli import app as cli
from kassa.config import load_settings
from kassa.db import make_engine
from kassa.keys import AmbiguousKeyId, KeyInfo, KeyStore, RateLimiter
from tests.conftest import ADMIN, PUB, decision_body
from tests.test_api import assert_problem


def other_process_keys(kassa: Kassa) -> KeyStore:
    """What `kassa keys ...` uses: its own engine on the same metadata DB."""
    return KeyStore(make_engine(kassa.settings.data_path / "kassa.db"))


def until(predicate, limit: float = 1.0) -> float:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < limit, f"not within {limit} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_key_created_elsewhere_works_in_a_running_server_within_a_second(client, kassa):
    key = other_process_keys(kassa).create("admin", "ops")
    h = {"Authorization": f"Bearer {key}"}
    until(lambda: client.get("/v1/offers", headers=h).status_code == 200)


def test_a_key_revoked_elsewhere_stops_working_within_a_second_and_after_a_restart(settings, clock):
    first = Kassa(settings, clock=clock)
    h = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(create_app(first)) as c:
        assert c.get("/v1/offers", headers=h).status_code == 200
        cli_keys = other_process_keys(first)
        admin_id = next(k["id"] for k in cli_keys.list() if k["kind"] == "admin")
        assert cli_keys.revoke(admin_id)  # the id `keys list` prints
        until(lambda: c.get("/v1/offers", headers=h).status_code == 401)
    # ADMIN is still in the settings (KASSA_ADMIN_KEY): the restart must not un-revoke it
    with TestClient(create_app(Kassa(settings, clock=clock))) as c:
        assert_problem(c.get("/v1/offers", headers=h), 401)


def test_a_revoked_settings_key_is_refused_with_a_warning_naming_the_setting(settings, clock, caplog):
    Kassa(settings, clock=clock).keys.revoke(ADMIN)
    caplog.set_level(logging.WARNING, "kassa.keys")
    kassa = Kassa(settings, clock=clock)
    assert kassa.keys.lookup(ADMIN) is None
    assert any("KASSA_ADMIN_KEY" in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)


def test_keys_revoke_on_the_command_line_takes_the_listed_id(tmp_path):
    data = str(tmp_path / "d")
    runner = CliRunner()
    created = runner.invoke(cli, ["keys", "create", "secret", "--name", "srv", "--data-dir", data])
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    listed = runner.invoke(cli, ["keys", "list", "--data-dir", data])
    store = KeyStore(make_engine(tmp_path / "d" / "kassa.db"))
    key_id = store.list()[0]["id"]
    assert key_id in listed.output
    revoked = runner.invoke(cli, ["keys", "revoke", key_id, "--data-dir", data])
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    store.reload()
    assert store.lookup(key) is None
    assert runner.invoke(cli, ["keys", "revoke", "0123456789ab", "--data-dir", data]).exit_code == 1


@pytest.mark.parametrize(("given", "stored"), [
    ("https://shop.example.com", "https://shop.example.com"),
    ("https://shop.example.com/", "https://shop.example.com"),
    ("HTTPS://Shop.Example.com:8443", "https://shop.example.com:8443"),
    ("http://localhost:3000", "http://localhost:3000"),
])
def test_key_origins_are_stored_as_browsers_send_them(kassa, client, given, stored):
    key = kassa.keys.create("publishable", "shop", [given])
    assert list(kassa.keys.lookup(key).origins) == [stored]
    r = client.post("/v1/decisions", json=decision_body(),
                    headers={"Authorization": f"Bearer {key}", "Origin": stored})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("bad", ["shop.example.com", "https://shop.example.com/checkout", "not a url", "https://",
                                 "*"])
def test_an_origin_no_browser_sends_is_refused_when_the_key_is_created(kassa, tmp_path, bad):
    # was stored as given: the key then refused every request from the store with 403 "origin not allowed"
    from kassa.keys import InvalidOrigin

    with pytest.raises(InvalidOrigin, match="scheme://host"):
        kassa.keys.create("publishable", "shop", [bad])
    data = str(tmp_path / "d")
    result = CliRunner().invoke(cli, ["keys", "create", "publishable", "--origin", bad, "--data-dir", data])
    assert result.exit_code == 2 and "scheme://host" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_an_id_prefix_that_matches_several_keys_is_refused(kassa):
    from sqlalchemy import insert

    from kassa.db import api_keys_table

    with kassa.db.begin() as conn:
        for tail in ("0", "1"):
            conn.execute(insert(api_keys_table).values(key_hash="abcdef01" + tail * 56, kind="secret", name=tail,
                                                       origins="[]", created_at=0.0, revoked_at=None))
    with pytest.raises(AmbiguousKeyId):
        kassa.keys.resolve("abcdef01")
    assert kassa.keys.resolve("abcdef01" + "1" * 4) == "abcdef01" + "1" * 56


def test_each_key_has_its_own_token_bucket():
    now = [0.0]
    limiter = RateLimiter({"publishable": 10.0, "admin": 0.0}, clock=lambda: now[0])
    a, b = KeyInfo("publishable", "a", (), "a" * 64), KeyInfo("publishable", "b", (), "b" * 64)
    assert all(limiter.retry_after(a) == 0 for _ in range(20))  # the 2 s burst
    assert limiter.retry_after(a) == 1
    assert limiter.retry_after(b) == 0  # another key is not affected
    now[0] = 0.5
    assert sum(limiter.retry_after(a) == 0 for _ in range(10)) == 5  # refilled at 10/s
    admin = KeyInfo("admin", "x", (), "c" * 64)
    assert all(limiter.retry_after(admin) == 0 for _ in range(1000))  # 0 = unlimited


def test_a_key_over_its_rate_limit_gets_429_with_retry_after(tmp_path, catalog_file, clock):
    settings = load_settings(None, data_dir=str(tmp_path / "d"), catalog_file=str(catalog_file),
                             publishable_key=PUB, **{"server.rate_limits": {"publishable": 2.0}})
    kassa = Kassa(settings, clock=clock)
    other = kassa.keys.create("publishable", "other shop")
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as c:
        statuses = [c.post("/v1/decisions", json=decision_body()).status_code for _ in range(8)]
        assert statuses[:4] == [200] * 4 and 429 in statuses
        r = c.post("/v1/decisions", json=decision_body())
        assert_problem(r, 429, "Authorization")
        assert int(r.headers["retry-after"]) >= 1
        ok = c.post("/v1/decisions", json=decision_body(), headers={"Authorization": f"Bearer {other}"})
        assert ok.status_code == 200


def test_setting_one_kinds_rate_limit_keeps_the_others_defaults(tmp_path, monkeypatch):
    # `rate_limits: {admin: 10}` (or KASSA_SERVER__RATE_LIMITS__ADMIN) replaced the whole dict: publishable
    # and secret keys became unlimited
    monkeypatch.setenv("KASSA_SERVER__RATE_LIMITS__ADMIN", "10")
    limits = load_settings(None, data_dir=str(tmp_path)).server.rate_limits
    assert (limits.publishable, limits.secret, limits.admin) == (5_000.0, 1_000.0, 10.0)
    kassa = Kassa(load_settings(None, data_dir=str(tmp_path / "d"), **{"server.rate_limits": {"secret": 3}}))
    assert kassa.keys.limiter.rates == {"publishable": 5_000.0, "secret": 3.0, "admin": 100.0}


@pytest.mark.parametrize(("limits", "message"), [
    ({"publishabel": 100}, "unknown field `publishabel`"),  # a misspelt kind was ignored: no limit at all
    ({"publishable": -5}, ">= 0"),
])
def test_a_rate_limit_that_cannot_apply_is_a_configuration_error(tmp_path, limits, message):
    with pytest.raises(SystemExit, match=message):
        load_settings(None, data_dir=str(tmp_path), **{"server.rate_limits": limits})


def test_keys_list_and_revoke_refuse_a_data_dir_without_kassa_data(tmp_path):
    # a mistyped --data-dir made a fresh database there and `keys list` showed an empty table
    missing = tmp_path / "typo"
    for args in (["keys", "list"], ["keys", "revoke", "abc"]):
        r = CliRunner().invoke(cli, [*args, "--data-dir", str(missing)])
        assert r.exit_code == 2 and "no Kassa data in" in " ".join(r.output.split()), r.output
    assert not missing.exists()


def test_keys_list_shows_a_long_origin_whole_on_a_narrow_console(tmp_path):
    data = str(tmp_path / "data")
    origin = "https://checkout.a-rather-long-shop-name.example.com"
    r = CliRunner().invoke(cli, ["keys", "create", "publishable", "--origin", origin, "--data-dir", data])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["keys", "list", "--data-dir", data], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    cells = "".join(line.split("│")[4].strip() for line in r.output.splitlines() if line.count("│") == 6)
    assert origin in cells, r.output
