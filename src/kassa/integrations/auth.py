"""Webhook signatures and API tokens that more than one platform uses.

Owns:

- the **Kassa webhook signature** for platforms without a native signed webhook (SFCC's cartridge hook,
  SAP Commerce's webhook interceptor): ``X-Kassa-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
  "<t>." + raw body)>``. Several ``v1=`` entries may be sent while a secret is being rotated; one match is
  enough. ``t`` bounds replays. Such deliveries carry no signed id, so they dedupe on the body's hash;
- the **base64 HMAC-SHA256 of the raw body** that Shopify and WooCommerce both send (each platform module
  keeps its own header names, topic and delivery id);
- the **OAuth2 client-credentials grant** (RFC 6749 §4.4) that SFCC (SLAS, Account Manager) and SAP
  Commerce use: the form-encoded token request goes through ``HttpClient``, so it waits out 429
  ``Retry-After`` and retries 5xx like every other call; ``BearerToken`` caches the answer until a minute
  before it expires and ``get_with_bearer`` fetches a new one once when the platform answers 401.

Signature schemes that only one platform uses (Adobe's RSA events, Magento's OAuth 1.0a) stay in that
platform's module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from kassa.integrations.base import AuthError, PayloadError, ReplayError, SignatureError, WebhookDelivery
from kassa.integrations.http import HttpClient, HttpStatusError, text_excerpt

SIGNATURE_HEADER = "x-kassa-signature"


# --------------------------------------------------------------------------- Kassa webhook signature
def kassa_signature(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Kassa-Signature`` value a sender attaches (what the cartridge / interceptor compute)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_kassa_signature(headers: Mapping[str, str], raw_body: bytes, secret: str | None,
                           window: float, now: float) -> datetime:
    """Check ``X-Kassa-Signature`` on the raw bytes; return the signed send time.

    Raises SignatureError (missing/malformed header, no secret configured, no matching ``v1``) before
    ReplayError (``t`` further than ``window`` seconds from ``now``), so unsigned junk is never a 409.
    """
    if not secret:
        raise SignatureError("no webhook_secret is configured, so no delivery can be verified")
    value = headers.get(SIGNATURE_HEADER)
    if not value:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    candidates: list[str] = []
    for part in value.split(","):
        key, sep, item = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(item)
            except ValueError:
                raise SignatureError(f"{SIGNATURE_HEADER}: t={item[:20]!r} is not unix seconds") from None
        elif key == "v1":
            candidates.append(item.strip().lower())
    if timestamp is None or not candidates:
        raise SignatureError(f"{SIGNATURE_HEADER} must be 't=<unix seconds>,v1=<hex hmac>'")
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw_body, hashlib.sha256).hexdigest()
    # Compare against every candidate (no early exit) so timing does not reveal which one matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(candidate.encode(), expected.encode())
    if not matched:
        raise SignatureError("webhook signature does not match the body (wrong secret or modified body)")
    age = now - timestamp
    if abs(age) > window:
        raise ReplayError(f"signed at t={timestamp}, {age:.0f} s from now: outside the {window:.0f} s replay window")
    return datetime.fromtimestamp(timestamp, UTC)


def body_delivery_id(raw_body: bytes) -> str:
    """Dedupe id of a delivery with no signed id of its own: the SHA-256 of the signed body."""
    return "sha256:" + hashlib.sha256(raw_body).hexdigest()[:48]


def verify_kassa_delivery(headers: Mapping[str, str], raw_body: bytes, secret: str | None, window: float,
                          now: float, topic_header: str) -> WebhookDelivery:
    """A delivery signed with ``X-Kassa-Signature``: its topic from ``topic_header`` (default
    ``order.created``), its signed send time, and the body hash as dedupe id."""
    h = {k.lower(): v for k, v in headers.items()}
    sent = verify_kassa_signature(h, raw_body, secret, window, now)
    topic = (h.get(topic_header) or "order.created").strip()
    return WebhookDelivery(body_delivery_id(raw_body), topic, sent, raw_body)


# --------------------------------------------------------------------------- base64 HMAC of the body
def verify_body_hmac(headers: Mapping[str, str], raw_body: bytes, secret: str | None, header: str,
                     platform: str) -> None:
    """Check ``header`` (as the platform spells it) holds the base64 HMAC-SHA256 of the raw body under
    ``secret``; raise SignatureError naming what is wrong. ``headers`` are lower-cased."""
    if secret is None:
        raise SignatureError(f"{platform} webhook_secret is not configured")
    signature = headers.get(header.lower())
    if not signature:
        raise SignatureError(f"missing {header} header")
    expected = base64.b64encode(hmac.new(secret.encode(), raw_body, hashlib.sha256).digest())
    if not hmac.compare_digest(expected, signature.strip().encode("utf-8", "replace")):
        raise SignatureError(f"{header} does not match the body (wrong secret or altered body)")


# --------------------------------------------------------------------------- OAuth2 client credentials
def client_credentials_token(http: HttpClient, url: str, form: Mapping[str, str], client_id: str,
                             client_secret: str) -> dict[str, Any]:
    """POST ``form`` to an OAuth2 token endpoint with HTTP Basic client auth; the JSON answer.

    Goes through ``http`` (``url`` may be on another host), so 429 ``Retry-After``, 5xx and connection
    errors are retried and counted like any API call. A 4xx answer is an ``AuthError``: token endpoints
    answer bad client credentials with 400 ``invalid_client`` as often as with 401.
    """
    try:
        data = http.post(url, form=form, auth=(client_id, client_secret), label="token endpoint").data
    except HttpStatusError as exc:
        raise AuthError(f"{http.platform} token endpoint HTTP {exc.status}: {text_excerpt(exc.body)}",
                        exc.status) from None
    if not isinstance(data, dict) or not data.get("access_token"):
        raise PayloadError(f"{http.platform} token endpoint answer has no access_token")
    return data


class BearerToken:
    """A client-credentials access token, cached until a minute before it expires.

    ``lifetime`` (seconds) is assumed when the token endpoint's answer has no ``expires_in``.
    """

    def __init__(self, lifetime: float) -> None:
        self.lifetime = lifetime
        self.value: str | None = None
        self.expires_at = 0.0

    def get(self, http: HttpClient, url: str, form: Mapping[str, str], client_id: str, client_secret: str,
            *, force: bool = False) -> str:
        """The cached token, or a new one from ``url`` when it is missing, expiring or ``force`` is set."""
        if force or self.value is None or http.clock() >= self.expires_at:
            data = client_credentials_token(http, url, form, client_id, client_secret)
            self.value = str(data["access_token"])
            # Refresh a minute early: a token that expires mid-crawl costs a 401 round trip.
            self.expires_at = http.clock() + max(60.0, float(data.get("expires_in") or self.lifetime) - 60.0)
        return self.value


def get_with_bearer(http: HttpClient, path: str, params: Mapping[str, Any] | None,
                    token: Callable[[bool], str]) -> Any:
    """GET ``path`` with ``Authorization: Bearer token(force)``; a 401 fetches a new token once (it may have
    been revoked or have expired early). The JSON answer."""
    try:
        return http.get(path, params, headers={"Authorization": f"Bearer {token(False)}"}).data
    except AuthError as exc:
        if exc.status != 401:
            raise
    return http.get(path, params, headers={"Authorization": f"Bearer {token(True)}"}).data
