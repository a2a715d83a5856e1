"""The ASGI application: routes, problem+json error handling, and the Kassa lifecycle."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from kassa import errors
from kassa.api import catalog, decisions, events, features, models, snippet, system, webhooks
from kassa.api.assets import get_asset
from kassa.api.common import problem_response
from kassa.api.cors import CorsMiddleware
from kassa.api.dashboard import routes as dashboard_routes
from kassa.api.docs_page import docs
from kassa.app import Kassa

log = logging.getLogger("kassa.api")


def _allowed(request: Request) -> str:
    """RFC 9110's `Allow` for a 405: the methods of every route on this path. Starlette's own header
    names only the first route's, and each method here is a route of its own."""
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def create_app(kassa: Kassa, manage_lifecycle: bool = True) -> Starlette:
    routes = [
        Route("/v1/decisions", decisions.create_decision, methods=["POST"]),
        Route("/v1/decisions/{decision_id}", decisions.get_decision, methods=["GET"]),
        Route("/v1/events", events.post_events, methods=["POST"]),
        Route("/v1/offers", catalog.list_offers, methods=["GET"]),
        Route("/v1/offers/{offer_id}", catalog.get_offer, methods=["GET"]),
        Route("/v1/offers/{offer_id}", catalog.put_offer, methods=["PUT"]),
        Route("/v1/offers/{offer_id}", catalog.delete_offer, methods=["DELETE"]),
        Route("/v1/placements", catalog.list_placements, methods=["GET"]),
        Route("/v1/placements/{placement_id}", catalog.get_placement, methods=["GET"]),
        Route("/v1/placements/{placement_id}", catalog.put_placement, methods=["PUT"]),
        Route("/v1/models", models.list_models, methods=["GET"]),
        Route("/v1/models/{version}", models.get_model, methods=["GET"]),
        Route("/v1/models/{version}/stage", models.change_stage, methods=["POST"]),
        Route("/v1/placements/{placement_id}/rollback", models.rollback, methods=["POST"]),
        Route("/v1/features/push", features.push_features, methods=["POST"]),
        Route("/v1/features/{view}/{entity_key}", features.put_feature_row, methods=["PUT"]),
        Route("/v1/features/{view}/{entity_key}", features.get_feature_row, methods=["GET"]),
        Route("/v1/webhooks/{platform}", webhooks.post_webhook, methods=["POST"]),
        Route("/v1/webhooks/{platform}", webhooks.webhook_challenge, methods=["GET"]),
        Route("/healthz", system.healthz, methods=["GET"]),
        Route("/readyz", system.readyz, methods=["GET"]),
        Route("/metrics", system.metrics, methods=["GET"]),
        Route("/openapi.json", system.openapi, methods=["GET"]),
        Route("/v1/snippet.js", snippet.get_snippet, methods=["GET"]),
        Route("/docs", docs, methods=["GET"]),
        Route("/assets/{name:path}", get_asset, methods=["GET"]),
        *dashboard_routes(kassa),
    ]
    if kassa.settings.server.bench_endpoints:
        routes.append(Route("/_bench/noop", system.noop, methods=["POST"]))
        routes.append(Route("/_bench/stall", system.stall, methods=["POST"]))

    async def kassa_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.KassaError)
        kassa.metrics.errors.labels(str(exc.status)).inc()
        return problem_response(exc, request.url.path, exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        err = errors.NotFound(f"no route {request.method} {request.url.path}") if exc.status_code == 404 \
            else errors.KassaError(str(exc.detail))
        if exc.status_code == 405:
            err = errors.KassaError(f"{request.method} is not allowed on {request.url.path}")
            err.status, err.title, err.slug = 405, "Method not allowed", "method-not-allowed"
        kassa.metrics.errors.labels(str(err.status)).inc()
        headers = {"Allow": _allowed(request)} if exc.status_code == 405 else None
        return problem_response(err, request.url.path, headers)

    async def metadata_unavailable(request: Request, exc: Exception) -> Response:
        # The metadata database (PostgreSQL) is down or restarting: an admin write or registry read cannot
        # be done now, and says so; decisions and events never reach here (they are served from memory).
        log.warning("metadata database unavailable on %s: %s", request.url.path, exc)
        err = errors.Unavailable("the metadata database is unavailable; retry shortly")
        kassa.metrics.errors.labels(str(err.status)).inc()
        response = problem_response(err, request.url.path)
        response.headers["Retry-After"] = "1"
        return response

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(errors.KassaError("unexpected server error; see the server log"),
                                request.url.path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_lifecycle:
            await kassa.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                await kassa.stop()

    app = Starlette(
        routes=routes,
        exception_handlers={errors.KassaError: kassa_error, HTTPException: http_error,
                            OperationalError: metadata_unavailable},
        lifespan=lifespan,
        # The 500 handler sits inside CorsMiddleware, so the snippet's page can read a 500 too: Starlette
        # puts the handler of `Exception` in its outermost middleware, which answered without CORS headers.
        middleware=[Middleware(CorsMiddleware, kassa=kassa), Middleware(ServerErrorMiddleware, handler=unexpected)],
    )
    app.state.kassa = kassa
    return app
