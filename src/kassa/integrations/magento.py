"""Adobe Commerce / Magento 2 connector.

Owns: the Magento REST API (``/rest[/<store>]/V1/products``, ``/V1/orders``, ``/V1/categories``) with an
integration access token as Bearer or OAuth 1.0a request signing (HMAC-SHA256, signature base string per
RFC 5849 built here); keyset paging of the catalog by ``(updated_at, entity_id)`` through ``searchCriteria``
filter groups; Adobe I/O Events deliveries of ``com.adobe.commerce.observer.sales_order_place_after``,
``…sales_order_save_after`` (an order saved later: one placed with a redirect payment method is
``pending_payment`` when placed and counts when a save brings it ``processing``; only placed states count,
``is_placed``; one saved ``canceled`` is a ``refund`` of the whole order) and
``…sales_order_creditmemo_save_after`` (a credit memo's refunded lines, a ``refund``) (CloudEvents
signed with RSA-SHA256 by Adobe, two signatures, public keys fetched from Adobe's static host
through an injectable fetcher with a 5 s timeout, once per key, and cached; ``verify_needs_io`` /
``prefetch`` let the receiver fetch them off the event loop); and the API-access audit.

Magento returns the last page again when ``currentPage`` runs past the end, so paging never trusts "an
empty page means done": it stops on ``total_count``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Unpack
from urllib.parse import quote, unquote_plus, urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from kassa.integrations.base import (
    AuditCheck,
    AuthError,
    IntegrationError,
    MalformedBody,
    Order,
    OrderLine,
    PayloadError,
    Product,
    Refund,
    ReplayError,
    SignatureError,
    Unreachable,
    WebhookDelivery,
    clip_id,
    country_code,
    currency_code,
    email_sha256,
    object_payload,
    parse_time,
    required_id,
    to_decimal,
)
from kassa.integrations.config import ConfigError, register
from kassa.integrations.connector import ConnectorOptions, HttpConnector, SetupMissing
from kassa.integrations.http import HttpClient, HttpStatusError

ORDER_EVENT = "com.adobe.commerce.observer.sales_order_place_after"
ORDER_SUBSCRIPTION = "observer.sales_order_place_after"  # the name `bin/magento events:subscribe` takes
# sales_order_place_after fires for an order placed with a redirect payment method (PayPal Express, a hosted card
# page) too, in state pending_payment: the buyer may never pay, and Magento cancels it after the Pending Payment
# Order Lifetime. The save that moves it on (processing once paid) comes only as sales_order_save_after.
ORDER_SAVED_EVENT = "com.adobe.commerce.observer.sales_order_save_after"
ORDER_SAVED_SUBSCRIPTION = "observer.sales_order_save_after"
# Order states (``state``, not the store-configurable ``status``) of a placed order: ``new`` (offline payment
# such as a bank transfer or check, awaiting it), ``processing`` (paid or authorized), ``complete``, ``closed``
# and ``holded`` (put on hold by the merchant). Not placed: ``pending_payment`` (sent to pay off-site),
# ``payment_review`` (payment held for fraud review: may be denied) and ``canceled``.
PLACED_STATES = frozenset({"new", "processing", "complete", "closed", "holded"})
REFUND_EVENT = "com.adobe.commerce.observer.sales_order_creditmemo_save_after"
REFUND_SUBSCRIPTION = "observer.sales_order_creditmemo_save_after"
ADOBE_KEY_HOST = "https://static.adobeioevents.com"
_KEY_PATH = re.compile(r"^/[A-Za-z0-9._~-]+(?:/[A-Za-z0-9._~-]+)*\.pem$")
_KEY_CACHE_MAX = 64
_KEY_RETRY_SECONDS = 60.0  # a key path that could not be fetched is refused without a fetch this long

PublicKeyFetcher = Callable[[str], str]


# --------------------------------------------------------------------------- OAuth 1.0a (RFC 5849)
def _pct(value: str) -> str:
    """RFC 3986 percent-encoding: everything but ALPHA / DIGIT / ``-._~``."""
    return quote(value, safe="-._~")


def oauth_base_string(method: str, url: str, params: Sequence[tuple[str, str]]) -> str:
    """The OAuth 1.0a signature base string (RFC 5849 §3.4.1).

    ``url`` may carry a query string; its parameters are merged with ``params`` (the ``oauth_*`` ones and any
    form-body parameters). ``oauth_signature`` and ``realm`` are never part of the base string.
    """
    split = urlsplit(url)
    scheme = split.scheme.lower()
    host = (split.hostname or "").lower()
    port = split.port
    if port is not None and not ((scheme == "http" and port == 80) or (scheme == "https" and port == 443)):
        host = f"{host}:{port}"
    base_uri = f"{scheme}://{host}{split.path or '/'}"
    pairs: list[tuple[str, str]] = []
    if split.query:
        for part in split.query.split("&"):
            if not part:
                continue
            key, _, value = part.partition("=")
            # Query values arrive percent-encoded, with "+" meaning a space in form encoding.
            pairs.append((unquote_plus(key), unquote_plus(value)))
    pairs.extend((k, v) for k, v in params if k not in ("oauth_signature", "realm"))
    encoded = sorted((_pct(k), _pct(v)) for k, v in pairs)
    normalized = "&".join(f"{k}={v}" for k, v in encoded)
    return "&".join((method.upper(), _pct(base_uri), _pct(normalized)))


def oauth_signature(base_string: str, consumer_secret: str, token_secret: str) -> str:
    key = f"{_pct(consumer_secret)}&{_pct(token_secret)}".encode()
    return base64.b64encode(hmac.new(key, base_string.encode(), hashlib.sha256).digest()).decode()


def oauth_header(
    method: str,
    url: str,
    params: Mapping[str, Any] | None,
    consumer_key: str,
    consumer_secret: str,
    token: str,
    token_secret: str,
    *,
    nonce: str | None = None,
    timestamp: int | None = None,
) -> str:
    """The ``Authorization: OAuth …`` header for one request (HMAC-SHA256, as Magento integrations accept)."""
    oauth = {
        "oauth_consumer_key": consumer_key,
        "oauth_nonce": nonce or secrets.token_hex(16),
        "oauth_signature_method": "HMAC-SHA256",
        "oauth_timestamp": str(int(time.time()) if timestamp is None else timestamp),
        "oauth_token": token,
        "oauth_version": "1.0",
    }
    query = [(k, str(v)) for k, v in (params or {}).items()]
    base = oauth_base_string(method, url, [*query, *oauth.items()])
    oauth["oauth_signature"] = oauth_signature(base, consumer_secret, token_secret)
    return "OAuth " + ", ".join(f'{k}="{_pct(v)}"' for k, v in oauth.items())


# --------------------------------------------------------------------------- Adobe public keys
_default_key_cache: dict[str, str] = {}
_default_key_lock = threading.Lock()


def fetch_adobe_public_key(path: str, host: str = ADOBE_KEY_HOST, timeout: float = 5.0) -> str:
    """GET the PEM at ``host + path`` (Adobe's static key host), cached for the life of the process.

    Keys are immutable files named by a random id, so a cached key never goes stale; the cache is bounded.
    """
    url = host.rstrip("/") + path
    with _default_key_lock:
        cached = _default_key_cache.get(url)
    if cached is not None:
        return cached
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise Unreachable(f"could not fetch Adobe I/O Events public key {url}: {exc!r}") from exc
    if response.status_code != 200:
        raise Unreachable(f"Adobe I/O Events public key {url}: HTTP {response.status_code}")
    pem = response.text
    with _default_key_lock:
        if len(_default_key_cache) >= _KEY_CACHE_MAX:
            _default_key_cache.pop(next(iter(_default_key_cache)))
        _default_key_cache[url] = pem
    return pem


# --------------------------------------------------------------------------- connector
@register("magento")
class MagentoConnector(HttpConnector):
    """Adobe Commerce / Magento 2 (REST ``V1`` API, Adobe I/O Events order events).

    Adobe signs events with its own RSA keys, so webhooks need no shared secret: they are enabled by
    ``adobe_client_id`` (``WEBHOOK_IDENTITY_SETTING``), and Adobe's ``GET ?challenge=`` URL check is
    answered (``WEBHOOK_CHALLENGE``).

    Options (``cfg``): ``base_url`` (store URL), ``store_code`` (REST store view; default: none, i.e.
    ``/rest/V1``), ``access_token`` (integration access token, sent as Bearer) or ``oauth`` (mapping of
    ``consumer_key``, ``consumer_secret``, ``access_token``, ``access_token_secret``: OAuth 1.0a signing),
    ``currency`` (base currency of catalog prices, default ``USD``), ``page_size`` (default 100),
    ``media_url`` (default ``<base_url>/media/catalog/product``), ``url_suffix`` (default ``.html``),
    ``adobe_client_id`` (the I/O project's client id: events addressed to another one are refused),
    ``adobe_key_host`` and ``replay_window_seconds`` (how old an event's ``time`` may be).
    """

    platform = "magento"
    order_topics = frozenset({ORDER_EVENT, ORDER_SAVED_EVENT})
    # an order saved `canceled` is its cancellation: the save topic carries refunds too (`parse_refund`)
    refund_topics = frozenset({REFUND_EVENT, ORDER_SAVED_EVENT})
    api_name = "Magento API"
    config_error_status = "unreachable"
    snippet_steps: ClassVar[list[str]] = [
        "Create a module (e.g. Kassa_Snippet) with view/frontend/layout/checkout_onepage_success.xml adding a "
        "block to the `content` container, template Kassa_Snippet::snippet.phtml.",
        "In the template read the order from Magento\\Checkout\\Model\\Session::getLastRealOrder() and pass "
        "order id (entity_id), increment id, currency, grand total, items and ship country to the snippet.",
        "bin/magento setup:upgrade && bin/magento cache:flush; place an order and check the success page.",
    ]
    webhook_steps: ClassVar[list[str]] = [
        "Install Adobe I/O Events for Adobe Commerce and configure the I/O project (Stores > Configuration > "
        "Adobe Services > Adobe I/O Events).",
        f"bin/magento events:subscribe {ORDER_SUBSCRIPTION} (or POST /V1/eventing/eventSubscribe), "
        f"{ORDER_SAVED_SUBSCRIPTION} so an order placed unpaid (pending_payment) counts once it is paid and a "
        "cancelled order stops counting as a conversion, and "
        f"{REFUND_SUBSCRIPTION} so refunded orders stop counting as conversions.",
        "In the Adobe Developer Console add a webhook event registration for the Commerce provider's "
        f"{ORDER_EVENT}, {ORDER_SAVED_EVENT} and {REFUND_EVENT} events pointing to "
        "https://<kassa>/v1/webhooks/magento.",
    ]

    WEBHOOK_IDENTITY_SETTING = "adobe_client_id"
    WEBHOOK_CHALLENGE = True

    def __init__(self, cfg: Mapping[str, Any], *, fetch_public_key: PublicKeyFetcher | None = None,
                 **options: Unpack[ConnectorOptions]) -> None:
        super().__init__(cfg, **options)
        self.client_id = self.cfg.get("adobe_client_id") or None
        key_host = str(self.cfg.get("adobe_key_host") or ADOBE_KEY_HOST)
        self._fetch_pem: PublicKeyFetcher = fetch_public_key or (lambda path: fetch_adobe_public_key(path, key_host))
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._keys_lock = threading.Lock()
        self._fetch_lock = threading.Lock()  # one fetch at a time: deliveries arriving meanwhile wait for it
        self._failed_keys: dict[str, tuple[float, str]] = {}  # path -> (monotonic time to try again, why)
        try:
            self.currency = currency_code(self.cfg.get("currency"), "USD", "currency")
        except PayloadError as exc:
            raise ConfigError(f"magento.currency: {exc}") from None
        self.page_size = self._page_size(100, 1000)
        self._categories: dict[str, tuple[str, ...]] | None = None

    # ------------------------------------------------------------------ API plumbing
    @property
    def base_url(self) -> str:
        return self._need("base_url").rstrip("/")

    @property
    def rest_prefix(self) -> str:
        store = self.cfg.get("store_code")
        return f"/rest/{store}/V1" if store else "/rest/V1"

    def _open_http(self) -> HttpClient:
        oauth = self.cfg.get("oauth")
        token = self.cfg.get("access_token")
        if not oauth and not token:
            raise ConfigError("magento needs `access_token` (integration token) or `oauth` credentials")
        return self._new_http(self.base_url, {"Authorization": f"Bearer {token}"} if token and not oauth else {})

    def _get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        full = self.rest_prefix + path
        oauth = self.cfg.get("oauth")
        if not oauth:
            return self.http.get(full, params).data
        for attempt in range(2):
            header = oauth_header(
                "GET",
                self.base_url + full,
                params,
                str(oauth["consumer_key"]),
                str(oauth["consumer_secret"]),
                str(oauth["access_token"]),
                str(oauth["access_token_secret"]),
                timestamp=int(self.clock()),
            )
            try:
                return self.http.get(full, params, headers={"Authorization": header}).data
            except AuthError as exc:
                # HttpClient resends a request after a 429 with the same nonce, which Magento refuses as
                # reused; sign afresh once.
                if attempt == 0 and "nonce" in str(exc).lower():
                    continue
                raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ webhooks
    def _unfetched_key_paths(self, headers: Mapping[str, str]) -> list[str]:
        """The signed key paths of a delivery that are neither cached nor refused within the last minute."""
        h = {k.lower(): v for k, v in headers.items()}
        paths = [path.strip() for n in (1, 2)
                 if h.get(f"x-adobe-digital-signature-{n}") and (path := h.get(f"x-adobe-public-key{n}-path"))]
        now = time.monotonic()
        with self._keys_lock:
            return [p for p in paths if _KEY_PATH.match(p) and ".." not in p and p not in self._keys
                    and self._failed_keys.get(p, (0.0, ""))[0] <= now]

    def verify_needs_io(self, headers: Mapping[str, str]) -> bool:
        """Whether ``verify`` would fetch a public key: the caller then runs ``prefetch`` off the event loop
        (a fetch blocks for up to its timeout)."""
        return bool(self._unfetched_key_paths(headers))

    def prefetch(self, headers: Mapping[str, str]) -> None:
        """Fetch and cache both public keys a delivery names (Adobe always sends two), so a later ``verify``
        of it, or of any delivery signed with them, needs no network; a key that cannot be had is refused
        without a fetch for a minute (``verify`` says why)."""
        for path in self._unfetched_key_paths(headers):
            with contextlib.suppress(SignatureError):  # verify says why the delivery is refused
                self._public_key(path)

    def _public_key(self, path: str) -> rsa.RSAPublicKey:
        with self._keys_lock:
            key = self._keys.get(path)
            failed = self._failed_keys.get(path)
        if key is not None:
            return key
        if not _KEY_PATH.match(path) or ".." in path:
            raise SignatureError(f"refusing public key path {path[:100]!r}: not an Adobe key file path")
        if failed is not None and failed[0] > time.monotonic():
            raise SignatureError(failed[1])
        with self._fetch_lock:
            with self._keys_lock:
                key = self._keys.get(path)
            if key is not None:  # fetched by the delivery this one waited for
                return key
            try:
                try:
                    pem = self._fetch_pem(path)
                except IntegrationError as exc:
                    raise SignatureError(f"could not fetch public key {path}: {exc}") from exc
                return self._load_key(path, pem)
            except SignatureError as exc:
                with self._keys_lock:
                    if len(self._failed_keys) >= _KEY_CACHE_MAX:
                        self._failed_keys.pop(next(iter(self._failed_keys)))
                    self._failed_keys[path] = (time.monotonic() + _KEY_RETRY_SECONDS, str(exc))
                raise

    def _load_key(self, path: str, pem: str | bytes) -> rsa.RSAPublicKey:
        try:
            loaded = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
        except (ValueError, TypeError) as exc:
            raise SignatureError(f"public key {path} is not a PEM RSA public key: {exc}") from None
        if not isinstance(loaded, rsa.RSAPublicKey):
            raise SignatureError(f"public key {path} is not an RSA key")
        with self._keys_lock:
            if len(self._keys) >= _KEY_CACHE_MAX:
                self._keys.pop(next(iter(self._keys)))
            self._keys[path] = loaded
        return loaded

    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookDelivery:
        """Accept an Adobe I/O Events delivery if either RSA-SHA256 signature verifies over the raw body."""
        h = {k.lower(): v for k, v in headers.items()}
        pairs = [
            (h.get("x-adobe-digital-signature-1"), h.get("x-adobe-public-key1-path")),
            (h.get("x-adobe-digital-signature-2"), h.get("x-adobe-public-key2-path")),
        ]
        present = [(sig, path) for sig, path in pairs if sig and path]
        if not present:
            raise SignatureError(
                "missing Adobe I/O Events signature headers "
                "(x-adobe-digital-signature-1/-2 with x-adobe-public-key1-path/-2-path)"
            )
        problems: list[str] = []
        verified = False
        for sig, path in present:
            assert sig is not None and path is not None
            try:
                signature = base64.b64decode(sig.strip(), validate=True)
            except ValueError:
                problems.append("signature is not base64")
                continue
            try:
                key = self._public_key(path.strip())
            except SignatureError as exc:
                problems.append(str(exc))
                continue
            try:
                key.verify(signature, raw_body, padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                problems.append(f"signature does not verify with {path.strip()}")
                continue
            verified = True
            break
        if not verified:
            raise SignatureError("Adobe I/O Events signature rejected: " + "; ".join(problems))
        event = _json_object(raw_body)
        if self.client_id is not None:
            recipient = event.get("recipient_client_id")
            if recipient != self.client_id:
                raise SignatureError(f"event is addressed to client {recipient!r}, not this integration")
        event_id = clip_id(event.get("id") or event.get("event_id"))
        topic = str(event.get("type") or "")
        if not topic:
            raise PayloadError("CloudEvent has no `type`", "type")
        if event.get("time") is None:
            raise ReplayError("CloudEvent has no `time`; cannot check the replay window")
        sent = parse_time(event.get("time"), "time")
        age = self.clock() - sent.timestamp()
        if abs(age) > self.replay_window:
            raise ReplayError(
                f"event time {sent.isoformat()} is {age:.0f} s from now, outside the {self.replay_window:.0f} s "
                "replay window"
            )
        return WebhookDelivery(event_id, topic, sent, raw_body)

    # ------------------------------------------------------------------ parsing
    def is_placed(self, payload: Mapping[str, Any]) -> bool:
        """An order in a placed ``state`` (``PLACED_STATES``); ``pending_payment``, ``payment_review`` and
        ``canceled`` are not, and a later ``sales_order_save_after`` to a placed state brings the order (once:
        the event id is the order id, so every later save of it is a duplicate). One without a state is taken
        as placed."""
        data = payload.get("data")
        order = data.get("value") if isinstance(data, Mapping) else payload
        state = order.get("state") if isinstance(order, Mapping) else None
        return state is None or (isinstance(state, str) and state.strip().lower() in PLACED_STATES)

    def describe_unplaced(self, payload: Mapping[str, Any]) -> str:
        # the CloudEvent's own id and fields are the event's; the order is data.value
        data = payload.get("data")
        order = data.get("value") if isinstance(data, Mapping) else None
        order = order if isinstance(order, Mapping) else payload
        order_id = order.get("entity_id") or order.get("increment_id")
        return f"order {str(order_id)[:64]!r} (state {str(order.get('state'))[:32]!r})"

    def parse_order(self, payload: dict[str, Any]) -> Order:
        """A Magento order from ``GET /V1/orders/{id}``, a search page item, or an I/O Events CloudEvent."""
        payload = object_payload(payload, "a Magento order")
        order = payload
        if "specversion" in payload or ("data" in payload and "type" in payload):
            data = payload.get("data")
            value = data.get("value") if isinstance(data, dict) else None
            if not isinstance(value, dict):
                raise PayloadError("CloudEvent `data.value` must hold the order object", "data.value")
            order = value
        order_id, increment_id = _order_id(order)
        if order.get("created_at") is None:
            raise PayloadError("Magento order has no `created_at`", "created_at")
        currency = currency_code(
            order.get("order_currency_code") or order.get("base_currency_code"), None, "order_currency_code"
        )
        if order.get("grand_total") is None:
            raise PayloadError("Magento order has no `grand_total`", "grand_total")
        total = to_decimal(order.get("grand_total"), "grand_total")
        subtotal = to_decimal(order["subtotal"], "subtotal") if order.get("subtotal") is not None else total
        items = order.get("items") or []
        if not isinstance(items, list):
            raise PayloadError("Magento order `items` must be a list", "items")
        lines: list[OrderLine] = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise PayloadError(f"items[{i}] must be an object", f"items[{i}]")
            if item.get("parent_item_id"):
                continue  # child line of a configurable/bundle: the parent line carries sku and price
            sku = clip_id(item.get("sku"))
            if sku is None:
                raise PayloadError(f"items[{i}] has no sku", f"items[{i}].sku")
            qty = to_decimal(item.get("qty_ordered", 1), f"items[{i}].qty_ordered")
            lines.append(OrderLine(
                sku=sku,
                product_id=clip_id(item.get("product_id")),
                category=None,  # Magento order lines carry no category; the synced catalog knows it
                qty=int(qty),
                unit_price=to_decimal(item.get("price", 0), f"items[{i}].price"),
            ))
        customer_id = None if _flag(order.get("customer_is_guest")) else clip_id(order.get("customer_id"))
        return Order(
            platform=self.platform,
            order_id=order_id,
            order_number=increment_id,
            customer_id=customer_id,
            email_sha256=email_sha256(order.get("customer_email")),
            created_at=parse_time(order.get("created_at"), "created_at"),
            currency=currency,
            subtotal=subtotal,
            total=total,
            ship_country=_ship_country(order),
            lines=tuple(lines),
        )

    def order_event_key(self, order: Order) -> str:
        """The increment id (``order_number``), else the entity id: the one field every order event carries.
        Adobe's events reference (https://developer.adobe.com/commerce/extensibility/events/events-reference)
        lists ``increment_id`` and no order ``entity_id`` in ``observer.sales_order_save_after``'s payload, and
        does not list ``observer.sales_order_place_after`` at all; Magento dispatches sales_order_place_after
        before it first saves the order (no entity id yet). Named by the entity id, an order paid at checkout
        came twice: placed (by its increment id) and again with its invoice's save (by its entity id). The
        order's id (what its refunds name) stays the entity id where the payload has one."""
        return order.order_number or order.order_id

    def parse_refund(self, topic: str, payload: dict[str, Any]) -> Refund | None:
        """An order saved ``canceled`` (``sales_order_save_after``): the whole order, named as its ``order``
        event names it (None for any other state: read as an order). Or a credit memo
        (``sales_order_creditmemo_save_after``): its lines with a refunded quantity, for the
        order ``order_id`` (the order's ``entity_id``, Kassa's Magento order id). A memo lists every line of
        the order, those not refunded with qty 0, and a configurable product twice (the parent line priced,
        its child at 0 with the same SKU): only priced lines with a quantity count. None when no line is
        refunded (an adjustment or shipping only)."""
        if topic == ORDER_SAVED_EVENT:
            return self._cancellation(payload)
        memo = payload.get("data", {}).get("value") if isinstance(payload.get("data"), dict) else None
        if not isinstance(memo, dict):
            raise PayloadError("CloudEvent `data.value` must hold the credit memo object", "data.value")
        order_id = clip_id(memo.get("order_id"))
        memo_id = clip_id(memo.get("entity_id")) or clip_id(memo.get("increment_id"))
        if order_id is None or memo_id is None:
            raise PayloadError("Magento credit memo needs `order_id` and `entity_id`", "order_id")
        items = memo.get("items") or []
        if not isinstance(items, list):
            raise PayloadError("Magento credit memo `items` must be a list", "items")
        priced: dict[str, OrderLine] = {}
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise PayloadError(f"items[{i}] must be an object", f"items[{i}]")
            sku = clip_id(item.get("sku"))
            qty = int(to_decimal(item.get("qty", 0), f"items[{i}].qty"))
            price = to_decimal(item.get("price", 0), f"items[{i}].price")
            if sku is None or qty <= 0 or price <= 0:
                continue
            line = priced.get(sku)
            priced[sku] = OrderLine(sku, clip_id(item.get("product_id")), None,
                                    qty + (line.qty if line else 0), price)
        if not priced:
            return None
        created = memo.get("created_at") or payload.get("time")
        return Refund(self.platform, order_id, memo_id, parse_time(created, "created_at"), tuple(priced.values()))

    def _cancellation(self, payload: dict[str, Any]) -> Refund | None:
        data = payload.get("data")
        order = data.get("value") if isinstance(data, dict) else None
        if not isinstance(order, dict):
            raise PayloadError("CloudEvent `data.value` must hold the order object", "data.value")
        state = order.get("state")
        if not isinstance(state, str) or state.strip().lower() != "canceled":
            return None
        order_id, _ = _order_id(order)
        changed = order.get("updated_at") or payload.get("time")
        return Refund(self.platform, order_id, None, parse_time(changed, "updated_at"))

    def parse_product(self, payload: dict[str, Any]) -> Product:
        payload = object_payload(payload, "a Magento product")
        sku = required_id(payload, "sku", "Magento product")
        product_id = clip_id(payload.get("id")) or sku
        custom = _custom_attributes(payload)
        ext = payload.get("extension_attributes") if isinstance(payload.get("extension_attributes"), dict) else {}
        assert isinstance(ext, dict)
        stock: int | None = None
        stock_item = ext.get("stock_item")
        if isinstance(stock_item, dict):
            in_stock = stock_item.get("is_in_stock", True)
            qty = stock_item.get("qty")
            stock = 0 if not in_stock else (max(0, int(to_decimal(qty, "stock_item.qty"))) if qty is not None
                                             else None)
        if payload.get("status") == 2:  # disabled in the admin: never offer it
            stock = 0
        image = custom.get("image") or _first_image(payload.get("media_gallery_entries"))
        image_url = None
        if isinstance(image, str) and image and image != "no_selection":
            default_media = f"{str(self.cfg.get('base_url') or '').rstrip('/')}/media/catalog/product"
            media = str(self.cfg.get("media_url") or default_media)
            image_url = media.rstrip("/") + "/" + image.lstrip("/")
        url_key = custom.get("url_key")
        url = None
        if isinstance(url_key, str) and url_key and self.cfg.get("base_url"):
            url = f"{self.base_url}/{url_key}{self.cfg.get('url_suffix', '.html')}"
        updated = payload.get("updated_at")
        return Product(
            sku=sku,
            product_id=product_id,
            title=str(payload.get("name") or sku),
            price=to_decimal(payload.get("price", 0) or 0, "price"),
            currency=self.currency,
            category_path=self._category_path(payload, ext, custom),
            stock=stock,
            image_url=image_url,
            url=url,
            updated_at=parse_time(updated, "updated_at") if updated else None,
        )

    def _category_path(self, payload: dict[str, Any], ext: dict[str, Any], custom: dict[str, Any]) -> tuple[str, ...]:
        ids: list[str] = []
        links = ext.get("category_links")
        if isinstance(links, list):
            ids = [str(link.get("category_id")) for link in links if isinstance(link, dict)]
        if not ids and isinstance(custom.get("category_ids"), list):
            ids = [str(c) for c in custom["category_ids"]]
        if not ids:
            return ()
        names = self._categories or {}
        paths = [names.get(c, (c,)) for c in ids]
        return max(paths, key=len)  # the most specific category the product is in

    # ------------------------------------------------------------------ catalog
    def load_categories(self) -> dict[str, tuple[str, ...]]:
        """Category id -> names from the store root down (``GET /V1/categories``), cached per connector."""
        if self._categories is None:
            tree = self._get("/categories")
            mapping: dict[str, tuple[str, ...]] = {}

            def walk(node: Any, trail: tuple[str, ...]) -> None:
                if not isinstance(node, dict):
                    raise PayloadError("malformed category tree from GET /V1/categories", "children_data")
                level = int(node.get("level") or 0)
                # Level 0 is "Root Catalog", level 1 a store's root ("Default Category"): not merchandising.
                here = (*trail, str(node.get("name") or node.get("id"))) if level >= 2 else trail
                mapping[str(node.get("id"))] = here or (str(node.get("name") or node.get("id")),)
                for child in node.get("children_data") or []:
                    walk(child, here)

            walk(tree, ())
            self._categories = mapping
        return self._categories

    def iter_products(self, cursor: str | None = None) -> Iterator[tuple[list[Product], str | None]]:
        """Pages ordered by ``(updated_at, entity_id)``; the cursor is the last pair seen (``"<updated_at>|<id>"``).

        Each page asks for products strictly after the cursor (two filter groups: ``updated_at >= t`` AND
        (``entity_id > id`` OR ``updated_at > t``)), so a product edited mid-crawl moves to the end instead of
        shifting pages and hiding another one.
        """
        try:
            self.load_categories()
        except (AuthError, HttpStatusError):
            self._categories = {}  # no category ACL (or no such route): paths fall back to category ids
        after = _parse_cursor(cursor)
        while True:
            params: dict[str, Any] = {
                "searchCriteria[pageSize]": self.page_size,
                "searchCriteria[currentPage]": 1,
                "searchCriteria[sortOrders][0][field]": "updated_at",
                "searchCriteria[sortOrders][0][direction]": "ASC",
                "searchCriteria[sortOrders][1][field]": "entity_id",
                "searchCriteria[sortOrders][1][direction]": "ASC",
            }
            params.update(_after_filters(after))
            page = _search_page(self._get("/products", params), "GET /V1/products")
            items, total = page
            fresh = [p for p in items if after is None or _key_of(p) > after]
            if not fresh:
                return  # nothing past the cursor (Magento repeats its last page past the end)
            # One product Kassa cannot map (a price past 1e9 in a small currency unit) is skipped and reported,
            # as every connector does: failing the page stopped every later run at the same product.
            products = self._parse_products(fresh, "sku")
            after = _key_of(fresh[-1])
            done = len(items) >= total
            yield products, f"{after[0]}|{after[1]}"
            if done:
                return

    def count_products(self, cursor: str | None = None) -> int | None:
        """Products a run from ``cursor`` will read (a progress hint; ``None`` if unknown)."""
        try:
            params: dict[str, Any] = {"searchCriteria[pageSize]": 1, "searchCriteria[currentPage]": 1}
            params.update(_after_filters(_parse_cursor(cursor)))
            _, self.total_hint = _search_page(self._get("/products", params), "GET /V1/products")
        except IntegrationError:
            self.total_hint = None
        return self.total_hint

    def get_order(self, order_id: str) -> Order:
        """``GET /V1/orders/{entity_id}``; a ``#``-prefixed value is looked up by increment id instead."""
        if order_id.startswith("#"):
            page = self._get("/orders", {
                "searchCriteria[filter_groups][0][filters][0][field]": "increment_id",
                "searchCriteria[filter_groups][0][filters][0][value]": order_id[1:],
                "searchCriteria[filter_groups][0][filters][0][condition_type]": "eq",
                "searchCriteria[pageSize]": 1,
            })
            items, _ = _search_page(page, "GET /V1/orders")
            if not items:
                raise PayloadError(f"no Magento order with increment id {order_id[1:]!r}", "increment_id")
            return self.parse_order(items[0])
        data = self._get(f"/orders/{quote(order_id, safe='')}")
        if not isinstance(data, dict):
            raise PayloadError(f"GET /V1/orders/{order_id} did not return an order object")
        return self.parse_order(data)

    def iter_orders(self, since: datetime | None = None) -> Iterator[tuple[list[Order], str | None]]:
        """Orders created at or after ``since``, oldest first, paged by ``currentPage`` and stopped on
        ``total_count`` (Magento answers a page past the end with the last page again)."""
        page_no = 1
        seen = 0
        while True:
            params: dict[str, Any] = {
                "searchCriteria[pageSize]": self.page_size,
                "searchCriteria[currentPage]": page_no,
                "searchCriteria[sortOrders][0][field]": "created_at",
                "searchCriteria[sortOrders][0][direction]": "ASC",
            }
            if since is not None:
                params.update({
                    "searchCriteria[filter_groups][0][filters][0][field]": "created_at",
                    "searchCriteria[filter_groups][0][filters][0][value]": since.astimezone(UTC).strftime(
                        "%Y-%m-%d %H:%M:%S"),
                    "searchCriteria[filter_groups][0][filters][0][condition_type]": "gteq",
                })
            items, total = _search_page(self._get("/orders", params), "GET /V1/orders")
            if not items or seen >= total:
                return
            take = items[: max(0, total - seen)]
            seen += len(take)
            orders = [self.parse_order(o) for o in take]
            yield orders, orders[-1].created_at.isoformat() if orders else None
            if seen >= total:
                return
            page_no += 1

    # ------------------------------------------------------------------ audit
    def audit(self) -> list[AuditCheck]:
        def products() -> str:
            _, total = _search_page(self._get("/products", {"searchCriteria[pageSize]": 1}), "GET /V1/products")
            return f"{total} products readable"

        def orders() -> str:
            items, total = _search_page(self._get("/orders", {
                "searchCriteria[pageSize]": 1,
                "searchCriteria[sortOrders][0][field]": "created_at",
                "searchCriteria[sortOrders][0][direction]": "ASC",
            }), "GET /V1/orders")
            if not items:
                return "orders readable (no orders yet)"
            oldest = parse_time(items[0].get("created_at"), "created_at")
            return f"{total} orders readable back to {oldest.date().isoformat()}"

        def webhooks() -> str:
            subs = self._get("/eventing/getEventSubscriptions")
            names = []
            if isinstance(subs, list):
                names = [str(s.get("name")) for s in subs if isinstance(s, dict)]
            elif isinstance(subs, dict):
                names = list(subs)
            if ORDER_SUBSCRIPTION not in names:
                raise SetupMissing(
                    f"Adobe I/O Events is installed but {ORDER_SUBSCRIPTION} is not subscribed; run "
                    f"`bin/magento events:subscribe {ORDER_SUBSCRIPTION}`"
                )
            said = [f"{ORDER_SUBSCRIPTION} is subscribed (Adobe I/O Events)"]
            # Recommended, not needed to learn from orders (as Shopify's audit says): a warning, not a refusal.
            for name, without in ((ORDER_SAVED_SUBSCRIPTION, "an order placed unpaid (pending_payment, a redirect "
                                   "payment method) is never counted when it is paid, and a cancelled order is "
                                   "not taken back"),
                                  (REFUND_SUBSCRIPTION, "a refunded order is not taken back and stays a conversion")):
                if name in names:
                    said.append(f"{name} is subscribed")
                else:
                    said.append(f"warning: {name} is not subscribed (recommended: without it {without}; run "
                                f"`bin/magento events:subscribe {name}`)")
            return "; ".join(said)

        def inventory() -> str:
            # lowStock needs no SKU, so it probes the CatalogInventory ACL even on an empty catalog.
            page = self._get("/stockItems/lowStock/", {"scopeId": 0, "qty": 0, "pageSize": 1})
            _, total = _search_page(page, "GET /V1/stockItems/lowStock")
            return f"stock readable ({total} items out of stock)"

        def customers() -> str:
            page = self._get("/customers/search", {"searchCriteria[pageSize]": 1})
            _, total = _search_page(page, "GET /V1/customers/search")
            return f"full customer records readable ({total} customers); orders alone give email hashes"

        checks = self._run_audit({"read_products": products, "read_orders": orders, "order_webhooks": webhooks,
                                  "inventory": inventory, "customer_data": customers})
        for check in checks:
            if check.capability == "order_webhooks" and check.status == "unsupported":
                check.detail = (
                    "Adobe I/O Events for Adobe Commerce is not installed (no /V1/eventing API); install it to "
                    f"receive {ORDER_EVENT} — " + check.detail
                )
        return checks

    def _refusal_detail(self, exc: AuthError | SetupMissing, capability: str) -> str:
        if isinstance(exc, SetupMissing):
            return str(exc)
        resource = _ACL_RESOURCES[capability]
        return f"{_magento_message(exc, resource)} (grant {resource})"


# The ACL resource each audit probe needs, named when Magento refuses it.
_ACL_RESOURCES = {
    "read_products": "Magento_Catalog::products",
    "read_orders": "Magento_Sales::sales",
    "order_webhooks": "Magento_AdobeCommerceEventsClient::event_list",
    "inventory": "Magento_CatalogInventory::cataloginventory",
    "customer_data": "Magento_Customer::customer",
}


# --------------------------------------------------------------------------- helpers
def _order_id(order: Mapping[str, Any]) -> tuple[str, str | None]:
    """An order payload's id (its ``entity_id``, else its ``increment_id``: what its order event, its credit memos'
    ``order_id`` and its cancellation name) and its increment id."""
    entity_id = clip_id(order.get("entity_id"))
    increment_id = clip_id(order.get("increment_id"))
    order_id = entity_id or increment_id
    if order_id is None:
        raise PayloadError("Magento order has neither `entity_id` nor `increment_id`", "entity_id")
    return order_id, increment_id


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # 400 as on every platform: a bad field is the 422
        raise MalformedBody(f"webhook body is not JSON: {exc}") from None
    except RecursionError:  # ~1,000 levels: as the other platforms' parser says (kassa.integrations.webhooks)
        raise MalformedBody("webhook body is nested too deeply") from None
    if isinstance(data, list):  # the registration's "Batch" delivery style: several events in one request
        raise PayloadError("Adobe I/O Events batch deliveries are not read: set the event registration's delivery "
                           "to Webhook (one event per request)")
    if not isinstance(data, dict):
        raise PayloadError("webhook body must be a JSON object")
    return data


def _search_page(data: Any, what: str) -> tuple[list[dict[str, Any]], int]:
    """``items`` and ``total_count`` of a Magento search result, or a PayloadError naming what is wrong."""
    if not isinstance(data, dict):
        raise PayloadError(f"{what} returned {type(data).__name__}, not a search result object")
    items = data.get("items")
    if items is None:
        items = []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise PayloadError(f"{what}: `items` must be a list of objects", "items")
    total = data.get("total_count")
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise PayloadError(f"{what}: missing or invalid `total_count` ({total!r})", "total_count")
    return items, total


def _parse_cursor(cursor: str | None) -> tuple[str, int] | None:
    if not cursor:
        return None
    ts, sep, last = cursor.rpartition("|")
    if not sep or not ts or not last.isdigit():
        raise PayloadError(f"not a Magento catalog cursor: {cursor!r} (expected '<updated_at>|<entity_id>')")
    return ts, int(last)


def _after_filters(after: tuple[str, int] | None) -> dict[str, Any]:
    """``searchCriteria`` filter groups selecting products strictly after ``(updated_at, entity_id)``."""
    if after is None:
        return {}
    ts, last_id = after
    return {
        "searchCriteria[filter_groups][0][filters][0][field]": "updated_at",
        "searchCriteria[filter_groups][0][filters][0][value]": ts,
        "searchCriteria[filter_groups][0][filters][0][condition_type]": "gteq",
        "searchCriteria[filter_groups][1][filters][0][field]": "entity_id",
        "searchCriteria[filter_groups][1][filters][0][value]": last_id,
        "searchCriteria[filter_groups][1][filters][0][condition_type]": "gt",
        "searchCriteria[filter_groups][1][filters][1][field]": "updated_at",
        "searchCriteria[filter_groups][1][filters][1][value]": ts,
        "searchCriteria[filter_groups][1][filters][1][condition_type]": "gt",
    }


def _key_of(product: dict[str, Any]) -> tuple[str, int]:
    updated = product.get("updated_at")
    pid = product.get("id")
    if not isinstance(updated, str) or not isinstance(pid, int) or isinstance(pid, bool):
        raise PayloadError(
            f"Magento product {product.get('sku')!r} lacks the integer `id` / string `updated_at` paging needs", "id"
        )
    return updated, pid


def _flag(value: Any) -> bool:
    """A Magento yes/no field: ``true``/``1`` from the REST API, but ``"1"``/``"0"`` in an I/O Events payload,
    whose values are the order model's data as loaded from the database (strings): ``bool("0")`` is true."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


def _custom_attributes(payload: dict[str, Any]) -> dict[str, Any]:
    attrs = payload.get("custom_attributes")
    if not isinstance(attrs, list):
        return {}
    return {str(a.get("attribute_code")): a.get("value") for a in attrs if isinstance(a, dict)}


def _first_image(entries: Any) -> str | None:
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if isinstance(entry, dict) and not entry.get("disabled") and entry.get("file"):
            return str(entry["file"])
    return None


def _ship_country(order: dict[str, Any]) -> str | None:
    ext = order.get("extension_attributes")
    if isinstance(ext, dict):
        assignments = ext.get("shipping_assignments")
        if isinstance(assignments, list) and assignments and isinstance(assignments[0], dict):
            shipping = assignments[0].get("shipping")
            address = shipping.get("address") if isinstance(shipping, dict) else None
            if isinstance(address, dict) and address.get("country_id"):
                return country_code(address.get("country_id"))
    addresses = order.get("addresses")
    if isinstance(addresses, list):
        for address in addresses:
            if isinstance(address, dict) and address.get("address_type") == "shipping":
                return country_code(address.get("country_id"))
    address = order.get("shipping_address")
    if isinstance(address, dict):
        return country_code(address.get("country_id"))
    return None


def _magento_message(exc: AuthError, resource: str) -> str:
    """Magento's error text with its ``%placeholders`` filled in.

    Magento words an ACL refusal as ``"The consumer isn't authorized to access %resources."`` plus a
    ``parameters`` object. Whether the body reaches us whole or already reduced to its ``message``, the
    placeholders get the parameters, or else the ACL resource of the endpoint that was probed.
    """
    text = re.sub(r"^magento HTTP \d+: ", "", str(exc))
    message, params = text, None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and "message" in data:
        message, params = str(data["message"]), data.get("parameters")
    if isinstance(params, dict):
        for name, value in params.items():
            message = message.replace(f"%{name}", str(value))
    elif isinstance(params, list):
        for i, value in enumerate(params, 1):
            message = message.replace(f"%{i}", str(value))
    message = message.replace("%resources", resource)
    return f"HTTP {exc.status}: {message}" if exc.status else message


__all__ = [
    "ORDER_EVENT",
    "ORDER_SAVED_EVENT",
    "MagentoConnector",
    "fetch_adobe_public_key",
    "oauth_base_string",
    "oauth_header",
    "oauth_signature",
]
