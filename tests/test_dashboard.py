"""The dashboard's data and sessions, in-process (the pages themselves are in tests/browser/test_dashboard.py)."""

from __future__ import annotations

import os
import re

import msgspec
import pytest
from starlette.testclient import TestClient

from kassa.api.app import create_app
from kassa.api.dashboard.outcomes import Outcomes, Tally
from kassa.api.dashboard.overview import most_shown, rate_span, redact_url, throughput_series
from kassa.api.dashboard.traffic import RateMeter, bucket_quantile
from kassa.app import Kassa
from kassa.config import Settings
from tests.conftest import ADMIN, PUB, Clock, decision_body, order


def test_quantiles_interpolate_inside_a_bucket_like_histogram_quantile() -> None:
    buckets = {0.001: 50.0, 0.002: 90.0, 0.005: 100.0, float("inf"): 100.0}
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.001)
    assert bucket_quantile(0.7, buckets) == pytest.approx(0.0015)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.0047)
    assert bucket_quantile(0.5, {0.001: 0.0, float("inf"): 0.0}) is None
    assert bucket_quantile(0.99, {0.001: 1.0, float("inf"): 10.0}) == 0.001  # above the last finite bound


def test_the_joined_reward_weights_events_in_the_window_caps_them_and_skips_late_ones(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    body = decision_body(order=order(total=80.0, categories=("electronics", "skincare")))
    r = client.post("/v1/decisions", json=body)
    d = r.json()
    assert r.status_code == 200, d
    first, second = d["offers"][0]["offer_id"], d["offers"][1]["offer_id"]

    def send(*events: dict) -> None:
        assert client.post("/v1/events", json={"events": list(events)}).status_code == 200

    did = d["decision_id"]
    send({"event_id": "a", "type": "accept", "decision_id": did, "offer_id": first},
         {"event_id": "b", "type": "click", "decision_id": did, "offer_id": first},
         {"event_id": "c", "type": "conversion", "decision_id": did, "offer_id": second, "value": 80.0})
    clock.advance(61)  # past the 60 s window
    send({"event_id": "d", "type": "accept", "decision_id": did, "offer_id": second})
    detail = Outcomes(kassa).decision(did, now=clock())
    assert detail is not None and detail.closed
    rewards = {o.offer_id: o.reward for o in detail.shown}
    assert rewards[first] == pytest.approx(1.1)
    assert rewards[second] == pytest.approx(50.0)  # 80 capped at 50; the late accept is not counted
    assert rewards[d["offers"][2]["offer_id"]] == 0.0  # the default
    assert [inside for _, _, inside in detail.events] == [True, True, True, False]
    assert {c for c, _ in detail.candidates} >= {first, second}
    assert Outcomes(kassa).decision("no-such-decision") is None


def test_reward_by_version_counts_only_closed_decisions(client: TestClient, kassa: Kassa, clock: Clock) -> None:
    ids = [client.post("/v1/decisions", json=decision_body(request_id=f"r{i}")).json()["decision_id"]
           for i in range(3)]
    outcomes = Outcomes(kassa)
    since = clock() - 10
    open_now = outcomes.placements(since, now=clock())["order_confirmation"].by_version["baseline"]
    assert (open_now.decisions, open_now.open) == (0, 3)
    closed = outcomes.placements(since, now=clock() + 120)["order_confirmation"].by_version["baseline"]
    assert (closed.decisions, closed.open) == (3, 0)
    assert outcomes.recent(2)[0][0] in ids


def _login(c: TestClient, key: str) -> int:
    r = c.post("/dashboard/login", data={"key": key, "next": "/dashboard"}, follow_redirects=False)
    return r.status_code


def test_revoking_the_admin_key_ends_its_dashboard_sessions(kassa: Kassa) -> None:
    key = kassa.keys.create("admin", "operator")
    with TestClient(create_app(kassa)) as c:
        assert _login(c, PUB) == 401
        assert _login(c, key) == 303
        assert c.get("/dashboard", follow_redirects=False).status_code == 200
        kassa.keys.revoke(key)
        r = c.get("/dashboard", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login")


def test_login_redirects_only_inside_the_dashboard(kassa: Kassa) -> None:
    key = kassa.keys.create("admin", "operator")
    with TestClient(create_app(kassa)) as c:
        for target in ("https://evil.example/", "//evil.example/x", "/v1/offers"):
            r = c.post("/dashboard/login", data={"key": key, "next": target}, follow_redirects=False)
            assert r.headers["location"] == "/dashboard"


def test_with_auth_off_the_dashboard_opens_without_a_key_and_posts_still_need_the_csrf_token(
        settings: Settings) -> None:
    kassa = Kassa(msgspec.structs.replace(settings, auth=False), seed=1)
    with TestClient(create_app(kassa)) as c:
        page = c.get("/dashboard/offers/discount")
        assert page.status_code == 200
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token is not None
        doc = msgspec.json.encode(msgspec.structs.replace(kassa.catalog.snapshot.offers["discount"],
                                                          title="12% off")).decode()
        assert c.post("/dashboard/offers/discount", data={"document": doc}, follow_redirects=False).status_code == 403
        r = c.post("/dashboard/offers/discount", data={"document": doc, "csrf": token.group(1)},
                   follow_redirects=False)
        assert r.status_code == 303
        assert kassa.catalog.snapshot.offers["discount"].title == "12% off"


def test_the_overview_shows_this_process_backends_and_their_state(kassa: Kassa) -> None:
    """The System table: what each component runs on here, where, and its state (embedded backends)."""
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        page = c.get("/dashboard")
    assert page.status_code == 200
    rows = _system(page.text)
    assert rows["Events and decision records"][0] == "SQLite (embedded)"
    assert rows["Events and decision records"][1].endswith("events.db")
    assert rows["Per-buyer state"][0] == "embedded"
    assert rows["Online feature store"][0] == "in process"
    assert rows["Metadata (catalog, keys, registries)"][0] == "sqlite"
    assert "every 0.25 s" in rows["Metadata (catalog, keys, registries)"][3]
    assert rows["Learner"][0] == "in this process"
    assert rows["This process"][0] == f"pid {os.getpid()}" and "ready" in rows["This process"][2]


def test_backend_urls_on_the_dashboard_hide_passwords() -> None:
    assert redact_url("redis://:s3cret@cache.internal:6380/2") == "redis://:***@cache.internal:6380/2"
    assert redact_url("nats://app:s3cret@nats:4222") == "nats://app:***@nats:4222"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://u:s3cret@[::1]:6379/0") == "redis://u:***@[::1]:6379/0"


def _system(page: str) -> dict[str, list[str]]:
    system = page[page.index("<h2>System</h2>"):page.index("<h2>Problem responses</h2>")]
    return {cells[0]: cells[1:] for cells in (re.findall(r"<td>(.*?)</td>", row)
                                              for row in re.findall(r"<tr>(.*?)</tr>", system, re.S)) if cells}


def test_the_overview_shows_redis_state_and_online_store_and_their_availability(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from kassa.config import load_settings
    from tests.conftest import CATALOG
    from tests.services import ensure_redis

    url = ensure_redis()
    prefix = "t" + uuid.uuid4().hex[:10]
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    settings = load_settings(None, data_dir=str(tmp_path / "data"), catalog_file=str(catalog), admin_key=ADMIN,
                             **{"state.backend": "redis", "state.redis_url": url, "state.key_prefix": prefix,
                                "features.online_store": "redis", "features.redis_url": url,
                                "features.key_prefix": prefix + "f"})
    k = Kassa(settings, seed=7)
    with TestClient(create_app(k), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        rows = _system(c.get("/dashboard").text)
        assert rows["Per-buyer state"][:2] == ["Redis", url]
        assert "available" in rows["Per-buyer state"][2] and "0 writes" in rows["Per-buyer state"][3]
        assert rows["Online feature store"][0] == "Redis" and "available" in rows["Online feature store"][2]
        k.state.redis._down_until = float("inf")  # type: ignore[union-attr]  # as after a failed round trip
        k.store.breaker.state = "open"  # type: ignore[attr-defined]
        rows = _system(c.get("/dashboard").text)
        assert "unavailable: fallback" in rows["Per-buyer state"][2]
        assert "circuit open" in rows["Online feature store"][2]
        k.state.redis._down_until = 0.0  # type: ignore[union-attr]
        k.store.breaker.state = "closed"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("change", "said"), [
    ({"timezone": "Europe"}, "not a time zone"),  # InvalidField escaped the editor: HTTP 500
    ({"offers": ["discount", "discount"]}, "more than once"),
    ({"offers": ["no-such-offer"]}, "unknown offer"),
])
def test_the_placement_editor_shows_what_the_catalog_refuses(kassa: Kassa, change: dict, said: str) -> None:
    from tests.conftest import ADMIN

    placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
    doc = msgspec.json.encode(msgspec.structs.replace(placement, **change)).decode()
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        r = c.post("/dashboard/placements/order_confirmation/edit", data={"document": doc}, follow_redirects=False)
    assert r.status_code == 422 and r.headers["content-type"].startswith("text/html"), r.text[:300]
    assert said in r.text
    assert kassa.catalog.snapshot.placements["order_confirmation"].placement == placement  # nothing changed


def test_the_editors_write_the_catalog_off_the_serving_loop(kassa: Kassa, monkeypatch: pytest.MonkeyPatch) -> None:
    """Catalog writes are SQL (PostgreSQL may be slow or away); the API made them off the loop, the dashboard's
    editors on it, stalling every decision meanwhile."""
    import asyncio

    from tests.conftest import ADMIN

    on_loop: list[str] = []
    for name in ("put_offer", "put_placement"):
        real = getattr(kassa.catalog, name)

        def spy(*args, _real=real, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            try:
                asyncio.get_running_loop()
                on_loop.append(_name)
            except RuntimeError:
                pass
            return _real(*args, **kwargs)

        monkeypatch.setattr(kassa.catalog, name, spy)
    offer = msgspec.structs.replace(kassa.catalog.snapshot.offers["discount"], title="12% off")
    placement = msgspec.structs.replace(kassa.catalog.snapshot.placements["order_confirmation"].placement, slots=2)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        for path, doc in (("/dashboard/offers/discount", offer),
                          ("/dashboard/placements/order_confirmation/edit", placement)):
            r = c.post(path, data={"document": msgspec.json.encode(doc).decode()}, follow_redirects=False)
            assert r.status_code == 303, r.text[:300]
    assert kassa.catalog.snapshot.offers["discount"].title == "12% off"
    assert kassa.catalog.snapshot.placements["order_confirmation"].placement.slots == 2
    assert on_loop == []


def test_a_refused_new_key_keeps_what_the_operator_typed_and_says_why(kassa: Kassa) -> None:
    """A bad origin or an empty name used to answer with a bare error page: no form, no navigation, input lost."""
    before = len(kassa.keys.list())
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        r = c.post("/dashboard/keys", data={"kind": "publishable", "name": "shop widget",
                                            "origins": "shop.example/path"})
        assert r.status_code == 422 and r.headers["content-type"].startswith("text/html")
        assert 'data-testid="key-error"' in r.text and "shop.example/path" in r.text
        assert 'name="name" required maxlength="100" value="shop widget"' in r.text
        assert 'name="origins" value="shop.example/path"' in r.text
        assert '<option value="publishable" selected>' in r.text
        assert 'href="/dashboard/keys" class="active"' in r.text  # still the keys page, with its navigation
        blank = c.post("/dashboard/keys", data={"kind": "secret", "name": "   "})
        assert blank.status_code == 422 and 'data-testid="key-error"' in blank.text
        assert len(kassa.keys.list()) == before  # nothing was created
        ok = c.post("/dashboard/keys", data={"kind": "secret", "name": "batch job"})
        # a header request (a script) has no session to hold the secret for a redirect: it gets the page
        assert ok.status_code == 200 and 'data-testid="new-key"' in ok.text
        assert 'value="batch job"' not in ok.text  # the form is emptied once the key exists
    assert len(kassa.keys.list()) == before + 1


def test_the_overview_plots_fallbacks_per_second_on_the_decisions_per_second_axis() -> None:
    """The decisions/s chart drew the fallback *share* (0..1) on its decisions/s axis, so 50 % fallbacks at
    200 decisions/s showed as a line at 0.5, flat on the floor; and only buckets with fallbacks had a point."""
    series = [(1000.0, 200.0, 0.5, 0.3, 1.2), (1010.0, 100.0, 0.0, 0.3, 1.1), (1030.0, 40.0, 0.25, 0.4, 1.5)]
    rate, latency = throughput_series(10.0, series, now=1035.0)
    assert set(rate) == {"decisions/s", "fallbacks/s"}
    assert rate["decisions/s"] == [(1000.0, 200.0), (1010.0, 100.0), (1020.0, 0.0), (1030.0, 40.0)]
    assert rate["fallbacks/s"] == [(1000.0, 100.0), (1010.0, 0.0), (1020.0, 0.0), (1030.0, 10.0)]
    assert latency["P99"] == [(1000.0, 1.2), (1010.0, 1.1), (1030.0, 1.5)]


def test_reward_by_offer_ranks_offers_by_impressions_not_by_a_noisy_rate() -> None:
    """Ranked by reward per impression, an offer shown once and accepted once (1.000) led the table and the
    chart of a demo run, above offers with hundreds of impressions."""
    by_offer = {"lucky-once": Tally(decisions=1, reward=1.0), "workhorse": Tally(decisions=400, reward=80.0),
                "steady": Tally(decisions=250, reward=75.0), "tie-b": Tally(decisions=5, reward=1.0),
                "tie-a": Tally(decisions=5, reward=1.0), "unseen": Tally(open=3)}
    assert [o for o, _ in most_shown(by_offer)] == ["workhorse", "steady", "tie-a", "tie-b", "lucky-once", "unseen"]


def test_an_error_page_keeps_the_navigation_for_a_logged_in_operator(kassa: Kassa) -> None:
    """A stale link (an unknown placement or offer) answered with a page without the navigation nor Log out."""
    key = kassa.keys.create("admin", "operator")
    with TestClient(create_app(kassa)) as c:
        assert _login(c, key) == 303
        for path in ("/dashboard/placements/gone", "/dashboard/offers/gone"):
            r = c.get(path)
            assert r.status_code == 404 and 'data-testid="error"' in r.text
            assert '<a href="/dashboard/keys">Keys</a>' in r.text and 'action="/dashboard/logout"' in r.text
        c.cookies.clear()
        r = c.post("/dashboard/keys", data={"kind": "secret", "name": "x"})
        assert r.status_code == 401 and '<a href="/dashboard/keys">' not in r.text  # logged out: no navigation


def test_a_placement_without_decisions_says_so_plainly(kassa: Kassa) -> None:
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        r = c.get("/dashboard/placements/order_confirmation")
    assert r.status_code == 200
    assert "Reward per impression: no data yet" in r.text and "the 0 most-shown" not in r.text
    assert "no impressions logged in the last day" in r.text


def test_logging_in_from_a_link_lands_on_the_page_it_asked_for_with_its_query(kassa: Kassa) -> None:
    """A shared link to one decision went through the login and landed on the empty explorer (query dropped)."""
    key = kassa.keys.create("admin", "operator")
    with TestClient(create_app(kassa)) as c:
        r = c.get("/dashboard/decisions?id=abc123&x=1", follow_redirects=False)
        assert r.status_code == 303
        form = c.get(r.headers["location"])
        assert 'name="next" value="/dashboard/decisions?id=abc123&amp;x=1"' in form.text
        r = c.post("/dashboard/login", data={"key": key, "next": "/dashboard/decisions?id=abc123&x=1"},
                   follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/decisions?id=abc123&x=1"
        assert c.get("/dashboard/placements", follow_redirects=False).status_code == 200
        c.cookies.clear()
        r = c.get("/dashboard/placements", follow_redirects=False)
        assert r.headers["location"] == "/dashboard/login?next=/dashboard/placements"


def test_decisions_per_second_count_only_the_part_of_a_bucket_inside_the_window_and_elapsed(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    """The newest bucket is still filling and the oldest starts before the window: counted over their full
    width, every overview ended on a dip towards zero (and started on one)."""
    aligned = clock.t - clock.t % 60
    clock.t = aligned + 30.0
    for i in range(10):  # 10 decisions from 30 s into a minute
        assert client.post("/v1/decisions", json=decision_body(request_id=f"a{i}")).status_code == 200
        clock.advance(1.0)
    since = aligned + 25.0  # the window opens 25 s into that minute: 35 s of it are inside
    clock.t = aligned + 1200.0 + 10.0  # 20 minutes later, 10 s into the newest minute
    for i in range(20):  # 20 decisions in those 10 s: 2 per second
        assert client.post("/v1/decisions", json=decision_body(request_id=f"b{i}")).status_code == 200
    kassa.decision_log.flush()
    bucket, series = Outcomes(kassa).throughput(since, now=clock())
    assert bucket == 60.0
    assert series[0][:2] == (aligned, pytest.approx(10 / 35))  # was 10 / 60
    assert series[-1][:2] == (aligned + 1200.0, pytest.approx(2.0))  # was 20 / 60


def test_the_drift_section_colours_warnings_lists_the_worst_first_and_keeps_tiny_p_values(kassa: Kassa) -> None:
    """A "warn" row or report rendered as a grey badge (the map had "warning"), rows came in check order with
    the warnings somewhere in the middle, and p = 1.75e-33 printed as 0.000."""
    from kassa.monitor.drift.report import DriftReport, DriftRow

    rows = [DriftRow("cat", "psi", 0.005, 0.928, "ok", 2000, 1982),
            DriftRow("score", "score_ks", 0.128, 1.75e-33, "warn", 2000, 1982),
            DriftRow("reward", "reward_rate", 0.16, None, "ok", 1820, 2439)]
    kassa.drift.last_reports["order_confirmation"] = DriftReport("order_confirmation", 1_800_000_000.0, 2000, 1982,
                                                                 rows)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        page = c.get("/dashboard/placements/order_confirmation").text
        overview = c.get("/dashboard").text
    drift = page[page.index("<h2>Drift</h2>"):]
    assert '<span class="badge warn">warn</span>' in drift and '<span class="badge warn">warn</span>' in overview
    cells = re.findall(r"<tr><td>(.*?)</td>", drift)
    assert cells == ["score", "cat", "reward"]
    assert "<td>1.75e-33</td>" in drift


def test_the_decisions_per_second_card_says_what_span_its_rate_covers() -> None:
    """With sparse reads the rate is an average over the gap since the last read (or since start), but the card
    always said "last minute": an hour after a burst it showed the burst's average as this minute's rate."""
    meter = RateMeter()
    assert meter.read(1030.0, 3000, started_at=1000.0) == (100.0, 30.0)  # the first read: since start
    assert meter.read(1060.0, 6000, started_at=1000.0) == (pytest.approx(100.0), 60.0)
    rate, over = meter.read(4660.0, 6000, started_at=1000.0)  # an hour without a read, and no decisions
    assert (rate, over) == (0.0, 3600.0)
    assert rate_span(30.0) == "last minute" and rate_span(3600.0) == "average over the last 60 min"
    assert rate_span(3 * 3600.0) == "average over the last 3.0 h"
    late = RateMeter()
    rate, over = late.read(1000.0 + 7200.0, 720_000, started_at=1000.0)  # a first visit two hours after start
    assert rate == 100.0 and rate_span(over) == "average over the last 2.0 h"


def test_time_charts_say_their_clock_is_utc() -> None:
    """Every time on the dashboard says UTC except the charts' axes, easy to read as local time."""
    from kassa.api.dashboard.charts import line_chart

    svg = line_chart({"a": [(1_800_000_000.0, 1.0), (1_800_003_600.0, 2.0)]}, "t")
    ticks = re.findall(r'text-anchor="(?:start|middle|end)">(\d\d:\d\d:\d\d[^<]*)</text>', svg)
    assert ticks == ["08:00:00", "08:20:00", "08:40:00", "09:00:00 UTC"]


def test_a_chart_with_more_lines_than_colours_still_tells_them_apart() -> None:
    """A learning curve after 8 model versions: its 9th line ("all versions") had the 1st line's colour and style."""
    from kassa.api.dashboard.charts import line_chart

    series = {f"v{i}": [(1_800_000_000.0, float(i)), (1_800_000_060.0, float(i) + 1)] for i in range(10)}
    svg = line_chart(series, "t")
    lines = re.findall(r'<polyline points="[^"]*" fill="none" stroke="([^"]+)" stroke-width="2"'
                       r'(?: stroke-dasharray="([^"]+)")?/>', svg)
    assert len(lines) == 10 and len(set(lines)) == 10, lines
    legend = re.findall(r'(?:<rect|<line)[^>]*(?:fill|stroke)="(#[0-9a-f]{6})"[^>]*?(?: stroke-dasharray="([^"]+)")?/>'
                        r'<text[^>]*>(v\d)</text>', svg)
    assert {(c, d) for c, d, _ in legend} == set(lines)  # each legend swatch drawn as its line


def test_a_drift_check_that_compared_nothing_is_not_shown_as_ok(kassa: Kassa) -> None:
    """A check with 0 reference decisions has no rows, and its severity defaults to "ok": a green badge on the
    overview and the placement for a check that compared nothing."""
    from kassa.monitor.drift.report import DriftReport

    kassa.drift.last_reports["order_confirmation"] = DriftReport("order_confirmation", 1_800_000_000.0, 0, 240, [])
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        for path in ("/dashboard", "/dashboard/placements/order_confirmation"):
            text = c.get(path).text
            assert '<span class="badge muted">nothing to compare yet</span>' in text, path
            assert '<span class="badge good">ok</span>' not in text, path


def _serve(client: TestClient, kassa: Kassa, clock: Clock, n: int, tag: str) -> None:
    """``n`` decisions a second apart, each flushed to a file of its own (as the writer does at low traffic)."""
    for i in range(n):
        assert client.post("/v1/decisions", json=decision_body(request_id=f"{tag}{i}")).status_code == 200
        kassa.decision_log.flush()
        clock.advance(1)


def test_each_view_reads_only_the_decision_log_files_written_since_the_last(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    """The log is a file per flush (up to two a second): every view used to read every file of it."""
    outcomes = Outcomes(kassa)
    window = outcomes.decision_window
    assert window is not None
    _serve(client, kassa, clock, 3, "a")
    since = clock() - 10
    first = outcomes.placements(since, now=clock() + 120)
    assert window.files_read == 3
    _serve(client, kassa, clock, 2, "b")
    again = outcomes.placements(since, now=clock() + 120)
    assert window.files_read == 5  # the two new files only
    assert again == Outcomes(kassa, incremental=False).placements(since, now=clock() + 120)
    assert again["order_confirmation"].by_version["baseline"].decisions == 5
    assert first["order_confirmation"].by_version["baseline"].decisions == 3
    assert outcomes.recent(4) == Outcomes(kassa, incremental=False).recent(4)
    assert outcomes.throughput(since, now=clock()) == Outcomes(kassa, incremental=False).throughput(since, now=clock())
    newest = outcomes.recent(1)[0][0]
    detail = outcomes.decision(newest)
    assert detail is not None and detail.record["decision_id"] == newest
    assert window.files_read == 5


def test_the_explorer_looks_an_id_up_in_its_own_days_partition_only(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    """An unknown id was looked for in the whole log (every partition of its history)."""
    outcomes = Outcomes(kassa)
    _serve(client, kassa, clock, 1, "a")
    known = outcomes.recent(1)[0][0]
    old = kassa.settings.data_path / "decisions" / "date=2026-01-01"  # a file no lookup should open
    old.mkdir()
    (old / "part-1-1.parquet").write_bytes(b"not parquet")
    for reader in (outcomes, Outcomes(kassa, incremental=False)):
        detail = reader.decision(known)
        assert detail is not None and detail.record["decision_id"] == known
        assert reader.decision(known[:8] + "0" * 16) is None
        assert reader.decision("f" * 24) is None  # the random form: the last `decision_lookup_days` only


def test_duckdb_reads_in_a_serving_process_use_one_thread_and_the_offline_reads_every_core(
        client: TestClient, kassa: Kassa, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """DuckDB starts a thread per core: the dashboard's log queries took the cores the decisions run on (decision
    P99 ~16 -> ~420 ms under a page loop on 2 cores, bench/dashboard_contention.py)."""
    import duckdb

    from kassa.events.decision_log import find_decision, read_decisions

    real, threads = duckdb.connect, []

    def connect(*args: object, **kwargs: object) -> duckdb.DuckDBPyConnection:
        con = real(*args, **kwargs)  # type: ignore[arg-type]
        threads.append(con.execute("SELECT current_setting('threads')").fetchall()[0][0])
        return con

    monkeypatch.setattr(duckdb, "connect", connect)
    _serve(client, kassa, clock, 3, "a")
    assert client.put("/v1/features/customer_signals/c-9", json={"values": {"ltv": 3.0}},
                      headers={"Authorization": f"Bearer {ADMIN}"}).status_code in (200, 201)
    newest = Outcomes(kassa, incremental=False).recent(2)[0][0]  # the explorer
    assert Outcomes(kassa, incremental=False).decision(newest) is not None
    assert Outcomes(kassa).placements(clock() - 10, now=clock() + 120)  # the decision window's first read
    assert Outcomes(kassa, incremental=False).throughput(clock() - 10, now=clock())[1]
    assert find_decision(kassa.settings.data_path, newest) is not None  # GET /v1/decisions/{id}
    assert "kassa_feature_age_seconds" in client.get("/metrics").text  # the offline store's newest value
    assert len(threads) >= 6 and set(threads) == {1}, threads
    threads.clear()
    assert read_decisions(kassa.settings.data_path).num_rows == 3  # kassa train / evaluate: every core
    assert threads == [os.cpu_count()]


def test_the_reward_tables_read_only_the_last_days_of_the_decision_log(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    """Partitions older than the window are not opened (a year of small files was read on every view)."""
    _serve(client, kassa, clock, 2, "a")
    old = kassa.settings.data_path / "decisions" / "date=2020-01-01"
    old.mkdir(parents=True)
    (old / "part-1577836800000-1.parquet").write_bytes(b"not parquet: reading it would fail the page")
    for incremental in (True, False):
        stats = Outcomes(kassa, incremental=incremental).placements(clock() - 3600, now=clock() + 120)
        assert stats["order_confirmation"].by_version["baseline"].decisions == 2


def test_the_offers_table_is_paged_with_a_count_and_links_that_keep_the_query(kassa: Kassa) -> None:
    """A catalog of hundreds of offers was one table of hundreds of rows."""
    base = kassa.catalog.snapshot.offers["discount"]
    extra = 120 - len(kassa.catalog.snapshot.offers)
    for i in range(extra):
        kassa.catalog.put_offer(msgspec.structs.replace(base, id=f"zz-{i:03d}"))
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        r = c.get("/dashboard/offers", params={"sort": "id", "page": "2"})
        assert r.status_code == 200
        body = r.text[r.text.index("<tbody>"):r.text.index("</tbody>")]
        assert body.count("<tr>") == 50
        pager = re.search(r'<p class="pager muted" data-testid="pager-page">(.*?)</p>', r.text)
        assert pager is not None and pager.group(1).startswith("offers 51\u2013100 of 120")
        assert 'rel="prev" href="?sort=id&amp;page=1"' in pager.group(1)
        assert 'rel="next" href="?sort=id&amp;page=3"' in pager.group(1)
        last = c.get("/dashboard/offers", params={"page": "99"})
        assert "offers 101\u2013120 of 120" in last.text and 'rel="next"' not in last.text
        bad = c.get("/dashboard/offers", params={"page": "two"})
        assert bad.status_code == 422 and "page is a page number (1, 2, ...), not &#x27;two&#x27;" in bad.text
        placement = c.get("/dashboard/placements/order_confirmation", params={"offers": "0"})
        assert placement.status_code == 422 and "offers is a page number" in placement.text
        assert 'data-testid="pager-offers">0 offers<' in c.get("/dashboard/placements/order_confirmation").text


def test_a_new_key_is_post_redirect_get_with_its_secret_held_server_side_once(kassa: Kassa) -> None:
    """Reloading the page the form posted to created a second key."""
    admin = kassa.keys.create("admin", "operator")
    with TestClient(create_app(kassa)) as c:
        assert _login(c, admin) == 303
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/dashboard/keys").text)
        assert token is not None
        before = len(kassa.keys.list())
        r = c.post("/dashboard/keys", data={"kind": "secret", "name": "nightly", "csrf": token.group(1)},
                   follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/keys"
        shown = c.get("/dashboard/keys")
        secret = re.search(r'data-testid="new-key">.*?<code>([^<]+)</code>', shown.text)
        assert secret is not None and kassa.keys.lookup(secret.group(1)) is not None
        again = c.get("/dashboard/keys")
        assert 'data-testid="new-key"' not in again.text and secret.group(1) not in again.text
        assert len(kassa.keys.list()) == before + 1


def test_an_unclaimed_flash_expires_and_flashes_stay_bounded(kassa: Kassa) -> None:
    from kassa.api.dashboard.session import FLASH_SECONDS, MAX_SESSIONS, Session, SessionStore

    store = SessionStore(kassa)
    one = Session(None, "csrf-1", 0.0)
    assert store.flash(one, "secret", now=100.0)
    assert store.take_flash(one, now=100.0 + FLASH_SECONDS) is None  # expired
    assert not store.flash(Session(None, "", 0.0, via_header=True), "x")  # no session to hold it
    for i in range(MAX_SESSIONS + 50):
        store.flash(Session(None, f"c{i}", 0.0), i, now=200.0)
    assert len(store._flashes) == MAX_SESSIONS
    assert store.take_flash(Session(None, f"c{MAX_SESSIONS + 49}", 0.0), now=201.0) == MAX_SESSIONS + 49


def test_wrong_login_keys_are_throttled_per_client_address_with_a_429_page(kassa: Kassa) -> None:
    """Wrong keys were checked at full speed, without limit."""
    admin = kassa.keys.create("admin", "operator")
    app = create_app(kassa)
    with TestClient(app, client=("203.0.113.7", 40000)) as c:
        for _ in range(10):  # session.LOGIN_BURST
            assert _login(c, "ka_wrong") == 401
        r = c.post("/dashboard/login", data={"key": admin, "next": "/dashboard"}, follow_redirects=False)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"].startswith("text/html") and 'data-testid="login-error"' in r.text
        assert f"Too many login attempts from 203.0.113.7: try again in {r.headers['retry-after']} s." in r.text
        assert "kassa_session" not in r.headers.get("set-cookie", "")  # the right key is not even checked
        other = TestClient(app, client=("203.0.113.8", 40000))  # another address is not held back
        for _ in range(30):  # and good logins do not use up its allowance
            assert _login(other, admin) == 303


def test_wrong_header_keys_share_the_login_throttle_per_client_address(kassa: Kassa) -> None:
    """Wrong keys in `Authorization: Bearer` were checked at full speed: the form's limit did not apply to them."""
    admin = kassa.keys.create("admin", "operator")
    app = create_app(kassa)
    with TestClient(app, client=("203.0.113.9", 40000)) as c:
        for _ in range(10):  # session.LOGIN_BURST
            assert c.get("/dashboard", headers={"Authorization": "Bearer ka_wrong"}).status_code == 401
        r = c.get("/dashboard", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1  # the right key is not even checked
        assert f"too many wrong keys from 203.0.113.9: try again in {r.headers['retry-after']} s" in r.text
        assert _login(c, admin) == 429  # one allowance for the form and the header
        other = TestClient(app, client=("203.0.113.10", 40000))  # another address is not held back
        for _ in range(30):  # and right keys do not use up its allowance
            assert other.get("/dashboard", headers={"Authorization": f"Bearer {admin}"}).status_code == 200


def test_the_login_throttle_refills_and_tracks_a_bounded_number_of_addresses() -> None:
    from kassa.api.dashboard.session import LoginThrottle

    clock = Clock(0.0)
    throttle = LoginThrottle(burst=2, per_minute=6.0, max_clients=100, clock=clock)
    assert throttle.attempt("a") == 0 and throttle.attempt("a") == 0
    assert throttle.attempt("a") == 10  # one attempt every 10 s
    clock.advance(10)
    assert throttle.attempt("a") == 0
    for i in range(1000):
        throttle.attempt(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle._buckets) <= 100


def test_the_decision_window_keeps_the_newest_rows_and_does_not_read_dropped_files_again(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    from kassa.api.dashboard.decision_window import DecisionLogWindow

    window = DecisionLogWindow(kassa.settings.data_path / "decisions", max_rows=2)
    _serve(client, kassa, clock, 3, "a")
    held = window.rows(clock() - 60, clock())
    assert held is not None and [r.ts for r in held] == [clock() - 1, clock() - 2]
    _serve(client, kassa, clock, 1, "b")
    held = window.rows(clock() - 60, clock())
    assert held is not None and [r.ts for r in held] == [clock() - 1, clock() - 2]
    assert window.files_read == 4 and window.rows(clock() - 3 * 24 * 3600, clock()) is None


def test_the_first_read_of_a_busy_day_stops_at_the_rows_the_pages_can_show(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    """The first read took every file of the day (up to ~172,800, millions of rows), then dropped most."""
    from kassa.api.dashboard.decision_window import DecisionLogWindow

    _serve(client, kassa, clock, 5, "a")
    window = DecisionLogWindow(kassa.settings.data_path / "decisions", max_rows=2, first_chunk=1)
    held = window.rows(clock() - 60, clock())
    assert held is not None and [r.ts for r in held] == [clock() - 1, clock() - 2]
    assert window.files_read == 3  # chunks of 1 then 2 files, newest first: the two oldest never read
    _serve(client, kassa, clock, 1, "b")
    again = window.rows(clock() - 60, clock())
    assert again is not None and [r.ts for r in again] == [clock() - 1, clock() - 2]


def test_each_view_reads_only_the_events_logged_since_the_last_on_sqlite(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    """Every placement view read and decoded every event of the day (~250 ms at 105,000 events)."""
    _serve(client, kassa, clock, 3, "a")
    outcomes = Outcomes(kassa)
    window = outcomes._sqlite_window
    assert window is not None
    ids = [r[0] for r in outcomes.recent(3)]

    def accept(decision_id: str, n: int) -> None:
        offer = outcomes.decision(decision_id).shown[0].offer_id  # type: ignore[union-attr]
        events = [{"event_id": f"{decision_id}-{n}", "type": "accept", "decision_id": decision_id, "offer_id": offer}]
        assert client.post("/v1/events", json={"events": events}).status_code == 200

    accept(ids[0], 1)
    since = clock() - 60
    first = outcomes.placements(since, now=clock() + 120)
    assert window.read_events == 1
    accept(ids[1], 2)
    accept(ids[2], 3)
    again = outcomes.placements(since, now=clock() + 120)
    assert window.read_events == 3  # the two new events only
    assert again == Outcomes(kassa, incremental=False).placements(since, now=clock() + 120)
    assert first != again and again["order_confirmation"].by_version["baseline"].reward == pytest.approx(3.0)
    small = Outcomes(kassa)  # past its cap the window lets go and views read in full, as before
    assert small._sqlite_window is not None
    small._sqlite_window.max_events = 2
    assert small.placements(since, now=clock() + 120) == again and small._sqlite_window.full_reads


def test_a_damaged_decision_log_file_is_a_problem_naming_it_not_a_500_traceback(
        client: TestClient, kassa: Kassa, clock: Clock) -> None:
    """GET /v1/decisions/{id}, the explorer and the reward tables raised DuckDB's error (a bare 500)."""
    _serve(client, kassa, clock, 1, "a")
    known = Outcomes(kassa).recent(1)[0][0]
    good = next((kassa.settings.data_path / "decisions").glob("date=*/*.parquet"))
    bad = good.with_name("part-9999999999999-1.parquet")
    bad.write_bytes(good.read_bytes()[:100])  # cut short: a copy that ran out of disk
    r = client.get(f"/v1/decisions/{known}", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["type"].endswith("/decision-log-unreadable") and str(bad) in problem["detail"]
    assert "move it out of the folder" in problem["detail"]
    for path in (f"/dashboard/decisions?id={known}", "/dashboard/decisions",
                 "/dashboard/placements/order_confirmation"):
        r = client.get(path, headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 500 and 'data-testid="error"' in r.text and str(bad) in r.text, (path, r.text[-500:])
