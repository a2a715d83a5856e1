"""Feature injection: PUT /v1/features/{view}/{entity_key} and POST /v1/features/push (secret key)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kassa import schemas
from kassa.api.common import authorize, decode, json_response, read_body
from kassa.app import Kassa


async def put_feature_row(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "secret", kassa.settings.auth)
    body = decode(await read_body(request, kassa.settings.server.max_body_bytes), schemas.FeatureWrite)
    ack = await kassa.features.put(request.path_params["view"], request.path_params["entity_key"], body)
    return json_response(ack)


async def push_features(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "secret", kassa.settings.auth)
    body = decode(await read_body(request, kassa.settings.server.max_body_bytes), schemas.FeaturePush)
    return json_response(await kassa.features.push(body))
