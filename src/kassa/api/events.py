"""POST /v1/events."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kassa import schemas
from kassa.api.common import authorize, decode, json_response, read_body
from kassa.app import Kassa


async def post_events(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "publishable", kassa.settings.auth)
    body = await read_body(request, kassa.settings.server.max_body_bytes)
    batch = decode(body, schemas.EventBatch)
    ack = await kassa.events.ingest(batch)
    if ack.duplicates:
        kassa.metrics.duplicates.inc(ack.duplicates)
    if ack.unknown_decisions:
        kassa.metrics.unknown_decisions.inc(ack.unknown_decisions)
    return json_response(ack)
