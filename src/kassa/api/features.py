"""Feature values: GET and PUT /v1/features/{view}/{entity_key}, POST /v1/features/push (secret or admin key)."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from kassa import schemas
from kassa.api.common import authorize, decode, json_response, read_body
from kassa.app import Kassa


class FeatureValues(msgspec.Struct):
    """One entity's newest values of a stored view, as the online store serves them to decisions."""

    view: str
    entity: str
    key: str
    ts: float  # event time of the values (unix seconds)
    age_seconds: float
    values: dict[str, schemas.StoredValue]


async def get_feature_row(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "secret", kassa.settings.auth)
    key = request.path_params["entity_key"]
    view, found = await kassa.features.get(request.path_params["view"], key)
    return json_response(FeatureValues(view.name, view.entity, key, found.ts, round(kassa.clock() - found.ts, 3),
                                    found.values))


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
