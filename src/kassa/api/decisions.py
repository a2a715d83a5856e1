"""POST /v1/decisions, and GET /v1/decisions/{decision_id} (a served decision as logged; secret or admin key)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kassa import errors, schemas
from kassa.api.common import JSON, authorize, decode, json_response, read_body
from kassa.app import Kassa


async def create_decision(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "publishable", kassa.settings.auth)
    body = await read_body(request, kassa.settings.server.max_body_bytes)
    req = decode(body, schemas.DecisionRequest)
    response = await kassa.engine.decide(req)
    return Response(schemas.encode(response), media_type=JSON)


async def get_decision(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "secret", kassa.settings.auth)
    decision_id = request.path_params["decision_id"]
    record = await kassa.find_decision(decision_id)
    if record is None:
        raise errors.NotFound(f"no decision {decision_id!r} in the decision log", "decision_id")
    return json_response(record)
