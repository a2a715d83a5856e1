"""Rendering in a real browser: both layouts, shadow-root isolation from hostile page CSS, text-only
content, keyboard use, one global, no cookies, the data- attribute form and the demo page."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import ORDER, KassaUnderTest, LoadPage, PageRun, show

FAST = {"timeout": 5000, "batchMs": 50}  # generous: the CPU is shared; the default is tested elsewhere

OFFERS_JS = """() => {
  const host = document.querySelector('kassa-offers');
  if (!host) return null;
  const r = host.shadowRoot;
  const box = r.querySelector('.box');
  return {
    layout: host.getAttribute('data-layout'),
    parent: host.parentElement.id || host.parentElement.tagName,
    role: box.getAttribute('role'), modal: box.getAttribute('aria-modal'),
    label: r.getElementById(box.getAttribute('aria-labelledby')).textContent,
    offers: [...r.querySelectorAll('.offer')].map((li) => ({
      id: li.dataset.offer,
      headline: li.querySelector('.headline').textContent,
      tag: li.querySelector('.headline').tagName,
      cta: li.querySelector('.cta').textContent,
      img: li.querySelector('img') && {loading: li.querySelector('img').loading, alt: li.querySelector('img').alt},
    })),
  };
}"""

STYLE_JS = """() => {
  const r = document.querySelector('kassa-offers').shadowRoot;
  const pick = (el) => {
    const s = getComputedStyle(el);
    return {display: s.display, visibility: s.visibility, opacity: s.opacity, color: s.color,
            background: s.backgroundColor, font: s.fontSize + ' ' + s.fontWeight + ' ' + s.fontFamily,
            // layout sizes, not getBoundingClientRect: the opening animation scales the dialog
            padding: s.padding, radius: s.borderRadius, w: el.offsetWidth, h: el.offsetHeight};
  };
  return {title: pick(r.querySelector('.title')), offer: pick(r.querySelector('.offer')),
          cta: pick(r.querySelector('.cta')), close: pick(r.querySelector('.close')),
          box: pick(r.querySelector('.box'))};
}"""

# the unreachable image of the third offer is removed on error; sizes are compared after that
IMAGES_SETTLED = "document.querySelector('kassa-offers').shadowRoot.querySelectorAll('img').length === 1"

# Everything hostile except hiding the store's own container (#offers): no script could undo that.
HOSTILE_CSS = """<style>
* { all: unset !important; }
html { font-size: 3px !important; }
kassa-offers, section, ul, li, button, p, div:not(#offers), h2, img, a {
  display: none !important; visibility: hidden !important; opacity: 0 !important; color: red !important;
  font: 2px/1 cursive !important; background: lime !important; padding: 40px !important; }
kassa-offers { position: absolute !important; left: -9999px !important; z-index: -1 !important; }
button:focus { outline: 9px solid red !important; }
</style>"""


DIALOG_FOCUSED = "document.querySelector('kassa-offers')?.shadowRoot.activeElement?.className === 'box'"


def focused(run: PageRun) -> str:
    """What has focus: ``shadow:<class>:<text>`` inside the snippet, else the page element's id."""
    return run.page.evaluate("""() => {
      const host = document.querySelector('kassa-offers');
      const a = host && host.shadowRoot.activeElement;
      if (a) return 'shadow:' + a.className + ':' + (a.className === 'box' ? '' : a.textContent);
      return document.activeElement ? document.activeElement.id || document.activeElement.tagName : '';
    }""")


def test_overlay_renders_offers_in_a_modal_dialog(open_shop_page: LoadPage) -> None:
    run = open_shop_page(init=FAST)
    result = show(run, layout="overlay")
    assert result["shown"] == 3 and result["decision_id"]
    got = run.page.evaluate(OFFERS_JS)
    assert got["layout"] == "overlay" and got["parent"] == "BODY"
    assert got["role"] == "dialog" and got["modal"] == "true" and got["label"] == "You might also like"
    assert [o["id"] for o in got["offers"]] == ["serum-sub", "warranty", "thanks10"]
    assert got["offers"][0] == {"id": "serum-sub", "headline": "Never run out: serum every 6 weeks", "tag": "P",
                                "cta": "Subscribe", "img": {"loading": "lazy", "alt": "Serum bottle"}}
    assert got["offers"][1]["tag"] == "A"  # content.url makes the headline a link (click events)
    run.page.wait_for_timeout(300)
    # the unreachable image is removed instead of showing a broken icon
    assert run.page.evaluate(OFFERS_JS)["offers"][2]["img"] is None
    run.page.wait_for_function(DIALOG_FOCUSED)  # focus moves into the dialog once it is painted
    dialog = run.page.locator("kassa-offers .box")
    assert dialog.is_visible()
    box = dialog.bounding_box()
    assert box and box["width"] > 300 and box["height"] > 200
    # the dialog is on top of the page at its centre
    on_top = run.page.evaluate("([x, y]) => document.elementFromPoint(x, y).tagName",
                               [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2])
    assert on_top == "KASSA-OFFERS"
    assert run.errors == []


