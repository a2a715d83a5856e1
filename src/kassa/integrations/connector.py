"""`HttpConnector`: the base class of the platform connectors, owning what every one of them sets up.

Owns the parts the five platform modules used to write each for itself: the options a connector takes
(``sleep`` and ``clock``, injectable so throttling tests run instantly; ``on_wait`` to report each wait,
``on_retry`` each wait before a retry;
``transport`` for tests), the webhook settings (``webhook_secret``, ``replay_window_seconds``), the
``HttpClient`` opened on first use from ``timeout`` / ``max_retries`` (so a connector built from webhook
settings alone never asks for API credentials), ``close``, the sync bookkeeping (``skipped``,
``total_hint``, ``waited_seconds``), parsing one page of products without failing on a bad product, the
audit step that turns a probe's exception into an ``AuditCheck``, and JSON sync cursors.

A platform module subclasses it, sets ``platform``, opens its client in ``_open_http`` (base URL, auth,
credential checks) and implements the ``Connector`` methods; signature schemes and payload quirks stay in
the platform module.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar, TypedDict

import httpx

from kassa.integrations.base import (
    AuditCheck,
    AuditStatus,
    AuthError,
    IntegrationError,
    Order,
    PayloadError,
    Product,
    Refund,
    WebhookDelivery,
)
from kassa.integrations.config import DEFAULT_REPLAY_WINDOW_SECONDS, ConfigError
from kassa.integrations.http import HttpClient, HttpStatusError


class ConnectorOptions(TypedDict, total=False):
    """The keyword options every connector takes (``connector_for(platform, cfg, **options)``)."""

    sleep: Callable[[float], None]
    clock: Callable[[], float]
    on_wait: Callable[[float, str], None] | None
    on_retry: Callable[[float, str], None] | None  # a failed request about to be retried (`HttpClient`)
    transport: httpx.BaseTransport | None


class SetupMissing(IntegrationError):
    """The credentials work but a platform-side setup step Kassa needs is missing (audit: ``missing_scope``)."""


class HttpConnector(ABC):
    """A connector that talks to its platform's API through ``HttpClient``.

    ``cfg`` keys read here: ``webhook_secret``, ``replay_window_seconds`` (default 300), ``timeout``
    (seconds, default 30) and ``max_retries`` (default 5); the platform class documents the rest.
    """

    platform: str  # set by each subclass ("shopify"); an instance attribute for the Connector protocol
    api_name: ClassVar[str] = "platform API"  # named in "<platform>.<key> is required to call the …"
    # The webhook topics that mean "order placed"; other verified deliveries are acknowledged and ignored.
    order_topics: ClassVar[frozenset[str]] = frozenset({"order.created"})
    # Topics that may cancel or refund an order (`parse_refund`); none unless the platform module reads them.
    refund_topics: ClassVar[frozenset[str]] = frozenset()
    # What the audit reports when a probe needs a config value that is not set.
    config_error_status: ClassVar[AuditStatus] = "missing_scope"

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
        on_wait: Callable[[float, str], None] | None = None,
        on_retry: Callable[[float, str], None] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.cfg = dict(cfg)
        self.sleep = sleep
        self.clock = clock
        self.on_wait = on_wait
        self.on_retry = on_retry
        self.transport = transport
        secret = self.cfg.get("webhook_secret")
        self.secret: str | None = str(secret) if secret else None
        self.replay_window = float(self.cfg.get("replay_window_seconds") or DEFAULT_REPLAY_WINDOW_SECONDS)
        # Checked here, not when the first request opens the client: a bad value is a configuration error.
        self.timeout: float = self._number("timeout", 30.0, 0.001, 3600, whole=False)
        self.max_retries: int = self._number("max_retries", 5, 0, 100)
        self.skipped: list[str] = []  # products that could not be parsed, with the reason (reported by sync)
        self.total_hint: int | None = None  # products the current sync run will see (for progress bars)
        self._http: HttpClient | None = None
        self._clients: list[HttpClient] = []

    # ------------------------------------------------------------------ config and HTTP
    def _need(self, key: str) -> str:
        value = self.cfg.get(key)
        if not value:
            raise ConfigError(f"{self.platform}.{key} is required to call the {self.api_name}")
        return str(value)

    def _number(self, key: str, default: float, low: float, high: float, *, whole: bool = True) -> Any:
        """The numeric option ``key`` (``default`` when unset), a ConfigError naming it when it is not a number in
        ``[low, high]``: ``page_size: many`` or ``timeout: soon`` was a ValueError traceback, not exit 2."""
        value = self.cfg.get(key)
        if value in (None, ""):
            return default
        try:
            number = (int(str(value).strip()) if whole else float(value)) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not low <= number <= high:
            kind = "a whole number" if whole else "a number"
            raise ConfigError(f"{self.platform}.{key} must be {kind} between {low:g} and {high:g}, got {value!r}")
        return number

    def _page_size(self, default: int, maximum: int, key: str = "page_size") -> int:
        size: int = self._number(key, default, 1, maximum)
        return size

    @property
    def http(self) -> HttpClient:
        """The platform's API client, opened on first use (credentials are checked then, not at construction)."""
        if self._http is None:
            self._http = self._open_http()
        return self._http

    @abstractmethod
    def _open_http(self) -> HttpClient:
        """Check the API settings and open the client: ``return self._new_http(base_url, headers, auth=…)``."""

    def _new_http(self, base_url: str, headers: Mapping[str, str] | None = None, *,
                  auth: tuple[str, str] | None = None) -> HttpClient:
        """An ``HttpClient`` with this connector's timeout, retries, clock, sleep and wait and retry reporting."""
        client = HttpClient(
            base_url, headers, timeout=self.timeout, max_retries=self.max_retries, sleep=self.sleep, clock=self.clock,
            on_wait=self.on_wait, on_retry=self.on_retry, transport=self.transport, auth=auth, platform=self.platform,
        )
        self._clients.append(client)
        return client

    @property
    def waited_seconds(self) -> float:
        """Seconds spent waiting on throttles and backoff by the clients open now (reported by sync)."""
        return sum(client.waited_seconds for client in self._clients)

    def close(self) -> None:
        """Close every client this connector opened; the next API call opens a new one."""
        for client in self._clients:
            client.close()
        self._clients.clear()
        self._http = None

    # ------------------------------------------------------------------ the Connector protocol
    @abstractmethod
    def verify(self, headers: Mapping[str, str], raw_body: bytes) -> WebhookDelivery: ...

    @abstractmethod
    def parse_order(self, payload: dict[str, Any]) -> Order: ...

    @abstractmethod
    def parse_product(self, payload: dict[str, Any]) -> Product: ...

    @abstractmethod
    def iter_products(self, cursor: str | None = None) -> Iterator[tuple[list[Product], str | None]]: ...

    @abstractmethod
    def get_order(self, order_id: str) -> Order: ...

    @abstractmethod
    def audit(self) -> list[AuditCheck]: ...

    # ------------------------------------------------------------------ shared steps
    def is_order_topic(self, topic: str) -> bool:
        return topic in self.order_topics

    def is_refund_topic(self, topic: str) -> bool:
        return topic in self.refund_topics

    def is_placed(self, payload: Mapping[str, Any]) -> bool:
        """Whether a verified order-topic payload is a placed order. Platforms that send an order before it is
        placed (WooCommerce: a checkout draft, an unpaid order) say no, and the delivery is acknowledged and
        ignored; the placed order arrives later under the same id."""
        return True

    def describe_unplaced(self, payload: Mapping[str, Any]) -> str:
        """The order a payload ``is_placed`` said no to, for the log line saying so: ``order '<id>' (status
        '<status>')`` of the top-level fields; a platform that nests its order says where it is."""
        return f"order {str(payload.get('id'))[:64]!r} (status {str(payload.get('status'))[:32]!r})"

    def order_event_key(self, order: Order) -> str:
        """What names an order's event (``{platform}:order:{key}``), so that every delivery of one order is a
        duplicate of the first: its id, unless a platform's order events do not all carry it."""
        return order.order_id

    def parse_refund(self, topic: str, payload: dict[str, Any]) -> Refund | None:
        """The cancellation or refund a verified ``refund_topics`` delivery carries; None when it takes back no
        line of the order (the delivery is acknowledged and ignored, or read as an order on an order topic)."""
        return None

    def _parse_products(self, raws: Iterable[Any], id_key: str = "id") -> list[Product]:
        """The products of one API page; one that cannot be parsed is listed in ``skipped`` with its
        ``id_key`` value instead of failing the page."""
        products: list[Product] = []
        for raw in raws:
            try:
                products.append(self.parse_product(raw))
            except PayloadError as exc:
                label = raw.get(id_key) if isinstance(raw, Mapping) else None
                self.skipped.append(f"{'?' if label in (None, '') else label}: {exc}")
        return products

    def _run_audit(self, probes: Mapping[str, Callable[[], AuditCheck | str]]) -> list[AuditCheck]:
        """One check per capability, probes run in order (a later probe may use what an earlier one found)."""
        checks: list[AuditCheck] = []
        for capability, probe in probes.items():
            self._audit_step(checks, capability, probe)
        return checks

    def _audit_step(self, checks: list[AuditCheck], capability: str, probe: Callable[[], AuditCheck | str]) -> None:
        """Run one audit probe and append its check: a string is an ``ok`` detail; a refusal is
        ``missing_scope``, a 404 ``unsupported``, anything else that fails ``unreachable``."""
        try:
            result = probe()
        except (AuthError, SetupMissing) as exc:
            checks.append(AuditCheck(capability, "missing_scope", self._refusal_detail(exc, capability)))
        except HttpStatusError as exc:
            status: AuditStatus = "unsupported" if exc.status == 404 else "unreachable"
            checks.append(AuditCheck(capability, status, self._failure_detail(exc)))
        except ConfigError as exc:
            checks.append(AuditCheck(capability, self.config_error_status, str(exc)))
        except (IntegrationError, httpx.HTTPError) as exc:
            checks.append(AuditCheck(capability, "unreachable", str(exc)))
        else:
            checks.append(result if isinstance(result, AuditCheck) else AuditCheck(capability, "ok", result))

    def _refusal_detail(self, exc: AuthError | SetupMissing, capability: str) -> str:
        """The audit detail of a refused probe (platforms turn their JSON error bodies into text here)."""
        return str(exc)

    def _failure_detail(self, exc: HttpStatusError) -> str:
        """The audit detail of a probe that failed with another HTTP status."""
        return str(exc)


# --------------------------------------------------------------------------- sync cursors
def encode_cursor(state: Mapping[str, Any]) -> str:
    """A JSON sync cursor (``None`` values left out, keys sorted so equal states give equal cursors)."""
    return json.dumps({k: v for k, v in state.items() if v is not None}, separators=(",", ":"), sort_keys=True)


def decode_cursor(cursor: str | None, platform: str) -> dict[str, Any]:
    """The state of a JSON sync cursor (``{}`` for none); an unreadable one is a ConfigError naming --reset."""
    if not cursor:
        return {}
    try:
        state = json.loads(cursor)
    except ValueError:
        raise ConfigError(f"{platform}: unreadable sync cursor {cursor[:80]!r}; run the sync with --reset") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{platform}: sync cursor must be a JSON object; run the sync with --reset")
    return state


def newest_update(products: Iterable[Product], high: str | None) -> str | None:
    """The later of ``high`` and the newest ``updated_at`` among ``products``, as the UTC stamp cursors keep."""
    for product in products:
        if product.updated_at is not None:
            stamp = product.updated_at.strftime("%Y-%m-%dT%H:%M:%SZ")
            high = max(high or stamp, stamp)
    return high
