"""The request mix: what each scheduled request of a load test is, and its bytes.

Owns :class:`RequestFactory` and :func:`assign_types`. Types are drawn per scheduled request from the
profile's mix with a seeded generator, so every worker process agrees on the global sequence. Decision
bodies come from a few thousand pre-encoded templates (orders shaped by the profile's payload: items
per order, price range, countries, candidate count) with the order id, session id and buyer filled in
per request by ``bytes`` formatting — building a request costs about a microsecond on the send path.

Impression, click and accept beacons refer to decisions this process actually received, the way a
confirmation page reports what it showed: an impression beacon reports the newest decision not yet
reported (each decision's impressions once; one older than `BEACON_MAX_AGE_S` is dropped, a page closed
before its beacon, and the newest decision reported instead), a click or accept names one of the latest
decisions received within `BEACON_MAX_AGE_S`, so they join their decision's reward even under the demo's 1 s reward
window. Impressions oldest first (a backlog growing by the decisions that get none) and clicks on any
of the last 4,096 decisions sent many after that window had closed: against ``kassa demo``, 197 of ~1,350
beacon events of a 15 s run at 100/s were ``kassa_event_unknown_decisions_total`` (a QA run: 1,160 of ~2,000).

Order webhooks are ``orders/create`` (Shopify) or ``order.created`` (WooCommerce) deliveries in the
platform's payload shape, signed like the platform signs them (HMAC-SHA256 of the raw body, base64,
in ``X-Shopify-Hmac-Sha256`` or ``X-WC-Webhook-Signature``), each with its own delivery id.
Feature pushes write the profile's values for a random buyer with the secret key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np

from kassa.loadtest.profiles import REQUEST_TYPES, Payload

TYPE_CODE = {t: i for i, t in enumerate(REQUEST_TYPES)}
DECISION, IMPRESSION, CLICK, ACCEPT, WEBHOOK, FEATURE_PUSH, NOOP = (TYPE_CODE[t] for t in REQUEST_TYPES)
_TEMPLATES = 1024
_RING = 4096  # decisions awaiting their impression beacon (the newest first; the oldest fall off)
_RECENT = 32  # decisions a click or accept picks from, newest last
BEACON_MAX_AGE_S = 0.5  # a click or accept names a decision received at most this long ago (else the newest)
_enc = msgspec.json.Encoder()


class _Shown(msgspec.Struct):
    offer_id: str


class _Decision(msgspec.Struct):
    """The fields of a decision response the generator reads (msgspec skips the rest)."""

    decision_id: str
    offers: list[_Shown]
    took_ms: float = float("nan")


_decode_decision = msgspec.json.Decoder(_Decision).decode


def assign_types(fractions: dict[str, float], n: int, seed: int) -> np.ndarray:
    """A type code for each of ``n`` scheduled requests, drawn from ``fractions`` (seeded)."""
    codes = np.array([TYPE_CODE[t] for t in fractions], dtype=np.int8)
    probs = np.array(list(fractions.values()), dtype=np.float64)
    if len(codes) == 1:
        return np.full(n, codes[0], dtype=np.int8)
    rng = np.random.default_rng(seed + 7919)
    return codes[rng.choice(len(codes), size=n, p=probs / probs.sum())]


def _fmt(obj: Any, slots: dict[str, bytes]) -> bytes:
    """JSON-encode ``obj``, escape ``%``, then turn placeholder strings into ``%`` slots."""
    raw = _enc.encode(obj).replace(b"%", b"%%")
    for placeholder, slot in slots.items():
        raw = raw.replace(placeholder.encode(), slot)
    return raw


class RequestFactory:
    """Builds the request bytes of each scheduled request for one worker process."""

    def __init__(
        self,
        payload: Payload,
        build: Any,
        *,
        tag: str,
        seed: int,
        key: str | None,
        secret_key: str | None,
        webhook_secret: str | None,
        host: str = "localhost",
        base_path: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.payload = payload
        self.clock = clock
        self.build = build  # ConnectionPool.build(method, path, body, headers)
        self.tag = tag.encode()
        self.rng = random.Random(seed)
        self.base = base_path.rstrip("/")
        self.host = host.encode()
        self.order_base = int(hashlib.blake2b(self.tag, digest_size=4).hexdigest(), 16) * 10**9
        json = b"Content-Type: application/json\r\n"
        self.pub_headers = (f"Authorization: Bearer {key}\r\n".encode() if key else b"") + json
        self.secret_headers = (f"Authorization: Bearer {secret_key}\r\n".encode() if secret_key else b"") + json
        self.webhook_secret = (webhook_secret or "").encode()
        self.paths = {
            DECISION: self.base + "/v1/decisions",
            NOOP: self.base + "/_bench/noop",
            IMPRESSION: self.base + "/v1/events",
            CLICK: self.base + "/v1/events",
            ACCEPT: self.base + "/v1/events",
            FEATURE_PUSH: self.base + "/v1/features/push",
            WEBHOOK: self.base + f"/v1/webhooks/{payload.webhook.platform}",
        }
        self.decision_templates = [self._decision_template() for _ in range(_TEMPLATES)]
        self.webhook_templates = [self._webhook_template() for _ in range(64)]
        self.push_template = _fmt(
            {"view": payload.feature_push.view,
             "rows": [{"key": f"__CUST{r}__", "values": payload.feature_push.values}
                      for r in range(payload.feature_push.rows)]},
            {f"__CUST{r}__": b"c-%d" for r in range(payload.feature_push.rows)},
        )
        # Recent decisions: (decision_id, [offer ids], order uid, received at); impressions are reported once each.
        self.ring: deque[tuple[bytes, list[bytes], int, float]] = deque(maxlen=_RECENT)
        self.unimpressed: deque[tuple[bytes, list[bytes], int, float]] = deque(maxlen=_RING)
        self.orphans = 0  # beacons sent before any decision came back (refer to no real decision)

    # ------------------------------------------------------------------ templates
    def _items(self) -> list[dict[str, Any]]:
        p, rng = self.payload, self.rng
        items = []
        for _ in range(rng.randint(p.items_per_order[0], p.items_per_order[1])):
            product = rng.randrange(p.products)
            items.append({
                "sku": f"sku-{product:06d}", "product_id": f"prod-{product:06d}",
                "category": f"cat-{rng.randrange(p.categories):03d}", "qty": rng.choice((1, 1, 1, 2, 3)),
                "price": round(rng.uniform(p.item_price[0], p.item_price[1]), 2),
            })
        return items

    def _decision_template(self) -> bytes:
        p, rng = self.payload, self.rng
        items = self._items()
        body: dict[str, Any] = {
            "placement": p.placement,
            "customer": {"id": "__CUST__"},
            "session_id": "__SESS__",
            "order": {
                "id": "__ORDER__", "platform": p.webhook.platform, "currency": p.currency,
                "total": round(sum(i["price"] * i["qty"] for i in items), 2),
                "ship_country": rng.choice(p.countries), "items": items, "customer_id": "__CUST__",
            },
            "context": {"device": rng.choice(("mobile", "mobile", "desktop", "tablet")),
                        "locale": rng.choice(("en-US", "en-GB", "de-DE", "fr-FR")),
                        "referrer": rng.choice(("google", "direct", "email", "instagram"))},
        }
        if p.candidates:
            body["candidates"] = rng.sample(p.offer_ids, p.candidates)
        # Slots in order of appearance: customer, session, order, order.customer_id (see decision()).
        return _fmt(body, {"__SESS__": b"s-%b-%d", "__CUST__": b"c-%d", "__ORDER__": b"o-%b-%d"})

    def _webhook_template(self) -> bytes:
        p = self.payload
        items = self._items()
        total = f"{sum(i['price'] * i['qty'] for i in items):.2f}"
        if p.webhook.platform == "woocommerce":
            body: dict[str, Any] = {
                "id": "__OID__", "number": "__ONAME__", "status": "processing", "currency": p.currency,
                "total": total, "customer_id": "__CUST__",
                "billing": {"email": "buyer@example.com", "country": p.countries[0]},
                "line_items": [{"id": k + 1, "product_id": k + 1, "sku": i["sku"], "name": i["sku"],
                                "quantity": i["qty"], "price": i["price"], "total": f"{i['price'] * i['qty']:.2f}"}
                               for k, i in enumerate(items)],
                "date_created_gmt": "__TS__",
            }
        else:
            body = {
                "id": "__OID__", "name": "#__ONAME__", "currency": p.currency, "total_price": total,
                "email": "buyer@example.com",
                "customer": {"id": "__CUST__"},
                "shipping_address": {"country_code": p.countries[0]},
                "line_items": [{"id": k + 1, "product_id": k + 1, "sku": i["sku"], "title": i["sku"],
                                "quantity": i["qty"], "price": f"{i['price']:.2f}"} for k, i in enumerate(items)],
                "created_at": "__TS__",
            }
        # Slots in order of appearance: order id, order name, customer, creation time (the time of sending:
        # an order placed before a decision does not count as that decision's conversion).
        raw = _fmt(body, {'"__OID__"': b"%d", "__ONAME__": b"LT%d", '"__CUST__"': b"%d", "__TS__": b"%b"})
        return raw

    # ------------------------------------------------------------------ per request
    def decision(self, uid: int, customer: int, path_code: int = DECISION) -> bytes:
        body = self.decision_templates[uid % _TEMPLATES] % (customer, self.tag, uid, self.tag, uid, customer)
        return self.build("POST", self.paths[path_code], body, self.pub_headers)

    def _pick(self, fresh: bool) -> tuple[bytes, list[bytes], int, float] | None:
        now = self.clock()
        if fresh and self.unimpressed:
            picked = self.unimpressed.pop()  # the page just shown reports it (the oldest lag behind a backlog)
            if now - picked[3] <= BEACON_MAX_AGE_S:
                return picked
            self.unimpressed.clear()  # older still: pages closed before their beacon went out
        ring = self.ring
        if not ring:
            return None
        picked = ring[self.rng.randrange(len(ring))]
        # A buyer clicks on the page in front of them: a decision older than that is past a short reward window.
        return picked if now - picked[3] <= BEACON_MAX_AGE_S else ring[-1]

    def beacon(self, code: int, uid: int) -> bytes:
        picked = self._pick(code == IMPRESSION)
        if picked is None or not picked[1]:
            self.orphans += 1
            did, offers = b"lt-none", [b"none"]
        else:
            did, offers = picked[0], picked[1]
        prefix = b"lt-%b-%d" % (self.tag, uid)
        if code == IMPRESSION:
            events = b",".join(
                b'{"event_id":"%b-%d","type":"impression","decision_id":"%b","offer_id":"%b"}' % (prefix, k, did, o)
                for k, o in enumerate(offers)
            )
        else:
            kind = b"click" if code == CLICK else b"accept"
            offer = offers[self.rng.randrange(len(offers))]
            events = b'{"event_id":"%b","type":"%b","decision_id":"%b","offer_id":"%b"}' % (prefix, kind, did, offer)
        return self.build("POST", self.paths[code], b'{"events":[' + events + b"]}", self.pub_headers)

    def feature_push(self, customers: tuple[int, ...]) -> bytes:
        return self.build("POST", self.paths[FEATURE_PUSH], self.push_template % customers, self.secret_headers)

    def webhook(self, uid: int, customer: int) -> bytes:
        # Order ids unique per run: the server dedupes orders by id, so a second run must not repeat them.
        order = self.order_base + uid
        woo = self.payload.webhook.platform == "woocommerce"
        now = time.strftime("%Y-%m-%dT%H:%M:%S" if woo else "%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
        body = self.webhook_templates[uid % len(self.webhook_templates)] % (order, order, customer, now)
        sig = base64.b64encode(hmac.new(self.webhook_secret, body, hashlib.sha256).digest())
        if self.payload.webhook.platform == "woocommerce":
            headers = (b"X-WC-Webhook-Signature: %b\r\nX-WC-Webhook-Delivery-ID: lt-%b-%d\r\n"
                       b"X-WC-Webhook-Topic: order.created\r\nX-WC-Webhook-Source: https://loadtest.example/\r\n"
                       % (sig, self.tag, uid))
        else:
            headers = (b"X-Shopify-Hmac-Sha256: %b\r\nX-Shopify-Webhook-Id: lt-%b-%d\r\n"
                       b"X-Shopify-Topic: orders/create\r\nX-Shopify-Shop-Domain: loadtest.myshopify.com\r\n"
                       % (sig, self.tag, uid))
        # Built by hand: per-request headers would only churn the pool's head cache.
        head = b"POST %b HTTP/1.1\r\nHost: %b\r\nContent-Type: application/json\r\n%bContent-Length: %d\r\n\r\n" % (
            self.paths[WEBHOOK].encode(), self.host, headers, len(body))
        return head + body

    def on_decision(self, uid: int, body: bytes) -> float:
        """Remember a decision that came back (for later beacons); returns its ``took_ms``."""
        d = _decode_decision(body)
        entry = (d.decision_id.encode(), [o.offer_id.encode() for o in d.offers], uid, self.clock())
        self.ring.append(entry)
        self.unimpressed.append(entry)
        return d.took_ms
