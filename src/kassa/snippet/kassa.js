/*! Kassa confirmation-page snippet | Apache-2.0 */
// Readable source of GET /v1/snippet.js. `python -m kassa.snippet.build` strips the comments and the
// indentation (line by line, so keep comments on their own lines) and computes the SRI hash.
//
// Rules this file keeps (docs/integrations/snippet.md):
// - one global, `Kassa`; no cookies; nothing happens until `show()`;
// - everything is rendered as text inside a shadow root; nothing from the API is parsed as HTML;
// - a decision slower than `timeout` (150 ms) shows nothing and leaves no trace in the DOM;
// - every error is swallowed and logged with console.debug only, but an API error (an HTTP 4xx/5xx)
//   or an ignored second tag is a console.warn: the store's developer has something to fix;
// - outcome events are sent only with consent, batched, each with its own event_id.
(() => {
  'use strict';
  const w = window;
  const d = document;
  const prior = w.Kassa;
  const script = d.currentScript;
  // Loaded twice (two tags, or a platform that injects it again): the first copy stays in charge. The
  // settings are one page-wide set (one key, one consent), so a second tag's data- form is not run:
  // it says so once, instead of a placement that silently never shows.
  if (prior && prior.version) {
    try {
      if (script && script.hasAttribute('data-key')) {
        console.warn('[kassa] this second snippet tag is ignored, data- attributes and all: keep one tag per ' +
          'page; show another placement with Kassa.show({placement, layout, target})', script);
      }
    } catch (_) {
      // a page that replaced console
    }
    return;
  }
  const TAG = 'kassa-offers';
  const MAX_QUEUE = 200;

  const log = (level, args) => {
    try {
      console[level]('[kassa]', ...args);
    } catch (_) {
      // a page that replaced console must not break us either
    }
  };
  const debug = (...args) => log('debug', args);
  // for what the store's developer must fix (the API refused the call): debug is hidden by default
  const warn = (...args) => log('warn', args);
  const guard = (fn) => (...args) => {
    try {
      return fn(...args);
    } catch (err) {
      debug(err);
    }
  };

  const cfg = {
    key: '',
    endpoint: '',
    placement: 'order_confirmation',
    layout: 'overlay',
    target: null,
    timeout: 150,
    batchMs: 1000,
    // undefined: not asked yet (events are held in memory); true: send; false: drop.
    consent: undefined,
    title: 'You might also like',
    labels: {close: 'Close', accepted: 'Added \u2713', cta: 'Yes, please'},
    onAccept: null,
  };
  // The server that served this file answers the calls too, unless init({endpoint}) says otherwise
  // (a self-hosted copy of the file; '' means the page's own origin, e.g. behind the store's proxy).
  const served = script && /^(https?:\/\/.+?)\/v1\/snippet\.js(?:[?#]|$)/.exec(script.src);
  if (served) cfg.endpoint = served[1];

  // ------------------------------------------------------------------ outcome events
  const outbox = [];
  const held = [];
  let timer = 0;
  let listening = false;

  const uuid = () => {
    if (w.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = new Uint8Array(16);
    if (w.crypto && crypto.getRandomValues) crypto.getRandomValues(b);
    else for (let i = 0; i < 16; i++) b[i] = (Math.random() * 256) | 0;
    b[6] = (b[6] & 15) | 64;
    b[8] = (b[8] & 63) | 128;
    const h = Array.from(b, (x) => (x + 256).toString(16).slice(1)).join('');
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  };

  const keyed = (path) => `${cfg.endpoint}${path}?key=${encodeURIComponent(cfg.key)}`;

  const record = (type, view, offerId) => {
    if (cfg.consent === false) return;
    const event = {event_id: uuid(), type, decision_id: view.decisionId, offer_id: offerId};
    if (cfg.consent !== true) {
      if (held.length < MAX_QUEUE) held.push(event);
      return;
    }
    if (outbox.length < MAX_QUEUE) outbox.push(event);
    schedule();
  };

  const schedule = () => {
    if (!listening) {
      listening = true;
      // The last chance to send before the buyer leaves: sendBeacon survives the unload.
      d.addEventListener('visibilitychange', () => d.visibilityState === 'hidden' && flush());
      w.addEventListener('pagehide', flush);
    }
    if (!timer) timer = setTimeout(flush, cfg.batchMs);
  };

  const post = (url, body, retries) => {
    fetch(url, {method: 'POST', body, keepalive: true, credentials: 'omit'})
      .then((r) => {
        if (r.status >= 500 && retries) setTimeout(() => post(url, body, retries - 1), 1000);
      })
      .catch(() => retries && setTimeout(() => post(url, body, retries - 1), 1000));
  };

  const flush = guard(() => {
    clearTimeout(timer);
    timer = 0;
    if (!outbox.length || !cfg.key) return;
    const url = keyed('/v1/events');
    // A string body goes as text/plain: a CORS-simple request, so no preflight and no header for
    // the key, which travels in the URL (publishable keys only; the server checks the Origin).
    const body = JSON.stringify({events: outbox.splice(0, outbox.length)});
    let queued = false;
    try {
      queued = !!(navigator.sendBeacon && navigator.sendBeacon(url, body));
    } catch (err) {
      debug(err);
    }
    if (!queued) post(url, body, 1);
  });

  const consent = (granted) => {
    cfg.consent = granted === true;
    const waiting = held.splice(0, held.length);
    if (cfg.consent && waiting.length) {
      outbox.push(...waiting);
      schedule();
    }
  };

  // ------------------------------------------------------------------ the request
  const pick = (o, names) => {
    const out = {};
    for (const n of names) if (o[n] !== undefined && o[n] !== null) out[n] = o[n];
    return out;
  };

  const context = (given) => {
    const c = {};
    try {
      const coarse = w.matchMedia && w.matchMedia('(pointer: coarse)').matches;
      c.device = coarse ? (Math.min(screen.width, screen.height) >= 600 ? 'tablet' : 'mobile') : 'desktop';
      // The page's language first (the store chose it; the offers should match the page around them),
      // then the browser's. A lang that is not a language tag (a template's placeholder) is skipped.
      const lang = d.documentElement.lang.trim();
      c.locale = /^[a-z]{2,8}([-_][a-z0-9]{1,8})*$/i.test(lang) ? lang : navigator.language;
      // No automatic context.timezone: the first Intl.DateTimeFormat() of a page costs 10-20 ms of
      // main thread before the request can leave. Stores that know it pass it; else the placement's.
    } catch (_) {
      // best effort only
    }
    return Object.assign(c, given);
  };

  const mark = (name) => {
    try {
      performance.mark(name);
    } catch (_) {
      // no User Timing: nothing to record
    }
  };

  // After the frame that shows the offers is rendered: rAF runs before that frame's paint, and a
  // task queued from it runs after. The measure lets stores (and bench/snippet_paint.py) see it.
  const afterPaint = (then) => requestAnimationFrame(() => {
    const ch = new MessageChannel();
    ch.port1.onmessage = guard(() => {
      mark('kassa:painted');
      try {
        performance.measure('kassa:show-to-paint', 'kassa:show', 'kassa:painted');
      } catch (_) {
        // the show mark was cleared by the page
      }
      then();
    });
    ch.port2.postMessage(0);
  });

  const nothing = (reason) => ({shown: 0, decision_id: null, reason});
  // a call that cannot even start says why, at the level every other reason is logged at
  const refuse = (reason) => {
    debug('no offers shown:', reason);
    return Promise.resolve(nothing(reason));
  };

  const show = (opts) => {
    opts = opts || {};
    mark('kassa:show');
    if (!cfg.key) return refuse('call Kassa.init({key}) first');
    if (!w.fetch || !w.AbortController || !Element.prototype.attachShadow) return refuse('unsupported browser');
    const layout = opts.layout === 'inline' || (!opts.layout && cfg.layout === 'inline') ? 'inline' : 'overlay';
    // Where the block goes is settled before asking: no decision is made that could not be shown.
    const where = layout === 'inline' ? resolveTarget(opts.target || cfg.target) : d.body;
    // Called from <head> (a blocking tag, a queued show): the body and the target are not parsed yet.
    if (!where && d.readyState === 'loading') {
      return new Promise((done) => d.addEventListener('DOMContentLoaded', () => done(api.show(opts)), {once: true}));
    }
    if (!where) return refuse(`inline target not found: ${opts.target || cfg.target || '(no target given)'}`);
    // One block per place (the overlay, or one inline target) until it is closed: a second show
    // (an effect run twice, the data- form plus a call) would stack two dialogs fighting for focus.
    const slot = layout === 'inline' ? where : 'overlay';
    if (pending.has(slot) || views.some((v) => v.slot === slot && v.host.isConnected)) {
      return refuse('already showing offers');
    }
    pending.add(slot);
    const body = pick(opts, ['order', 'customer', 'session_id', 'request_id', 'limit', 'candidates']);
    body.placement = opts.placement || cfg.placement;
    body.context = context(opts.context);
    const ctrl = new AbortController();
    const limit = opts.timeout > 0 ? opts.timeout : cfg.timeout;
    const clock = setTimeout(() => ctrl.abort(), limit);
    return fetch(keyed('/v1/decisions'), {
      method: 'POST', body: JSON.stringify(body), signal: ctrl.signal, credentials: 'omit',
      cache: 'no-store', priority: 'high',
    })
      .then((r) => {
        if (r.ok) return r.json();
        const failed = `decision failed: HTTP ${r.status}`;
        // The API's problem says why (an unknown key, a refused origin, a bad order): say it where the
        // developer looks, unless the call already timed out.
        return r.json().catch(() => 0).then((p) => {
          p = p || {};
          const field = p.field ? ` (${p.field})` : '';
          if (!ctrl.signal.aborted) warn(`${failed}: ${p.detail || p.title || r.statusText}${field}`);
          throw new Error(failed);
        });
      })
      .then((decision) => {
        // The abort also stops a body still downloading, but a timer can fire between the last
        // chunk and this callback: the check keeps "nothing after the timeout" exact.
        if (ctrl.signal.aborted) return nothing('timeout');
        clearTimeout(clock);
        pending.delete(slot);
        if (!where.isConnected) {
          debug('inline target left the page:', opts.target || cfg.target);
          return {shown: 0, decision_id: decision.decision_id, reason: 'inline target not found'};
        }
        const shown = render(decision, layout, opts, where, slot);
        return {shown, decision_id: decision.decision_id, reason: shown ? null : 'no offers'};
      })
      .catch((err) => {
        clearTimeout(clock);
        pending.delete(slot);
        const reason = ctrl.signal.aborted ? 'timeout' : String((err && err.message) || err);
        debug('no offers shown:', reason);
        return nothing(reason);
      });
  };

  // ------------------------------------------------------------------ rendering
  const CSS = `
:host{all:initial!important;display:block!important;visibility:visible!important;opacity:1!important;contain:layout style}
:host([data-layout=overlay]){position:fixed!important;inset:0!important;z-index:var(--kassa-z,2147483000)!important}
*,*::before,*::after{box-sizing:border-box}
[hidden]{display:none!important}
.box{position:relative;margin:var(--kassa-margin,16px 0);padding:20px;text-align:start;color:var(--kassa-text,#1f2328);background:var(--kassa-bg,#fff);border:1px solid var(--kassa-border,#e3e6ea);border-radius:var(--kassa-radius,14px);font:400 var(--kassa-font-size,15px)/1.45 var(--kassa-font,system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif);-webkit-font-smoothing:antialiased}
.box:focus{outline:none}
.title{margin:0 0 14px;margin-inline-end:40px;font-size:1.13em;overflow-wrap:anywhere;font-weight:650;line-height:1.3;letter-spacing:-.005em}
.offers{list-style:none;margin:0;padding:0;display:grid;grid-template-columns:minmax(0,1fr);gap:10px}
.offer{display:flex;flex-wrap:wrap;align-items:center;gap:14px;padding:12px;background:var(--kassa-card,#f7f8fa);border:1px solid var(--kassa-card-border,#eceef1);border-radius:calc(var(--kassa-radius,14px) - 4px)}
.img{flex:none;width:64px;height:64px;border-radius:8px;object-fit:cover;background:#e9ecef}
.text{flex:1 1 8em;min-width:0}
.headline{display:block;margin:0;font-weight:600;color:inherit;text-decoration:none;overflow-wrap:anywhere}
a.headline:hover{text-decoration:underline}
.body{margin:2px 0 0;overflow-wrap:anywhere;font-size:.92em;color:var(--kassa-muted,#59636e)}
.disclosure{margin:0 0 2px;overflow-wrap:anywhere;font-size:.75em;font-weight:600;letter-spacing:.04em;text-transform:uppercase;color:var(--kassa-muted,#59636e)}
.code{display:inline-block;max-width:100%;overflow-wrap:anywhere;margin:6px 0 0;padding:2px 8px;font:600 .95em/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;letter-spacing:.06em;border:1px dashed currentColor;border-radius:6px}
.cta{flex:none;max-width:100%;min-height:40px;margin-inline-start:auto;padding:8px 17px;font:inherit;font-size:.93em;font-weight:600;overflow-wrap:anywhere;color:var(--kassa-accent-text,#fff);background:var(--kassa-accent,#1f2328);border:1px solid transparent;border-radius:var(--kassa-button-radius,999px);cursor:pointer}
.cta:hover{filter:brightness(1.15)}
.cta[aria-disabled=true]{color:var(--kassa-done-text,#fff);background:var(--kassa-done,#1a7f37);cursor:default;filter:none}
.close{position:absolute;top:10px;inset-inline-end:10px;display:grid;place-items:center;width:36px;height:36px;padding:0;font:400 26px/1 system-ui,sans-serif;color:var(--kassa-muted,#59636e);background:transparent;border:0;border-radius:50%;cursor:pointer}
.close:hover{background:rgba(127,127,127,.14)}
:focus-visible{outline:2px solid var(--kassa-focus,#0969da);outline-offset:2px}
.overlay{position:fixed;inset:0;display:flex;align-items:center;justify-content:center;padding:16px}
.backdrop{position:absolute;inset:0;background:var(--kassa-backdrop,rgba(17,24,39,.5))}
.overlay .box{width:100%;max-width:var(--kassa-width,520px);max-height:calc(100vh - 32px);max-height:calc(100dvh - 32px);margin:0;overflow:auto;overscroll-behavior:contain;box-shadow:0 24px 64px rgba(17,24,39,.3);animation:kassa-in .16s ease-out}
@keyframes kassa-in{from{transform:translateY(10px) scale(.985)}}
@media (max-width:520px){.overlay{align-items:flex-end;padding:0}.overlay .box{max-width:none;border-radius:var(--kassa-radius,14px) var(--kassa-radius,14px) 0 0}.cta{width:100%}}
@media (prefers-reduced-motion:reduce){.overlay .box{animation:none}}
`;

  // A constructed stylesheet, shared by every block: a store CSP without 'unsafe-inline' in
  // style-src blocks a <style> element (even in a shadow root) but not adoptedStyleSheets.
  let sheet = null;
  const styleRoot = (root) => {
    try {
      if (!sheet) {
        const made = new CSSStyleSheet();
        made.replaceSync(CSS);
        sheet = made;
      }
      root.adoptedStyleSheets = [sheet];
    } catch (_) {
      // an older browser: an inline <style>, which a strict CSP may block
      root.append(el('style', null, CSS));
    }
  };

  const el = (tag, cls, text) => {
    const e = d.createElement(tag);
    if (cls) e.className = cls;
    // textContent only: offer content is data, never markup
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  };

  const auto = (e) => {
    e.dir = 'auto';
    return e;
  };

  // Only http(s) links, and http(s) or data:image sources; anything else (javascript:, ...) is dropped.
  const safeUrl = (value, images) => {
    if (typeof value !== 'string' || !value) return null;
    try {
      const u = new URL(value, location.href);
      if (u.protocol === 'https:' || u.protocol === 'http:') return u.href;
      if (images && u.protocol === 'data:' && /^data:image\//i.test(value)) return value;
    } catch (_) {
      // not a URL
    }
    return null;
  };

  const resolveTarget = (t) => {
    if (!t) return null;
    if (typeof t === 'string') return d.querySelector(t);
    return t.nodeType === 1 ? t : null;
  };

  // While the overlay is open the page behind it does not scroll. The function returned puts back
  // exactly what was there: each inline property's value and priority, and no style attribute where
  // there was none.
  const lockScroll = () => {
    const html = d.documentElement;
    const css = getComputedStyle(html);
    // The viewport scrolls by <html>'s overflow, or by <body>'s when <html>'s is visible: locking the
    // other one would make it a scroll container (its margins stop collapsing: the page moves).
    const e = css.overflowX === 'visible' && css.overflowY === 'visible' ? d.body : html;
    const set = [['overflow-x', 'hidden', e], ['overflow-y', 'hidden', e]];
    // a classic scrollbar keeps its space: without it the page would widen (and shift) behind the backdrop
    if (w.innerWidth > html.clientWidth) set.push(['scrollbar-gutter', 'stable', html]);
    const undo = [];
    for (const el of new Set(set.map((x) => x[2]))) {
      const had = el.hasAttribute('style');
      undo.unshift(() => had || el.style.length || el.removeAttribute('style'));
    }
    for (const [p, value, el] of set) {
      const s = el.style;
      const v = s.getPropertyValue(p);
      const prio = s.getPropertyPriority(p);
      undo.unshift(() => (v ? s.setProperty(p, v, prio) : s.removeProperty(p)));
      s.setProperty(p, value, 'important');
    }
    return () => undo.forEach((f) => f());
  };

  const views = [];
  const pending = new Set();
  let refocusing = false;

  const seen = (view, id) => {
    if (view.closed || view.seen.has(id)) return;
    view.seen.add(id);
    record('impression', view, id);
  };

  const observe = (view) => {
    if (!w.IntersectionObserver) return;
    // "Seen" means at least half of the offer was on screen while the tab was visible.
    view.io = new IntersectionObserver((entries) => {
      if (d.visibilityState !== 'visible') return;
      for (const e of entries) if (e.isIntersecting && e.intersectionRatio >= 0.5) seen(view, e.target.dataset.offer);
    }, {threshold: [0.5, 1]});
    view.items.forEach((li) => view.io.observe(li));
  };

  const close = (view) => {
    if (view.closed) return;
    // Offers seen but not taken were declined; offers never seen say nothing.
    for (const id of view.seen) if (!view.accepted.has(id)) record('dismiss', view, id);
    view.closed = true;
    if (view.io) view.io.disconnect();
    view.cleanup.forEach((fn) => fn());
    // An inline block closed from the keyboard hands focus to its target, so the next Tab goes on
    // from here instead of from the top of the page (focus would fall to <body>).
    const spot = view.slot !== 'overlay' && d.activeElement === view.host ? view.host.parentElement : null;
    view.host.remove();
    if (spot) {
      if (!spot.hasAttribute('tabindex')) spot.tabIndex = -1;
      spot.focus({preventScroll: true});
    }
    const back = view.restore;
    if (back && back.isConnected && back.focus) back.focus({preventScroll: true});
    views.splice(views.indexOf(view), 1);
  };

  const accept = (view, offer, button, code) => {
    const id = offer.offer_id;
    if (view.closed || view.accepted.has(id)) return;
    seen(view, id);
    view.accepted.add(id);
    record('accept', view, id);
    // aria-disabled, not disabled: a disabled button drops keyboard focus out of the dialog.
    button.setAttribute('aria-disabled', 'true');
    button.textContent = (offer.content && offer.content.accepted_label) || cfg.labels.accepted;
    if (code) code.hidden = false;
    const detail = {decision_id: view.decisionId, offer_id: id, content: offer.content};
    const handler = view.opts.onAccept || cfg.onAccept;
    if (typeof handler === 'function') guard(handler)(detail);
    w.dispatchEvent(new CustomEvent('kassa:accept', {detail}));
    const url = safeUrl(offer.content && offer.content.url, false);
    if (url && typeof handler !== 'function') w.open(url, '_blank', 'noopener');
  };

  const card = (view, offer, i) => {
    const c = offer.content && typeof offer.content === 'object' ? offer.content : {};
    const headline = c.headline || c.title;
    if (!headline || !offer.offer_id) return null;
    const li = el('li', 'offer');
    li.dataset.offer = offer.offer_id;
    li.setAttribute('part', 'offer');
    const src = safeUrl(c.image_url || c.image, true);
    if (src) {
      const img = el('img', 'img');
      // attributes before src, so the lazy hint applies to the first fetch
      img.loading = 'lazy';
      img.decoding = 'async';
      img.width = 64;
      img.height = 64;
      img.alt = c.image_alt ? String(c.image_alt) : '';
      img.onerror = () => img.remove();
      img.src = src;
      li.append(img);
    }
    const text = el('div', 'text');
    const url = safeUrl(c.url, false);
    // dir=auto: offer text keeps its own direction on a page of the other one (English on Arabic)
    const head = auto(el(url ? 'a' : 'p', 'headline', headline));
    head.id = `kassa-h${i}`;
    if (url) {
      head.href = url;
      head.target = '_blank';
      head.rel = 'noopener noreferrer';
      head.addEventListener('click', () => {
        seen(view, offer.offer_id);
        if (!view.clicked.has(offer.offer_id)) {
          view.clicked.add(offer.offer_id);
          record('click', view, offer.offer_id);
        }
      });
    }
    // a paid placement says so above its headline ("Sponsored", localised by the server)
    if (c.disclosure) text.append(auto(el('p', 'disclosure', c.disclosure)));
    text.append(head);
    if (c.body || c.description) text.append(auto(el('p', 'body', c.body || c.description)));
    let code = null;
    if (c.code) {
      code = el('p', 'code', c.code);
      code.hidden = true;
      code.setAttribute('aria-live', 'polite');
      text.append(code);
    }
    const button = auto(el('button', 'cta', c.cta || cfg.labels.cta));
    button.type = 'button';
    button.setAttribute('aria-describedby', head.id);
    button.setAttribute('part', 'cta');
    button.addEventListener('click', guard(() => accept(view, offer, button, code)));
    li.append(text, button);
    return li;
  };

  const trapTab = (view, e) => {
    const f = Array.from(view.box.querySelectorAll('button,a[href]'));
    if (!f.length) return;
    const at = view.root.activeElement;
    const first = f[0];
    const last = f[f.length - 1];
    if (e.shiftKey && (at === first || at === view.box)) {
      e.preventDefault();
      last.focus();
    } else if (!e.shiftKey && at === last) {
      e.preventDefault();
      first.focus();
    }
  };

  const render = (decision, layout, opts, target, slot) => {
    const offers = decision && Array.isArray(decision.offers) ? decision.offers : [];
    if (!offers.length) return 0;
    const view = {
      decisionId: decision.decision_id, opts, slot, seen: new Set(), accepted: new Set(), clicked: new Set(),
      items: [], cleanup: [], closed: false, io: null, restore: null,
    };
    const items = offers.map((o, i) => card(view, o, i)).filter(Boolean);
    if (!items.length) return 0;
    view.items = items;

    const host = d.createElement(TAG);
    host.setAttribute('data-layout', layout);
    const root = host.attachShadow({mode: 'open'});
    const box = el('section', 'box');
    box.setAttribute('part', 'box');
    const title = el('h2', 'title', opts.title || cfg.title);
    title.id = 'kassa-title';
    box.setAttribute('aria-labelledby', title.id);
    const shut = el('button', 'close', '\u00d7');
    shut.type = 'button';
    shut.setAttribute('aria-label', cfg.labels.close);
    shut.addEventListener('click', guard(() => close(view)));
    const list = el('ul', 'offers');
    list.append(...items);
    box.append(title, list, shut);
    styleRoot(root);
    Object.assign(view, {host, root, box});

    if (layout === 'overlay') {
      box.setAttribute('role', 'dialog');
      box.setAttribute('aria-modal', 'true');
      box.tabIndex = -1;
      const wrap = el('div', 'overlay');
      const backdrop = el('div', 'backdrop');
      backdrop.addEventListener('click', guard(() => close(view)));
      wrap.append(backdrop, box);
      root.append(wrap);
      box.addEventListener('keydown', guard((e) => {
        if (e.key === 'Escape') {
          e.preventDefault();
          close(view);
        } else if (e.key === 'Tab') {
          trapTab(view, e);
        }
      }));
      // Focus that leaves the dialog (a click on the page, a screen reader's jump) is brought back.
      // (not re-entered: a page's own focus trap would otherwise bounce focus until the stack overflows)
      const keepFocus = guard((e) => {
        if (e.target === host || view.closed || refocusing) return;
        refocusing = true;
        try {
          box.focus({preventScroll: true});
        } finally {
          refocusing = false;
        }
      });
      d.addEventListener('focusin', keepFocus);
      view.cleanup.push(() => d.removeEventListener('focusin', keepFocus));
      view.restore = d.activeElement;
      d.body.append(host);
      // Removed by the page (not closed): the scroll lock must not outlive it.
      const gone = new MutationObserver(guard(() => host.isConnected || close(view)));
      gone.observe(d.body, {childList: true});
      view.cleanup.push(() => gone.disconnect());
    } else {
      box.setAttribute('role', 'region');
      root.append(box);
      target.append(host);
    }
    const onVisible = () => {
      // an observer reports a change only once: re-observing re-checks what is on screen now
      if (d.visibilityState === 'visible' && view.io) {
        view.io.disconnect();
        items.forEach((li) => view.io.observe(li));
      }
    };
    d.addEventListener('visibilitychange', onVisible);
    view.cleanup.push(() => d.removeEventListener('visibilitychange', onVisible));
    views.push(view);
    observe(view);
    // Focus moves in once the dialog is on screen: focusing now would force a synchronous style
    // and layout pass before the first paint (about 8 ms on a busy phone-class CPU).
    // The scroll lock too: it reads the page's layout.
    afterPaint(() => {
      if (layout !== 'overlay' || view.closed) return;
      view.cleanup.push(lockScroll());
      box.focus({preventScroll: true});
    });
    return items.length;
  };

  // ------------------------------------------------------------------ configuration
  const init = (options) => {
    const o = options || {};
    for (const k of ['key', 'endpoint', 'placement', 'layout', 'target', 'title', 'onAccept']) {
      if (o[k] !== undefined && o[k] !== null) cfg[k] = o[k];
    }
    if (o.timeout > 0) cfg.timeout = +o.timeout;
    if (o.batchMs >= 0) cfg.batchMs = +o.batchMs;
    if (o.labels) Object.assign(cfg.labels, o.labels);
    cfg.endpoint = String(cfg.endpoint).replace(/\/+$/, '');
    if (o.consent !== undefined) consent(o.consent);
  };

  // ------------------------------------------------------------------ the data- attribute form
  // A GA4 purchase in a data layer: {event: 'purchase', ecommerce: {...}} or gtag's
  // ['event', 'purchase', {...}]; the newest one wins.
  const fromDataLayer = (layer) => {
    if (!Array.isArray(layer)) return null;
    for (let i = layer.length - 1; i >= 0; i--) {
      const e = layer[i];
      let ec = null;
      if (e && e[0] === 'event' && e[1] === 'purchase') ec = e[2];
      else if (e && e.event === 'purchase') ec = e.ecommerce;
      if (!ec || ec.transaction_id === undefined || ec.transaction_id === null) continue;
      const items = (Array.isArray(ec.items) ? ec.items : [])
        .filter((it) => it && (it.item_id || it.item_name))
        .map((it) => pick({
          sku: String(it.item_id || it.item_name), category: it.item_category,
          qty: Math.max(1, Math.round(+it.quantity || 1)), price: Math.max(0, +it.price || 0),
        }, ['sku', 'category', 'qty', 'price']));
      const order = {id: String(ec.transaction_id), total: Math.max(0, +ec.value || 0), items};
      if (ec.currency) order.currency = String(ec.currency).toUpperCase();
      return {order};
    }
    return null;
  };

  const fromAttributes = () => {
    if (!script || !script.hasAttribute('data-key')) return;
    const a = (n) => script.getAttribute(`data-${n}`) || undefined;
    if (!a('key')) {
      debug('data-key is empty: no offers will be shown');
      return;
    }
    const given = a('consent');
    init({
      key: a('key'), endpoint: a('endpoint'), placement: a('placement'), layout: a('layout'), target: a('target'),
      title: a('title'), timeout: a('timeout'), consent: given === undefined ? undefined : given === 'true',
    });
    const start = guard(() => {
      let data = null;
      const sel = a('order');
      if (sel) {
        const node = d.querySelector(sel);
        const parsed = node && JSON.parse(node.textContent);
        data = parsed && (parsed.order ? parsed : {order: parsed});
      } else {
        data = fromDataLayer(w[a('datalayer') || 'dataLayer']);
      }
      if (!data) debug('no order found for the data- attribute form');
      else show(data);
    });
    if (d.readyState === 'loading') d.addEventListener('DOMContentLoaded', start);
    else start();
  };

  // ------------------------------------------------------------------ the one global
  const api = {
    version: '1',
    init: guard(init),
    show: (opts) => {
      try {
        return show(opts);
      } catch (err) {
        debug(err);
        return Promise.resolve(nothing(String(err)));
      }
    },
    consent: guard(consent),
    close: guard(() => views.slice().forEach(close)),
    flush,
    // Commands pushed before the script loaded (`Kassa.q.push(['init', {...}])`) run now; pushed
    // after, they run at once.
    q: {push: (...cmds) => cmds.forEach(guard((c) => typeof api[c[0]] === 'function' && api[c[0]](c[1])))},
  };
  w.Kassa = api;
  if (prior && prior.q && prior.q.length) api.q.push(...Array.from(prior.q));
  guard(fromAttributes)();
})();
