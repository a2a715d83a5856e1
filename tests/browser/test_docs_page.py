"""The API reference at /docs: vendored Swagger UI renders /openapi.json in Chromium, nothing from a CDN."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from tests.browser.conftest import KassaUnderTest, PageRun


def test_docs_page_lists_the_api_operations_from_openapi(page: PageRun, kassa_server: KassaUnderTest,
                                                         tmp_path: Path) -> None:
    seen: list[str] = []
    page.page.on("request", lambda req: seen.append(req.url))
    page.page.goto(kassa_server.url + "/docs")
    page.page.wait_for_selector(".opblock", timeout=15_000)
    paths = {s.replace("\u200b", "").strip() for s in page.page.locator(".opblock-summary-path").all_inner_texts()}
    assert {"/v1/decisions", "/v1/events", "/v1/offers/{offer_id}", "/v1/models/{version}/stage"} <= paths
    assert page.page.locator(".opblock-post").count() >= 2
    shots = Path(os.environ.get("DASHBOARD_SCREENSHOT_DIR") or tmp_path)
    page.page.screenshot(path=str(shots / "dashboard-docs.png"))
    assert seen and all(u.startswith(kassa_server.url) or u.startswith("data:") for u in seen), seen
    assert not page.errors, page.errors
    assert not [text for kind, text in page.console if kind == "error"], page.console


def test_docs_assets_are_served_from_the_package_with_a_strict_policy(kassa_server: KassaUnderTest) -> None:
    r = httpx.get(kassa_server.url + "/docs")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    bundle = httpx.get(kassa_server.url + "/assets/vendor/swagger-ui/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    again = httpx.get(kassa_server.url + "/assets/vendor/swagger-ui/swagger-ui-bundle.js",
                      headers={"If-None-Match": bundle.headers["etag"]})
    assert again.status_code == 304
    assert httpx.get(kassa_server.url + "/assets/../keys.py").status_code == 404
    assert httpx.get(kassa_server.url + "/assets/vendor/swagger-ui/swagger-ui-bundle.js.map").status_code == 404
