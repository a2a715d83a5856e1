"""A typed client for Kassa's HTTP API: `KassaClient` (sync) and `AsyncKassaClient` (async), over httpx.

For a store's servers (a checkout extension, an order service, a feature pipeline): every request and
response is a wire type of `kassa.schemas` (decoded with msgspec), every error answer
(``application/problem+json``) is raised as a `ProblemError` carrying its ``type``, ``title``,
``status``, ``detail`` and failing ``field``, and a request that could not be completed is a
`TransportError` (`KassaTimeout` when it timed out).

Retries are safe because every call is idempotent on the server: a decision gets a ``request_id``
(generated when the caller gives none) that is sent unchanged on every attempt, so a retry after a lost
answer returns the decision already made instead of making a second one; events are deduplicated by
``event_id``; feature writes and catalog PUT/DELETE are idempotent. Connection failures, timeouts and
429/502/503/504 answers are retried with exponential backoff and jitter (``Retry-After`` honoured, capped),
never longer than the call's ``deadline``; any other answer is final.

    >>> from kassa.client import KassaClient
    >>> with KassaClient("http://127.0.0.1:8000", key="demo-secret", timeout=0.5) as kassa:
    ...     decision = kassa.decide({"placement": "order_confirmation", "order": {"id": "1001", "total": 59.99}})
    ...     kassa.send_events([{"event_id": "imp-1", "type": "impression", "decision_id": decision.decision_id,
    ...                         "offer_id": decision.offers[0].offer_id}])

This module imports nothing of Kassa but its wire types (`kassa.schemas`, an import-linter contract), so
it can be vendored or installed with the package without pulling in the server.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from kassa import schemas

T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 502, 503, 504})
DEFAULT_TIMEOUT = 2.0  # seconds per attempt; a checkout page rarely waits longer for offers
USER_AGENT = "kassa-python-client"


class ClientError(Exception):
    """Base of every error this client raises."""


class ProblemError(ClientError):
    """An error answer (RFC 9457 problem details): what was wrong, and which field."""

    def __init__(self, status: int, title: str, detail: str, type: str = "about:blank", field: str | None = None,
                 instance: str | None = None) -> None:
        super().__init__(f"{status} {title}: {detail}" + (f" (field {field})" if field else ""))
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.field = field
        self.instance = instance

    @classmethod
    def from_response(cls, response: httpx.Response) -> ProblemError:
        try:
            body = msgspec.json.decode(response.content, type=schemas.Problem)
        except msgspec.DecodeError:  # not a problem document (a proxy's error page): keep what there is
            return cls(response.status_code, response.reason_phrase or "Error", response.text[:200].strip())
        return cls(body.status, body.title, body.detail, body.type, body.field, body.instance)


class TransportError(ClientError):
    """The request could not be completed (connection refused or reset, DNS, ...) after every retry."""


class KassaTimeout(TransportError):
    """No answer within the timeout (per attempt) or the deadline (per call)."""


@dataclass(frozen=True, slots=True)
class Retry:
    """How failed attempts are retried: ``attempts`` in all, backoff doubling from ``backoff`` seconds
    (full jitter) up to ``max_backoff``."""

    attempts: int = 3
    backoff: float = 0.05
    max_backoff: float = 1.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))


NO_RETRY = Retry(attempts=1)


class OfferList(msgspec.Struct):
    """``GET /v1/offers``."""

    offers: list[schemas.Offer]
    count: int


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One API call as data, sent by the sync or the async transport alike."""

    method: str
    path: str
    body: bytes | None
    result: type[T]


