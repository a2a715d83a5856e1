"""The sample order-confirmation page of ``kassa demo`` (``GET /demo/confirmation``), using the real snippet.

``confirmation_page()`` renders a plausible store's "thank you" page for one order and loads
``/v1/snippet.js`` with its SRI hash, the ``Kassa.q`` command queue and a publishable key; the
screenshot and paint benchmark script (``bench/snippet_paint.py``) and the browser tests render the same
page. ``add_demo_page()`` mounts the route on a demo server: ``?layout=overlay|inline`` picks the layout,
``?n=`` the simulated order (default: a different one on each load).
"""

from __future__ import annotations

import html
import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from kassa.snippet.build import built

PATH = "/demo/confirmation"
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "CAD": "CA$", "AUD": "A$", "JPY": "¥"}


def _money(amount: float, currency: str) -> str:
    symbol = _SYMBOLS.get(currency)
    return f"{symbol}{amount:,.2f}" if symbol else f"{amount:,.2f} {currency}"


def _json_for_script(obj: Any) -> str:
    # Inside <script>, only "</script" (and "<!--") can end the element early: escape every "<".
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def confirmation_page(
    payload: Mapping[str, Any],
    *,
    key: str,
    layout: str = "overlay",
    script_src: str | None = None,
    script_integrity: str | None = "",
    endpoint: str | None = None,
    names: Mapping[str, str] | None = None,
    timeout_ms: int | None = None,
    consent: bool = True,
    title: str | None = None,
    banner: str | None = None,
    extra_head: str = "",
    show_on_load: bool = False,
) -> str:
    """The HTML of a confirmation page for ``payload`` (a decision request body: placement, order, …).

    ``script_src`` defaults to this server's pinned ``/v1/snippet.js?v=…``; ``script_integrity`` to the
    built file's SRI hash ("") or none (None); ``endpoint`` to the server that served the script.
    ``banner`` is trusted HTML shown above the page (the demo's switcher). ``show_on_load`` calls
    ``show`` once the page has loaded and painted its first frame instead of as soon as the script runs
    (the paint benchmark, so that the page's own first paint is not counted).
    """
    snippet = built()
    src = script_src or f"/v1/snippet.js?v={snippet.version}"
    integrity = snippet.integrity if script_integrity == "" else script_integrity
    sri = f' integrity="{html.escape(integrity)}" crossorigin="anonymous"' if integrity else ""
    order = payload.get("order") or {}
    currency = str(order.get("currency") or "USD")
    names = names or {}
    rows = []
    subtotal = 0.0
    for item in order.get("items") or []:
        qty = int(item.get("qty") or 1)
        price = float(item.get("price") or 0.0)
        subtotal += qty * price
        name = names.get(item["sku"]) or item["sku"]
        category = str(item.get("category") or "").replace("_", " ")
        rows.append(
            f'<tr><td><span class="thumb" aria-hidden="true">{html.escape(name[:1].upper())}</span>'
            f'<span><b>{html.escape(name)}</b><small>{html.escape(category.capitalize())} · SKU '
            f'{html.escape(item["sku"])}</small></span></td><td class="qty">× {qty}</td>'
            f'<td class="num">{_money(qty * price, currency)}</td></tr>')
    total = float(order.get("total") or subtotal)
    shipping = max(0.0, round(total - subtotal, 2))
    init: dict[str, Any] = {"key": key, "placement": payload.get("placement") or "order_confirmation",
                            "consent": consent}
    if endpoint is not None:
        init["endpoint"] = endpoint
    if timeout_ms is not None:
        init["timeout"] = timeout_ms
    if title:
        init["title"] = title
    show = {k: payload[k] for k in ("order", "customer", "context", "session_id") if k in payload}
    show.update(layout=layout, target="#kassa-offers")
    init_cmd, show_cmd = f'["init",{_json_for_script(init)}]', f'["show",{_json_for_script(show)}]'
    queue = "window.Kassa=window.Kassa||{q:[]};" + (
        f"Kassa.q.push({init_cmd});addEventListener('load',()=>requestAnimationFrame(()=>setTimeout(()=>"
        f"Kassa.q.push({show_cmd}))));" if show_on_load
        else f"Kassa.q.push({init_cmd},{show_cmd});")
    order_id = html.escape(str(order.get("id") or "1001"))
    country = html.escape(str(order.get("ship_country") or "US"))
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Order {order_id} confirmed · Larkspur &amp; Co.</title>
<link rel="icon" href="data:,">
<style>{_PAGE_CSS}</style>
<script>{queue}</script>
<script async src="{html.escape(src)}"{sri}></script>
{extra_head}
</head>
<body>
{banner or ""}
<header class="site"><div class="wrap"><a class="logo" href="#">Larkspur <i>&amp;</i> Co.</a>
<nav><a href="#">Shop</a><a href="#">Journal</a><a href="#">Help</a><a href="#">Account</a></nav></div></header>
<main class="wrap">
  <section class="confirm">
    <div class="check" aria-hidden="true">✓</div>
    <div><p class="eyebrow">Order #{order_id} confirmed</p>
    <h1>Thank you, your order is on its way!</h1>
    <p class="lead">We've emailed your receipt. You'll get tracking details as soon as the parcel leaves our
    warehouse, usually within one business day.</p></div>
  </section>
  <div class="grid">
    <div class="main">
      <section class="card">
        <h2>Order summary</h2>
        <table class="items">{"".join(rows)}</table>
        <dl class="totals"><dt>Subtotal</dt><dd>{_money(subtotal, currency)}</dd>
        <dt>Shipping</dt><dd>{_money(shipping, currency) if shipping else "Free"}</dd>
        <dt class="grand">Total</dt><dd class="grand">{_money(total, currency)}</dd></dl>
      </section>
      <div id="kassa-offers"></div>
      <section class="card help"><h2>Need anything?</h2><p>Reply to your confirmation email or visit the help
      centre: changes to this order are possible for the next 60 minutes.</p></section>
    </div>
    <aside>
      <section class="card"><h2>Delivery</h2><p>Standard shipping to {country}<br>
      Estimated arrival in 3–5 business days</p></section>
      <section class="card"><h2>Payment</h2><p>Card ending in 4242<br>Billing address as delivery</p></section>
    </aside>
  </div>
