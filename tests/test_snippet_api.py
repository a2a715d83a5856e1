"""Serving the snippet (versions, caching, SRI, size budget), its build, CORS and preflights, keys in the URL,
and the demo page route."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.api.demo_page import add_demo_page, confirmation_page
from kassa.app import Kassa
from kassa.keys import RateLimiter
from kassa.snippet.build import SIZE_BUDGET_GZIP, build, built, minify
from kassa.snippet.build import main as build_main
from tests.conftest import ADMIN, PUB, SECRET, decision_body
from tests.partial_writes import disk_full_halfway
from tests.test_api import assert_problem

SHOP = "https://shop.example"
EVIL = "https://evil.example"
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture
def anon(kassa: Kassa):
    with TestClient(create_app(kassa)) as c:
        yield c


@pytest.fixture
def bound(kassa: Kassa) -> str:
    return kassa.keys.create("publishable", "shop", [SHOP])


# --------------------------------------------------------------------------- the built file
def test_built_snippet_is_within_10_kb_gzipped():
    snippet = built()
    assert len(gzip.compress(snippet.body, 9)) <= SIZE_BUDGET_GZIP
    assert gzip.decompress(snippet.gzipped) == snippet.body
    assert len(snippet.body) < snippet.source_bytes  # comments and indentation are gone


def test_integrity_is_the_sha384_of_the_served_bytes():
    snippet = built()
    assert snippet.integrity == "sha384-" + base64.b64encode(hashlib.sha384(snippet.body).digest()).decode()
    assert snippet.version == hashlib.sha256(snippet.body).hexdigest()[:12]
    assert build().integrity == snippet.integrity  # deterministic


def test_minify_keeps_code_and_drops_only_comment_lines():
    src = ("/*! keep me */\n// gone\n  /* gone\n   too */\nconst a = 'http://x//y'; // trailing stays\n"
           "  /* gone */ const b = 1;\n\n    return a;\n")
    assert minify(src) == "/*! keep me */\nconst a = 'http://x//y'; // trailing stays\nconst b = 1;\nreturn a;\n"


def test_build_cli_writes_the_file_and_prints_the_tag(tmp_path: Path):
    out = tmp_path / "kassa.js"
    done = subprocess.run([sys.executable, "-m", "kassa.snippet.build", "--out", str(out), "--json",
                           "--base-url", "https://kassa.shop.example/"], capture_output=True, text=True, check=True)
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.read_bytes() == built().body
    assert info["integrity"] == built().integrity and info["gzip_bytes"] <= SIZE_BUDGET_GZIP
    assert info["script_tag"] == (f'<script async src="https://kassa.shop.example/v1/snippet.js?v={built().version}" '
                                  f'integrity="{built().integrity}" crossorigin="anonymous"></script>')


def test_a_build_that_fails_halfway_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]):
    # `python -m kassa.snippet.build --out` wrote the script in place: a full disk or a stop half-way left half a
    # script where the last good build (the one the page tags' integrity hash names) had been.
    out = tmp_path / "kassa.js"
    out.write_bytes(b"// the previous build\n")
    disk_full_halfway(monkeypatch)
    assert build_main(["--out", str(out)]) == 2
    assert "cannot write the snippet to" in capsys.readouterr().err
    assert out.read_bytes() == b"// the previous build\n" and [p.name for p in tmp_path.iterdir()] == ["kassa.js"]


def test_built_file_is_valid_javascript_when_node_is_available(tmp_path: Path):
    import shutil

    node = shutil.which("node")
    if node is None:  # the browser tests run the file for real; this is only a quicker syntax check
        return
    path = tmp_path / "kassa.js"
    path.write_bytes(built().body)
    subprocess.run([node, "--check", str(path)], check=True)


# --------------------------------------------------------------------------- GET /v1/snippet.js
def test_snippet_is_served_with_cache_headers_and_sri(anon):
    snippet = built()
    r = anon.get("/v1/snippet.js", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.content == snippet.body
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["cache-control"].startswith("public, max-age=300")
    assert r.headers["etag"] == f'"{snippet.version}"'
    assert r.headers["x-kassa-sri"] == snippet.integrity
    assert r.headers["x-kassa-snippet-version"] == snippet.version
    assert r.headers["access-control-allow-origin"] == "*"  # <script integrity crossorigin> needs it
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "set-cookie" not in r.headers


def test_snippet_is_served_gzipped_when_accepted(anon):
    r = anon.get("/v1/snippet.js", headers={"Accept-Encoding": "gzip, br"})
    assert r.headers["content-encoding"] == "gzip"
    assert int(r.headers["content-length"]) == len(built().gzipped) <= SIZE_BUDGET_GZIP
    assert r.content == built().body  # httpx decoded it
    assert r.headers["etag"] == f'"{built().version}-gz"' and r.headers["vary"] == "Accept-Encoding"


def test_pinned_version_is_immutable_and_an_unknown_one_is_404(anon):
    version = built().version
    r = anon.get(f"/v1/snippet.js?v={version}")
    assert r.status_code == 200 and r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert_problem(anon.get("/v1/snippet.js?v=000000000000"), 404, "v")


def test_a_matching_etag_gets_304(anon):
    etag = anon.get("/v1/snippet.js", headers={"Accept-Encoding": "identity"}).headers["etag"]
    for inm in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        r = anon.get("/v1/snippet.js", headers={"If-None-Match": inm, "Accept-Encoding": "identity"})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert anon.get("/v1/snippet.js", headers={"If-None-Match": '"stale"'}).status_code == 200


def test_head_and_no_key_needed(anon):
    r = anon.head("/v1/snippet.js")
    assert r.status_code == 200 and r.content == b"" and r.headers["x-kassa-sri"] == built().integrity
    assert_problem(anon.post("/v1/snippet.js"), 405)


# --------------------------------------------------------------------------- preflights
def test_preflight_from_an_allowed_origin(anon, bound):
    r = anon.options("/v1/decisions", headers={"Origin": SHOP, **PREFLIGHT})
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == SHOP
    assert r.headers["access-control-allow-methods"] == "POST"
    assert r.headers["access-control-allow-headers"] == "Authorization, Content-Type"
    assert r.headers["access-control-max-age"] == "7200"
    assert "Origin" in r.headers["vary"]
    assert "access-control-allow-credentials" not in r.headers
    assert anon.options("/v1/events", headers={"Origin": SHOP, **PREFLIGHT}).status_code == 204


def test_preflight_without_any_unbound_key_refuses_other_origins(kassa, anon, bound):
    kassa.keys.revoke(PUB)  # the fixture's bootstrap key allows any origin; drop it
    r = anon.options("/v1/decisions", headers={"Origin": EVIL, **PREFLIGHT})
    body = assert_problem(r, 403, "Origin")
    assert "evil.example" in body["detail"]
    assert not any(h.startswith("access-control-") for h in r.headers)


@pytest.mark.parametrize(("headers", "field"), [
    ({"Access-Control-Request-Method": "PUT"}, "Access-Control-Request-Method"),
    ({"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-requested-with"},
     "Access-Control-Request-Headers"),
])
def test_preflight_for_other_methods_or_headers_is_refused(anon, bound, headers, field):
    r = anon.options("/v1/decisions", headers={"Origin": SHOP, **headers})
    assert_problem(r, 403, field)
    assert "access-control-allow-origin" not in r.headers


def test_preflight_for_anything_but_decisions_and_events_is_refused(anon, bound):
    for path in ("/v1/offers", "/v1/placements/order_confirmation", "/v1/features/push"):
        r = anon.options(path, headers={"Origin": SHOP, **PREFLIGHT})
        assert_problem(r, 403)
        assert "access-control-allow-origin" not in r.headers


def test_preflight_of_an_unbound_key_follows_server_cors_origins(tmp_path, catalog_file):
    from kassa.config import load_settings

    settings = load_settings(None, data_dir=str(tmp_path / "d"), catalog_file=str(catalog_file),
                             publishable_key=PUB, **{"server.cors_origins": [SHOP]})
    with TestClient(create_app(Kassa(settings))) as c:
        assert c.options("/v1/decisions", headers={"Origin": SHOP, **PREFLIGHT}).status_code == 204
        assert_problem(c.options("/v1/decisions", headers={"Origin": EVIL, **PREFLIGHT}), 403, "Origin")
        ok = c.post("/v1/decisions", json=decision_body(),
                    headers={"Authorization": f"Bearer {PUB}", "Origin": SHOP})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == SHOP
        r = c.post("/v1/decisions", json=decision_body(), headers={"Authorization": f"Bearer {PUB}", "Origin": EVIL})
        assert_problem(r, 403, "Origin")


# --------------------------------------------------------------------------- actual calls
def test_allowed_origin_gets_cors_headers_on_decisions_and_events(anon, bound):
    h = {"Authorization": f"Bearer {bound}", "Origin": SHOP}
    r = anon.post("/v1/decisions", json=decision_body(), headers=h)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == SHOP and r.headers["vary"] == "Origin"
    d = r.json()
    ev = {"events": [{"event_id": "cors-1", "type": "impression", "decision_id": d["decision_id"],
                      "offer_id": d["offers"][0]["offer_id"]}]}
    r = anon.post("/v1/events", json=ev, headers=h)
    assert r.json() == \
        {"accepted": 1, "duplicates": 0, "unknown_decisions": 0} and r.headers["access-control-allow-origin"] == SHOP
    # even a validation error is readable by the page that made it
    r = anon.post("/v1/decisions", json={"placement": 5}, headers=h)
    assert r.status_code == 422 and r.headers["access-control-allow-origin"] == SHOP


def test_disallowed_origin_gets_a_403_it_can_read_and_nothing_is_stored(kassa, anon, bound):
    for path, body in (("/v1/decisions", decision_body()),
                       ("/v1/events", {"events": [{"event_id": "x-1", "type": "order", "order": {"id": "o"}}]})):
        for auth in ({"Authorization": f"Bearer {bound}"}, {}):
            url = path if auth else f"{path}?key={bound}"
            r = anon.post(url, json=body, headers={**auth, "Origin": EVIL})
            assert "not allowed for this key" in assert_problem(r, 403, "Origin")["detail"]
            # readable, so the page's console can say why instead of "Failed to fetch"
            assert r.headers["access-control-allow-origin"] == EVIL and r.headers["vary"] == "Origin"
    assert kassa.event_log.count() == 0


def _revoked(kassa: Kassa, key: str) -> None:
    kassa.keys.revoke(key)


def _limited(kassa: Kassa, key: str) -> None:
    kassa.keys.limiter = RateLimiter({"publishable": 0.5})  # a burst of one call


def _raising(kassa: Kassa, key: str) -> None:
    async def fail(req: object) -> object:
        raise RuntimeError("injected")
    kassa.engine.decide = fail  # type: ignore[method-assign]


@pytest.mark.parametrize(("path", "body", "status", "field", "setup"), [
    ("/v1/decisions?key=nope", decision_body(), 401, "key", None),
    ("/v1/events?key={bound}", {"events": []}, 401, "key", _revoked),
    ("/v1/decisions", decision_body(), 401, "Authorization", None),
    (f"/v1/decisions?key={SECRET}", decision_body(), 403, "key", None),
    ("/v1/decisions?key={bound}", decision_body("no_such_placement"), 404, "placement", None),
    ("/v1/decisions?key={bound}", {"placement": "x" * 70_000}, 413, None, None),
    ("/v1/events?key={bound}", {"events": [{"type": "nope"}]}, 422, None, None),
    ("/v1/decisions?key={bound}", decision_body(), 429, "key", _limited),
    ("/v1/decisions?key={bound}", decision_body(), 500, None, _raising),
])
def test_errors_on_the_browser_routes_carry_the_cors_headers(kassa, bound, caplog, path, body, status, field, setup):
    # Without them the browser hides the problem and the snippet can only say "Failed to fetch".
    if setup is not None:
        setup(kassa, bound)
    with TestClient(create_app(kassa), raise_server_exceptions=False) as client:
        if status == 429:
            client.post(path.format(bound=bound), json=body, headers={"Origin": SHOP})
        r = client.post(path.format(bound=bound), content=json.dumps(body), headers={"Origin": SHOP})
    assert_problem(r, status, field)
    assert r.headers["access-control-allow-origin"] == SHOP and r.headers["vary"] == "Origin"
    if status == 500:  # logged once, by the handler that answered
        assert [rec.message for rec in caplog.records if rec.name == "kassa.api"] == \
            ["unhandled error on /v1/decisions"]


def test_unbound_publishable_key_echoes_any_origin(anon):
    r = anon.post("/v1/decisions", json=decision_body(), headers={"Authorization": f"Bearer {PUB}", "Origin": EVIL})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == EVIL


def test_requests_without_origin_get_no_cors_headers(anon, bound):
    r = anon.post("/v1/decisions", json=decision_body(), headers={"Authorization": f"Bearer {bound}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_secret_and_admin_keys_never_get_cors_headers_on_success(anon):
    for key in (SECRET, ADMIN):
        r = anon.post("/v1/decisions", json=decision_body(), headers={"Authorization": f"Bearer {key}", "Origin": SHOP})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        ev = {"events": [{"event_id": f"s-{key}", "type": "order", "order": {"id": "o"}}]}
        r = anon.post("/v1/events", json=ev, headers={"Authorization": f"Bearer {key}", "Origin": SHOP})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_publishable_key_cannot_call_anything_else_cross_origin(anon, bound):
    h = {"Authorization": f"Bearer {bound}", "Origin": SHOP}
    for method, path in (("GET", "/v1/offers"), ("GET", "/v1/placements"), ("GET", "/v1/models"),
                         ("PUT", "/v1/features/customer_signals/c-1")):
        r = anon.request(method, path, headers=h, json={"values": {"ltv": 1.0}})
        assert_problem(r, 403, "Authorization")
        assert "access-control-allow-origin" not in r.headers
    r = anon.get(f"/v1/offers?key={bound}", headers={"Origin": SHOP})
    assert_problem(r, 403, "key")


# --------------------------------------------------------------------------- ?key=
def test_publishable_key_in_the_url_as_text_plain(anon, bound):
    body = json.dumps(decision_body())
    r = anon.post(f"/v1/decisions?key={bound}", content=body,
                  headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": SHOP})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == SHOP
    d = r.json()
    ev = json.dumps({"events": [{"event_id": "url-1", "type": "accept", "decision_id": d["decision_id"],
                                 "offer_id": d["offers"][0]["offer_id"]}]})
    r = anon.post(f"/v1/events?key={bound}", content=ev, headers={"Content-Type": "text/plain;charset=UTF-8"})
    assert r.json() == {"accepted": 1, "duplicates": 0, "unknown_decisions": 0}


@pytest.mark.parametrize("key", [SECRET, ADMIN])
def test_only_publishable_keys_may_travel_in_the_url(anon, key):
    body = assert_problem(anon.post(f"/v1/decisions?key={key}", json=decision_body()), 403, "key")
    assert "publishable" in body["detail"]
    assert_problem(anon.get(f"/v1/offers?key={key}"), 403, "key")


def test_unknown_or_empty_key_in_the_url_is_401(anon):
    assert_problem(anon.post("/v1/decisions?key=nope", json=decision_body()), 401, "key")
    assert_problem(anon.post("/v1/decisions?key=", json=decision_body()), 401, "key")
    assert_problem(anon.post("/v1/decisions?key=nope", json=decision_body(), headers={"Origin": SHOP}), 401, "key")


def test_the_header_wins_over_the_url(anon, bound):
    r = anon.post("/v1/decisions?key=nope", json=decision_body(), headers={"Authorization": f"Bearer {bound}"})
    assert r.status_code == 200


# --------------------------------------------------------------------------- the demo page
def test_demo_page_route_serves_a_page_pinned_to_the_current_snippet(kassa):
    app = create_app(kassa)
    payload = {"placement": "order_confirmation", "order": {"id": "R-7", "currency": "EUR", "total": 20.0,
               "items": [{"sku": "S-1", "category": "skin_care", "qty": 2, "price": 10.0}]},
               "customer": {"id": "c-1"}}
    add_demo_page(app, PUB, [payload], {"S-1": "Night </script><b>cream"}, timeout_ms=400)
    with TestClient(app) as c:
        r = c.get("/demo/confirmation?layout=inline&n=0")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        page = r.text
        assert f'src="/v1/snippet.js?v={built().version}" integrity="{built().integrity}"' in page
        assert '"layout":"inline"' in page and '"timeout":400' in page and '"key":"test-publishable-key"' in page
        assert "Night &lt;/script&gt;&lt;b&gt;cream" in page and "</script><b>" not in page
        assert "€20.00" in page and "Skin care" in page
        assert '"layout":"overlay"' in c.get("/demo/confirmation?n=oops").text


def test_demo_page_json_cannot_close_the_script_element():
    page = confirmation_page({"order": {"id": "</script><script>alert(1)</script>"}}, key="k")
    assert "</script><script>alert(1)" not in page and "\\u003c/script>" in page


def test_demo_page_needs_orders():
    with pytest.raises(ValueError, match="at least one"):
        add_demo_page(Starlette(), "k", [])
