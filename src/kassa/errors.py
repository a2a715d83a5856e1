"""Errors that become ``application/problem+json`` responses (RFC 9457), naming the failing field."""

from __future__ import annotations

import re

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


def from_decode_error(exc: msgspec.DecodeError) -> KassaError:
    """Map a msgspec error to 422 (valid JSON, wrong fields) or 400 (not JSON), with the field path."""
    message = str(exc)
    if isinstance(exc, msgspec.ValidationError):
        m = _AT.search(message)
        field = None
        if m:
            field = m.group(1).lstrip(".") or None
            message = message[: m.start()]
        return Invalid(message, field)
    return BadRequest(f"malformed JSON: {message}")
