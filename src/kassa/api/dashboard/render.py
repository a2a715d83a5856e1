"""HTML building blocks of the dashboard: the page frame, tables, numbers, and the headers every page gets.

Escaping is the default, not a habit: `h` escapes any value, `table` escapes every cell unless the
caller wraps it in `Markup` (already-built HTML, e.g. a link or a form), and URLs built from ids go
through `url` (percent-encoded, then escaped). The Content-Security-Policy forbids inline scripts and
inline styles, so a value that slipped through unescaped still could not run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from html import escape
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from starlette.datastructures import QueryParams
from starlette.responses import HTMLResponse

from kassa import errors

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make Chromium send `Origin: null` on posts
    "Cache-Control": "no-store",
}
NAV = (("Overview", "/dashboard"), ("Placements", "/dashboard/placements"),
       ("Decisions", "/dashboard/decisions"), ("Offers", "/dashboard/offers"),
       ("Features", "/dashboard/features"), ("Keys", "/dashboard/keys"))


class Markup(str):
    """HTML that is already safe (built here from escaped parts): `table` and `h` pass it through."""


def h(value: Any) -> str:
    if isinstance(value, Markup):
        return value
    return escape("" if value is None else str(value), quote=True)


def url(*parts: str, **query: str) -> str:
    path = "/".join(quote(p, safe="") if i else p for i, p in enumerate(parts))
    if query:
        path += "?" + "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query.items())
    return h(path)


def link(text: Any, href: str) -> Markup:
    """A link; ``href`` must come from `url` (already encoded and escaped)."""
    return Markup(f'<a href="{href}">{h(text)}</a>')


def when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:,.{digits}f}"


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.2f} ms"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "nothing yet",
          cls: str = "") -> str:
    body = "".join("<tr>" + "".join(f"<td>{h(c)}</td>" for c in r) + "</tr>" for r in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="muted">{h(empty)}</td></tr>'
    head = "".join(f"<th>{h(x)}</th>" for x in headers)
    return f'<table class="{h(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


PAGE_SIZE = 50  # rows per page of a long table (offers): a catalog of hundreds stays one screenful per page
T = TypeVar("T")


def paged(rows: Sequence[T], query: QueryParams, param: str = "page", noun: str = "rows",
          size: int = PAGE_SIZE) -> tuple[Sequence[T], str]:
    """One page of ``rows`` (``?<param>=N``, from 1) and the pager to put under its table: which rows of how many,
    and previous / next links that keep the page's other query parameters. A page past the last shows the last;
    a page that is not a whole number from 1 is refused (422)."""
    raw = query.get(param, "1")
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise errors.Invalid(f"{param} is a page number (1, 2, ...), not {raw[:20]!r}", param)
    pages = max(1, -(-len(rows) // size))
    n = min(int(raw), pages)
    start = (n - 1) * size
    shown = rows[start:start + size]
    keep = [(k, v) for k, v in query.multi_items() if k != param]

    def to(target: int) -> str:  # a relative URL: this page's path, its query with only the page changed
        return h("?" + urlencode([*keep, (param, str(target))]))

    count = (f"{h(noun)} {start + 1:,}\u2013{start + len(shown):,} of {len(rows):,}" if pages > 1
             else f"{len(rows):,} {h(noun)}")
    prev = f' <a rel="prev" href="{to(n - 1)}">Previous</a>' if n > 1 else ""
    nxt = f' <a rel="next" href="{to(n + 1)}">Next</a>' if n < pages else ""
    return shown, f'<p class="pager muted" data-testid="pager-{h(param)}">{count}{prev}{nxt}</p>'


def card(label: str, value: str, note: str = "", test_id: str = "") -> str:
    tid = f' data-testid="{h(test_id)}"' if test_id else ""
    return (f'<div class="card"{tid}><div class="label">{h(label)}</div><div class="value">{h(value)}</div>'
            f'<div class="note">{h(note)}</div></div>')


def badge(text: str, kind: str = "") -> Markup:
    return Markup(f'<span class="badge {h(kind)}">{h(text)}</span>')


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{h(token)}">'


def page(title: str, body: str, active: str = "", csrf: str = "", status: int = 200, refresh: int = 0,
         logged_in: bool = True) -> HTMLResponse:
    current = ' class="active"'
    nav = "".join(f'<a href="{h(href)}"{current if href == active else ""}>{h(name)}</a>'
                  for name, href in NAV) if logged_in else ""
    logout = (f'<form method="post" action="/dashboard/logout" class="logout">{csrf_field(csrf)}'
              '<button type="submit">Log out</button></form>') if logged_in and csrf else ""
    data = f' data-refresh="{refresh}"' if refresh else ""
    html = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{h(title)} · Kassa</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/assets/dashboard.css"><script src="/assets/dashboard.js" defer></script>
</head><body{data}><header><span class="brand">Kassa</span><nav>{nav}</nav>{logout}</header>
<main><h1>{h(title)}</h1>{body}</main></body></html>"""
    return HTMLResponse(html, status_code=status, headers=HEADERS)
