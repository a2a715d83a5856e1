"""Errors that become ``application/problem+json`` responses (RFC 9457), naming the failing field."""

from __future__ import annotations

import re
from typing import Any

import msgspec

_AT = re.compile(r" - at (?:`key` in )?`\$(.*)`$")  # a bad dict key names its dict


def with_article(word: str) -> str:
    """``word`` with its indefinite article, for messages: "a secret", "an admin", "an impression"."""
    return ("an " if word[:1] in "aeiou" else "a ") + word


class KassaError(Exception):
    status = 500
    title = "Internal error"
    slug = "internal"

    def __init__(self, detail: str, field: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.headers = headers


class BadRequest(KassaError):
    status, title, slug = 400, "Malformed request", "malformed"


class Unauthorized(KassaError):
    status, title, slug = 401, "Missing or invalid API key", "unauthorized"


class InvalidSignature(Unauthorized):
    """A webhook whose signature does not verify: webhooks carry no API key, so the title says signature (the
    problem type stays ``unauthorized``)."""

    title = "Missing or invalid webhook signature"


class InvalidMetricsToken(Unauthorized):
    """``GET /metrics`` without the ``server.metrics_token`` it is guarded by (a token, not an API key)."""

    title = "Missing or invalid metrics token"


class Forbidden(KassaError):
    status, title, slug = 403, "API key not allowed here", "forbidden"


class NotFound(KassaError):
    status, title, slug = 404, "Not found", "not-found"


class Conflict(KassaError):
    status, title, slug = 409, "Conflict", "conflict"


class PayloadTooLarge(KassaError):
    status, title, slug = 413, "Request body too large", "too-large"


class Invalid(KassaError):
    status, title, slug = 422, "Invalid field", "invalid"


class TooManyRequests(KassaError):
    status, title, slug = 429, "Rate limit exceeded", "rate-limited"


class Unavailable(KassaError):
    status, title, slug = 503, "Service unavailable", "unavailable"


_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _value_at(body: bytes, path: str) -> Any:
    """The value at a msgspec error path (``.order.ship_country``, ``.offers[1].id``) of a JSON body; raises
    `LookupError` when the path does not lead to one (a dict key holding a dot, say)."""
    node: Any = msgspec.json.decode(body)
    end = 0
    for m in _STEP.finditer(path):
        if m.start() != end:
            raise LookupError(path)
        end = m.end()
        node = node[m.group(1)] if m.group(1) is not None else node[int(m.group(2))]
    if end != len(path):
        raise LookupError(path)
    return node


def from_decode_error(exc: msgspec.DecodeError, body: bytes | None = None) -> KassaError:
    """Map a msgspec error to 422 (valid JSON, wrong fields) or 400 (not JSON), with the field path. A value
    refused by a pattern is quoted from ``body`` (msgspec names only the regex: a ship country `USA` was
    "Expected `str` matching regex '^[A-Z]{2}$'")."""
    message = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        m = _AT.search(message)
        field = None
        if m:
            field = m.group(1).lstrip(".") or None
            message = message[: m.start()]
            # not an e-mail hash field: what fails its pattern is likely the raw address, never echoed
            if body is not None and "matching regex" in message and "`key` in" not in m.group(0) \
                    and "email" not in m.group(1):
                try:
                    got = repr(_value_at(body, m.group(1)))
                except (LookupError, TypeError, ValueError, msgspec.DecodeError):
                    got = None
                if got is not None:
                    message += f", got {got if len(got) <= 60 else got[:57] + '...'}"
        return Invalid(message, field)
    return BadRequest(f"malformed JSON: {message}")
