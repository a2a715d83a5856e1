"""Dashboard pages that change things: login and logout, offers, placements, API keys.

Edits go through the same services and wire types as the JSON API: an offer or a placement is edited
as its JSON document, decoded with ``schemas.Offer`` / ``schemas.Placement`` (so the dashboard accepts
exactly what ``PUT /v1/offers/{id}`` accepts) and saved with the catalog, which rebuilds the snapshot
the hot path reads. Keys are listed by hash prefix (plaintext is never stored) and revoked by it; a new
key's plaintext is shown once: the form's post redirects to the keys page (reloading it does not create a
second key) and the session's flash (`SessionStore.flash`) holds the plaintext for that one page view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, get_args

import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from kassa import errors, schemas
from kassa.api.catalog import store_offer, store_placement
from kassa.api.common import decode, no_nul
from kassa.api.dashboard.render import Markup, badge, csrf_field, h, link, num, page, paged, table, url
from kassa.api.dashboard.session import Session, clear_cookie, own_origin, set_cookie
from kassa.api.dashboard.state import read_form
from kassa.keys import AmbiguousKeyId, InvalidOrigin, KeyKind

if TYPE_CHECKING:
    from kassa.api.dashboard.state import Dashboard

_pretty = msgspec.json.Encoder(order="sorted")


def _json(obj: object) -> str:
    return msgspec.json.format(_pretty.encode(obj), indent=2).decode()


def _safe_next(value: str | None) -> str:
    # only a path of this dashboard: never an absolute or protocol-relative URL (open redirect)
    if value and value.startswith("/dashboard") and "//" not in value and "\\" not in value:
        return value
    return "/dashboard"


# --------------------------------------------------------------------------- login
def _login_page(next_path: str, message: str = "", status: int = 200) -> Response:
    error = f'<p class="error" data-testid="login-error">{h(message)}</p>' if message else ""
    body = (f'{error}<form method="post" action="/dashboard/login" class="login">'
            f'<input type="hidden" name="next" value="{h(next_path)}">'
            '<label for="key">Admin key</label>'
            '<input id="key" name="key" type="password" autocomplete="current-password" required autofocus>'
            '<button type="submit">Log in</button></form>'
            '<p class="muted">The key is checked once; the browser then keeps an HttpOnly session cookie.</p>')
    return page("Log in", body, status=status, logged_in=False)


def login_form(dash: Dashboard) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        dash.warm()  # the decision log's day read while the operator logs in
        return _login_page(_safe_next(request.query_params.get("next")))

    return endpoint


def login(dash: Dashboard) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and origin != own_origin(request):
            return _login_page("/dashboard", "Cross-origin login refused.", 403)
        try:
            form = await read_form(request)
        except errors.KassaError as exc:
            return _login_page("/dashboard", exc.detail, exc.status)
        next_path = _safe_next(form.get("next"))
        client = request.client.host if request.client else ""
        wait = dash.sessions.throttle.attempt(client)
        if wait:
            refused = _login_page(next_path, f"Too many login attempts from {client}: try again in {wait} s.", 429)
            refused.headers["Retry-After"] = str(wait)
            return refused
        made = dash.sessions.login(form.get("key", "").strip())
        if made is None:
            return _login_page(next_path, "That is not a valid admin key.", 401)
        dash.sessions.throttle.succeeded(client)
        response = RedirectResponse(next_path, status_code=303)
        set_cookie(response, request, made[0])
        return response

    return endpoint


async def logout(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    dash.sessions.logout(request)
    response = RedirectResponse("/dashboard/login", status_code=303)
    clear_cookie(response)
    return response


# --------------------------------------------------------------------------- offers and placements
def _problem(exc: errors.KassaError) -> str:
    return f"{exc.detail} (at {exc.field})" if exc.field else exc.detail


def _editor(action: str, document: str, csrf: str, message: str = "", ok: bool = False) -> str:
    note = (f'<p class="{"ok" if ok else "error"}" data-testid="{"saved" if ok else "edit-error"}">{h(message)}</p>'
            if message else "")
    return (f'{note}<form method="post" action="{action}" class="editor">{csrf_field(csrf)}'
            '<label for="document">JSON document</label>'
            f'<textarea id="document" name="document" rows="24" spellcheck="false" data-json>{h(document)}</textarea>'
            '<div><button type="submit">Save</button></div></form>')


async def offers(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    snapshot = dash.kassa.catalog.snapshot
    rows = [(link(o.id, url("/dashboard/offers", o.id)), o.kind, o.title, num(o.value, 2),
             badge("active", "good") if o.active else badge("inactive", "muted"),
             num(o.stock) if o.stock is not None else "—")
            for o in sorted(snapshot.offers.values(), key=lambda o: o.id)]
    shown, pager = paged(rows, request.query_params, "page", "offers")
    body = table(["offer", "kind", "title", "value", "state", "stock"], shown, "no offers in the catalog") + pager
    return page("Offers", body, "/dashboard/offers", session.csrf)


async def edit_offer(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    kassa = dash.kassa
    offer_id = no_nul(request.path_params["offer_id"], "offer_id")  # a new offer's id goes to SQL as it is
    offer = kassa.catalog.snapshot.offers.get(offer_id)
    if offer is None and request.method == "GET":
        raise errors.NotFound(f"unknown offer {offer_id!r}")
    action = url("/dashboard/offers", offer_id)
    title = f"Offer {offer_id}"
    if request.method == "GET":
        saved = request.query_params.get("saved") == "1"
        return page(title, _editor(action, _json(offer), session.csrf, "Saved." if saved else "", saved),
                    "/dashboard/offers", session.csrf)
    document = form.get("document", "")
    try:
        edited = decode(document.encode(), schemas.Offer)
        if edited.id != offer_id:
            raise errors.Invalid(f"the document's id {edited.id!r} does not match this offer ({offer_id!r})", "id")
        await asyncio.to_thread(store_offer, kassa.catalog, edited)  # SQL: off the serving loop
    except errors.KassaError as exc:
        return page(title, _editor(action, document, session.csrf, _problem(exc)), "/dashboard/offers",
                    session.csrf, status=exc.status)
    return RedirectResponse(url("/dashboard/offers", offer_id, saved="1").replace("&amp;", "&"), status_code=303)


async def placements(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    snapshot = dash.kassa.catalog.snapshot
    rows = []
    for placement_id, view in sorted(snapshot.placements.items()):
        p = view.placement
        model = dash.kassa.models.get(placement_id)
        rows.append((link(placement_id, url("/dashboard/placements", placement_id)), p.policy, p.slots,
                     len(view.static_offers), model.version if model else "baseline",
                     link("edit", url("/dashboard/placements", placement_id, "edit"))))
    body = table(["placement", "policy", "slots", "eligible offers", "serving", ""], rows,
                 "no placements in the catalog")
    return page("Placements", body, "/dashboard/placements", session.csrf)


async def edit_placement(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    kassa = dash.kassa
    placement_id = request.path_params["placement_id"]
    view = kassa.catalog.snapshot.placements.get(placement_id)
    if view is None:
        raise errors.NotFound(f"unknown placement {placement_id!r}")
    action = url("/dashboard/placements", placement_id, "edit")
    title = f"Edit placement {placement_id}"
    if request.method == "GET":
        saved = request.query_params.get("saved") == "1"
        return page(title, _editor(action, _json(view.placement), session.csrf, "Saved." if saved else "", saved),
                    "/dashboard/placements", session.csrf)
    document = form.get("document", "")
    try:
        edited = decode(document.encode(), schemas.Placement)
        if edited.id != placement_id:
            raise errors.Invalid(f"the document's id {edited.id!r} does not match {placement_id!r}", "id")
        await asyncio.to_thread(store_placement, kassa.catalog, edited, kassa.repo)  # SQL: off the serving loop
    except errors.KassaError as exc:
        return page(title, _editor(action, document, session.csrf, _problem(exc)), "/dashboard/placements",
                    session.csrf, status=exc.status)
    target = url("/dashboard/placements", placement_id, "edit", saved="1").replace("&amp;", "&")
    return RedirectResponse(target, status_code=303)


# --------------------------------------------------------------------------- keys
_KINDS: tuple[str, ...] = get_args(KeyKind)


def _full_hash(dash: Dashboard, prefix: str) -> str:
    if not (8 <= len(prefix) <= 64) or any(c not in "0123456789abcdef" for c in prefix):
        raise errors.Invalid("a key is named by the hex prefix of its hash", "key_hash")
    try:
        digest = dash.kassa.keys.resolve(prefix)
    except AmbiguousKeyId:
        digest = None
    if digest is None:
        raise errors.NotFound(f"no single key has a hash starting {prefix!r}", "key_hash")
    return digest


def _new_key(kind: str, name: str, plaintext: str) -> str:
    return (f'<p class="ok" data-testid="new-key">New {h(kind)} key <b>{h(name)}</b>: '
            f"<code>{h(plaintext)}</code> — copy it now, it is not shown again.</p>")


async def keys(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    kassa = dash.kassa
    created = ""
    status = 200
    kind, name, origins_text = "", "", ""
    if request.method == "POST":
        kind, name, origins_text = form.get("kind", ""), form.get("name", "").strip(), form.get("origins", "")
        origins = [o.strip() for o in origins_text.split() if o.strip()]
        try:
            if kind not in _KINDS or not name or len(name) > 100 or "\x00" in name:  # PostgreSQL text holds no NUL
                raise errors.Invalid("choose a kind and give the key a name (up to 100 characters, no NUL)", "name")
            try:
                # SQL: off the serving loop, as the catalog editors
                plaintext = await asyncio.to_thread(kassa.keys.create, kind, name, origins)  # type: ignore[arg-type]
            except InvalidOrigin as exc:
                raise errors.Invalid(str(exc), "origins") from None
        except errors.KassaError as exc:
            # the form below comes back as the operator filled it, with what is wrong above it
            created = f'<p class="error" data-testid="key-error">{h(_problem(exc))}</p>'
            status = exc.status
        else:
            if dash.sessions.flash(session, (kind, name, plaintext)):
                return RedirectResponse("/dashboard/keys", status_code=303)  # POST-redirect-GET
            created = _new_key(kind, name, plaintext)  # a script's header request: no session to hold it
            kind, name, origins_text = "", "", ""
    else:
        flashed = dash.sessions.take_flash(session)
        if flashed is not None:
            created = _new_key(*flashed)
    rows = []
    for k in await asyncio.to_thread(kassa.keys.list):
        action = url("/dashboard/keys", k["id"], "revoke")
        revoke = Markup("—") if k["revoked"] else Markup(
            f'<form method="post" action="{action}" data-confirm="Revoke key {h(k["name"])}?">'
            f'{csrf_field(session.csrf)}<button type="submit" class="danger">Revoke</button></form>')
        state = badge("revoked", "bad") if k["revoked"] else badge("active", "good")
        rows.append((Markup(f"<code>{h(k['id'])}</code>"), k["kind"], k["name"],
                     " ".join(k["origins"]) or "—", state, revoke))
    options = "".join(f'<option value="{h(k)}"{" selected" if k == kind else ""}>{h(k)}</option>' for k in _KINDS)
    body = (created + '<div data-testid="keys">'
            + table(["id", "kind", "name", "origins", "state", ""], rows, "no keys") + "</div>"
            + '<h2>New key</h2><form method="post" action="/dashboard/keys" class="inline">'
            + csrf_field(session.csrf)
            + f'<label>Kind <select name="kind">{options}</select></label>'
            f'<label>Name <input name="name" required maxlength="100" value="{h(name)}"></label>'
            f'<label>Origins <input name="origins" value="{h(origins_text)}" '
            'placeholder="https://shop.example (publishable keys)"></label>'
            '<button type="submit">Create</button></form>')
    return page("API keys", body, "/dashboard/keys", session.csrf, status=status)


async def revoke_key(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    digest = await asyncio.to_thread(_full_hash, dash, request.path_params["key_hash"])
    await asyncio.to_thread(dash.kassa.keys.revoke, digest)  # SQL: off the serving loop
    return RedirectResponse("/dashboard/keys", status_code=303)
