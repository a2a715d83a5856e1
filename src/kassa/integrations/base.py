"""The canonical commerce model and the connector protocol every platform module implements.

Owns: ``Order`` / ``OrderLine`` / ``Refund`` / ``Product`` (money as ``Decimal``, times as tz-aware UTC), the
conversion of those to Kassa's wire types (``schemas.Event`` of type ``order`` or ``refund``, ``schemas.Offer``
of kind ``product``), the ``Connector`` protocol (verify a webhook, parse payloads, page the catalog, fetch one
order, audit credentials), the audit result type and the integration error hierarchy.

Raw e-mail addresses never leave a connector: ``email_sha256`` hashes them at parse time and only the
hash is stored on an ``Order``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, Protocol, runtime_checkable

from kassa import schemas

PLATFORMS: tuple[str, ...] = ("shopify", "magento", "sfcc", "sap", "woocommerce")

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_MAX_ID = 128  # schemas.Id bounds
MAX_ORDER_LINES = 500  # schemas.Order.items bound: an order event holds at most this many lines
_MAX_MONEY = Decimal("1e9")
_MAX_DECIMAL = Decimal("1e18")  # any amount or quantity a platform sends: 18 digits + 4 decimals fit the context


# --------------------------------------------------------------------------- errors
class IntegrationError(Exception):
    """Base of every error a connector raises; ``str(exc)`` is safe to show to an operator."""


class SignatureError(IntegrationError):
    """Missing or wrong webhook signature (HTTP 401)."""


class ReplayError(IntegrationError):
    """Webhook timestamp outside the replay window (HTTP 409)."""


class PayloadError(IntegrationError):
    """A payload or API page Kassa cannot turn into the canonical model (HTTP 400/422)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class MalformedBody(PayloadError):
    """A verified webhook body that is not JSON (HTTP 400, unlike a JSON payload with bad fields: 422)."""


class AuthError(IntegrationError):
    """The platform refused the credentials; the message carries the platform's own error text."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class MissingScopeError(AuthError):
    """The credentials work but lack a permission (scope) the call needs; the message is the platform's."""


