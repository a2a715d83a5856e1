"""POST /v1/decisions."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kassa import schemas
from kassa.api.common import JSON, authorize, decode, read_body
from kassa.app import Kassa


async def create_decision(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "publishable", kassa.settings.auth)
    body = await read_body(request, kassa.settings.server.max_body_bytes)
    req = decode(body, schemas.DecisionRequest)
    response = await kassa.engine.decide(req)
    return Response(schemas.encode(response), media_type=JSON)
