"""`WebhookReceiver`: one signed platform webhook → at most one canonical ``order`` or ``refund`` event.

Owns the platform-independent steps between the raw HTTP body and ``EventIngest``: pick the connector
(built once per platform from Kassa's ``integrations`` settings), verify the signature on the raw bytes,
skip topics that are not "order placed" (and orders the platform sent before they were placed, and the
platform's test notifications), parse into the canonical ``Order``, keep an order time beyond now +
``MAX_CLOCK_SKEW`` as the time it arrived (a 2999 ``created_at`` stuck in the buyer's ``last_order_ts`` for
good, and a 422 would have the platform retry the order until it drops it), fill in line categories the
platform left out from the offer catalog, and name the event ``{platform}:order:{order_id}`` so the durable
event log deduplicates re-deliveries (the order id sits inside the signed body; delivery-id headers are not
signed). A cancellation or refund topic (the connector's ``refund_topics``) becomes a ``refund`` event named
``{platform}:refund:{refund id}`` or ``{platform}:cancel:{order id}``. It never writes anything itself: the
caller ingests the event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from kassa import schemas
from kassa.catalog.snapshot import CatalogSnapshot
from kassa.degraded import RateLimitedWarning
from kassa.integrations.base import (
    MAX_ORDER_LINES,
    Connector,
    IntegrationError,
    MalformedBody,
    Order,
    OrderLine,
    PayloadError,
    Refund,
)
from kassa.integrations.config import ConfigError, connector_for, factory_for, webhook_settings

DEFAULT_MAX_BODY_BYTES = 1_048_576  # an order with hundreds of lines runs to a few hundred KB
MAX_CLOCK_SKEW = 86_400.0  # seconds a store's clock may run ahead of Kassa's before an order time is not believed
_MAX_TOPICS_WARNED = 100  # a sender cycling through made-up topics cannot grow the set without bound
_Lined = TypeVar("_Lined", Order, Refund)  # what `_within_line_bound` keeps within MAX_ORDER_LINES lines

log = logging.getLogger(__name__)


class NotConfigured(IntegrationError):
    """Kassa has no webhook secret for this platform, so it cannot verify anything from it."""


@dataclass(slots=True)
class WebhookResult:
    platform: str
    topic: str
    delivery_id: str | None
    event: schemas.Event | None  # None: a verified delivery that is not an order (ping, other topic)
    order: Order | None = None
    lines_dropped: int = 0  # lines of an order or refund past MAX_ORDER_LINES left out of its event


class WebhookReceiver:
    def __init__(self, integrations: Mapping[str, Mapping[str, Any]],
                 snapshot: Callable[[], CatalogSnapshot] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._integrations = integrations
        self._clock = clock
        self._snapshot = snapshot
        self._connectors: dict[str, Connector] = {}
        self._limits: dict[str, int] = {}
        self._warned_topics: set[tuple[str, str]] = set()
        self._warned_unplaced: set[str] = set()
        self._said_test: set[str] = set()
        self._warned_future: set[str] = set()
        # A store whose orders (refunds) run past MAX_ORDER_LINES sends many of them: one line per 10 s each,
        # with the count held back (every answer still says lines_dropped).
        self._warn_long_order = RateLimitedWarning(log, "webhooks")
        self._warn_long_refund = RateLimitedWarning(log, "webhooks")

    def connector(self, platform: str) -> Connector:
        connector = self._connectors.get(platform)
        if connector is None:
            factory = factory_for(platform)  # UnknownPlatform before any settings are read
            try:
                cfg = webhook_settings(platform, self._integrations)
            except ConfigError as exc:  # a blank secret, a bad replay window: nothing can be verified
                raise NotConfigured(f"webhooks from {platform} are misconfigured: {exc}") from None
            # Platforms that sign with their own key pair (Adobe I/O Events) need no shared secret; they
            # count as configured once their identity setting is present.
            identity = getattr(factory, "WEBHOOK_IDENTITY_SETTING", None)
            if identity is not None and cfg.options.get(identity):
                pass
            elif not cfg.webhook_secret:
                setting = identity or "webhook_secret"
                raise NotConfigured(
                    f"webhooks from {platform} are not configured: set "
                    f"KASSA_INTEGRATIONS__{platform.upper()}__{setting.upper()} (or integrations.{platform}."
                    f"{setting} in Kassa's settings)"
                )
            try:
                connector = self._connectors[platform] = connector_for(platform, cfg)
            except ConfigError as exc:  # an option the connector checks (a page_size that is no number)
                raise NotConfigured(f"webhooks from {platform} are misconfigured: {exc}") from None
            self._limits[platform] = cfg.options.get("max_body_bytes") or DEFAULT_MAX_BODY_BYTES
        return connector

    def challenge_supported(self, platform: str) -> bool:
        """Whether the platform checks a new webhook URL with ``GET ?challenge=`` (Adobe I/O Events)."""
        return bool(getattr(factory_for(platform), "WEBHOOK_CHALLENGE", False))

    def max_body_bytes(self, platform: str) -> int:
        """The platform's ``max_body_bytes``, checked with its other webhook settings (so before any body is
        read, an unknown or unconfigured platform raises as ``connector`` does)."""
        self.connector(platform)
        return self._limits[platform]

    async def receive_async(self, platform: str, headers: Mapping[str, str], raw_body: bytes) -> WebhookResult:
        """``receive`` for a handler on the event loop: what the connector must fetch to verify a delivery
        (Magento's Adobe public keys, once each, up to a 5 s timeout) is fetched in a worker thread, so the
        server answers other requests meanwhile; everything else runs inline (no thread hop per delivery)."""
        connector = self.connector(platform)
        needs_io = getattr(connector, "verify_needs_io", None)
        if needs_io is not None and needs_io(headers):
            await asyncio.to_thread(connector.prefetch, headers)  # type: ignore[attr-defined]
        return self.receive(platform, headers, raw_body)

    def receive(self, platform: str, headers: Mapping[str, str], raw_body: bytes) -> WebhookResult:
        """Verify and parse; raises SignatureError, ReplayError, PayloadError, NotConfigured, UnknownPlatform."""
        connector = self.connector(platform)
        delivery = connector.verify(headers, raw_body)
        is_order_topic = getattr(connector, "is_order_topic", None)
        reads_order = is_order_topic is None or is_order_topic(delivery.topic)
        is_refund_topic = getattr(connector, "is_refund_topic", None)
        reads_refund = is_refund_topic is not None and is_refund_topic(delivery.topic)
        if delivery.topic == "ping" or not (reads_order or reads_refund):
            if delivery.topic != "ping":
                self._warn_topic(platform, delivery.topic, connector)
            return WebhookResult(platform, delivery.topic, delivery.delivery_id, None)
        try:
            payload = msgspec.json.decode(delivery.body)
        except msgspec.DecodeError as exc:
            raise MalformedBody(f"webhook body is not valid JSON: {exc}") from None
        except UnicodeDecodeError as exc:  # a signed body can still hold bytes that are not UTF-8
            raise MalformedBody(f"webhook body is not valid UTF-8 (byte {exc.start})") from None
        except RecursionError:
            raise MalformedBody("webhook body is nested too deeply") from None
        if not isinstance(payload, dict):
            raise PayloadError(f"webhook body must be a JSON object, got {type(payload).__name__}")
        is_test = getattr(connector, "is_test", None)
        if is_test is not None and is_test(payload):
            if platform not in self._said_test:
                # Once per process: the admin's "send test notification" proves the subscription works.
                self._said_test.add(platform)
                log.info("%s test notification (order %r) received and verified: acknowledged and ignored, "
                         "test orders are not counted", platform, str(payload.get("id"))[:64])
            return WebhookResult(platform, delivery.topic, delivery.delivery_id, None)
        if reads_refund:
            refund = connector.parse_refund(delivery.topic, payload)  # type: ignore[attr-defined]
            if refund is not None:
                refund, dropped = self._within_line_bound(self._believable_refund_time(refund))
                return WebhookResult(platform, delivery.topic, delivery.delivery_id, refund.to_event(),
                                     lines_dropped=dropped)
            if not reads_order:  # a refund of nothing but money (shipping, an adjustment): no line taken back
                return WebhookResult(platform, delivery.topic, delivery.delivery_id, None)
        is_placed = getattr(connector, "is_placed", None)
        if is_placed is not None and not is_placed(payload):
            if platform not in self._warned_unplaced:
                # Once per process: the order is counted only if a later delivery (WooCommerce: order.updated)
                # brings it placed, which needs that subscription too.
                self._warned_unplaced.add(platform)
                describe = getattr(connector, "describe_unplaced", None)
                what = describe(payload) if describe is not None else \
                    f"order {str(payload.get('id'))[:64]!r} (status {str(payload.get('status'))[:32]!r})"
                log.warning("%s %s is not placed yet: acknowledged and ignored until a later delivery brings it "
                            "placed; see docs/integrations/%s.md for the subscriptions that need", platform, what,
                            platform)
            return WebhookResult(platform, delivery.topic, delivery.delivery_id, None)
        order, dropped = self._within_line_bound(self._believable_time(connector.parse_order(payload)))
        order = self._with_categories(order)
        key = getattr(connector, "order_event_key", None)
        event = order.to_event(f"{platform}:order:{key(order) if key is not None else order.order_id}")
        return WebhookResult(platform, delivery.topic, delivery.delivery_id, event, order, dropped)

    def _warn_topic(self, platform: str, topic: str, connector: Connector) -> None:
        # A subscription to the wrong topic (Shopify orders/paid for orders/create) is answered 200 and writes
        # nothing, so the platform shows deliveries succeeding while no order ever arrives: say it once per topic.
        key = (platform, topic[:100])
        if key in self._warned_topics or len(self._warned_topics) >= _MAX_TOPICS_WARNED:
            return
        self._warned_topics.add(key)
        reads = ", ".join(sorted({*getattr(connector, "order_topics", ()), *getattr(connector, "refund_topics", ())})) \
            or "its order topics"
        log.warning("%s webhook topic %r is acknowledged and ignored: Kassa reads %s (check the subscription's "
                    "topic); further deliveries of this topic are ignored without a word", platform, key[1], reads)

    def _believable_time(self, order: Order) -> Order:
        now = self._clock()
        if order.created_at.timestamp() <= now + MAX_CLOCK_SKEW:
            return order
        if order.platform not in self._warned_future:  # once per platform: a store clock that is off stays off
            self._warned_future.add(order.platform)
            log.warning("%s order %r has created_at %s, more than the %.0f s clock skew allowed ahead of now: kept "
                        "as placed when it arrived (further such orders are kept alike without a word)",
                        order.platform, order.order_id[:64], order.created_at.isoformat(), MAX_CLOCK_SKEW)
        return dataclasses.replace(order, created_at=datetime.fromtimestamp(now, UTC))

    def _believable_refund_time(self, refund: Refund) -> Refund:
        # The joiner does not read a refund's time; it is the event's timestamp, for reports that do.
        now = self._clock()
        if refund.created_at.timestamp() <= now + MAX_CLOCK_SKEW:
            return refund
        return dataclasses.replace(refund, created_at=datetime.fromtimestamp(now, UTC))

    def _bounded_lines(self, lines: tuple[OrderLine, ...]) -> tuple[OrderLine, ...]:
        # Every line of an offered product first (attribution credits, and a refund takes back, only those),
        # then the first other lines, in their own order: MAX_ORDER_LINES in all.
        offered = self._snapshot().product_offer if self._snapshot is not None else {}
        kept = {i for i, line in enumerate(lines)
                if line.sku in offered or (line.product_id is not None and line.product_id in offered)}
        kept = set(sorted(kept)[:MAX_ORDER_LINES])
        for i in range(len(lines)):
            if len(kept) >= MAX_ORDER_LINES:
                break
            kept.add(i)
        return tuple(line for i, line in enumerate(lines) if i in kept)

    def _within_line_bound(self, record: _Lined) -> tuple[_Lined, int]:
        # A 4xx for a long order is retried by the platform until it gives up (Shopify then deletes the
        # subscription), so an order or a refund is kept with MAX_ORDER_LINES lines (`_bounded_lines`, those of
        # offered products first); an order's total whole.
        if len(record.lines) <= MAX_ORDER_LINES:
            return record, 0
        lines = self._bounded_lines(record.lines)
        dropped = len(record.lines) - len(lines)
        if isinstance(record, Refund):
            warn, kind, kept = self._warn_long_refund, "a refund", "not taken back"
            subject = (f"{record.platform} refund {(record.refund_id or 'cancellation')[:64]!r} of order "
                       f"{record.order_id[:64]!r}")
        else:
            warn, kind, kept = self._warn_long_order, "an order", "the order's total is kept"
            subject = f"{record.platform} order {record.order_id[:64]!r}"
        warn(f"{subject} has {len(record.lines)} lines, more than the {MAX_ORDER_LINES} {kind} event holds: "
             f"stored with the lines of offered products and the first others, {dropped} lines left out ({kept})")
        return dataclasses.replace(record, lines=lines), dropped

    def _with_categories(self, order: Order) -> Order:
        # Shopify line items (and WooCommerce's) carry no category, but eligibility rules, retrieval and
        # streaming features use it: take it from the synced product offer when there is one.
        if self._snapshot is None or all(line.category for line in order.lines):
            return order
        snap = self._snapshot()
        lines = []
        changed = False
        for line in order.lines:
            if line.category is None:
                offer_id = (snap.product_offer.get(line.product_id) if line.product_id else None) \
                    or snap.product_offer.get(line.sku)
                offer = snap.offers.get(offer_id) if offer_id else None
                if offer is not None and offer.category:
                    line = dataclasses.replace(line, category=offer.category)
                    changed = True
            lines.append(line)
        return dataclasses.replace(order, lines=tuple(lines)) if changed else order