class RateLimited(IntegrationError):
    """The platform kept throttling after every retry; ``retry_after`` is its last hint in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unreachable(IntegrationError):
    """The platform could not be reached (DNS, connect, timeout, repeated 5xx)."""


# --------------------------------------------------------------------------- helpers
def email_sha256(raw: object) -> str | None:
    """SHA-256 hex of the trimmed, lower-cased address; ``None`` for a missing or blank one, or for a value
    that is no string (a signed payload's ``"email": 0`` or ``[]`` was an AttributeError: HTTP 500)."""
    if not isinstance(raw, str):
        return None
    normalized = raw.strip().lower()
    if not normalized:
        return None
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def to_decimal(x: Any, field: str | None = None) -> Decimal:
    """Money from a platform value (string like ``"19.99"``, int, float or Decimal)."""
    if isinstance(x, Decimal):
        value = x
    elif isinstance(x, bool) or x is None:
        raise PayloadError(f"expected a decimal amount, got {x!r}", field)
    elif isinstance(x, int | str):
        try:
            value = Decimal(str(x).strip())
        except InvalidOperation:
            raise PayloadError(f"expected a decimal amount, got {x!r}", field) from None
    elif isinstance(x, float):
        value = Decimal(repr(x))  # repr keeps the shortest round-trip digits ("19.99", not 19.98999…)
    else:
        raise PayloadError(f"expected a decimal amount, got {type(x).__name__}", field)
    if not value.is_finite():
        raise PayloadError(f"expected a finite amount, got {x!r}", field)
    if abs(value) >= _MAX_DECIMAL:  # past this, quantizing a price to cents raises InvalidOperation (a 500)
        raise PayloadError(f"expected an amount below 1e18, got {value:.3E}", field)
    return value


def parse_time(x: Any, field: str | None = None) -> datetime:
    """A tz-aware UTC datetime from ISO 8601 (``Z`` or offset; naive means UTC), unix seconds or a datetime."""
    if isinstance(x, datetime):
        dt = x
    elif isinstance(x, int | float) and not isinstance(x, bool):
        try:
            return datetime.fromtimestamp(float(x), UTC)
        except (OverflowError, OSError, ValueError):
            raise PayloadError(f"timestamp out of range: {x!r}", field) from None
    elif isinstance(x, str) and x.strip():
        text = x.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            raise PayloadError(f"expected an ISO 8601 time, got {x!r}", field) from None
    else:
        raise PayloadError(f"expected a time, got {x!r}", field)
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is before datetime.min in UTC: was a 500 on a signed webhook
        raise PayloadError(f"time out of range: {x!r}", field) from None


def currency_code(x: Any, default: str | None = None, field: str | None = None) -> str:
    """An ISO 4217 code, upper-cased; ``default`` when missing."""
    if x is None or x == "":
        if default is None:
            raise PayloadError("missing currency", field)
        return default
    code = str(x).strip().upper()
    if not _CURRENCY.match(code):
        raise PayloadError(f"not an ISO 4217 currency code: {x!r}", field)
    return code


def country_code(x: Any) -> str | None:
    """An ISO 3166-1 alpha-2 code, upper-cased; ``None`` for anything else (a ship country is optional)."""
    if not isinstance(x, str):
        return None
    code = x.strip().upper()
    return code if _COUNTRY.match(code) else None


def clip_id(x: Any) -> str | None:
    """A platform id as a Kassa id string (1–128 chars) or ``None``."""
    if x is None or isinstance(x, bool):
        return None
    text = str(x).strip()
    return text[:_MAX_ID] if text else None


def object_payload(payload: Any, what: str) -> dict[str, Any]:
    """``payload`` when it is a JSON object; else a PayloadError naming ``what`` (``"a Shopify order"``)."""
    if not isinstance(payload, dict):
        raise PayloadError(f"expected a JSON object for {what}, got {type(payload).__name__}")
    return payload


def required_id(payload: Mapping[str, Any], key: str, what: str) -> str:
    """The platform id under ``key`` (see ``clip_id``); a PayloadError naming the field when it is missing."""
    value = clip_id(payload.get(key))
    if value is None:
        raise PayloadError(f"{what} has no `{key}`", key)
    return value


def required_list(payload: Mapping[str, Any], key: str, what: str) -> list[Any]:
    """The JSON list under ``key``; a PayloadError naming the field when it is missing or not a list."""
    value = payload.get(key)
    if not isinstance(value, list):
        raise PayloadError(f"{what} `{key}` must be a list", key)
    return value


def int_quantity(value: Any, field: str) -> int:
    """A line quantity that must already be a JSON integer (``2``, not ``"2"`` or ``2.0``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PayloadError(f"{field} must be an integer, got {value!r}", field)
    return value


@contextmanager
def malformed(what: str, *also: type[Exception]) -> Iterator[None]:
    """Turn the TypeError / ValueError / AttributeError (and ``also``) of reading an odd payload into a
    PayloadError ``malformed <what>: …`` (HTTP 422) instead of a crash."""
    caught: tuple[type[Exception], ...] = (TypeError, ValueError, AttributeError, *also)
    try:
        yield
    except caught as exc:
        raise PayloadError(f"malformed {what}: {exc}") from None


def _require_id(value: str | None, name: str) -> None:
    if not value or len(value) > _MAX_ID:
        raise PayloadError(f"{name} must be 1–{_MAX_ID} characters", name)


def _require_money(value: Decimal, name: str) -> None:
    if value < 0 or value > _MAX_MONEY:
        raise PayloadError(f"{name} must be between 0 and 1e9, got {value}", name)


# --------------------------------------------------------------------------- canonical model
@dataclass(frozen=True, slots=True)
class OrderLine:
    sku: str
    product_id: str | None
    category: str | None
    qty: int
    unit_price: Decimal

    def __post_init__(self) -> None:
        _require_id(self.sku, "sku")
        if self.product_id is not None:
            _require_id(self.product_id, "product_id")
        if not 0 <= self.qty <= 100_000:
            raise PayloadError(f"qty must be between 0 and 100000, got {self.qty}", "qty")
        _require_money(self.unit_price, "unit_price")

    def to_item(self) -> schemas.OrderItem:
        category = self.category[:256] if self.category else None
        return schemas.OrderItem(self.sku, self.product_id, category, self.qty, float(self.unit_price))


@dataclass(frozen=True, slots=True)
class Order:
    platform: str
    order_id: str
    order_number: str | None
    customer_id: str | None
    email_sha256: str | None
    created_at: datetime
    currency: str
    subtotal: Decimal
    total: Decimal
    ship_country: str | None
    lines: tuple[OrderLine, ...]

    def __post_init__(self) -> None:
        # Validated once here so `to_event` can build wire structs without msgspec re-validation.
        _require_id(self.order_id, "order_id")
        if self.customer_id is not None:
            _require_id(self.customer_id, "customer_id")
        if self.email_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.email_sha256):
            raise PayloadError("email_sha256 must be 64 lower-case hex characters", "email_sha256")
        if self.created_at.tzinfo is None:
            raise PayloadError("created_at must be timezone-aware", "created_at")
        if not _CURRENCY.match(self.currency):
            raise PayloadError(f"not an ISO 4217 currency code: {self.currency!r}", "currency")
        if self.ship_country is not None and not _COUNTRY.match(self.ship_country):
            raise PayloadError(f"not an ISO 3166 country code: {self.ship_country!r}", "ship_country")
        _require_money(self.subtotal, "subtotal")
        _require_money(self.total, "total")

    def to_order(self) -> schemas.Order:
        # Any number of lines parses (WebhookReceiver keeps MAX_ORDER_LINES of a longer order); the wire type
        # holds at most that many, and a stored event past its bound would not decode again.
        if len(self.lines) > MAX_ORDER_LINES:
            raise PayloadError(f"an order event holds at most {MAX_ORDER_LINES} lines, got {len(self.lines)}",
                               "lines")
        return schemas.Order(
            id=self.order_id,
            platform=self.platform,
            currency=self.currency,
            total=float(self.total),
            ship_country=self.ship_country,
            items=[line.to_item() for line in self.lines],
            created_at=self.created_at.timestamp(),
            customer_id=self.customer_id,
        )

    def to_event(self, event_id: str) -> schemas.Event:
        """The ``order`` event Kassa ingests (durable log, features, retrieval, reward attribution)."""
        customer = None
        if self.customer_id is not None or self.email_sha256 is not None:
            customer = schemas.Customer(id=self.customer_id, email_sha256=self.email_sha256)
        return schemas.Event(
            event_id=bounded_event_id(event_id),
            type="order",
            value=float(self.total),
            timestamp=self.created_at.timestamp(),
            customer=customer,
            order=self.to_order(),
        )


def bounded_event_id(event_id: str) -> str:
    """``event_id`` within the wire bound. Cut to the bound, two long order ids sharing their first ~110
    characters were one event id (the second order dropped as a duplicate): the cut keeps a digest of the whole
    id, still the same id for every delivery of the same order."""
    if len(event_id) <= _MAX_ID:
        return event_id
    digest = hashlib.sha256(event_id.encode()).hexdigest()[:32]
    return f"{event_id[:_MAX_ID - 33]}~{digest}"


@dataclass(frozen=True, slots=True)
class Refund:
    """An order cancelled or refunded: ``lines`` are what was refunded (their SKU or product id, quantity and
    unit price as the order's lines had them); none means the whole order. ``refund_id`` names one refund of
    the order (a platform may refund an order several times); None for a cancellation, of which an order has
    one."""

    platform: str
    order_id: str
    refund_id: str | None
    created_at: datetime
    lines: tuple[OrderLine, ...] = ()

    def __post_init__(self) -> None:
        _require_id(self.order_id, "order_id")
        if self.refund_id is not None:
            _require_id(self.refund_id, "refund_id")
        if self.created_at.tzinfo is None:
            raise PayloadError("created_at must be timezone-aware", "created_at")

    def to_event(self) -> schemas.Event:
        """The ``refund`` event Kassa ingests, named so re-deliveries deduplicate: ``{platform}:refund:{id}``,
        or ``{platform}:cancel:{order id}``."""
        name = f"refund:{self.refund_id}" if self.refund_id is not None else f"cancel:{self.order_id}"
        return schemas.Event(
            event_id=bounded_event_id(f"{self.platform}:{name}"),
            type="refund",
            timestamp=self.created_at.timestamp(),
            order=schemas.Order(id=self.order_id, platform=self.platform,
                                items=[line.to_item() for line in self.lines[:MAX_ORDER_LINES]]),
        )


@dataclass(frozen=True, slots=True)
class Product:
    sku: str
    product_id: str
    title: str
    price: Decimal
    currency: str
    category_path: tuple[str, ...]
    stock: int | None
    image_url: str | None
    url: str | None
    updated_at: datetime | None
    active: bool = True  # False for drafts/archived/disabled products: their offer is kept but not served

    def __post_init__(self) -> None:
        _require_id(self.sku, "sku")
        _require_id(self.product_id, "product_id")
        if not _CURRENCY.match(self.currency):
            raise PayloadError(f"not an ISO 4217 currency code: {self.currency!r}", "currency")
        _require_money(self.price, "price")

    @property
    def category(self) -> str | None:
        """The most specific category (what order lines and eligibility rules compare against)."""
        return self.category_path[-1][:256] if self.category_path else None

    def to_offer(self, offer_id: str | None = None) -> schemas.Offer:
        """A ``product`` offer for the catalog; its id defaults to the SKU (what order lines carry)."""
        content: dict[str, Any] = {"price": str(self.price), "currency": self.currency}
        if self.image_url:
            content["image_url"] = self.image_url
        if self.url:
            content["url"] = self.url
        if self.category_path:
            content["category_path"] = list(self.category_path)
        return schemas.Offer(
            id=(offer_id or self.sku)[:_MAX_ID],
            kind="product",
            title=self.title[:256] or self.sku,
            content=content,
            value=float(self.price),
            sku=self.sku,
            product_id=self.product_id,
            category=self.category,
            stock=self.stock,
            features={"price": float(self.price)},
            active=self.active,
        )


# --------------------------------------------------------------------------- webhooks, audit, protocol
@dataclass
class WebhookDelivery:
    """A verified webhook: its dedupe id (platform delivery id), topic, send time if given, and raw body."""

    delivery_id: str | None
    topic: str
    timestamp: datetime | None
    body: bytes


AuditStatus = Literal["ok", "missing_scope", "unreachable", "unsupported"]
Capability = Literal["read_products", "read_orders", "order_webhooks", "inventory", "customer_data"]
CAPABILITIES: tuple[str, ...] = ("read_products", "read_orders", "order_webhooks", "inventory", "customer_data")


@dataclass
class AuditCheck:
    capability: str  # one of CAPABILITIES
    status: AuditStatus
    detail: str  # the platform's own error text, or what was found

    def to_dict(self) -> dict[str, str]:
        return {"capability": self.capability, "status": self.status, "detail": self.detail}


@runtime_checkable
class Connector(Protocol):
    """What every platform module provides. Instances hold credentials; they are cheap to build.

    Optional extras the CLI reads with ``getattr``: ``snippet_steps: list[str]`` (how to install the
    confirmation-page snippet on this platform) and ``webhook_steps: list[str]`` (how to subscribe Kassa's
    webhook endpoint), both shown by ``kassa integrations audit``. ``WebhookReceiver`` reads three more on a
    verified delivery, each answered 200 ``ignored`` when it says no: ``is_order_topic(topic)``,
    ``is_test(payload)`` (a test notification or test-mode order) and ``is_placed(payload)``, and names an order's
event by ``order_event_key(order)`` (by default its id). A connector that
    reads cancellations and refunds says which topics may carry one, ``is_refund_topic(topic)`` (by default
    ``topic in refund_topics``), and gives ``parse_refund(topic, payload) -> Refund | None`` (None: this
    delivery of the topic refunds nothing, e.g. a WooCommerce ``order.updated`` to another status).
    """

    platform: str

    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookDelivery:
        """Check the signature on the raw bytes (headers lower-cased); raise SignatureError / ReplayError."""
        ...

    def parse_order(self, payload: dict[str, Any]) -> Order:
        """The canonical order of a webhook or API payload; PayloadError with a clear message."""
        ...

    def parse_product(self, payload: dict[str, Any]) -> Product:
        """The canonical product of an API payload; PayloadError with a clear message."""
        ...

    def iter_products(self, cursor: str | None = None) -> Iterator[tuple[list[Product], str | None]]:
        """Pages of products, each with the cursor that resumes *after* that page."""
        ...

    def get_order(self, order_id: str) -> Order:
        ...

    def audit(self) -> list[AuditCheck]:
        ...