def test_inline_renders_into_the_target_without_a_dialog(open_shop_page: LoadPage) -> None:
    run = open_shop_page(init=FAST)
    before = run.page.evaluate("document.getElementById('offers').getBoundingClientRect().height")
    assert before == 0  # the target reserves no space before offers arrive
    result = show(run, layout="inline", target="#offers")
    assert result["shown"] == 3
    got = run.page.evaluate(OFFERS_JS)
    assert got["layout"] == "inline" and got["parent"] == "offers"
    assert got["role"] == "region" and got["modal"] is None
    assert run.page.evaluate("document.querySelector('kassa-offers').shadowRoot.querySelector('.overlay')") is None
    assert run.page.locator("kassa-offers .offer").count() == 3
    assert run.page.evaluate("document.getElementById('offers').getBoundingClientRect().height") > 150
    assert focused(run) == "BODY"  # inline never steals focus
    assert run.errors == []


def test_inline_with_a_missing_target_shows_nothing(open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(init=FAST)
    html = run.page.evaluate("document.body.innerHTML")
    result = show(run, layout="inline", target="#nowhere")
    # the reason names the mistake (it said "no offers"), and no decision is made that cannot be shown
    assert result == {"shown": 0, "decision_id": None, "reason": "inline target not found: #nowhere"}
    assert kassa_server.faults.requests("/v1/decisions", "POST") == []
    assert run.page.evaluate("document.body.innerHTML") == html
    assert run.snippet_console("debug")  # said why, at debug level only
    assert run.snippet_console("error") == [] and run.snippet_console("warning") == []


def test_hostile_page_css_does_not_reach_the_offers(open_shop_page: LoadPage, page: PageRun) -> None:
    styles: dict[str, dict[str, Any]] = {}
    for name, head in (("clean", ""), ("hostile", HOSTILE_CSS)):
        run = open_shop_page(head=head, init=FAST)
        assert show(run, layout="overlay")["shown"] == 3
        run.page.wait_for_function(IMAGES_SETTLED)
        styles[name] = run.page.evaluate(STYLE_JS)
        run.page.keyboard.press("Escape")
    clean, hostile = styles["clean"], styles["hostile"]
    assert hostile == clean  # every computed style and size, element by element
    assert clean["cta"]["display"] == "block" and clean["cta"]["visibility"] == "visible"
    assert clean["cta"]["background"] == "rgb(31, 35, 40)" and clean["cta"]["color"] == "rgb(255, 255, 255)"
    assert clean["title"]["font"].startswith("16.95px 650")  # 1.13em of the 15px default, not the page's 3px rem
    assert clean["box"]["w"] == 520

    # inline: sizes follow the store's column, but styles must not
    for name, head in (("clean", ""), ("hostile", HOSTILE_CSS)):
        run = open_shop_page(head=head, init=FAST)
        assert show(run, layout="inline", target="#offers")["shown"] == 3
        run.page.wait_for_function(IMAGES_SETTLED)
        styles[name] = run.page.evaluate(STYLE_JS)
        assert run.page.locator("kassa-offers .cta").first.is_visible()
    for part in ("title", "offer", "cta", "close"):
        for prop in ("display", "visibility", "opacity", "color", "background", "font", "padding", "radius"):
            assert styles["hostile"][part][prop] == styles["clean"][part][prop], (part, prop)
    assert page.errors == []


def test_offer_content_is_rendered_as_text_never_html(open_shop_page: LoadPage) -> None:
    run = open_shop_page(init=FAST)
    assert show(run, placement="hostile", layout="inline", target="#offers")["shown"] == 1
    got = run.page.evaluate("""() => {
      const r = document.querySelector('kassa-offers').shadowRoot;
      return {headline: r.querySelector('.headline').textContent, tag: r.querySelector('.headline').tagName,
              body: r.querySelector('.body').textContent, cta: r.querySelector('.cta').textContent,
              elements: [...r.querySelectorAll('.offer *')].map((e) => e.tagName),
              pwned: window.__pwned === undefined ? null : window.__pwned};
    }""")
    run.page.wait_for_timeout(200)
    assert got["headline"] == '<img src=x onerror="window.__pwned=1"><b>bold</b>'
    assert got["body"] == "<script>window.__pwned=2</script>" and got["cta"] == "<i>Click</i>"
    assert got["tag"] == "P"  # the javascript: url is not made a link
    assert got["elements"] == ["DIV", "P", "P", "BUTTON"]  # no <img> (javascript: src), no markup from content
    run.page.locator("kassa-offers .cta").click()
    assert run.page.evaluate("window.__pwned === undefined")


def test_a_dutch_order_in_euros_shows_dutch_text_euro_prices_and_the_sponsored_label(
        open_shop_page: LoadPage) -> None:
    run = open_shop_page(init=FAST)
    euro_order = {**ORDER, "currency": "EUR", "ship_country": "NL"}
    assert show(run, placement="sponsored", layout="inline", target="#offers", order=euro_order,
                context={"locale": "nl-NL"})["shown"] == 1
    got = run.page.evaluate("""() => {
      const li = document.querySelector('kassa-offers').shadowRoot.querySelector('.offer');
      return {label: li.querySelector('.disclosure').textContent, headline: li.querySelector('.headline').textContent,
              cta: li.querySelector('.cta').textContent,
              order: [...li.querySelectorAll('.text > *')].map((e) => e.className)};
    }""")
    assert got == {"label": "Gesponsord", "headline": "3 gratis nummers", "cta": "Toevoegen voor €\u00a09,49",
                   "order": ["disclosure", "headline"]}  # the label comes first, above the headline
    assert run.errors == []


def test_keyboard_only_accept_in_the_overlay(open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(init={**FAST, "consent": True})
    run.page.focus("#page-button")
    result = show(run, layout="overlay")
    run.page.wait_for_function(DIALOG_FOCUSED)
    run.page.keyboard.press("Tab")
    assert focused(run) == "shadow:cta:Subscribe"
    run.page.keyboard.press("Enter")
    assert focused(run) == "shadow:cta:Added \u2713"  # still focused, now marked as accepted
    assert run.page.evaluate(
        "document.querySelector('kassa-offers').shadowRoot.querySelector('.cta').getAttribute('aria-disabled')"
    ) == "true"
    # Tab cycles inside the dialog: 5 focusable controls (3 buttons, 1 link, close), never the page
    seen = set()
    for _ in range(7):
        run.page.keyboard.press("Tab")
        seen.add(focused(run))
    assert all(s.startswith("shadow:") for s in seen) and len(seen) == 5
    run.page.keyboard.press("Shift+Tab")
    assert focused(run).startswith("shadow:")
    # Escape closes it and focus returns where it was
    run.page.keyboard.press("Escape")
    assert run.page.locator("kassa-offers").count() == 0
    assert focused(run) == "page-button"
    events = kassa_server.wait_for_events(result["decision_id"], 6)
    kinds = sorted((e.type, e.offer_id) for e in events)
    assert kinds == [("accept", "serum-sub"), ("dismiss", "thanks10"), ("dismiss", "warranty"),
                     ("impression", "serum-sub"), ("impression", "thanks10"), ("impression", "warranty")]


def test_keyboard_only_accept_inline_and_close_button(open_shop_page: LoadPage,
                                                      kassa_server: KassaUnderTest) -> None:
    run = open_shop_page(init={**FAST, "consent": True})
    result = show(run, layout="inline", target="#offers")
    run.page.keyboard.press("Tab")  # the first focusable thing on this page is the first offer's button
    assert focused(run) == "shadow:cta:Subscribe"
    run.page.keyboard.press("Space")
    run.page.keyboard.press("Tab")
    run.page.keyboard.press("Tab")
    assert focused(run) == "shadow:cta:Add cover"
    run.page.keyboard.press("Tab")
    run.page.keyboard.press("Enter")  # the discount: reveals its code
    code = run.page.locator("kassa-offers .code")
    assert code.is_visible() and code.text_content() == "THANKS10"
    events = kassa_server.wait_for_events(result["decision_id"], 5)
    assert sorted(e.type for e in events) == ["accept", "accept", "impression", "impression", "impression"]


def test_accept_fires_the_callback_and_a_dom_event(open_shop_page: LoadPage) -> None:
    run = open_shop_page(init=FAST)
    run.page.evaluate("""() => { window.__got = [];
      Kassa.init({onAccept: (d) => window.__got.push(['cb', d.offer_id])});
      window.addEventListener('kassa:accept', (e) => window.__got.push(['event', e.detail.offer_id])); }""")
    show(run, layout="overlay")
    run.page.locator("kassa-offers .cta").nth(1).click()
    assert run.page.evaluate("window.__got") == [["cb", "warranty"], ["event", "warranty"]]


def test_one_global_no_cookies_and_nothing_before_show(page: PageRun, shop: Any,
                                                       kassa_server: KassaUnderTest) -> None:
    url = shop.add('<!doctype html><html><head><link rel="icon" href="data:,"></head><body>'
                   '<div id="offers"></div></body></html>')
    page.page.goto(url)
    before = page.page.evaluate("Object.getOwnPropertyNames(window)")
    page.page.add_script_tag(url=f"{kassa_server.url}/v1/snippet.js")
    page.page.wait_for_function("window.Kassa && Kassa.version")
    page.page.evaluate("(k) => Kassa.init({key: k, timeout: 5000, batchMs: 50, consent: true})", kassa_server.key)
    page.page.wait_for_timeout(200)
    # loading and init do nothing visible and call nothing
    assert page.page.locator("kassa-offers").count() == 0
    assert [r["path"] for r in kassa_server.faults.responses] == ["/v1/snippet.js"]
    assert show(page, layout="inline", target="#offers")["shown"] == 3
    page.page.locator("kassa-offers .cta").first.click()
    page.page.wait_for_timeout(300)
    after = page.page.evaluate("Object.getOwnPropertyNames(window)")
    assert sorted(set(after) - set(before)) == ["Kassa"]
    assert page.page.evaluate("document.cookie") == ""
    assert page.page.context.cookies() == []


def test_data_attribute_form_reads_the_order_from_a_json_script_tag(
        open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    data = json.dumps({"order": ORDER, "customer": {"id": "c-9"}})
    attrs = (f'data-key="{kassa_server.key}" data-layout="inline" data-target="#offers" '
             'data-order="#kassa-order" data-timeout="5000"')
    run = open_shop_page(body=f'<script type="application/json" id="kassa-order">{data}</script>',
                         script_attrs=attrs)
    run.page.wait_for_selector("kassa-offers .offer")
    assert run.page.locator("kassa-offers .offer").count() == 3
    sent = json.loads(kassa_server.faults.requests("/v1/decisions", "POST")[0]["body"])
    assert sent["order"] == ORDER and sent["customer"] == {"id": "c-9"}
    assert sent["placement"] == "order_confirmation" and sent["context"]["device"] == "desktop"


def test_data_attribute_form_reads_a_ga4_purchase_from_the_data_layer(
        open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    layer = """<script>window.dataLayer = [{event: 'page_view'},
      {event: 'purchase', ecommerce: {transaction_id: 'T-9', value: 72.5, currency: 'usd',
        items: [{item_id: 'SERUM-C', item_name: 'Serum', item_category: 'skincare', price: 36.25, quantity: 2}]}}];
    </script>"""
    attrs = f'data-key="{kassa_server.key}" data-layout="overlay" data-timeout="5000"'
    run = open_shop_page(head=layer, script_attrs=attrs)
    run.page.wait_for_selector("kassa-offers .offer")
    sent = json.loads(kassa_server.faults.requests("/v1/decisions", "POST")[0]["body"])
    assert sent["order"] == {"id": "T-9", "total": 72.5, "currency": "USD",
                             "items": [{"sku": "SERUM-C", "category": "skincare", "qty": 2, "price": 36.25}]}


def test_demo_page_shows_offers_with_the_pinned_snippet(page: PageRun, kassa_server: KassaUnderTest) -> None:
    for layout in ("overlay", "inline"):
        page.page.goto(f"{kassa_server.url}/demo/confirmation?layout={layout}&n=0")
        page.page.wait_for_selector("kassa-offers .offer")
        assert page.page.locator("kassa-offers").get_attribute("data-layout") == layout
        assert page.page.locator("kassa-offers .offer").count() == 3
    assert page.errors == []


def test_css_custom_properties_theme_the_offers(open_shop_page: LoadPage) -> None:
    theme = """<style>:root { --kassa-accent: rgb(176, 100, 58); --kassa-font-size: 17px; }
    kassa-offers { --kassa-radius: 4px; }</style>"""
    run = open_shop_page(head=theme, init={**FAST, "title": "Before you go"})
    show(run, layout="inline", target="#offers", placement="hostile")
    got = run.page.evaluate("""() => {
      const r = document.querySelector('kassa-offers').shadowRoot;
      const cta = getComputedStyle(r.querySelector('.cta'));
      return {bg: cta.backgroundColor, box: getComputedStyle(r.querySelector('.box')).fontSize,
              radius: getComputedStyle(r.querySelector('.box')).borderRadius,
              title: r.querySelector('.title').textContent};
    }""")
    assert got == {"bg": "rgb(176, 100, 58)", "box": "17px", "radius": "4px", "title": "Before you go"}


def test_a_strict_style_src_policy_does_not_unstyle_the_offers(open_shop_page: LoadPage,
                                                                 kassa_server: KassaUnderTest) -> None:
    # A store whose CSP allows Kassa in script-src and connect-src (the documented checklist) but no
    # inline styles: a <style> element in the shadow root would be blocked and the overlay unstyled.
    csp = (f"""<meta http-equiv="Content-Security-Policy" content="default-src 'self'; """
           f"""script-src 'unsafe-inline' {kassa_server.url}; connect-src {kassa_server.url}; """
           f"""img-src data: http:; style-src 'self'">""")
    run = open_shop_page(head=csp, init=FAST)
    assert show(run, layout="overlay")["shown"] == 3
    got = run.page.evaluate("""() => {
      const host = document.querySelector('kassa-offers');
      const r = host.shadowRoot;
      return {host: getComputedStyle(host).position, overlay: getComputedStyle(r.querySelector('.overlay')).position,
              cta: getComputedStyle(r.querySelector('.cta')).backgroundColor};
    }""")
    assert got == {"host": "fixed", "overlay": "fixed", "cta": "rgb(31, 35, 40)"}
    assert [t for kind, t in run.console if "Content Security Policy" in t] == []
    assert run.errors == []


def test_a_second_show_for_the_same_place_is_refused_until_the_first_is_closed(
        open_shop_page: LoadPage, kassa_server: KassaUnderTest) -> None:
    # e.g. React StrictMode running an effect twice, or the data- form plus a Kassa.show() call:
    # two overlays stacked, each pulling focus back from the other (a "Maximum call stack" page error).
    run = open_shop_page(init=FAST)
    for layout in ("overlay", "inline"):
        kassa_server.faults.reset()
        results = run.page.evaluate("""(o) => Promise.all([Kassa.show(o), Kassa.show(o)])""",
                                    {"order": ORDER, "layout": layout, "target": "#offers"})
        assert sorted(r["shown"] for r in results) == [0, 3]
        assert [r["reason"] for r in results if not r["shown"]] == ["already showing offers"]
        assert run.page.locator("kassa-offers").count() == 1
        assert len(kassa_server.faults.requests("/v1/decisions", "POST")) == 1  # no decision that can't show
        run.page.wait_for_timeout(300)
        assert run.errors == []
        run.page.evaluate("Kassa.close()")
        assert show(run, layout=layout, target="#offers")["shown"] == 3  # closed: the place is free again
        run.page.evaluate("Kassa.close()")


OVERFLOW_JS = """() => {
  const r = document.querySelector('kassa-offers').shadowRoot;
  const box = r.querySelector('.box').getBoundingClientRect();
  const out = [...r.querySelectorAll('.box *')].filter((e) => e.scrollWidth > e.clientWidth + 1)
    .map((e) => `${e.className}: ${e.scrollWidth} > ${e.clientWidth}`);
  for (const e of r.querySelectorAll('.cta, .headline, .body, .code')) {
    const b = e.getBoundingClientRect();
    if (b.left < box.left - 1 || b.right > box.right + 1) out.push(`${e.className} outside the box`);
  }
  return out;
}"""


@pytest.mark.parametrize("where", ["narrow-inline", "phone-overlay", "desktop-overlay"])
def test_long_words_and_labels_stay_inside_the_block(open_shop_page: LoadPage, where: str) -> None:
    # A German offer: a 77-letter word, a long button label and a long code. They pushed the grid
    # wider than the block, so buttons were cut off (unreachable) in a narrow column and on a phone.
    head = "<style>#offers { width: 280px; }</style>" if where == "narrow-inline" else ""
    run = open_shop_page(head=head, init=FAST)
    if where == "phone-overlay":
        run.page.set_viewport_size({"width": 360, "height": 740})
    layout = "inline" if where == "narrow-inline" else "overlay"
    assert show(run, layout=layout, target="#offers", placement="long")["shown"] == 2
    run.page.locator("kassa-offers [data-offer=long] .cta").click()  # reveals the code
    assert run.page.locator("kassa-offers .code").is_visible()
    assert run.page.evaluate(OVERFLOW_JS) == []


def test_a_right_to_left_page_mirrors_the_block_and_isolates_offer_text(page: PageRun, shop: Any,
                                                                        kassa_server: KassaUnderTest) -> None:
    # An Arabic store page: the title belongs on the right, the close button on the left (it was
    # pinned right, over the title's side), and English offer text keeps its own direction ("15% off
    # every delivery" was reordered to "off every delivery 15%").
    from tests.browser.conftest import shop_page

    html = shop_page(kassa_server.url).replace('<html lang="en">', '<html lang="ar" dir="rtl">')
    page.page.goto(shop.add(html))
    page.page.wait_for_function("window.Kassa && Kassa.version")
    page.page.evaluate("(o) => Kassa.init(o)", {"key": kassa_server.key, **FAST})
    assert show(page, layout="overlay", title="قد يعجبك أيضاً")["shown"] == 3
    got = page.page.evaluate("""() => {
      const r = document.querySelector('kassa-offers').shadowRoot;
      const rect = (s) => r.querySelector(s).getBoundingClientRect();
      const box = rect('.box'), close = rect('.close');
      const title = r.querySelector('.title');
      const range = document.createRange(); range.selectNodeContents(title);
      const text = range.getBoundingClientRect();
      const body = r.querySelector('.body');
      return {close_on_left: close.left - box.left < box.right - close.right,
              title_on_right: box.right - text.right < text.left - box.left,
              title_rtl: title.matches(':dir(rtl)'), english_body_ltr: body.matches(':dir(ltr)'),
              english_headline_ltr: r.querySelector('.headline').matches(':dir(ltr)')};
    }""")
    assert got == {"close_on_left": True, "title_on_right": True, "title_rtl": True,
                   "english_body_ltr": True, "english_headline_ltr": True}
    assert page.errors == []


def test_buttons_keep_a_visible_edge_in_forced_colors_mode(browser: Any, shop: Any,
                                                           kassa_server: KassaUnderTest) -> None:
    # Windows High Contrast drops background colours: borderless pill buttons became bare text,
    # indistinguishable from the headlines next to them.
    from tests.browser.conftest import shop_page

    context = browser.new_context(forced_colors="active", viewport={"width": 1280, "height": 800})
    try:
        pg = context.new_page()
        pg.goto(shop.add(shop_page(kassa_server.url)))
        pg.wait_for_function("window.Kassa && Kassa.version")
        pg.evaluate("(o) => Kassa.init(o)", {"key": kassa_server.key, **FAST})
        assert pg.evaluate("(o) => Kassa.show(o)", {"order": ORDER, "layout": "overlay"})["shown"] == 3
        edges = pg.evaluate("""() => [...document.querySelector('kassa-offers').shadowRoot.querySelectorAll('.cta')]
          .map((b) => { const s = getComputedStyle(b);
                        return [s.borderTopStyle, parseFloat(s.borderTopWidth) >= 1, s.borderTopColor]; })""")
        assert len(edges) == 3
        for style, wide, color in edges:
            assert style == "solid" and wide and color not in ("transparent", "rgba(0, 0, 0, 0)")
    finally:
        context.close()


def test_closing_the_inline_block_by_keyboard_keeps_the_place_in_the_page(page: PageRun, shop: Any,
                                                                          kassa_server: KassaUnderTest) -> None:
    # The close button took focus with it: focus fell to <body> and the next Tab restarted at the top.
    from tests.browser.conftest import shop_page

    html = shop_page(kassa_url=kassa_server.url).replace(
        '<div id="offers"></div>', '<a id="before" href="#b">before</a><div id="offers"></div>'
                                   '<a id="after" href="#a">after</a>')
    page.page.goto(shop.add(html))
    page.page.wait_for_function("window.Kassa && Kassa.version")
    page.page.evaluate("(o) => Kassa.init(o)", {"key": kassa_server.key, **FAST})
    assert show(page, layout="inline", target="#offers")["shown"] == 3
    page.page.locator("kassa-offers .close").focus()
    page.page.keyboard.press("Enter")
    assert page.page.locator("kassa-offers").count() == 0
    assert focused(page) == "offers"
    page.page.keyboard.press("Tab")
    assert focused(page) == "after"
    page.page.keyboard.press("Shift+Tab")  # the target itself is not a tab stop (tabindex=-1)
    assert focused(page) == "before"


def test_closing_the_inline_block_by_mouse_moves_no_focus(open_shop_page: LoadPage) -> None:
    run = open_shop_page(init=FAST)
    assert show(run, layout="inline", target="#offers")["shown"] == 3
    run.page.evaluate("document.getElementById('page-button').focus()")
    run.page.evaluate("Kassa.close()")
    assert focused(run) == "page-button"
    assert run.page.evaluate("document.getElementById('offers').hasAttribute('tabindex')") is False


@pytest.mark.parametrize("layout", ["overlay", "inline"])
def test_a_show_queued_in_the_head_waits_for_the_body(page: PageRun, shop: Any, kassa_server: KassaUnderTest,
                                                      layout: str) -> None:
    # A blocking tag in <head> runs the queued show before <body> (and the inline target) exist.
    cmds = json.dumps([["init", {"key": kassa_server.key, **FAST}],
                       ["show", {"order": ORDER, "layout": layout, "target": "#offers"}]])
    html = (f'<!doctype html><html><head><link rel="icon" href="data:,">'
            f'<script>window.Kassa = window.Kassa || {{q: []}}; Kassa.q.push(...{cmds});</script>'
            f'<script src="{kassa_server.url}/v1/snippet.js"></script></head>'
            f'<body><h1>Thanks</h1><div id="offers"></div></body></html>')
    page.page.goto(shop.add(html))
    page.page.wait_for_selector("kassa-offers .offer")
    assert page.page.locator("kassa-offers").get_attribute("data-layout") == layout
    assert page.page.locator("kassa-offers .offer").count() == 3
    assert page.errors == []


@pytest.mark.parametrize(("html_lang", "sent"), [
    (' lang="nl-NL"', "nl-NL"),  # the page's language wins over the browser's
    ("", "de-DE"),  # no lang: the browser's
    (' lang="{{ locale }}"', "de-DE"),  # a template placeholder is not a language
])
def test_the_pages_html_lang_picks_the_offers_language_before_the_browsers(
        browser: Any, shop: Any, kassa_server: KassaUnderTest, html_lang: str, sent: str) -> None:
    # A Dutch store page in a German browser showed German offers next to Dutch text: the store chose
    # the page's language, the buyer's browser only says what they usually read.
    from tests.browser.conftest import shop_page

    context = browser.new_context(locale="de-DE")
    try:
        pg = context.new_page()
        pg.goto(shop.add(shop_page(kassa_server.url).replace(' lang="en"', html_lang)))
        pg.wait_for_function("window.Kassa && Kassa.version")
        pg.evaluate("(o) => Kassa.init(o)", {"key": kassa_server.key, **FAST})
        kassa_server.faults.reset()
        assert pg.evaluate("(o) => Kassa.show(o)", {"order": {**ORDER, "currency": "EUR"}, "placement": "sponsored",
                                                    "layout": "inline", "target": "#offers"})["shown"] == 1
        [call] = kassa_server.faults.requests("/v1/decisions", "POST")
        assert json.loads(call["body"])["context"]["locale"] == sent
        headline = pg.locator("kassa-offers .headline").text_content()
        assert headline == ("3 gratis nummers" if sent == "nl-NL" else "3 free issues, on us")
    finally:
        context.close()


SCROLL_STATE_JS = """() => {
  const inline = (e) => e.hasAttribute('style') ? [...e.style].map((p) => [p, e.style.getPropertyValue(p),
    e.style.getPropertyPriority(p)]).sort() : null;
  const thanks = document.getElementById('thanks').getBoundingClientRect();
  return {y: Math.round(scrollY), scrollbar: innerWidth - document.documentElement.clientWidth,
          top: thanks.top, width: thanks.width,
          html: inline(document.documentElement), body: inline(document.body)};
}"""


@pytest.fixture(scope="module")
def classic_scrollbars(browser: Any, chromium: str) -> Iterator[Any]:
    """Chromium with scrollbars that take room, as on Windows and Linux desktops (Playwright hides them)."""
    b = browser.browser_type.launch(executable_path=chromium, args=["--disable-gpu", "--no-first-run"],
                                    ignore_default_args=["--hide-scrollbars"])
    yield b
    b.close()


@pytest.mark.parametrize(("styled", "style", "removed_by"), [
    ("documentElement", "overflow-y: scroll; color: rgb(0, 0, 0)", "close"),  # <html> scrolls the viewport
    ("body", "overflow-x: hidden !important", "close"),  # <body>'s overflow goes to the viewport
    (None, None, "page"),  # a single-page app removing the dialog: the lock must not outlive it
])
def test_the_overlay_locks_the_page_scroll_and_restores_it_exactly(
        classic_scrollbars: Any, shop: Any, kassa_server: KassaUnderTest, styled: str | None, style: str | None,
        removed_by: str) -> None:
    # The page behind the dialog scrolled under the wheel; the page's own inline overflow must come back as it was.
    from tests.browser.conftest import shop_page

    context = classic_scrollbars.new_context(viewport={"width": 1280, "height": 800})
    run = PageRun(context.new_page(), [], [])
    run.page.on("pageerror", lambda exc: run.errors.append(str(exc)))
    run.page.goto(shop.add(shop_page(kassa_server.url, body="<div style='height: 3000px'></div>")))
    run.page.wait_for_function("window.Kassa && Kassa.version")
    run.page.evaluate("(o) => Kassa.init(o)", {"key": kassa_server.key, **FAST})
    try:
        _lock_and_restore(run, styled, style, removed_by)
    finally:
        context.close()


def _lock_and_restore(run: PageRun, styled: str | None, style: str | None, removed_by: str) -> None:
    if styled:
        run.page.evaluate(f"document.{styled}.setAttribute('style', {style!r})")
    run.page.evaluate("scrollTo(0, 400)")
    before = run.page.evaluate(SCROLL_STATE_JS)
    assert before["y"] == 400 and before["scrollbar"] == 15  # a scrollbar that takes room
    assert show(run, layout="overlay")["shown"] == 3
    run.page.wait_for_function(DIALOG_FOCUSED)  # the lock comes with the focus, after the first paint
    run.page.mouse.move(20, 20)  # over the backdrop
    run.page.mouse.wheel(0, 600)
    run.page.wait_for_timeout(300)
    during = run.page.evaluate(SCROLL_STATE_JS)
    # the page did not scroll, and nothing behind moved or widened (the scrollbar's space is kept)
    assert (during["y"], during["top"], during["width"]) == (400, before["top"], before["width"])
    if removed_by == "close":
        run.page.keyboard.press("Escape")
    else:
        run.page.evaluate("document.querySelector('kassa-offers').remove()")
        run.page.wait_for_timeout(50)
    assert run.page.locator("kassa-offers").count() == 0
    assert run.page.evaluate(SCROLL_STATE_JS) == before
    run.page.mouse.wheel(0, 600)
    run.page.wait_for_function("scrollY > 400")
    assert run.errors == []


def test_the_overlay_fits_the_dynamic_viewport_height(open_shop_page: LoadPage) -> None:
    # 100vh is the tallest viewport: on a phone whose URL bar is showing, the sheet's bottom hid under it.
    run = open_shop_page(init=FAST)
    assert show(run, layout="overlay")["shown"] == 3
    max_height = run.page.evaluate("""() => [...document.querySelector('kassa-offers').shadowRoot.adoptedStyleSheets[0]
      .cssRules].find((r) => r.selectorText === '.overlay .box').style.maxHeight""")
    assert max_height == "calc(100dvh - 32px)"  # a browser without dvh keeps the 100vh before it


@pytest.mark.parametrize("first", ["data-form", "plain"])
def test_a_second_snippet_tag_says_once_that_it_is_ignored(page: PageRun, shop: Any, kassa_server: KassaUnderTest,
                                                           first: str) -> None:
    # A theme and an app both adding the tag: the second one's data- attributes were dropped without a
    # word (with a plain first tag, the page showed no offers at all and said nothing).
    order = f'<script type="application/json" id="o">{json.dumps({"order": ORDER})}</script>'
    src = f"{kassa_server.url}/v1/snippet.js"
    data_form = f'data-key="{kassa_server.key}" data-order="#o" data-layout="inline" data-timeout="5000"'
    # blocking tags, so the first one runs first (async copies run in the order they arrive)
    first_tag = f'<script src="{src}" {data_form} data-target="#offers"></script>' if first == "data-form" \
        else f'<script src="{src}"></script>'
    page.page.goto(shop.add(
        f'<!doctype html><html lang="en"><head><link rel="icon" href="data:,"></head><body>{order}'
        f'<div id="offers"></div><div id="other"></div>{first_tag}'
        f'<script src="{src}" {data_form} data-placement="sponsored" data-target="#other"></script>'
        f'</body></html>'))
    page.page.wait_for_function("window.Kassa && Kassa.version")
    if first == "data-form":
        page.page.wait_for_selector("#offers kassa-offers .offer")
    page.page.wait_for_timeout(300)
    [warning] = page.snippet_console("warning")
    assert "second snippet tag is ignored" in warning and "Kassa.show({placement, layout, target})" in warning
    assert page.page.locator("#other kassa-offers").count() == 0
    assert len(kassa_server.faults.requests("/v1/decisions", "POST")) == (1 if first == "data-form" else 0)
    assert page.errors == []