class _Client:
    """What both clients share: the calls, the retry decisions and the decoding; only sending differs."""

    def __init__(self, base_url: str, key: str | None, timeout: float, retry: Retry, deadline: float | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry
        self.deadline = deadline  # seconds for a whole call, retries included; None: attempts x timeout
        self.headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"

    # -- the calls
    @staticmethod
    def _decide(request: schemas.DecisionRequest | Mapping[str, Any]) -> Call[schemas.DecisionResponse]:
        if isinstance(request, schemas.DecisionRequest):
            if request.request_id is None:
                request = msgspec.structs.replace(request, request_id=new_request_id())
            body = msgspec.json.encode(request)
        else:
            body = msgspec.json.encode({**request, "request_id": request.get("request_id") or new_request_id()})
        return Call("POST", "/v1/decisions", body, schemas.DecisionResponse)

    @staticmethod
    def _events(events: Iterable[schemas.Event | Mapping[str, Any]]) -> Call[schemas.EventAck]:
        return Call("POST", "/v1/events", msgspec.json.encode({"events": list(events)}), schemas.EventAck)

    @staticmethod
    def _put_feature(view: str, entity_key: str, values: Mapping[str, Any],
                     timestamp: float | None) -> Call[schemas.FeatureAck]:
        body = schemas.FeatureWrite(values=dict(values), timestamp=timestamp)
        return Call("PUT", f"/v1/features/{_seg(view)}/{_seg(entity_key)}", msgspec.json.encode(body),
                    schemas.FeatureAck)

    @staticmethod
    def _push_features(view: str, rows: Iterable[schemas.FeatureRow | Mapping[str, Any]]) -> Call[schemas.FeatureAck]:
        return Call("POST", "/v1/features/push", msgspec.json.encode({"view": view, "rows": list(rows)}),
                    schemas.FeatureAck)

    @staticmethod
    def _get(path: str, result: type[T]) -> Call[T]:
        return Call("GET", path, None, result)

    @staticmethod
    def _put_offer(offer: schemas.Offer | Mapping[str, Any]) -> Call[schemas.Offer]:
        offer_id = offer.id if isinstance(offer, schemas.Offer) else str(offer["id"])
        return Call("PUT", f"/v1/offers/{_seg(offer_id)}", msgspec.json.encode(offer), schemas.Offer)

    # -- attempts
    def _budget(self) -> float:
        if self.deadline is not None:
            return self.deadline
        return self.retry.attempts * (self.timeout + self.retry.max_backoff)

    def _final(self, call: Call[T], response: httpx.Response) -> T:
        if response.status_code >= 400:
            raise ProblemError.from_response(response)
        if call.result is type(None) or not response.content:
            return None  # type: ignore[return-value]
        return msgspec.json.decode(response.content, type=call.result)

    def _retryable(self, response: httpx.Response, attempt: int) -> bool:
        return response.status_code in RETRY_STATUSES and attempt < self.retry.attempts

    def _request(self, call: Call[Any], remaining: float) -> dict[str, Any]:
        headers = dict(self.headers)
        if call.body is not None:
            headers["Content-Type"] = "application/json"
        return {"method": call.method, "url": self.base_url + call.path, "content": call.body, "headers": headers,
                "timeout": httpx.Timeout(max(min(self.timeout, remaining), 0.001))}

    @staticmethod
    def _failed(exc: httpx.HTTPError, call: Call[Any], attempts: int) -> TransportError:
        what = f"{call.method} {call.path} failed after {attempts} attempt{'s' if attempts > 1 else ''}"
        if isinstance(exc, httpx.TimeoutException):
            return KassaTimeout(f"{what}: timed out ({type(exc).__name__})")
        return TransportError(f"{what}: {type(exc).__name__}: {exc}")


class KassaClient(_Client):
    """Synchronous client. ``timeout`` is per attempt, ``deadline`` (optional) bounds a whole call."""

    def __init__(self, base_url: str, key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retry: Retry = Retry(), deadline: float | None = None, http: httpx.Client | None = None) -> None:
        super().__init__(base_url, key, timeout, retry, deadline)
        self._own = http is None
        self.http = http if http is not None else httpx.Client()

    def __enter__(self) -> KassaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self.http.close()

    def call(self, call: Call[T]) -> T:
        """Send ``call``, retrying what may be retried within the deadline; the decoded answer or an error."""
        end = time.monotonic() + self._budget()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self.http.request(**self._request(call, end - time.monotonic()))
            except httpx.HTTPError as exc:  # transport: refused, reset, timed out
                pause = self.retry.delay(attempt)
                if attempt >= self.retry.attempts or time.monotonic() + pause >= end:
                    raise self._failed(exc, call, attempt) from exc
            else:
                pause = self.retry.delay(attempt, response.headers.get("retry-after"))
                if not self._retryable(response, attempt) or time.monotonic() + pause >= end:
                    return self._final(call, response)
            time.sleep(pause)

    def decide(self, request: schemas.DecisionRequest | Mapping[str, Any]) -> schemas.DecisionResponse:
        """``POST /v1/decisions``; a missing ``request_id`` is generated, so retries return the same decision."""
        return self.call(self._decide(request))

    def send_events(self, events: Iterable[schemas.Event | Mapping[str, Any]]) -> schemas.EventAck:
        """``POST /v1/events`` (up to 1,000; a repeated ``event_id`` is counted once)."""
        return self.call(self._events(events))

    def put_feature(self, view: str, entity_key: str, values: Mapping[str, Any],
                    timestamp: float | None = None) -> schemas.FeatureAck:
        return self.call(self._put_feature(view, entity_key, values, timestamp))

    def push_features(self, view: str, rows: Iterable[schemas.FeatureRow | Mapping[str, Any]]) -> schemas.FeatureAck:
        return self.call(self._push_features(view, rows))

    def get_feature(self, view: str, entity_key: str) -> dict[str, Any]:
        return self.call(self._get(f"/v1/features/{_seg(view)}/{_seg(entity_key)}", dict))

    def get_decision(self, decision_id: str) -> dict[str, Any]:
        """A served decision as logged (secret or admin key)."""
        return self.call(self._get(f"/v1/decisions/{_seg(decision_id)}", dict))

    def list_offers(self) -> list[schemas.Offer]:
        return self.call(self._get("/v1/offers", OfferList)).offers

    def get_offer(self, offer_id: str) -> schemas.Offer:
        return self.call(self._get(f"/v1/offers/{_seg(offer_id)}", schemas.Offer))

    def put_offer(self, offer: schemas.Offer | Mapping[str, Any]) -> schemas.Offer:
        return self.call(self._put_offer(offer))

    def delete_offer(self, offer_id: str) -> None:
        self.call(Call("DELETE", f"/v1/offers/{_seg(offer_id)}", None, type(None)))

    def ready(self) -> bool:
        """Whether the server is ready to decide (``GET /readyz``)."""
        try:
            self.call(Call("GET", "/readyz", None, dict))
        except ClientError:
            return False
        return True


class AsyncKassaClient(_Client):
    """Asynchronous client (asyncio); the same calls as `KassaClient`, awaited."""

    def __init__(self, base_url: str, key: str | None = None, *, timeout: float = DEFAULT_TIMEOUT,
                 retry: Retry = Retry(), deadline: float | None = None,
                 http: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, key, timeout, retry, deadline)
        self._own = http is None
        self.http = http if http is not None else httpx.AsyncClient()

    async def __aenter__(self) -> AsyncKassaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own:
            await self.http.aclose()

    async def call(self, call: Call[T]) -> T:
        end = time.monotonic() + self._budget()
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self.http.request(**self._request(call, end - time.monotonic()))
            except httpx.HTTPError as exc:
                pause = self.retry.delay(attempt)
                if attempt >= self.retry.attempts or time.monotonic() + pause >= end:
                    raise self._failed(exc, call, attempt) from exc
            else:
                pause = self.retry.delay(attempt, response.headers.get("retry-after"))
                if not self._retryable(response, attempt) or time.monotonic() + pause >= end:
                    return self._final(call, response)
            await asyncio.sleep(pause)

    async def decide(self, request: schemas.DecisionRequest | Mapping[str, Any]) -> schemas.DecisionResponse:
        return await self.call(self._decide(request))

    async def send_events(self, events: Iterable[schemas.Event | Mapping[str, Any]]) -> schemas.EventAck:
        return await self.call(self._events(events))

    async def put_feature(self, view: str, entity_key: str, values: Mapping[str, Any],
                          timestamp: float | None = None) -> schemas.FeatureAck:
        return await self.call(self._put_feature(view, entity_key, values, timestamp))

    async def push_features(self, view: str,
                            rows: Iterable[schemas.FeatureRow | Mapping[str, Any]]) -> schemas.FeatureAck:
        return await self.call(self._push_features(view, rows))

    async def get_feature(self, view: str, entity_key: str) -> dict[str, Any]:
        return await self.call(self._get(f"/v1/features/{_seg(view)}/{_seg(entity_key)}", dict))

    async def get_decision(self, decision_id: str) -> dict[str, Any]:
        return await self.call(self._get(f"/v1/decisions/{_seg(decision_id)}", dict))

    async def list_offers(self) -> list[schemas.Offer]:
        return (await self.call(self._get("/v1/offers", OfferList))).offers

    async def get_offer(self, offer_id: str) -> schemas.Offer:
        return await self.call(self._get(f"/v1/offers/{_seg(offer_id)}", schemas.Offer))

    async def put_offer(self, offer: schemas.Offer | Mapping[str, Any]) -> schemas.Offer:
        return await self.call(self._put_offer(offer))

    async def delete_offer(self, offer_id: str) -> None:
        await self.call(Call("DELETE", f"/v1/offers/{_seg(offer_id)}", None, type(None)))

    async def ready(self) -> bool:
        try:
            await self.call(Call("GET", "/readyz", None, dict))
        except ClientError:
            return False
        return True


def new_request_id() -> str:
    """A fresh idempotency key for a decision (sent unchanged on every retry of that decision)."""
    return uuid.uuid4().hex


def _seg(value: str) -> str:
    """One URL path segment, percent-escaped (spaces, ``?``, ``#`` in an id)."""
    return quote(value, safe="")
