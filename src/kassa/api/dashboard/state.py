"""The dashboard's per-process state (`Dashboard`) and the guard every page handler runs behind.

`Dashboard.guard` turns a page handler into a Starlette endpoint: it finds the session (cookie) or the
admin key (header), parses the form and checks the CSRF token on every POST, and renders errors as an
HTML page rather than problem+json.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kassa import errors
from kassa.api.common import read_body
from kassa.api.dashboard.outcomes import Outcomes
from kassa.api.dashboard.render import h, page
from kassa.api.dashboard.session import LoginRequired, Session, SessionStore, set_cookie
from kassa.api.dashboard.traffic import RateMeter
from kassa.app import Kassa

MAX_FORM_BYTES = 256 * 1024
log = logging.getLogger(__name__)

Handler = Callable[["Dashboard", Request, Session, dict[str, str]], Awaitable[Response]]


class Dashboard:
    """The dashboard's state in one process: sessions, the rate meter, the log reader."""

    def __init__(self, kassa: Kassa) -> None:
        self.kassa = kassa
        self.sessions = SessionStore(kassa)
        self.meter = RateMeter()
        self.outcomes = Outcomes(kassa)
        self.started = time.time()
        self._warming: threading.Thread | None = None

    def warm(self) -> None:
        """Read the decision log's last day on a thread of its own, once per process, so the first page after a
        restart finds it held (`DecisionLogWindow`): called when the login form is asked for (sessions do not
        survive a restart, so an operator's first visit after one logs in), and a page that comes meanwhile
        waits only for the rest of the read. Not at start: a process whose dashboard nobody opens never holds it."""
        if self._warming is not None or self.outcomes.decision_window is None:
            return
        self._warming = threading.Thread(target=self._warm, name="kassa-dashboard-warm", daemon=True)
        self._warming.start()

    def _warm(self) -> None:
        window = self.outcomes.decision_window
        assert window is not None
        try:
            now = time.time()
            window.rows(now - window.span_seconds, now)
        except Exception:  # the first page reads it again and shows what went wrong
            log.warning("dashboard: reading the decision log ahead of the first view failed", exc_info=True)

    def guard(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session: Session | None = None
            try:
                session = self.sessions.current(request)
                form: dict[str, str] = {}
                if request.method == "POST":
                    form = await read_form(request)
                    self.sessions.check_csrf(request, session, form.get("csrf"))
                response = await handler(self, request, session, form)
            except LoginRequired:
                self.warm()
                if request.method == "GET":
                    # the query too: a link to one decision (/dashboard/decisions?id=...) lands on it after login
                    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse(f"/dashboard/login?next={quote(target, safe='/')}", status_code=303)
                return error_page(errors.Unauthorized("log in first: your session is missing or expired"))
            except errors.KassaError as exc:
                return error_page(exc, session)
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


def error_page(exc: errors.KassaError, session: Session | None = None) -> Response:
    """The error as a page; a logged-in operator keeps the navigation (a wrong link is one click from right)."""
    body = f'<p class="error" data-testid="error">{h(exc.detail or exc.title)}</p>' \
           '<p><a href="/dashboard">Back to the dashboard</a></p>'
    response = page(exc.title, body, csrf=session.csrf if session else "", status=exc.status,
                    logged_in=session is not None)
    response.headers.update(exc.headers or {})  # Retry-After of a 429
    return response
