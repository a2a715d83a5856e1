"""Health, readiness, metrics, the OpenAPI document and the bench endpoints (no-op, stall)."""

from __future__ import annotations

import asyncio
import hmac
import math
import time

from starlette.requests import Request
from starlette.responses import Response

from kassa import errors
from kassa.api.common import bearer, json_response
from kassa.api.openapi import openapi_document
from kassa.app import Kassa

_OK = b'{"status":"ok"}'


async def healthz(request: Request) -> Response:
    return Response(_OK, media_type="application/json")


async def readyz(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    if not kassa.ready:
        return json_response({"status": "starting"}, 503)
    if not kassa.catalog.snapshot.placements:
        # Every decision would be a 404: a load balancer must not send traffic here yet.
        return json_response({"status": "not ready", "offers": len(kassa.catalog.snapshot.offers), "placements": 0,
                              "reason": "no placements: load a catalog (--catalog FILE or catalog_file in the "
                                        "settings) or PUT /v1/placements/{id} with an admin key"}, 503)
    return json_response({
        "status": "ready",
        "offers": len(kassa.catalog.snapshot.offers),
        "placements": len(kassa.catalog.snapshot.placements),
        "models": kassa.models.versions(),
    })


async def metrics(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    token = kassa.settings.server.metrics_token
    if token is not None:
        header = request.headers.get("authorization")
        sent = bearer(header) if header else None
        if sent is None:
            raise errors.InvalidMetricsToken("/metrics needs `Authorization: Bearer <server.metrics_token>`",
                                             "Authorization")
        if not hmac.compare_digest(sent.encode(), token.encode()):
            raise errors.InvalidMetricsToken("wrong metrics token", "Authorization")
    await asyncio.to_thread(kassa.refresh_freshness)
    return Response(kassa.metrics.render(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> Response:
    return Response(openapi_document(), media_type="application/json")


async def noop(request: Request) -> Response:
    """Reads the body and answers ``{}``: the floor a decision's latency is compared with."""
    await request.body()
    armed = getattr(request.app.state, "bench_stall_seconds", 0.0)
    if armed:
        request.app.state.bench_stall_seconds = 0.0
        time.sleep(armed)  # blocks the event loop on purpose: see `stall`
    return Response(b"{}", media_type="application/json")


_MAX_STALL_SECONDS = 30.0


async def stall(request: Request) -> Response:
    """Test-only (``server.bench_endpoints``): block the whole event loop with ``time.sleep``.

    ``POST /_bench/stall?seconds=S`` stalls right away and answers when done; with ``&arm=1`` it answers
    at once and the next ``POST /_bench/noop`` stalls instead, so the stall starts while a request of
    the load is in flight (the load tests use it to prove no coordinated omission). A blocked loop is
    what a GC pause, a synchronous call or a CPU-starved process does to every request at once.
    """
    raw = request.query_params.get("seconds", "1")
    try:
        seconds = float(raw)
    except ValueError:
        raise errors.Invalid(f"seconds must be a number, got {raw!r}", "seconds") from None
    if not (math.isfinite(seconds) and 0 <= seconds <= _MAX_STALL_SECONDS):
        raise errors.Invalid(f"seconds must be between 0 and {_MAX_STALL_SECONDS:g}, got {raw}", "seconds")
    if request.query_params.get("arm", "0") not in ("", "0", "false"):
        request.app.state.bench_stall_seconds = seconds
        return json_response({"armed": seconds})
    time.sleep(seconds)
    return json_response({"stalled": seconds})
