"""The operator dashboard (/dashboard) in headless Chromium.

A Kassa server of its own (the package's shop server has no learning placement) is fed a short
demo-like run through the public API: decisions for a learning placement, accepts biased towards one
offer, a reward window of one second, snapshots every second. Then the pages are driven as an operator
would: log in, read the overview and a placement, look a decision up, edit an offer, revoke a key.

Screenshots go to a temporary folder, or to ``$DASHBOARD_SCREENSHOT_DIR`` when set (``make
screenshots`` style: ``DASHBOARD_SCREENSHOT_DIR=docs/img pytest tests/browser/test_dashboard.py``).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from kassa.app import Kassa
from kassa.config import load_settings
from kassa.server import BackgroundServer
from tests.browser.conftest import free_port

HOSTILE = '<img src=x onerror="window.__pwned=1">Cover'
CATALOG: dict[str, Any] = {
    "offers": [
        {"id": "serum-sub", "kind": "subscription", "title": "Serum refills", "value": 30,
         "content": {"headline": "Serum every 6 weeks", "cta": "Subscribe"}},
        {"id": "warranty", "kind": "warranty", "title": HOSTILE, "value": 20,
         "content": {"headline": "<script>window.__pwned=2</script>", "cta": "Add"}},
        {"id": "thanks10", "kind": "discount", "title": "10% off", "value": 10,
         "content": {"headline": "10% off your next order", "cta": "Get my code", "code": "THANKS10"}},
        {"id": "socks", "kind": "product", "title": "Wool socks", "value": 12, "sku": "SOCKS",
         "content": {"headline": "Warm feet", "cta": "Add socks"}},
    ],
    "placements": [
        {"id": "order_confirmation", "slots": 2, "offers": ["serum-sub", "warranty", "thanks10", "socks"],
         "policy": "epsilon", "exploration": 0.3, "min_learned_decisions": 20, "latency_budget_ms": 5000,
         "reward": {"wait_seconds": 1.0, "weights": {"click": 0.1, "accept": 1.0, "conversion": "value"}}},
    ],
}
# How often a shopper accepts each offer when shown: the learner should find serum-sub.
ACCEPT = {"serum-sub": 0.6, "warranty": 0.15, "thanks10": 0.3, "socks": 0.05}


@dataclass
class Dash:
    url: str
    kassa: Kassa
    admin: str
    decision_ids: list[str]
    accepted: dict[str, str]  # decision id -> offer accepted
    shots: Path


def _drive(url: str, key: str, n: int, seed: int) -> tuple[list[str], dict[str, str]]:
    rng = random.Random(seed)
    ids: list[str] = []
    accepted: dict[str, str] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
        for i in range(n):
            body = {"placement": "order_confirmation", "request_id": f"r-{seed}-{i}",
                    "customer": {"id": f"c-{rng.randrange(40)}"},
                    "order": {"id": f"o-{seed}-{i}", "currency": "USD", "total": round(rng.uniform(20, 200), 2),
                              "items": [{"sku": "SERUM", "category": "skincare", "qty": 1, "price": 64.0}]}}
            r = client.post("/v1/decisions", json=body)
            assert r.status_code == 200, r.text
            d = r.json()
            ids.append(d["decision_id"])
            events = []
            for offer in d["offers"]:
                if rng.random() < ACCEPT[offer["offer_id"]]:
                    events.append({"event_id": f"e-{d['decision_id']}-{offer['offer_id']}", "type": "accept",
                                   "decision_id": d["decision_id"], "offer_id": offer["offer_id"]})
                    accepted.setdefault(d["decision_id"], offer["offer_id"])
                    break
            if events:
                assert client.post("/v1/events", json={"events": events}).status_code == 200
    return ids, accepted


@pytest.fixture(scope="module")
def dash() -> Iterator[Dash]:
    with tempfile.TemporaryDirectory(prefix="kassa-dash-", ignore_cleanup_errors=True) as tmp:
        catalog = Path(tmp) / "catalog.json"
        catalog.write_bytes(msgspec.json.encode(CATALOG))
        port = free_port()
        admin = "ka_dashboard-test-admin-key"
        settings = load_settings(
            None, data_dir=str(Path(tmp) / "data"), catalog_file=str(catalog), log_level="warning",
            admin_key=admin, decision_log_flush_seconds=0.2,
            **{"server.port": port, "server.host": "127.0.0.1", "learn.snapshot_every_seconds": 0.5,
               "learn.snapshot_min_learns": 10, "learn.registry_poll_seconds": 0.2,
               "learn.drift_check_seconds": 0.5})
        kassa = Kassa(settings, seed=7)
        secret = kassa.keys.create("secret", "demo-driver")
        kassa.keys.create("publishable", "storefront", ["https://shop.example"])
        server = BackgroundServer(settings, kassa)
        server.start()
        try:
            ids: list[str] = []
            accepted: dict[str, str] = {}
            for round_ in range(4):  # rounds a second apart: the learning curve gets several points
                more, more_accepted = _drive(server.url, secret, 60, seed=round_)
                ids += more
                accepted.update(more_accepted)
                time.sleep(1.2)  # windows close, the learner snapshots
            time.sleep(0.6)
            shots = Path(os.environ.get("DASHBOARD_SCREENSHOT_DIR") or Path(tmp) / "shots")
            shots.mkdir(parents=True, exist_ok=True)
            yield Dash(server.url, kassa, admin, ids, accepted, shots)
        finally:
            server.stop()


@pytest.fixture
def dpage(browser: Any, dash: Dash) -> Iterator[Any]:
    """A fresh browser context; records every request's URL and any page error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(10_000)
    pg.requests_seen = []
    pg.errors = []
    pg.on("request", lambda req: pg.requests_seen.append(req.url))
    pg.on("pageerror", lambda exc: pg.errors.append(str(exc)))
    pg.on("console", lambda msg: pg.errors.append(msg.text) if msg.type == "error" else None)
    yield pg
    context.close()


