"""`kassa integrations audit`: per capability OK / missing scope / unreachable, with the platform's own words."""

from __future__ import annotations

import json
import socket

import yaml
from typer.testing import CliRunner

from kassa.cli import app
from kassa.integrations.audit import run_audit
from kassa.integrations.base import AuditCheck
from kassa.integrations.shopify import ShopifyConnector
from kassa.integrations.woocommerce import WooCommerceConnector


def statuses(checks: list[AuditCheck]) -> dict[str, str]:
    return {c.capability: c.status for c in checks}


def details(checks: list[AuditCheck]) -> dict[str, str]:
    return {c.capability: c.detail for c in checks}


def test_shopify_with_every_scope_is_all_ok(shopify_fake, shopify_cfg):
    shopify_fake.orders["1"] = {"id": "gid://shopify/Order/1", "createdAt": "2024-03-05T10:00:00Z"}
    shopify_fake.webhook_subscriptions = [{"id": "gid://shopify/WebhookSubscription/1", "topic": "ORDERS_CREATE",
                                           "endpoint": {"__typename": "WebhookHttpEndpoint",
                                                        "callbackUrl": "https://kassa.example/v1/webhooks/shopify"}}]
    report = run_audit(ShopifyConnector(shopify_cfg))
    assert report.ok and list(statuses(report.checks)) == [
        "read_products", "read_orders", "order_webhooks", "inventory", "customer_data"]
    found = details(report.checks)
    assert "read_all_orders" in found["read_orders"] and "2024-03-05" in found["read_orders"]
    assert "https://kassa.example/v1/webhooks/shopify" in found["order_webhooks"]
    assert any("purchase.thank-you.block.render" in step for step in report.snippet_steps)


def test_shopify_missing_scopes_are_reported_with_shopifys_message(shopify_fake, shopify_cfg):
    shopify_fake.scopes = {"read_products", "read_orders"}
    report = run_audit(ShopifyConnector(shopify_cfg))
    got = statuses(report.checks)
    assert got == {"read_products": "ok", "read_orders": "ok", "order_webhooks": "ok",
                   "inventory": "missing_scope", "customer_data": "missing_scope"}
    found = details(report.checks)
    assert "Access denied for inventoryItems field" in found["inventory"] and "read_inventory" in found["inventory"]
    assert "last 60 days only" in found["read_orders"]  # no read_all_orders
    assert not report.ok


def test_shopify_bad_token_is_unreachable_everywhere_with_shopifys_message(shopify_cfg):
    report = run_audit(ShopifyConnector(shopify_cfg | {"access_token": "nope"}))
    assert set(statuses(report.checks).values()) == {"unreachable"}
    assert all("Invalid API key or access token" in c.detail for c in report.checks)


def test_an_unreachable_host_is_reported_not_raised(sleeps):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conn = ShopifyConnector({"shop": f"http://127.0.0.1:{port}", "access_token": "t", "max_retries": 1}, sleep=sleeps)
    report = run_audit(conn)
    assert set(statuses(report.checks).values()) == {"unreachable"}
    assert "unreachable" in report.checks[0].detail


def test_woocommerce_permissions_and_order_reach(woo_fake, woo_cfg):
    woo_fake.orders["9"] = {"id": 9, "date_created_gmt": "2023-07-01T08:00:00"}
    woo_fake.orders["10"] = {"id": 10, "date_created_gmt": "2025-01-01T08:00:00"}
    woo_fake.denied = {"customers"}
    woo_fake.webhooks = [{"id": 3, "topic": "order.created", "status": "active",
                          "delivery_url": "https://kassa.example/v1/webhooks/woocommerce"},
                         {"id": 4, "topic": "order.updated", "status": "disabled",
                          "delivery_url": "https://kassa.example/v1/webhooks/woocommerce"}]
    report = run_audit(WooCommerceConnector(woo_cfg))
    got = statuses(report.checks)
    assert got == {"read_products": "ok", "read_orders": "ok", "order_webhooks": "ok", "inventory": "ok",
                   "customer_data": "missing_scope"}
    found = details(report.checks)
    assert "back to 2023-07-01" in found["read_orders"]
    assert "Sorry, you cannot list resources" in found["customer_data"]
    assert "order.created delivered to https://kassa.example" in found["order_webhooks"]
    assert "order.updated webhook exists but is disabled" in found["order_webhooks"]


def test_woocommerce_bad_keys_are_unreachable_with_the_platform_error(woo_cfg):
    report = run_audit(WooCommerceConnector(woo_cfg | {"consumer_key": "ck_bad"}))
    assert set(statuses(report.checks).values()) == {"unreachable"}
    assert "Consumer key is invalid" in report.checks[0].detail


def test_the_cli_prints_a_table_and_json_last(tmp_path, woo_fake):
    config = tmp_path / "woo.yaml"
    config.write_text(yaml.safe_dump({"woocommerce": {"url": woo_fake.url, "consumer_key": "ck_test",
                                                      "consumer_secret": "cs_test"}}))
    result = CliRunner().invoke(app, ["integrations", "audit", "woocommerce", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["platform"] == "woocommerce" and len(report["checks"]) == 5
    assert any("woocommerce_thankyou" in step for step in report["snippet_steps"])


def test_the_cli_exits_1_when_something_is_missing(tmp_path, shopify_fake):
    shopify_fake.scopes = {"read_products"}
    config = tmp_path / "shop.yaml"
    config.write_text(yaml.safe_dump({"shop": shopify_fake.url, "access_token": "shpat_test"}))
    result = CliRunner().invoke(app, ["integrations", "audit", "shopify", "--config", str(config)])
    assert result.exit_code == 1
    assert "missing scope" in result.output and "read_orders" in result.output


def _subscription(i: int, topic: str) -> dict:
    return {"id": f"gid://shopify/WebhookSubscription/{i}", "topic": topic,
            "endpoint": {"__typename": "WebhookHttpEndpoint", "callbackUrl": "https://kassa.example/v1/webhooks/shopify"}}


def test_shopify_audit_recommends_the_refund_topics_and_warns_without_them(shopify_fake, shopify_cfg):
    """Only ORDERS_CREATE was looked for: a store without orders/cancelled or refunds/create read as all set,
    though its cancelled and returned orders then stay conversions."""
    shopify_fake.webhook_subscriptions = [_subscription(1, "ORDERS_CREATE")]
    found = details(run_audit(ShopifyConnector(shopify_cfg)).checks)["order_webhooks"]
    assert "orders/create subscribed to https://kassa.example/v1/webhooks/shopify" in found
    assert "warning: no orders/cancelled subscription" in found and "cancelled order is not taken back" in found
    assert "warning: no refunds/create subscription" in found and "refunded order is not taken back" in found
    shopify_fake.webhook_subscriptions += [_subscription(2, "ORDERS_CANCELLED"), _subscription(3, "REFUNDS_CREATE")]
    found = details(run_audit(ShopifyConnector(shopify_cfg)).checks)["order_webhooks"]
    assert "warning" not in found
    assert "orders/cancelled subscribed to https://kassa.example" in found
    assert "refunds/create subscribed to https://kassa.example" in found
