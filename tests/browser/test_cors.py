"""CORS in a real browser: the key's origin gets answers (with and without a preflight); any other origin
is refused by the server and the browser alike, for decisions and for event beacons."""

from __future__ import annotations

import json

from tests.browser.conftest import ORDER, KassaUnderTest, LoadPage, ShopServer, show

FETCH_WITH_HEADER = """async ([url, key, body]) => {
  try {
    const r = await fetch(url + '/v1/decisions', {method: 'POST', body: JSON.stringify(body),
      headers: {'Authorization': 'Bearer ' + key, 'Content-Type': 'application/json'}});
    return {status: r.status, body: await r.json()};
  } catch (err) {
    return {error: String(err)};
  }
}"""


def test_a_disallowed_origin_gets_no_offers_and_the_console_says_why(
        open_shop_page: LoadPage, elsewhere: ShopServer, kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(origin=elsewhere, init={"timeout": 5000})
    html = run.page.evaluate("document.body.innerHTML")
    result = show(run, layout="overlay")
    # the refusal is readable (it was "Failed to fetch": no CORS headers, so the browser hid it)
    assert result == {"shown": 0, "decision_id": None, "reason": "decision failed: HTTP 403"}
    [call] = kassa_server.faults.requests("/v1/decisions", "POST")
    assert call["origin"] == elsewhere.origin
    assert call["status"] == 403 and call["allow_origin"] == elsewhere.origin
    assert run.snippet_console("warning") == [f"[kassa] decision failed: HTTP 403: origin '{elsewhere.origin}' "
                                              "is not allowed for this key (Origin)"]
    assert run.page.evaluate("document.body.innerHTML") == html
    assert run.errors == []


def test_an_unknown_or_revoked_key_is_named_in_the_console(open_shop_page: LoadPage,
                                                           kassa_server: KassaUnderTest) -> None:
    revoked = kassa_server.kassa.keys.create("publishable", "revoked", ["https://revoked.example"])
    kassa_server.kassa.keys.revoke(revoked)
    for key in ("kp_typo", revoked):
        run = open_shop_page(init={"key": key, "timeout": 5000})
        run.console.clear()
        assert show(run, layout="inline", target="#offers")["reason"] == "decision failed: HTTP 401"
        assert run.snippet_console("warning") == ["[kassa] decision failed: HTTP 401: unknown or revoked API key (key)"]
        assert run.page.locator("kassa-offers").count() == 0 and run.errors == []


def test_preflighted_calls_work_from_the_keys_origin_only(open_shop_page: LoadPage, elsewhere: ShopServer,
                                                          kassa_server: KassaUnderTest) -> None:
    body = {"placement": "order_confirmation", "order": ORDER}
    run = open_shop_page()
    ok = run.page.evaluate(FETCH_WITH_HEADER, [kassa_server.url, kassa_server.key, body])
    assert ok["status"] == 200 and len(ok["body"]["offers"]) == 3
    [preflight] = kassa_server.faults.requests("/v1/decisions", "OPTIONS")
    assert preflight["status"] == 204 and preflight["allow_origin"] == run.page.evaluate("location.origin")

    kassa_server.faults.reset()
    run = open_shop_page(origin=elsewhere)
    refused = run.page.evaluate(FETCH_WITH_HEADER, [kassa_server.url, kassa_server.key, body])
    assert "error" in refused and "fetch" in refused["error"].lower()
    [preflight] = kassa_server.faults.requests("/v1/decisions", "OPTIONS")
    assert preflight["status"] == 403 and preflight["allow_origin"] is None
    assert kassa_server.faults.requests("/v1/decisions", "POST") == []  # the browser never sent the call


def test_event_beacons_from_a_disallowed_origin_are_not_stored(
        open_shop_page: LoadPage, elsewhere: ShopServer, kassa_server: KassaUnderTest) -> None:
    run = open_shop_page()
    decision = show(run, layout="inline", target="#offers", timeout=5000)
    beacon = """([url, key, body]) => navigator.sendBeacon(url + '/v1/events?key=' + key, body)"""
    events = json.dumps({"events": [{"event_id": "evil-1", "type": "accept", "decision_id": decision["decision_id"],
                                     "offer_id": "serum-sub"}]})
    run = open_shop_page(origin=elsewhere)
    kassa_server.faults.responses.clear()
    assert run.page.evaluate(beacon, [kassa_server.url, kassa_server.key, events]) is True  # queued by the browser
    for _ in range(100):
        if kassa_server.faults.requests("/v1/events", "POST"):
            break
        run.page.wait_for_timeout(50)
    [post] = kassa_server.faults.requests("/v1/events", "POST")
    assert post["status"] == 403 and post["origin"] == elsewhere.origin  # sendBeacon sends the Origin
    assert [e for e in kassa_server.events(decision["decision_id"]) if e.event_id == "evil-1"] == []