def login(pg: Any, dash: Dash, key: str | None = None, path: str = "/dashboard") -> None:
    pg.goto(dash.url + path)
    pg.fill("#key", key or dash.admin)
    pg.click("form.login button")
    pg.wait_for_load_state()


def shot(pg: Any, dash: Dash, name: str, full_page: bool = True) -> None:
    pg.screenshot(path=str(dash.shots / f"dashboard-{name}.png"), full_page=full_page)


# --------------------------------------------------------------------------- login and CSRF
def test_login_with_a_wrong_key_is_refused(dpage: Any, dash: Dash) -> None:
    dpage.goto(dash.url + "/dashboard")
    assert dpage.url.startswith(dash.url + "/dashboard/login")
    dpage.fill("#key", "ka_not-a-key")
    with dpage.expect_response(lambda r: r.url.endswith("/dashboard/login") and r.request.method == "POST") as resp:
        dpage.click("form.login button")
    assert resp.value.status == 401
    assert "not a valid admin key" in dpage.inner_text("[data-testid=login-error]")
    assert not [c for c in dpage.context.cookies() if c["name"] == "kassa_session"]
    # a secret key is a valid key, but not an admin one
    login(dpage, dash, key="ks_whatever-is-not-admin")
    assert dpage.locator("[data-testid=login-error]").is_visible()


