"""Never harm the page: a slow decision, a 500, a network failure or no offers leave the page exactly as it
was (same DOM, no layout shift, no page error, nothing above console.debug but the API's own refusals, one
console.warn each)."""

from __future__ import annotations

import time

import pytest

from tests.browser.conftest import KassaUnderTest, LoadPage, PageRun, show

BODY_JS = "document.body.innerHTML"


def assert_untouched(run: PageRun, html_before: str, warned: list[str] | None = None) -> None:
    assert run.page.locator("kassa-offers").count() == 0
    assert run.page.evaluate(BODY_JS) == html_before
    assert run.page.evaluate("window.__cls") == 0  # zero layout shift
    assert run.errors == []
    assert run.snippet_console("error") == [] and run.snippet_console("warning") == (warned or [])
    assert run.snippet_console("log") == [] and run.snippet_console("info") == []


def test_a_decision_slower_than_the_default_150_ms_shows_nothing_ever(
        open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    kassa_server.faults.delay_s = 1.5
    run = open_shop_page(init={})  # the default timeout
    html = run.page.evaluate(BODY_JS)
    t0 = time.monotonic()
    result = show(run, layout="inline", target="#offers")
    waited = time.monotonic() - t0
    assert result == {"shown": 0, "decision_id": None, "reason": "timeout"}
    assert waited < 1.5  # it gave up before the server answered
    run.page.wait_for_timeout(1800)  # past the server's late answer: still nothing
    assert kassa_server.faults.requests("/v1/decisions", "POST")  # the request was made...
    assert_untouched(run, html)  # ...and left no trace
    assert any("timeout" in m for m in run.snippet_console("debug"))


def test_the_timeout_is_configurable(open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    kassa_server.faults.delay_s = 0.4
    run = open_shop_page(init={"timeout": 5000})
    assert show(run, layout="overlay")["shown"] == 3
    # focus moves into the dialog after its first paint; Escape closes it from there
    run.page.wait_for_function("document.querySelector('kassa-offers')?.shadowRoot.activeElement")
    run.page.keyboard.press("Escape")
    assert run.page.locator("kassa-offers").count() == 0
    assert show(run, layout="overlay", timeout=100)["reason"] == "timeout"


@pytest.mark.parametrize("layout", ["overlay", "inline"])
def test_a_server_error_leaves_the_page_intact(open_shop_page: LoadPage, kassa_server: KassaUnderTest,
                                               layout: str) -> None:
    kassa_server.faults.fail_status = 500
    run = open_shop_page(init={"timeout": 5000})
    html = run.page.evaluate(BODY_JS)
    result = show(run, layout=layout, target="#offers")
    assert result["shown"] == 0 and result["reason"] == "decision failed: HTTP 500"
    run.page.wait_for_timeout(200)
    assert_untouched(run, html, ["[kassa] decision failed: HTTP 500: injected failure"])


def test_a_network_failure_leaves_the_page_intact(open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(init={"timeout": 5000})
    run.page.route(f"{kassa_server.url}/v1/decisions*", lambda route: route.abort("connectionrefused"))
    html = run.page.evaluate(BODY_JS)
    result = show(run, layout="inline", target="#offers")
    assert result["shown"] == 0 and "fetch" in result["reason"].lower()
    run.page.wait_for_timeout(200)
    assert_untouched(run, html)


def test_no_offers_means_no_layout_shift(open_shop_page: LoadPage) -> None:
    run = open_shop_page(init={"timeout": 5000})
    html = run.page.evaluate(BODY_JS)
    result = show(run, placement="empty", layout="inline", target="#offers")
    assert result["shown"] == 0 and result["reason"] == "no offers" and result["decision_id"]
    run.page.wait_for_timeout(300)
    assert_untouched(run, html)


def test_a_bad_request_is_swallowed(open_shop_page: LoadPage) -> None:
    run = open_shop_page(init={"timeout": 5000})
    html = run.page.evaluate(BODY_JS)
    result = show(run, layout="overlay", order={"id": "x", "currency": "dollars"})  # 422 from the server
    assert result["shown"] == 0 and result["reason"] == "decision failed: HTTP 422"
    [warning] = run.snippet_console("warning")  # the API's message, for the store's developer
    assert warning.startswith("[kassa] decision failed: HTTP 422: ") and "currency" in warning
    assert_untouched(run, html, [warning])


def test_calls_before_init_or_with_garbage_do_not_throw(page: PageRun, shop: object,
                                                        kassa_server: KassaUnderTest) -> None:
    url = shop.add(f'<!doctype html><html><head><link rel="icon" href="data:,">'  # type: ignore[attr-defined]
                   f'<script async src="{kassa_server.url}/v1/snippet.js"></script></head><body></body></html>')
    page.page.goto(url)
    page.page.wait_for_function("window.Kassa && Kassa.version")
    reason = page.page.evaluate("""async () => {
      const r = await Kassa.show({layout: 'overlay'});
      Kassa.init(42); Kassa.init(null); Kassa.consent('maybe'); Kassa.close(); Kassa.flush();
      Kassa.q.push(['nope', 1], null, ['show']);
      return r.reason; }""")
    assert reason == "call Kassa.init({key}) first"
    page.page.wait_for_timeout(200)
    assert page.errors == []
    assert [r["path"] for r in kassa_server.faults.responses] == ["/v1/snippet.js"]


@pytest.mark.parametrize(("attrs", "says"), [
    ('data-key="" data-order="#o"', "data-key is empty"),
    ('data-key="{key}" data-order="#o" data-layout="inline"', "inline target not found: (no target given)"),
])
def test_a_misconfigured_data_form_says_why_at_debug_level(page: PageRun, shop: object, kassa_server: KassaUnderTest,
                                                           attrs: str, says: str) -> None:
    # An empty data-key was silent even at the Verbose level: show() returned its reason to nobody.
    order = '<script type="application/json" id="o">{"order": {"id": "1", "total": 5, "items": []}}</script>'
    url = shop.add(f'<!doctype html><html><head><link rel="icon" href="data:,"></head><body>{order}'  # type: ignore[attr-defined]
                   f'<script async src="{kassa_server.url}/v1/snippet.js" '
                   f'{attrs.format(key=kassa_server.key)}></script></body></html>')
    page.page.goto(url)
    page.page.wait_for_function("window.Kassa && Kassa.version")
    page.page.wait_for_timeout(300)
    assert any(says in m for m in page.snippet_console("debug")), page.console
    assert page.snippet_console("error") == [] and page.snippet_console("warning") == []
    assert kassa_server.faults.requests("/v1/decisions", "POST") == []


def test_show_before_init_says_why_at_debug_level(page: PageRun, shop: object, kassa_server: KassaUnderTest) -> None:
    url = shop.add(f'<!doctype html><html><head><link rel="icon" href="data:,">'  # type: ignore[attr-defined]
                   f'<script async src="{kassa_server.url}/v1/snippet.js"></script></head><body></body></html>')
    page.page.goto(url)
    page.page.wait_for_function("window.Kassa && Kassa.version")
    page.page.evaluate("Kassa.show({layout: 'overlay'})")
    assert any("call Kassa.init({key}) first" in m for m in page.snippet_console("debug"))
