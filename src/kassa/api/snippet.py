"""GET /v1/snippet.js: the confirmation-page script, cacheable, versioned and pinned with SRI.

``/v1/snippet.js`` is the current build, cached for five minutes (stores that paste the plain URL get
upgrades). ``/v1/snippet.js?v=<version>`` is immutable and cached for a year; a version this server no
longer has is a 404 rather than different bytes, which the page's ``integrity`` would refuse anyway.
Every response names its version and SRI hash (``X-Kassa-Snippet-Version``, ``X-Kassa-SRI``), carries an
ETag (a matching ``If-None-Match`` gets 304) and ``Access-Control-Allow-Origin: *`` so that
``<script integrity=… crossorigin="anonymous">`` works from any store's origin. No key is needed.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from kassa import errors
from kassa.snippet.build import built

JS = "text/javascript; charset=utf-8"
_LATEST = "public, max-age=300, stale-while-revalidate=86400"
_PINNED = "public, max-age=31536000, immutable"


def _matches(if_none_match: str, etag: str) -> bool:
    # Weak comparison (RFC 9110 §13.1.2): W/"x" matches "x"; `*` matches anything.
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags


async def get_snippet(request: Request) -> Response:
    snippet = built()
    pinned = request.query_params.get("v")
    if pinned is not None and pinned != snippet.version:
        raise errors.NotFound(
            f"snippet version {pinned!r} is not served here; the current version is {snippet.version}", "v")
    gzip_ok = "gzip" in request.headers.get("accept-encoding", "")
    etag = f'"{snippet.version}-gz"' if gzip_ok else f'"{snippet.version}"'
    headers = {
        "Cache-Control": _PINNED if pinned else _LATEST,
        "ETag": etag,
        "Vary": "Accept-Encoding",
        "X-Kassa-Snippet-Version": snippet.version,
        "X-Kassa-SRI": snippet.integrity,
        "Access-Control-Allow-Origin": "*",
        "Access-Control-Expose-Headers": "X-Kassa-Snippet-Version, X-Kassa-SRI",
        "Cross-Origin-Resource-Policy": "cross-origin",
        "X-Content-Type-Options": "nosniff",
    }
    inm = request.headers.get("if-none-match")
    if inm is not None and _matches(inm, etag):
        return Response(status_code=304, headers=headers)
    if gzip_ok:
        headers["Content-Encoding"] = "gzip"
        return Response(snippet.gzipped, media_type=JS, headers=headers)
    return Response(snippet.body, media_type=JS, headers=headers)
