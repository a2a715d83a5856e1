"""Outcome events from a real browser, checked in the server's event log: impressions only when visible,
every event exactly once, sent on page exit, and none at all without consent."""

from __future__ import annotations

import json
import re

from tests.browser.conftest import KassaUnderTest, LoadPage, show

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
BELOW_THE_FOLD = "<style>#offers { display: block; margin-top: 2600px; }</style>"


def test_impressions_only_after_scrolling_into_view_and_only_once(
        open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(head=BELOW_THE_FOLD, init={"timeout": 5000, "batchMs": 50, "consent": True})
    result = show(run, layout="inline", target="#offers")
    assert result["shown"] == 3
    run.page.wait_for_timeout(800)  # rendered below the fold: 16 batch windows pass, nothing is seen
    assert kassa_server.events(result["decision_id"]) == []
    for _ in range(3):  # scroll down and up again: an offer is seen once per decision
        run.page.locator("kassa-offers .offer").last.scroll_into_view_if_needed()
        run.page.wait_for_timeout(250)
        run.page.evaluate("window.scrollTo(0, 0)")
        run.page.wait_for_timeout(150)
    events = kassa_server.wait_for_events(result["decision_id"], 3)
    assert sorted((e.type, e.offer_id) for e in events) == [
        ("impression", "serum-sub"), ("impression", "thanks10"), ("impression", "warranty")]


def test_a_half_visible_offer_is_not_yet_an_impression(open_shop_page: LoadPage,
                                                       kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(head=BELOW_THE_FOLD, init={"timeout": 5000, "batchMs": 50, "consent": True})
    result = show(run, layout="inline", target="#offers")
    # bring only the top of the first offer on screen (less than half of it)
    top, bottom = run.page.evaluate("""() => {
      const li = document.querySelector('kassa-offers').shadowRoot.querySelector('.offer');
      const r = li.getBoundingClientRect();
      return [r.top + window.scrollY, r.bottom + window.scrollY]; }""")
    run.page.evaluate("(y) => window.scrollTo(0, y - innerHeight + 12)", top)
    run.page.wait_for_timeout(600)
    assert kassa_server.events(result["decision_id"]) == []
    run.page.evaluate("(y) => window.scrollTo(0, y - innerHeight + 4)", bottom)  # all of it, none of the next
    events = kassa_server.wait_for_events(result["decision_id"], 1)
    assert [(e.type, e.offer_id) for e in events] == [("impression", "serum-sub")]


def test_events_arrive_exactly_once_with_unique_ids_when_the_page_is_left(
        open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    # A long batch window: only the page-exit flush (sendBeacon on pagehide) can deliver these.
    run = open_shop_page(init={"timeout": 5000, "batchMs": 60_000, "consent": True})
    result = show(run, layout="overlay")
    cta = run.page.locator("kassa-offers .cta").first
    cta.dblclick()
    cta.click(force=True)  # force: Playwright itself will not click an aria-disabled button
    cta.press("Enter")
    with run.page.context.expect_page() as popup:  # the warranty headline links out: a click
        run.page.locator("kassa-offers a.headline").click()
    popup.value.close()
    run.page.locator("kassa-offers a.headline").click(modifiers=["Control"])  # a second click on it
    run.page.wait_for_timeout(300)
    assert kassa_server.events(result["decision_id"]) == []  # still batched
    run.page.goto("about:blank")
    events = kassa_server.wait_for_events(result["decision_id"], 5, settle=0.6)
    assert sorted((e.type, e.offer_id) for e in events) == [
        ("accept", "serum-sub"), ("click", "warranty"),
        ("impression", "serum-sub"), ("impression", "thanks10"), ("impression", "warranty")]
    assert all(UUID.match(e.event_id) for e in events)
    assert len({e.event_id for e in events}) == len(events)
    # the wire shape: only Event fields (the server forbids unknown ones), no client timestamp
    posts = kassa_server.faults.requests("/v1/events", "POST")
    assert len(posts) == 1 and posts[0]["status"] == 200
    sent = json.loads(posts[0]["body"])["events"]
    assert {frozenset(e) for e in sent} == {frozenset({"event_id", "type", "decision_id", "offer_id"})}


def test_no_events_without_consent(open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    for consent in (None, False):
        init = {"timeout": 5000, "batchMs": 50}
        if consent is not None:
            init["consent"] = consent
        run = open_shop_page(init=init)
        result = show(run, layout="overlay")
        run.page.locator("kassa-offers .cta").first.click()
        run.page.keyboard.press("Escape")
        run.page.wait_for_timeout(400)
        run.page.goto("about:blank")  # page exit: the flush that would send, had there been consent
        run.page.wait_for_timeout(600)
        assert kassa_server.events(result["decision_id"]) == []
        assert kassa_server.faults.requests("/v1/events") == []


def test_consent_given_later_sends_what_happened_before_it(open_shop_page: LoadPage,
                                                           kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(init={"timeout": 5000, "batchMs": 50})
    result = show(run, layout="overlay")
    run.page.locator("kassa-offers .cta").first.click()
    run.page.wait_for_timeout(300)
    assert kassa_server.faults.requests("/v1/events") == []
    run.page.evaluate("Kassa.consent(true)")
    events = kassa_server.wait_for_events(result["decision_id"], 4)
    assert sorted(e.type for e in events) == ["accept", "impression", "impression", "impression"]
    # withdrawn: later outcomes are dropped
    run.page.evaluate("Kassa.consent(false)")
    run.page.keyboard.press("Escape")  # would be two dismissals
    run.page.wait_for_timeout(400)
    assert len(kassa_server.events(result["decision_id"])) == 4
