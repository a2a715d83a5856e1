"""Shared request plumbing: bounded body reads, decoding into wire types, keys, problem responses."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from kassa import errors
from kassa.keys import KeyInfo, KeyKind, KeyStore
from kassa.schemas import Problem

T = TypeVar("T")
JSON = "application/json"
PROBLEM = "application/problem+json"
_decoders: dict[type, msgspec.json.Decoder] = {}
_encoder = msgspec.json.Encoder()


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
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise errors.PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode(body: bytes, kind: type[T]) -> T:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    if not body:
        raise errors.BadRequest("request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise errors.from_decode_error(exc) from None


def _a(kind: str) -> str:
    """The key kind with its article: "a secret", "an admin"."""
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


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
                                   f"{_a(info.kind)} key in the Authorization header", field)
    elif not header or not header.startswith("Bearer "):
        raise errors.Unauthorized("send `Authorization: Bearer <key>`", "Authorization")
    else:
        info = keys.lookup(header[7:].strip())
    if info is None:
        raise errors.Unauthorized("unknown or revoked API key", field)
    if not info.allows(needed):
        raise errors.Forbidden(f"{_a(info.kind)} key cannot do this; it needs {_a(needed)} key", field)
    if info.kind == "publishable" and info.origins:
        origin = request.headers.get("origin")
        if origin is not None and origin not in info.origins:
            raise errors.Forbidden(f"origin {origin!r} is not allowed for this key", "Origin")
    return info


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(_encoder.encode(obj), status_code=status, media_type=JSON)


def problem_response(exc: errors.KassaError, instance: str | None = None) -> Response:
    body = Problem(
        type=f"https://kassa.dev/problems/{exc.slug}", title=exc.title, status=exc.status,
        detail=exc.detail, field=exc.field, instance=instance,
    )
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return Response(_encoder.encode(body), status_code=exc.status, media_type=PROBLEM, headers=headers)
