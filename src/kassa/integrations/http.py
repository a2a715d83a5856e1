"""`HttpClient`: the one synchronous HTTP client every connector talks to its platform through.

Owns the platform-agnostic parts of API access: JSON requests on one pooled ``httpx.Client``, waiting out
HTTP 429 (``Retry-After`` as seconds or an HTTP date), retrying 5xx and connection failures with
exponential backoff, and turning refusals into the integration errors (``AuthError`` carrying the
platform's own body text on 401/403, ``PayloadError`` on a page that is not JSON). ``sleep`` and ``clock``
are injectable so tests of throttling run instantly.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from kassa.integrations.base import AuthError, IntegrationError, PayloadError, RateLimited, Unreachable

_BODY_EXCERPT = 500  # characters of a platform error body kept in exception messages


class HttpStatusError(IntegrationError):
    """A non-retryable HTTP error other than 401/403 (e.g. 404, 400, 422), with the platform's body text."""

    def __init__(self, message: str, status: int, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


@dataclass
class JsonResponse:
    status: int
    headers: httpx.Headers
    data: Any


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); ``None`` if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def body_excerpt(response: httpx.Response) -> str:
    """The platform's error text: ``code: message`` from a JSON error body, else the body itself (trimmed)."""
    return text_excerpt(response.text)


def text_excerpt(body: str) -> str:
    """``body_excerpt`` of an error body already read (``HttpStatusError.body``)."""
    text = body.strip()
    try:
        data = json.loads(text) if text.startswith("{") else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        message, code = data.get("message"), data.get("code")
        if isinstance(message, str) and message:
            text = f"{code}: {message}" if isinstance(code, str) and code else message
        elif data.get("errors"):
            errors = data["errors"]
            text = errors if isinstance(errors, str) else json.dumps(errors)
    return text[:_BODY_EXCERPT] + ("…" if len(text) > _BODY_EXCERPT else "")


class HttpClient:
    """JSON over HTTPS with the platform's throttling honoured.

    ``max_retries`` bounds the retries of one request (429, 5xx and connection errors together);
    ``max_wait`` bounds a single ``Retry-After`` wait: a platform asking for longer gets ``RateLimited``
    rather than a silently stuck sync. ``on_retry(seconds, reason)`` hears of each wait before a retry, the
    reason naming the request, the try that failed of how many, and why (``kassa integrations`` prints it:
    against a host that refuses, the default 5 retries wait 15.5 s in all, and they were silent).
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        max_retries: int = 5,
        sleep: Callable[[float], None] = time.sleep,
        *,
        auth: tuple[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_wait: float = 300.0,
        transport: httpx.BaseTransport | None = None,
        on_wait: Callable[[float, str], None] | None = None,
        on_retry: Callable[[float, str], None] | None = None,
        platform: str = "platform",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.sleep = sleep
        self.clock = clock
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_wait = max_wait
        self.on_wait = on_wait
        self.on_retry = on_retry
        self.platform = platform
        self.waited_seconds = 0.0  # total time spent waiting on throttles/backoff (reported by sync)
        self.requests = 0
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Accept": "application/json", "User-Agent": "kassa-integrations", **(headers or {})},
            timeout=timeout,
            auth=auth,
            transport=transport,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, seconds: float, reason: str) -> None:
        """Sleep through the injectable ``sleep``, counted and reported (connectors use it for their own throttles)."""
        if seconds <= 0:
            return
        self.waited_seconds += seconds
        if self.on_wait is not None:
            self.on_wait(seconds, reason)
        self.sleep(seconds)

    def retry_wait(self, seconds: float, tries: tuple[int, int], what: str, why: str) -> None:
        """Wait before trying ``what`` again: ``tries`` is (the try that failed, how many there may be);
        ``on_retry`` hears of it first, then the wait is counted and reported like any other."""
        reason = f"{what}: try {tries[0]}/{tries[1]} failed ({why})"
        if self.on_retry is not None:
            self.on_retry(seconds, reason)
        self.wait(seconds, reason)

    def get(self, path: str, params: Mapping[str, Any] | None = None,
            headers: Mapping[str, str] | None = None) -> JsonResponse:
        return self.request("GET", path, params=params, headers=headers)

    def post(self, path: str, json_body: Any = None, params: Mapping[str, Any] | None = None,
             headers: Mapping[str, str] | None = None, *, form: Mapping[str, str] | None = None,
             auth: tuple[str, str] | None = None, label: str | None = None) -> JsonResponse:
        return self.request("POST", path, params=params, json_body=json_body, headers=headers, form=form, auth=auth,
                            label=label)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        label: str | None = None,
    ) -> JsonResponse:
        """One request, retried as the class says. ``path`` may be an absolute URL (e.g. an OAuth token
        endpoint on another host); ``form`` sends a form-encoded body instead of JSON; ``auth`` is HTTP Basic
        for this request only; ``label`` names the endpoint in error messages (``sfcc token endpoint HTTP
        401: …``)."""
        name = f"{self.platform} {label}" if label else self.platform
        where = path if "://" in path else self.base_url
        what, tries = f"{method} {label or path}", self.max_retries + 1
        attempt = 0
        while True:
            self.requests += 1
            try:
                response = self._client.request(method, path, params=params, json=json_body, headers=headers,
                                                data=dict(form) if form is not None else None,
                                                auth=auth if auth is not None else httpx.USE_CLIENT_DEFAULT)
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise Unreachable(f"{name} unreachable at {where}: {exc!r}") from exc
                why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.retry_wait(self._backoff(attempt), (attempt + 1, tries), what, why)
                attempt += 1
                continue
            status = response.status_code
            if status == 429:
                retry_after = parse_retry_after(response.headers.get("retry-after"), self.clock())
                if attempt >= self.max_retries or (retry_after is not None and retry_after > self.max_wait):
                    raise RateLimited(
                        f"{name} rate limit (HTTP 429) on {method} {path}: {body_excerpt(response)}",
                        retry_after,
                    )
                self.retry_wait(retry_after if retry_after is not None else self._backoff(attempt),
                                (attempt + 1, tries), what, "HTTP 429")
                attempt += 1
                continue
            if status >= 500:
                if attempt >= self.max_retries:
                    raise Unreachable(
                        f"{name} HTTP {status} on {method} {path} after {attempt + 1} tries: "
                        f"{body_excerpt(response)}"
                    )
                # A 503 may say when to come back; otherwise back off exponentially.
                hint = parse_retry_after(response.headers.get("retry-after"), self.clock())
                self.retry_wait(min(hint, self.max_wait) if hint is not None else self._backoff(attempt),
                                (attempt + 1, tries), what, f"HTTP {status}")
                attempt += 1
                continue
            if status in (401, 403):
                raise AuthError(f"{name} HTTP {status}: {body_excerpt(response)}", status)
            if status >= 400:
                raise HttpStatusError(
                    f"{name} HTTP {status} on {method} {path}: {body_excerpt(response)}",
                    status,
                    response.text,
                )
            return JsonResponse(status, response.headers, self._decode(response, method, path))

    def _backoff(self, attempt: int) -> float:
        return float(min(self.max_backoff, self.backoff * (2**attempt)))

    def _decode(self, response: httpx.Response, method: str, path: str) -> Any:
        if not response.content:
            return None
        try:
            return json.loads(response.content)
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(
                f"{self.platform} returned a malformed page on {method} {path} (HTTP {response.status_code}): "
                f"{exc}; body starts {response.text[:120]!r}"
            ) from None
