"""Static files the HTML pages load: ``GET /assets/{name}`` from ``kassa/api/static`` (in the package).

Only the files listed in `FILES` are served, so no path ever reaches the filesystem from a request.
Nothing is fetched from a CDN: the dashboard's CSS and JS are ours, Swagger UI is vendored (see
``static/vendor/swagger-ui/VENDOR.md``). Files are read once and kept in memory (about 2 MB).
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from kassa import errors

FILES = {
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
    "vendor/swagger-ui/swagger-ui.css": "text/css; charset=utf-8",
    "vendor/swagger-ui/swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "vendor/swagger-ui/LICENSE": "text/plain; charset=utf-8",
}


@cache
def _load(name: str) -> tuple[bytes, str]:
    data = resources.files("kassa.api").joinpath("static", *name.split("/")).read_bytes()
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


async def get_asset(request: Request) -> Response:
    name = request.path_params["name"]
    media_type = FILES.get(name)
    if media_type is None:
        raise errors.NotFound(f"no asset {name!r}", "name")
    data, etag = _load(name)
    headers = {"ETag": etag, "Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=media_type, headers=headers)
