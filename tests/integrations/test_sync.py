"""Catalog sync into the real SQLite offer catalog: paging, resume after a kill, incremental runs, the CLI."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from kassa.catalog.store import Catalog, SqlCatalogStore
from kassa.cli import app
from kassa.db import make_engine
from kassa.integrations.base import AuthError
from kassa.integrations.shopify import ShopifyConnector
from kassa.integrations.sync import SyncCursor, sync_catalog
from kassa.integrations.woocommerce import WooCommerceConnector
from tests.integrations.conftest import Sleeps
from tests.integrations.fakes.shopify import ShopifyFake, product_node
from tests.signals import stop_when


@pytest.fixture
def store(tmp_path: Path) -> SqlCatalogStore:
    return SqlCatalogStore(make_engine(tmp_path / "kassa.db"))


def offers(store: SqlCatalogStore) -> dict[str, Any]:
    loaded, _ = store.load()
    return {o.id: o for o in loaded}


class Killed(Exception):
    """Stands in for the process dying in the middle of a page."""


class DiesAfter:
    """Wraps a connector; its product stream dies after ``pages`` pages were handed out (a kill -9 lookalike)."""

    def __init__(self, connector: Any, pages: int) -> None:
        self.connector, self.pages, self.platform = connector, pages, connector.platform

    def iter_products(self, cursor: str | None = None) -> Any:
        for n, page in enumerate(self.connector.iter_products(cursor)):
            if n == self.pages:
                raise Killed
            yield page


def test_products_land_as_product_offers(shopify_cfg, store, tmp_path):
    report = sync_catalog(ShopifyConnector(shopify_cfg), store, tmp_path)
    assert (report.products, report.pages, report.complete, report.resumed) == (7, 3, True, False)
    got = offers(store)
    assert sorted(got) == [f"SKU-{i:06d}" for i in range(7)]
    offer = got["SKU-000003"]
    assert offer.kind == "product" and offer.product_id == "1000003" and offer.category == "type-3"
    assert offer.value == 3.99 and offer.stock == 3 and offer.features == {"price": 3.99, "category_root": "type-3"}
    # the Kassa catalog (what `kassa serve` loads) sees them, indexed by product key for retrieval
    snapshot = Catalog(store).snapshot
    assert snapshot.product_offer["1000003"] == "SKU-000003"


def test_a_killed_sync_resumes_and_every_product_lands_once(tmp_path, store):
    with ShopifyFake(generated=95) as fake:
        cfg = {"shop": fake.url, "access_token": "shpat_test", "page_size": 10}
        with pytest.raises(Killed):
            sync_catalog(DiesAfter(ShopifyConnector(cfg), 4), store, tmp_path)  # type: ignore[arg-type]
        assert len(offers(store)) == 40
        saved = SyncCursor(tmp_path, "shopify").load()
        assert saved["complete"] is False and saved["products"] == 40
        before = len(fake.queries)
        report = sync_catalog(ShopifyConnector(cfg), store, tmp_path)
        assert report.resumed and report.previously_written == 40
        assert report.products == 55 and report.complete
        # only the remaining pages were fetched
        assert len(fake.queries) - before == 6
    got = offers(store)
    assert sorted(got) == [f"SKU-{i:06d}" for i in range(95)]  # each exactly once (ids are unique keys)


def test_a_finished_sync_runs_incrementally_next_time(tmp_path, store, shopify_fake, shopify_cfg):
    sync_catalog(ShopifyConnector(shopify_cfg), store, tmp_path)
    renamed = product_node(3, title="Renamed", updatedAt="2026-02-01T00:00:00Z")
    shopify_fake.products = sorted([*shopify_fake.products, renamed], key=lambda p: p["updatedAt"])
    report = sync_catalog(ShopifyConnector(shopify_cfg), store, tmp_path)
    assert report.products == 2 and not report.resumed  # the newest-seen product again, and the changed one
    assert offers(store)["SKU-000003"].title == "Renamed" and len(offers(store)) == 7
    full = sync_catalog(ShopifyConnector(shopify_cfg), store, tmp_path, reset=True)
    assert full.products == 8 and len(offers(store)) == 7


def test_rate_limits_during_a_sync_are_waited_out_and_reported(tmp_path, store, woo_fake, woo_cfg, sleeps: Sleeps):
    woo_fake.throttle_next("4")
    report = sync_catalog(WooCommerceConnector(woo_cfg, sleep=sleeps), store, tmp_path)
    assert report.products == 7 and report.waited_seconds == 4.0 and sleeps.calls == [4.0]


def test_an_auth_failure_writes_nothing_and_keeps_no_cursor(tmp_path, store, woo_cfg):
    with pytest.raises(AuthError):
        sync_catalog(WooCommerceConnector(woo_cfg | {"consumer_key": "ck_wrong"}), store, tmp_path)
    assert offers(store) == {} and SyncCursor(tmp_path, "woocommerce").load() == {}


def test_a_malformed_page_stops_the_sync_at_the_last_committed_page(tmp_path, store, shopify_fake, shopify_cfg):
    conn = ShopifyConnector(shopify_cfg)
    first = sync_catalog(conn, store, tmp_path, max_pages=1)
    assert first.products == 3 and not first.complete
    shopify_fake.malformed_next()
    with pytest.raises(Exception, match="malformed page"):
        sync_catalog(conn, store, tmp_path)
    assert len(offers(store)) == 3 and SyncCursor(tmp_path, "shopify").load()["products"] == 3
    assert sync_catalog(conn, store, tmp_path).products == 4 and len(offers(store)) == 7


def test_offer_id_prefix_namespaces_the_products(tmp_path, store, woo_cfg):
    sync_catalog(WooCommerceConnector(woo_cfg), store, tmp_path, offer_id_prefix="woo:")
    assert sorted(offers(store))[0] == "woo:WOO-00000"


def test_the_cli_syncs_with_a_progress_bar_and_prints_json_last(tmp_path, woo_fake, monkeypatch):
    monkeypatch.setenv("WOO_SECRET_FROM_ENV", "cs_test")
    config = tmp_path / "woo.yaml"
    config.write_text(yaml.safe_dump({"woocommerce": {"url": woo_fake.url, "consumer_key": "ck_test",
                                                      "consumer_secret": "${WOO_SECRET_FROM_ENV}", "per_page": 2}}))
    data = tmp_path / "data"
    result = CliRunner().invoke(app, ["integrations", "sync", "woocommerce", "--config", str(config),
                                      "--data-dir", str(data), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["products"] == 7 and summary["pages"] == 4 and summary["complete"] is True
    assert len(offers(SqlCatalogStore(make_engine(data / "kassa.db")))) == 7
    assert (data / "integrations" / "woocommerce.cursor.json").exists()


def test_the_cli_explains_a_bad_config(tmp_path):
    config = tmp_path / "shop.yaml"
    config.write_text("shopify:\n  shop: x.myshopify.com\n  access_token: ${NOT_SET_ANYWHERE}\n")
    result = CliRunner().invoke(app, ["integrations", "sync", "shopify", "--config", str(config),
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "NOT_SET_ANYWHERE is not set" in result.output
    result = CliRunner().invoke(app, ["integrations", "sync", "bigcommerce", "--config", str(config),
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown platform" in result.output
    result = CliRunner().invoke(app, ["integrations", "sync", "shopify", "--config", str(config), "--every", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.output


@pytest.mark.parametrize(("platform", "options", "says"), [
    ("shopify", "shop: x.myshopify.com\n  access_token: t\n  page_size: many",
     "shopify.page_size must be a whole number between 1 and 250, got 'many'"),
    ("shopify", "shop: x.myshopify.com\n  access_token: t\n  timeout: soon", "shopify.timeout must be a number"),
    ("woocommerce", "url: https://x.example\n  consumer_key: k\n  consumer_secret: s\n  per_page: lots",
     "woocommerce.per_page must be a whole number between 1 and 100"),
    ("woocommerce", "url: https://x.example\n  consumer_key: k\n  consumer_secret: s\n  currency: euros",
     "woocommerce.currency: not an ISO 4217 currency code"),
    ("sap", "base_url: https://x.example\n  base_site_id: e\n  client_id: a\n  client_secret: b\n  page_size: x",
     "sap.page_size must be a whole number"),
    ("magento", "base_url: https://x.example\n  access_token: t\n  currency: dollars",
     "magento.currency: not an ISO 4217 currency code"),
])
def test_an_option_that_is_not_a_usable_value_is_exit_2_naming_it(tmp_path, platform, options, says):
    # these were ValueError / PayloadError tracebacks with exit 1, read as "the platform refused"
    config = tmp_path / "c.yaml"
    config.write_text(f"{platform}:\n  {options}\n")
    result = CliRunner().invoke(app, ["integrations", "sync", platform, "--credentials", str(config),
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split())


def test_the_cli_reports_a_refusal_and_exits_1(tmp_path, woo_fake):
    config = tmp_path / "woo.yaml"
    config.write_text(yaml.safe_dump({"url": woo_fake.url, "consumer_key": "ck_bad", "consumer_secret": "x"}))
    result = CliRunner().invoke(app, ["integrations", "sync", "woocommerce", "--config", str(config),
                                      "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 1
    assert "Consumer key is invalid" in json.loads(result.stdout.strip().splitlines()[-1])["error"]
    # nothing was written: the message does not speak of a committed page's cursor
    assert "this run wrote nothing" in result.output and "committed page" not in result.output


def test_the_cli_shows_each_retry_of_a_host_that_refuses_and_takes_retries_and_timeout(tmp_path):
    # a closed port was retried for ~16 s per request (31 s for a sync) with nothing on screen
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: connections are refused
    config = tmp_path / "woo.yaml"
    config.write_text(yaml.safe_dump({"url": f"http://127.0.0.1:{port}", "consumer_key": "ck", "consumer_secret": "x"}))
    started = time.monotonic()
    result = CliRunner().invoke(app, ["integrations", "sync", "woocommerce", "--credentials", str(config),
                                      "--data-dir", str(tmp_path), "--retries", "1", "--timeout", "2"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and time.monotonic() - started < 5, text
    assert text.count("woocommerce GET /products: try 1/2 failed (ConnectError: ") == 1, text
    assert "Connection refused); retrying in 0.5 s" in text and "try 2/2" not in text
    assert "woocommerce sync stopped: woocommerce unreachable" in text
    audit = CliRunner().invoke(app, ["integrations", "audit", "woocommerce", "--credentials", str(config),
                                     "--retries", "0"])
    assert audit.exit_code == 1 and "retrying" not in audit.output and "unreachable" in audit.output
    refused = CliRunner().invoke(app, ["integrations", "sync", "woocommerce", "--credentials", str(config),
                                       "--retries", "-1"])
    assert refused.exit_code == 2 and "--retries" in refused.output


def test_a_sync_of_a_host_that_refuses_retries_its_first_request_once(tmp_path):
    # the progress bar's product count was asked first, retried to the end and shrugged off, then the first
    # page was retried all over again: 31 s for one refusal at the default 5 retries
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "shop.yaml"
    config.write_text(yaml.safe_dump({"shop": f"127.0.0.1:{port}", "access_token": "shpat_x"}))
    result = CliRunner().invoke(app, ["integrations", "sync", "shopify", "--credentials", str(config),
                                      "--data-dir", str(tmp_path), "--retries", "1"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and text.count("try 1/2 failed") == 1, text


def test_the_progress_total_is_asked_once_the_first_page_is_in(tmp_path, store, shopify_cfg):
    totals: list[int | None] = []
    report = sync_catalog(ShopifyConnector(shopify_cfg), store, tmp_path, on_page=lambda r, total: totals.append(total))
    assert report.products == 7 and totals == [7, 7, 7]  # 3 pages of 3, each with the whole run's count


# ----------------------------------------------------------------------------- the integration config file
@pytest.mark.parametrize(("text", "message"), [
    ("shopify: [unclosed", "not valid YAML"),
    ("woocommerce: {url: x}\n", "no `shopify` section"),
    ("platform: woocommerce\nurl: x\n", "configures platform 'woocommerce'"),
    ("shopify: {replay_window_seconds: soon}\n", "must be a number"),
    ("shopify: {replay_window_seconds: -5}\n", "must be positive"),
    ("- a\n- list\n", "must hold a mapping"),
])
def test_a_bad_integration_config_is_a_clear_error(tmp_path, text, message):
    from kassa.integrations.config import ConfigError, load_integration_settings

    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_integration_settings("shopify", path)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.mkdir(), "Is a directory"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00"), "cannot read integration config file"),
])
def test_an_integration_config_that_cannot_be_read_is_a_clear_error(tmp_path, make, message):
    # a directory given to --credentials was an IsADirectoryError traceback
    from kassa.integrations.config import ConfigError, load_integration_settings

    path = tmp_path / "cfg.yaml"
    make(path)
    with pytest.raises(ConfigError, match=message):
        load_integration_settings("shopify", path)
    result = CliRunner().invoke(app, ["integrations", "audit", "shopify", "--credentials", str(path)])
    assert result.exit_code != 0 and not isinstance(result.exception, OSError | UnicodeDecodeError)
    assert "cannot read integration config file" in " ".join(result.output.split()), result.output


def test_config_layers_env_references_and_defaults(tmp_path, monkeypatch):
    from kassa.integrations.config import load_integration_settings

    monkeypatch.setenv("SHOP_TOKEN", "shpat_from_env")
    monkeypatch.delenv("KASSA_INTEGRATIONS__SHOPIFY__WEBHOOK_SECRET", raising=False)
    path = tmp_path / "cfg.yaml"
    path.write_text("integrations:\n  shopify:\n    access_token: ${SHOP_TOKEN}\n"
                    "    shop: ${SHOP_DOMAIN:-x.myshopify.com}\n")
    cfg = load_integration_settings("shopify", path, {"shopify": {"webhook_secret": "from-kassa-settings",
                                                                  "shop": "overridden.myshopify.com"}})
    assert cfg.options == {"access_token": "shpat_from_env", "shop": "x.myshopify.com"}  # the file wins
    assert cfg.webhook_secret == "from-kassa-settings" and cfg.replay_window_seconds == 300.0
    assert cfg.as_dict()["webhook_secret"] == "from-kassa-settings"


def test_a_running_server_serves_offers_the_cli_synced_within_a_second(tmp_path, shopify_fake, kassa, client):
    """The CLI said (and the docs) that a running `kassa serve` loads synced offers at its next start; the
    catalog's change feed brings them in within a second, and the CLI says so now."""
    import time

    from tests.conftest import ADMIN

    config = tmp_path / "shopify.yaml"
    config.write_text(yaml.safe_dump({"shop": shopify_fake.url, "access_token": "shpat_test"}))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    before = {o["id"] for o in client.get("/v1/offers", headers=admin).json()["offers"]}
    result = CliRunner().invoke(app, ["integrations", "sync", "shopify", "--credentials", str(config),
                                      "--data-dir", kassa.settings.data_dir])
    assert result.exit_code == 0, result.output
    assert "within a second" in result.output and "next start" not in result.output
    t0 = time.monotonic()
    while client.get("/readyz").json()["offers"] < len(before) + 7:  # the serving snapshot's count
        assert time.monotonic() - t0 < 1.5, "the synced offers did not reach the running server"
        time.sleep(0.02)
    after = {o["id"] for o in client.get("/v1/offers", headers=admin).json()["offers"]}
    assert len(after - before) == 7


def test_sync_every_stopped_with_ctrl_c_exits_130_with_its_cursor_saved(tmp_path, woo_fake):
    # "stopped; the cursor is saved" and exit 0, as if the schedule had ended by itself
    config = tmp_path / "woo.yaml"
    config.write_text(yaml.safe_dump({"woocommerce": {"url": woo_fake.url, "consumer_key": "ck_test",
                                                      "consumer_secret": "cs_test", "per_page": 2}}))
    data = tmp_path / "data"
    stopped = stop_when(["integrations", "sync", "woocommerce", "--credentials", str(config), "--data-dir", str(data),
                         "--every", "1h"], "next woocommerce sync in 1h")
    assert stopped.returncode == 130 and "stopped; the cursor is saved" in stopped.err, stopped.err
    assert "Traceback" not in stopped.err and (data / "integrations" / "woocommerce.cursor.json").exists()
