"""Health, readiness, metrics, the OpenAPI document and the bench no-op endpoint."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kassa.api.common import json_response
from kassa.api.openapi import openapi_document
from kassa.app import Kassa

_OK = b'{"status":"ok"}'


async def healthz(request: Request) -> Response:
    return Response(_OK, media_type="application/json")


async def readyz(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    if not kassa.ready:
        return json_response({"status": "starting"}, 503)
    return json_response({
        "status": "ready",
        "offers": len(kassa.catalog.snapshot.offers),
        "placements": len(kassa.catalog.snapshot.placements),
        "models": kassa.models.versions(),
    })


async def metrics(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    kassa.metrics.pending.set(len(kassa.joiner))
    kassa.metrics.model_swaps.set(kassa.models.swaps)
    return Response(kassa.metrics.render(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> Response:
    return Response(openapi_document(), media_type="application/json")


async def noop(request: Request) -> Response:
    """Reads the body and answers ``{}``: the floor a decision's latency is compared with."""
    await request.body()
    return Response(b"{}", media_type="application/json")