def test_the_session_cookie_is_httponly_and_samesite_strict(dpage: Any, dash: Dash) -> None:
    login(dpage, dash)
    assert dpage.url == dash.url + "/dashboard"
    (cookie,) = [c for c in dpage.context.cookies() if c["name"] == "kassa_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/dashboard"
    assert dpage.evaluate("document.cookie") == ""


def test_a_post_without_the_csrf_token_is_refused(dpage: Any, dash: Dash) -> None:
    victim = dash.kassa.keys.create("publishable", "csrf-target", ["https://shop.example"])
    login(dpage, dash, path="/dashboard/keys")
    prefix = next(k["id"] for k in dash.kassa.keys.list() if k["name"] == "csrf-target")
    # the session cookie travels with these requests, the CSRF token does not (or is wrong)
    for form in ({}, {"csrf": "forged"}):
        r = dpage.request.post(f"{dash.url}/dashboard/keys/{prefix}/revoke", form=form, max_redirects=0)
        assert r.status == 403, r.text()
    token = dpage.get_attribute("input[name=csrf]", "value")
    r = dpage.request.post(f"{dash.url}/dashboard/keys/{prefix}/revoke", form={"csrf": token},
                           headers={"Origin": "https://evil.example"}, max_redirects=0)
    assert r.status == 403
    assert dash.kassa.keys.lookup(victim) is not None  # still active
    offer_before = dash.kassa.catalog.snapshot.offers["thanks10"]
    r = dpage.request.post(f"{dash.url}/dashboard/offers/thanks10", form={"document": "{}"}, max_redirects=0)
    assert r.status == 403 and dash.kassa.catalog.snapshot.offers["thanks10"] == offer_before


def test_an_admin_key_in_the_header_reads_the_dashboard_without_a_session(dash: Dash) -> None:
    r = httpx.get(dash.url + "/dashboard", headers={"Authorization": f"Bearer {dash.admin}"})
    assert r.status_code == 200 and "Decisions / s" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    publishable = dash.kassa.keys.create("publishable", "not-admin", [])
    r = httpx.get(dash.url + "/dashboard", headers={"Authorization": f"Bearer {publishable}"})
    assert r.status_code == 401
    r = httpx.get(dash.url + "/dashboard", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")


# --------------------------------------------------------------------------- pages
def test_overview_shows_traffic_latency_and_placements(dpage: Any, dash: Dash) -> None:
    login(dpage, dash)
    total = dpage.inner_text("[data-testid=kpi-total] .value")
    assert int(total.replace(",", "")) >= len(dash.decision_ids)
    assert dpage.inner_text("[data-testid=kpi-p99] .value").endswith("ms")
    assert "%" in dpage.inner_text("[data-testid=kpi-fallback] .value")
    assert dpage.locator("svg.chart").count() >= 1
    assert dpage.locator("a[href='/dashboard/placements/order_confirmation']").count() == 1
    shot(dpage, dash, "overview")
    assert all(u.startswith(dash.url) or u.startswith("data:") for u in dpage.requests_seen), dpage.requests_seen
    assert not dpage.errors, dpage.errors


def test_placement_page_shows_reward_by_version_and_offer_and_the_learning_curve(dpage: Any, dash: Dash) -> None:
    login(dpage, dash, path="/dashboard/placements/order_confirmation")
    by_offer = dpage.inner_text("[data-testid=reward-by-offer]")
    for offer in ("serum-sub", "thanks10"):
        assert offer in by_offer
    rows = dpage.locator("[data-testid=reward-by-version] tbody tr")
    assert rows.count() >= 1
    serving = dash.kassa.models.serving("order_confirmation")
    assert serving is not None and serving.production is not None  # the learner published a snapshot
    assert serving.production.version in dpage.inner_text("[data-testid=canary]")
    assert dpage.locator("svg.chart[aria-label^='Reward per decision'] polyline, "
                         "svg.chart[aria-label^='Reward per decision'] circle").count() >= 1
    assert dash.kassa.model_registry.versions("order_confirmation")  # the learner registered snapshots
    assert "Evaluations and gate decisions" in dpage.content()
    shot(dpage, dash, "placement")
    assert not dpage.errors, dpage.errors


def test_decision_explorer_shows_a_decision_with_its_events_and_reward(dpage: Any, dash: Dash) -> None:
    decision_id, offer = next(iter(dash.accepted.items()))
    login(dpage, dash, path="/dashboard/decisions")
    dpage.fill("#decision-id", decision_id)
    dpage.click("form.search button")
    detail = dpage.locator("[data-testid=decision-detail]")
    text = detail.inner_text()
    assert decision_id in text and "order_confirmation" in text
    assert "accept" in text and offer in text and "closed" in text
    assert dpage.locator("[data-testid=features] tbody tr").count() >= 3
    shot(dpage, dash, "decision")
    dpage.goto(dash.url + "/dashboard/decisions?id=nope-not-a-decision")
    assert dpage.locator("[data-testid=not-found]").is_visible()


def test_editing_an_offer_changes_what_the_api_serves(dpage: Any, dash: Dash) -> None:
    login(dpage, dash, path="/dashboard/offers")
    dpage.click("a[href='/dashboard/offers/thanks10']")
    doc = msgspec.json.decode(dpage.input_value("textarea[name=document]"))
    doc["title"] = "15% off"
    doc["content"]["code"] = "THANKS15"
    dpage.fill("textarea[name=document]", msgspec.json.encode(doc).decode())
    dpage.click("form.editor button")
    assert dpage.locator("[data-testid=saved]").is_visible()
    shot(dpage, dash, "offer")
    r = httpx.get(dash.url + "/v1/offers/thanks10", headers={"Authorization": f"Bearer {dash.admin}"})
    assert r.json()["title"] == "15% off" and r.json()["content"]["code"] == "THANKS15"
    # a document the schema refuses is shown back with the reason, and nothing changes
    doc["value"] = -5
    dpage.fill("textarea[name=document]", msgspec.json.encode(doc).decode())
    dpage.click("form.editor button")
    assert ">= 0" in dpage.inner_text("[data-testid=edit-error]")
    assert dash.kassa.catalog.snapshot.offers["thanks10"].value == 10


def test_revoking_a_key_refuses_it_on_the_api(dpage: Any, dash: Dash) -> None:
    key = dash.kassa.keys.create("secret", "to-revoke")
    body = {"placement": "order_confirmation"}
    assert httpx.post(dash.url + "/v1/decisions", json=body,
                      headers={"Authorization": f"Bearer {key}"}).status_code == 200
    login(dpage, dash, path="/dashboard/keys")
    dpage.on("dialog", lambda dialog: dialog.accept())
    row = dpage.locator("[data-testid=keys] tr", has_text="to-revoke")
    row.locator("button", has_text="Revoke").click()
    dpage.wait_for_load_state()
    assert "revoked" in dpage.locator("[data-testid=keys] tr", has_text="to-revoke").inner_text()
    r = httpx.post(dash.url + "/v1/decisions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401
    shot(dpage, dash, "keys")


def test_reloading_after_creating_a_key_creates_no_second_key_and_shows_the_secret_once(
        dpage: Any, dash: Dash) -> None:
    """The form posted to the page that showed the key: a reload posted it again and made a second key."""
    login(dpage, dash, path="/dashboard/keys")
    before = len(dash.kassa.keys.list())
    dpage.select_option("select[name=kind]", "secret")
    dpage.fill("input[name=name]", "reload-check")
    dpage.click("form.inline button")
    dpage.wait_for_load_state()
    secret = dpage.inner_text("[data-testid=new-key] code")
    assert dpage.url == dash.url + "/dashboard/keys"  # redirected, and the secret is not in the URL
    assert dash.kassa.keys.lookup(secret) is not None
    dpage.reload()
    dpage.wait_for_load_state()
    assert len(dash.kassa.keys.list()) == before + 1
    assert dpage.locator("[data-testid=new-key]").count() == 0  # shown once
    assert secret not in dpage.content()


def test_hostile_offer_text_is_shown_as_text_never_run(dpage: Any, dash: Dash) -> None:
    login(dpage, dash, path="/dashboard/offers")
    assert HOSTILE in dpage.inner_text("table")
    dpage.goto(dash.url + "/dashboard/offers/warranty")
    assert "<script>window.__pwned=2</script>" in dpage.input_value("textarea[name=document]")
    dpage.goto(dash.url + "/dashboard/placements/order_confirmation")
    dpage.goto(dash.url + "/dashboard/decisions?id=" + "%3Cimg%20src%3Dx%20onerror%3Dwindow.__pwned%3D3%3E")
    assert dpage.evaluate("window.__pwned") is None


def test_features_page_lists_views_with_their_freshness(dpage: Any, dash: Dash) -> None:
    login(dpage, dash, path="/dashboard/features")
    assert dpage.locator("main table").count() == 1
    assert not dpage.errors, dpage.errors


def test_on_a_phone_the_pages_fit_the_screen_and_every_link_is_reachable(dpage: Any, dash: Dash) -> None:
    """At 390 px the header's navigation ran off the right edge (Offers, Features, Keys and Log out only by
    scrolling the whole page sideways) and tables squeezed their columns to a letter or two each."""
    dpage.set_viewport_size({"width": 390, "height": 800})
    login(dpage, dash)
    for path in ("/dashboard", "/dashboard/placements/order_confirmation", "/dashboard/decisions",
                 "/dashboard/keys", "/dashboard/offers"):
        dpage.goto(dash.url + path)
        width, client = dpage.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width <= client, (path, width, client)
        for box in [el.bounding_box() for el in dpage.locator("header nav a, header .logout button").all()]:
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= client, (path, box)
    dpage.goto(dash.url + "/dashboard")
    # the System table scrolls inside itself instead: its columns keep a readable width
    narrowest = dpage.evaluate("Math.min(...[...document.querySelectorAll('main table')[1].querySelectorAll('th')]"
                               ".map(th => th.getBoundingClientRect().width))")
    assert narrowest >= 60, narrowest
    assert not dpage.errors, dpage.errors


def test_every_form_field_has_a_label(dpage: Any, dash: Dash) -> None:
    """The offer and placement editors' JSON textarea had no label: a screen reader announced "edit text"."""
    unlabelled = ("[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]"
                  ".filter(el => !el.labels.length && !el.getAttribute('aria-label')).map(el => el.outerHTML)")
    login(dpage, dash)
    for path in ("/dashboard/offers/serum-sub", "/dashboard/placements/order_confirmation/edit", "/dashboard/keys",
                 "/dashboard/decisions"):
        dpage.goto(dash.url + path)
        assert dpage.evaluate(unlabelled) == [], path
    dpage.goto(dash.url + "/dashboard/offers/serum-sub")
    assert '"serum-sub"' in dpage.get_by_label("JSON document").input_value()


CONTRAST_JS = """() => {
  const rgb = s => s.match(/[0-9.]+/g).map(Number);
  const lum = c => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const background = el => { for (; el; el = el.parentElement) { const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length < 4 || c[3] > 0) return c; } return [255, 255, 255]; };
  return [...document.querySelectorAll('main .muted, main .badge, .card .label, .card .note')]
    .filter(el => el.textContent.trim()).map(el => {
      const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))].sort((x, y) => y - x);
      return [el.className, el.textContent.trim().slice(0, 30), Math.round(100 * (a + 0.05) / (b + 0.05)) / 100]; });
}"""


def test_muted_text_and_badges_meet_wcag_aa_contrast(dpage: Any, dash: Dash) -> None:
    """Muted notes and badges (#6b7280 on the #f3f4f6 page) were 4.4:1, under the 4.5:1 AA needs for small text."""
    login(dpage, dash)
    for path in ("/dashboard", "/dashboard/placements/order_confirmation", "/dashboard/offers", "/dashboard/keys"):
        dpage.goto(dash.url + path)
        checked = dpage.evaluate(CONTRAST_JS)
        assert checked, path
        low = [c for c in checked if c[2] < 4.5]
        assert not low, (path, low)