</main>
<footer class="wrap"><p>© Larkspur &amp; Co. · a store invented for the Kassa demo</p></footer>
</body>
</html>
"""


_PAGE_CSS = """
*{box-sizing:border-box}body{margin:0;background:#f6f5f2;color:#23201c;
font:16px/1.55 "Iowan Old Style","Palatino Linotype",Georgia,serif}
.wrap{max-width:1080px;margin:0 auto;padding:0 24px}
.site{background:#fff;border-bottom:1px solid #e7e3dc}.site .wrap{display:flex;align-items:center;
justify-content:space-between;height:64px}.logo{font-size:22px;font-weight:700;color:#23201c;text-decoration:none;
letter-spacing:.01em}.logo i{color:#b0643a}nav a{margin-left:22px;color:#5d574f;text-decoration:none;
font:15px system-ui,sans-serif}
.demo{background:#1f2328;color:#e6edf3;font:14px/1.4 system-ui,sans-serif}.demo .wrap{padding:9px 24px}
.demo a{color:#9ecbff}.demo b{color:#fff}
.confirm{display:flex;gap:20px;align-items:flex-start;margin:36px 0 28px}.check{flex:none;width:52px;height:52px;
border-radius:50%;background:#2f7d4f;color:#fff;display:grid;place-items:center;font:26px system-ui,sans-serif}
.eyebrow{margin:0;color:#2f7d4f;font:600 14px system-ui,sans-serif;letter-spacing:.04em;text-transform:uppercase}
h1{margin:4px 0 6px;font-size:32px;line-height:1.2;font-weight:600}.lead{margin:0;color:#5d574f;max-width:640px}
.grid{display:grid;grid-template-columns:minmax(0,1fr) 300px;gap:24px}.main{min-width:0}
@media (max-width:820px){.grid{grid-template-columns:1fr}}
.card{background:#fff;border:1px solid #e7e3dc;border-radius:12px;padding:20px 22px;margin-bottom:20px}
.card h2{margin:0 0 12px;font:600 17px system-ui,sans-serif}.card p{margin:0;color:#5d574f}
.items{width:100%;border-collapse:collapse;font-family:system-ui,sans-serif;font-size:15px}
.items td{padding:10px 0;border-bottom:1px solid #f0ede8;vertical-align:middle}
.items td:first-child{display:flex;gap:12px;align-items:center}.items small{display:block;color:#8a8279}
.thumb{flex:none;width:44px;height:44px;border-radius:8px;background:#efe7dc;color:#b0643a;display:grid;
place-items:center;font-weight:700}.qty{color:#8a8279;text-align:center;width:60px}.num{text-align:right}
.totals{display:grid;grid-template-columns:1fr auto;margin:14px 0 0;font-family:system-ui,sans-serif;gap:4px 0}
.totals dt{color:#5d574f}.totals dd{margin:0;text-align:right}.totals .grand{font-weight:700;font-size:17px;
padding-top:8px;border-top:1px solid #e7e3dc;color:#23201c}
footer p{color:#8a8279;font:13px system-ui,sans-serif;margin:8px 0 40px}
"""


def demo_banner(layout: str, n: int, total: int) -> str:
    other = "inline" if layout == "overlay" else "overlay"
    nxt = (n + 1) % max(total, 1)
    return (
        '<div class="demo"><div class="wrap"><b>Kassa demo</b>: this store page loads the real snippet from '
        f"<code>/v1/snippet.js</code>. Layout <b>{layout}</b> · "
        f'<a href="{PATH}?layout={other}&amp;n={n}">show {other}</a> · '
        f'<a href="{PATH}?layout={layout}&amp;n={nxt}">another order</a></div></div>'
    )


def add_demo_page(app: Starlette, key: str, payloads: Sequence[Mapping[str, Any]],
                  names: Mapping[str, str] | None = None, timeout_ms: int | None = None) -> None:
    """Mount ``GET /demo/confirmation`` on ``app`` (before it serves), rendering one of ``payloads``."""
    if not payloads:
        raise ValueError("the demo page needs at least one order payload")

    async def page(request: Request) -> HTMLResponse:
        layout = "inline" if request.query_params.get("layout") == "inline" else "overlay"
        try:
            n = int(request.query_params["n"]) % len(payloads)
        except (KeyError, ValueError):
            n = random.randrange(len(payloads))
        body = confirmation_page(payloads[n], key=key, layout=layout, names=names, timeout_ms=timeout_ms,
                                 banner=demo_banner(layout, n, len(payloads)))
        return HTMLResponse(body, headers={"Cache-Control": "no-store"})

    app.router.routes.append(Route(PATH, page, methods=["GET"]))
