"""Shared request plumbing: bounded body reads, decoding into wire types, keys, problem responses.

`decode` is the one door every JSON body goes through, so it owns what msgspec alone would turn into
a 500: bytes that are not UTF-8 (msgspec raises `UnicodeDecodeError`) and nesting deep enough to make
its recursive decoder raise `RecursionError` (20,000 levels of ``[`` fit in a 64 KiB body). Depth is
checked before decoding: a body with at most `MAX_DEPTH` brackets in total cannot be deeper, which is
every ordinary request (two `bytes.count` calls, ~1 µs); only larger bodies get the exact check.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from kassa import errors
from kassa.keys import KeyInfo, KeyKind, KeyStore
from kassa.schemas import Problem

T = TypeVar("T")
JSON = "application/json"
PROBLEM = "application/problem+json"
_decoders: dict[type, msgspec.json.Decoder] = {}
_encoder = msgspec.json.Encoder()

MAX_DEPTH = 64  # arrays/objects nested deeper than this are refused before decoding
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
# A JSON string or a number token; numbers are rewritten only outside strings.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?', re.DOTALL)


def _strip_pairs(brackets: bytes, limit: int) -> tuple[bytes, int]:
    """Remove innermost ``[]``/``{}`` pairs up to ``limit`` times; returns what is left and the passes made.

    Each pass lowers the nesting of what is left by exactly one, so a balanced text nested at most
    ``limit`` deep leaves nothing.
    """
    passes = 0
    while passes < limit:
        shorter = brackets.replace(b"[]", b"").replace(b"{}", b"")
        if len(shorter) == len(brackets):
            break
        brackets = shorter
        passes += 1
    return brackets, passes


def nesting_depth_exceeds(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``limit`` (or is unbalanced past it).

    Ordinary bodies are settled by C-speed byte operations: few brackets in all (~1 µs), or balanced
    within ``limit`` counting brackets inside strings too (~30 µs for a 500-event batch). That second
    test can be fooled only by strings full of brackets, by at most as many levels as they hold
    brackets; the decoder's `RecursionError` backstop covers what it misses. Anything else gets the
    exact walk with strings removed.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if not _strip_pairs(body.translate(None, _NOT_BRACKET), limit)[0]:
        return False
    rest, passes = _strip_pairs(_STRING.sub(b"", body).translate(None, _NOT_BRACKET), limit)
    depth = passes
    for byte in rest:
        depth += 1 if byte in b"[{" else -1
        if depth > limit:
            return True
    return False


def _integral(match: re.Match[bytes]) -> bytes:
    token = match.group(0)
    if token[:1] == b'"' or not any(c in token for c in b".eE"):
        return token
    try:
        number = Decimal(token.decode())
    except InvalidOperation:  # pragma: no cover - the regex only matches valid literals
        return token
    if number.adjusted() < 16 and number == number.to_integral_value():
        return str(int(number)).encode()
    return token


def integral_floats_as_ints(body: bytes) -> bytes:
    """``6.0`` → ``6`` outside strings: JSON Schema's "integer" includes integral floats, msgspec's does not."""
    return _TOKEN.sub(_integral, body)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading it all."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise errors.BadRequest("Content-Length is not a number") from None
        if size > limit:
            raise errors.PayloadTooLarge(f"body of {size} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise errors.PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # a buyer's tab closed mid-upload: a 4xx nobody reads, not a logged traceback
        raise errors.BadRequest(f"the client disconnected after {total} bytes of the body") from None
    return b"".join(chunks)


def decode(body: bytes, kind: type[T]) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    if not body:
        raise errors.BadRequest("request body is empty; send a JSON object")
    if nesting_depth_exceeds(body):
        raise errors.BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        if "got `float`" not in str(exc):
            raise errors.from_decode_error(exc, body) from None
        try:  # an integral float for an int field (`"limit": 6.0`): accept it as the integer it is
            return decoder.decode(integral_floats_as_ints(body))
        except msgspec.DecodeError as again:
            raise errors.from_decode_error(again, body) from None
    except msgspec.DecodeError as exc:
        raise errors.from_decode_error(exc) from None
    except UnicodeDecodeError as exc:
        raise errors.BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    except RecursionError:  # pragma: no cover - nesting_depth_exceeds refuses these first
        raise errors.BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels") from None


def no_nul(value: str, field: str) -> str:
    """``value`` unless it holds a NUL character: a name looked up in or written to the metadata database
    (catalog ids, model versions, reasons) must not, as PostgreSQL text cannot hold one (``%00`` in a path
    was a psycopg `DataError`, a 500). Decisions and events never reach SQL and need no such check."""
    if "\x00" in value:
        raise errors.Invalid(f"{field} must not contain NUL (U+0000) characters", field)
    return value


def bearer(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, None for another scheme or no token. The
    scheme is case-insensitive (RFC 9110 §11.1): ``bearer <key>`` was a 401."""
    scheme, _, token = header.partition(" ")
    if scheme != "Bearer" and scheme.lower() != "bearer":
        return None
    return token.strip() or None


def authorize(request: Request, keys: KeyStore, needed: KeyKind, enabled: bool = True) -> KeyInfo | None:
    if not enabled:
        return None
    header = request.headers.get("authorization")
    field = "Authorization"
    if not header and "key" in request.query_params:
        # `?key=` lets the browser snippet send CORS-simple requests (no preflight, one round trip;
        # sendBeacon cannot set headers at all). Only publishable keys, which are public anyway.
        field = "key"
        info = keys.lookup(request.query_params["key"])
        if info is not None and info.kind != "publishable":
            raise errors.Forbidden("only a publishable key may travel in the URL; send "
                                   f"{errors.with_article(info.kind)} key in the Authorization header", field)
    elif not header or (token := bearer(header)) is None:
        raise errors.Unauthorized("send `Authorization: Bearer <key>`", "Authorization")
    else:
        info = keys.lookup(token)
    if info is None:
        raise errors.Unauthorized("unknown or revoked API key", field)
    if not info.allows(needed):
        a = errors.with_article
        raise errors.Forbidden(f"{a(info.kind)} key cannot do this; it needs {a(needed)} key", field)
    if info.kind == "publishable" and info.origins:
        origin = request.headers.get("origin")
        if origin is not None and origin not in info.origins:
            raise errors.Forbidden(f"origin {origin!r} is not allowed for this key", "Origin")
    if keys.limiter is not None:
        wait = keys.limiter.retry_after(info)
        if wait:
            raise errors.TooManyRequests(f"this {info.kind} key is over its rate limit; retry in {wait} s",
                                         field, {"Retry-After": str(wait)})
    return info


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type=JSON)


def problem_response(exc: errors.KassaError, instance: str | None = None,
                     headers: dict[str, str] | None = None) -> Response:
    body = Problem(
        type=f"https://kassa.dev/problems/{exc.slug}", title=exc.title, status=exc.status,
        detail=exc.detail, field=exc.field, instance=instance,
    )
    if exc.status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return Response(_encoder.encode(body), status_code=exc.status, media_type=PROBLEM, headers=headers)
