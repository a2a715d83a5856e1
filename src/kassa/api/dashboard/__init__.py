"""The operator dashboard at ``/dashboard``: server-rendered HTML over the services of this process.

One module per page group: `overview` (traffic, per-placement reward, learning curve, canary, gate,
drift, feature freshness), `explorer` (one decision and its outcomes), `manage` (offers, placements,
keys, login). Reads come from the process itself: the Prometheus registry (`traffic`), the decision
and event logs (`outcomes`), the model registry, the drift watch and the catalog. Writes go through the
same services as the JSON API (`Catalog.put_offer`, `KeyStore.revoke`), so the dashboard can do nothing
an admin key cannot do over HTTP.

Every handler runs behind `Dashboard.guard`: a session cookie or an admin key in the header
(`session`), the CSRF check on every POST, and an HTML error page instead of problem+json.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from kassa import errors
from kassa.api.common import read_body
from kassa.api.dashboard.outcomes import Outcomes
from kassa.api.dashboard.render import h, page
from kassa.api.dashboard.session import LoginRequired, Session, SessionStore, set_cookie
from kassa.api.dashboard.traffic import RateMeter
from kassa.app import Kassa

MAX_FORM_BYTES = 256 * 1024

Handler = Callable[["Dashboard", Request, Session, dict[str, str]], Awaitable[Response]]


class Dashboard:
    """The dashboard's state in one process: sessions, the rate meter, the log reader."""

    def __init__(self, kassa: Kassa) -> None:
        self.kassa = kassa
        self.sessions = SessionStore(kassa)
        self.meter = RateMeter()
        self.outcomes = Outcomes(kassa)
        self.started = time.time()

    def guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                session = self.sessions.current(request)
                form: dict[str, str] = {}
                if request.method == "POST":
                    form = await read_form(request)
                    self.sessions.check_csrf(request, session, form.get("csrf"))
                response = await handler(self, request, session, form)
            except LoginRequired:
                if request.method == "GET":
                    return RedirectResponse(f"/dashboard/login?next={quote(request.url.path)}", status_code=303)
                return error_page(errors.Unauthorized("log in first: your session is missing or expired"))
            except errors.KassaError as exc:
                return error_page(exc)
            token = getattr(request.state, "new_session_token", None)
            if token:
                set_cookie(response, request, token)
            return response

        return endpoint


async def read_form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (last value wins), bounded."""
    body = await read_body(request, MAX_FORM_BYTES)
    ctype = request.headers.get("content-type", "")
    if body and not ctype.startswith("application/x-www-form-urlencoded"):
        raise errors.BadRequest("the dashboard accepts form posts only (application/x-www-form-urlencoded)")
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[-1] for k, v in parsed.items()}


def error_page(exc: errors.KassaError) -> Response:
    body = f'<p class="error" data-testid="error">{h(exc.detail or exc.title)}</p>' \
           '<p><a href="/dashboard">Back to the dashboard</a></p>'
    return page(exc.title, body, status=exc.status, logged_in=False)


def routes(kassa: Kassa) -> list[Route]:
    """Every dashboard route, bound to one `Dashboard` for this process."""
    from kassa.api.dashboard import explorer, manage, overview

    dash = Dashboard(kassa)
    g = dash.guard
    return [
        Route("/dashboard/login", manage.login_form(dash), methods=["GET"]),
        Route("/dashboard/login", manage.login(dash), methods=["POST"]),
        Route("/dashboard/logout", g(manage.logout), methods=["POST"]),
        Route("/dashboard", g(overview.overview), methods=["GET"]),
        Route("/dashboard/placements", g(manage.placements), methods=["GET"]),
        Route("/dashboard/placements/{placement_id}", g(overview.placement), methods=["GET"]),
        Route("/dashboard/placements/{placement_id}/edit", g(manage.edit_placement), methods=["GET", "POST"]),
        Route("/dashboard/features", g(overview.features), methods=["GET"]),
        Route("/dashboard/decisions", g(explorer.explorer), methods=["GET"]),
        Route("/dashboard/offers", g(manage.offers), methods=["GET"]),
        Route("/dashboard/offers/{offer_id}", g(manage.edit_offer), methods=["GET", "POST"]),
        Route("/dashboard/keys", g(manage.keys), methods=["GET", "POST"]),
        Route("/dashboard/keys/{key_hash}/revoke", g(manage.revoke_key), methods=["POST"]),
    ]
