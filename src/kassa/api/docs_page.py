"""The API reference at ``GET /docs``: Swagger UI (vendored, no CDN) over ``/openapi.json``.

The page is static HTML; Swagger UI and its start-up script (``static/docs.js``) are files under
``/assets/``, so the Content-Security-Policy needs no inline script. Swagger UI sets inline styles
itself, hence ``style-src 'unsafe-inline'`` on this page only (the dashboard's policy forbids them).
"Try it out" sends requests to this same server with the key entered under "Authorize".
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse

CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kassa API reference</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="/assets/vendor/swagger-ui/swagger-ui.css">
</head><body><div id="swagger-ui"></div>
<script src="/assets/vendor/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/assets/docs.js"></script>
</body></html>"""


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                       "Referrer-Policy": "no-referrer"})
