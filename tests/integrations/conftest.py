"""Fixtures for the integration tests: the local fake platform servers (port 0), recorded payloads, signing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kassa.config import Settings
from tests.integrations.fakes.shopify import ShopifyFake, product_node
from tests.integrations.fakes.woocommerce import WooCommerceFake, wc_product

FIXTURES = Path(__file__).parent / "fixtures"
SHOPIFY_SECRET = "shpss_test_client_secret"
WOO_SECRET = "woo-webhook-secret"


def fixture(platform: str, name: str) -> dict[str, Any]:
    data = json.loads((FIXTURES / platform / name).read_text())
    assert isinstance(data, dict)
    return data


def fixture_bytes(platform: str, name: str) -> bytes:
    return (FIXTURES / platform / name).read_bytes()


class Sleeps:
    """A stand-in for ``time.sleep`` that records the waits instead of sleeping (keeps throttle tests fast)."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def shopify_fake() -> Iterator[ShopifyFake]:
    fake = ShopifyFake([product_node(i) for i in range(7)])
    with fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def woo_fake() -> Iterator[WooCommerceFake]:
    fake = WooCommerceFake([wc_product(i) for i in range(7)])
    with fake:
        yield fake  # type: ignore[misc]


@pytest.fixture
def shopify_cfg(shopify_fake: ShopifyFake) -> dict[str, Any]:
    return {"shop": shopify_fake.url, "access_token": "shpat_test", "page_size": 3, "webhook_secret": SHOPIFY_SECRET,
            "max_retries": 3}


@pytest.fixture
def woo_cfg(woo_fake: WooCommerceFake) -> dict[str, Any]:
    return {"url": woo_fake.url, "consumer_key": "ck_test", "consumer_secret": "cs_test", "per_page": 3,
            "webhook_secret": WOO_SECRET, "max_retries": 3}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared test settings (tests/conftest.py) plus webhook secrets for Shopify and WooCommerce."""
    return msgspec.structs.replace(settings, integrations={
        "shopify": {"webhook_secret": SHOPIFY_SECRET},
        "woocommerce": {"webhook_secret": WOO_SECRET},
    })
