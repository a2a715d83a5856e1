"""Hypothesis fuzzing (issue 15, bounded: a fixed number of derandomized examples per property) of the two
places raw bytes from the internet are first touched: the JSON body decoder and the webhook verifiers.
Whatever arrives, the answer is a value or one of the documented errors, never anything else."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kassa import errors, schemas
from kassa.api.common import MAX_DEPTH, decode, nesting_depth_exceeds
from kassa.integrations.base import IntegrationError
from kassa.integrations.webhooks import MalformedBody, WebhookReceiver
from tests.integrations.conftest import SHOPIFY_SECRET, WOO_SECRET
from tests.integrations.fakes.base import sign_b64

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
WIRE_TYPES = [schemas.DecisionRequest, schemas.EventBatch, schemas.Offer, schemas.Placement,
              schemas.FeaturePush, schemas.FeatureWrite]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


def containers(value: Any) -> int:
    if isinstance(value, list):
        return 1 + sum(containers(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(containers(v) for v in value.values())
    return 0


def nest(value: Any, levels: int, wrap: str) -> Any:
    for _ in range(levels):
        value = [value] if wrap == "list" else {"k": value}
    return value


@FUZZ
@given(st.binary(max_size=2048), st.sampled_from(WIRE_TYPES))
def test_arbitrary_bytes_decode_or_are_a_4xx(body, kind):
    try:
        decode(body, kind)
    except errors.KassaError as exc:
        assert exc.status in (400, 422)


@FUZZ
@given(json_values, st.integers(0, 200), st.sampled_from(["list", "dict"]), st.sampled_from(WIRE_TYPES))
def test_json_of_any_shape_and_depth_decodes_or_is_a_4xx(value, levels, wrap, kind):
    body = json.dumps({"placement": "p", "context": {"x": nest(value, levels, wrap)}}).encode()
    try:
        decode(body, kind)
    except errors.KassaError as exc:
        assert exc.status in (400, 422)


@FUZZ
@given(json_values, st.integers(0, 100), st.sampled_from(["list", "dict"]), st.text(alphabet="[]{}\"\\", max_size=30))
def test_the_depth_check_agrees_with_the_parsed_depth(value, levels, wrap, noise):
    value = [nest(value, levels, wrap), noise]  # brackets and escapes inside strings must not count...
    body = json.dumps(value).encode()
    hidden = sum(body.count(c) for c in b"[]{}") - 2 * containers(value)  # brackets inside strings
    exceeds = nesting_depth_exceeds(body)
    if not hidden:
        assert exceeds == (depth(value) > MAX_DEPTH)
    else:  # ...and can hide at most as many levels as they hold brackets (the decoder's backstop catches those)
        assert exceeds or depth(value) <= MAX_DEPTH + hidden
        assert not exceeds or depth(value) > MAX_DEPTH - hidden


# --------------------------------------------------------------------------- webhook verifiers
SECRETS = {"shopify": SHOPIFY_SECRET, "woocommerce": WOO_SECRET, "sfcc": "sfcc-secret", "sap": "sap-secret"}
receiver = WebhookReceiver({p: {"webhook_secret": s} for p, s in SECRETS.items()})
header_names = st.sampled_from([
    "x-shopify-hmac-sha256", "x-shopify-topic", "x-shopify-webhook-id", "x-shopify-triggered-at",
    "x-wc-webhook-signature", "x-wc-webhook-topic", "x-wc-webhook-delivery-id", "x-wc-webhook-resource",
    "x-sfcc-signature", "x-sfcc-timestamp", "x-sap-signature", "x-sap-timestamp", "x-signature", "x-timestamp",
    "content-type", "x-delivery-id"])
headers_st = st.dictionaries(header_names, st.text(max_size=60), max_size=8)


def refused_or_parsed(platform: str, headers: dict[str, str], body: bytes) -> None:
    # SignatureError, ReplayError, PayloadError (MalformedBody), NotConfigured: each a 4xx in the API
    with contextlib.suppress(IntegrationError):
        receiver.receive(platform, headers, body)


@FUZZ
@given(st.sampled_from(sorted(SECRETS)), headers_st, st.binary(max_size=1024))
def test_webhook_verifiers_refuse_anything_unsigned_with_a_documented_error(platform, headers, body):
    refused_or_parsed(platform, headers, body)


@FUZZ
@given(st.sampled_from(["shopify", "woocommerce"]), json_values | st.binary(max_size=512).map(lambda b: b))
def test_signed_bodies_of_any_shape_are_parsed_or_refused_with_a_documented_error(platform, payload):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    if platform == "shopify":
        headers = {"x-shopify-hmac-sha256": sign_b64(SHOPIFY_SECRET, body), "x-shopify-topic": "orders/create",
                   "x-shopify-webhook-id": "d-1", "x-shopify-triggered-at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    else:
        headers = {"x-wc-webhook-signature": sign_b64(WOO_SECRET, body), "x-wc-webhook-topic": "order.created",
                   "x-wc-webhook-delivery-id": "w-1", "x-wc-webhook-resource": "order"}
    refused_or_parsed(platform, headers, body)


def test_a_signed_but_deeply_nested_or_non_utf8_webhook_is_refused_as_malformed():
    for body in (b"[" * 20_000 + b"]" * 20_000, b'{"id": "\xff"}'):
        headers = {"x-shopify-hmac-sha256": sign_b64(SHOPIFY_SECRET, body), "x-shopify-topic": "orders/create",
                   "x-shopify-webhook-id": "d-2"}
        with pytest.raises(MalformedBody):
            receiver.receive("shopify", headers, body)
