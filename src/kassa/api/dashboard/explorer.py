"""The decision explorer: one decision by id, with what the policy saw, chose, and got back.

Read from the logs (`outcomes.Outcomes.decision`): the feature vector the policy scored, every
candidate with its probability, the shown offers with their slot probabilities, the outcome events
carrying the decision's id (marked when they arrived after the reward window) and the joined reward.
Without an id the page lists the newest decisions, each a link to its detail.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from kassa.api.dashboard.outcomes import DecisionDetail
from kassa.api.dashboard.render import badge, h, link, num, page, table, url, when
from kassa.api.dashboard.session import Session

if TYPE_CHECKING:
    from kassa.api.dashboard.state import Dashboard

_MAX_ID = 128


def _search(value: str) -> str:
    return ('<form method="get" action="/dashboard/decisions" class="search">'
            '<label for="decision-id">Decision id</label>'
            f'<input id="decision-id" name="id" value="{h(value)}" maxlength="{_MAX_ID}" required '
            'autocomplete="off" spellcheck="false"><button type="submit">Look up</button></form>')


def _detail(d: DecisionDetail) -> str:
    r = d.record
    state = (badge("closed", "good") if d.closed else badge("reward window open", "warn"))
    facts = table(["", ""], [
        ("decision id", r["decision_id"]), ("served at", when(r["ts"])),
        ("placement", link(r["placement"], url("/dashboard/placements", r["placement"]))),
        ("model version", r["model_version"]), ("request id", r["request_id"] or "—"),
        ("customer", r["customer_id"] or "—"), ("explored", "yes" if r["explored"] else "no"),
        ("fallback", "yes" if r["fallback"] else "no"), ("took", f"{r['took_ms']:.2f} ms"),
        ("reward window", badge(f"closes {when(d.closes_at)}", "") if not d.closed else state),
        ("joined reward", num(d.reward)),
    ], cls="facts")
    shown = table(["slot", "offer", "probability", "reward", "revenue"],
                  [(o.slot, o.offer_id, num(o.probability), num(o.reward), num(o.revenue, 2)) for o in d.shown],
                  "nothing was shown")
    candidates = table(["offer", "policy probability"],
                       [(offer, num(p)) for offer, p in sorted(d.candidates, key=lambda c: -c[1])], "no candidates")
    events = table(["received", "type", "offer", "value", "event id", "counted"],
                   [(when(at), ev.type, ev.offer_id or "—", num(ev.value, 2), ev.event_id,
                     "yes" if inside else "late (after the window)") for at, ev, inside in d.events],
                   "no outcome events for this decision")
    feats = table(["feature", "value"], sorted((k, v) for k, v in d.features.items()), "no features logged")
    if d.events_cut_at is not None:
        events += (f'<p class="error" data-testid="events-cut">Outcome events read only up to {when(d.events_cut_at)}'
                   " (the JetStream read cap, or NATS did not answer): later events are not listed.</p>")
    return (f'<section data-testid="decision-detail"><h2>Decision {h(r["decision_id"])} {state}</h2>{facts}'
            f"<h2>Shown offers</h2>{shown}<h2>Outcome events</h2>{events}"
            f'<h2>Candidates</h2>{candidates}<h2>Features</h2><div data-testid="features">{feats}</div></section>')


async def explorer(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    decision_id = request.query_params.get("id", "").strip()[:_MAX_ID]
    if decision_id:
        detail = await asyncio.to_thread(dash.outcomes.decision, decision_id)
        if detail is None:
            body = (_search(decision_id) + f'<p class="error" data-testid="not-found">No logged decision has id '
                    f"<code>{h(decision_id)}</code>.</p>")
            return page("Decision explorer", body, "/dashboard/decisions", session.csrf, status=404)
        return page("Decision explorer", _search(decision_id) + _detail(detail), "/dashboard/decisions",
                    session.csrf)
    recent = await asyncio.to_thread(dash.outcomes.recent, 25)
    rows = [(link(i, url("/dashboard/decisions", id=i)), when(ts), p, v, ", ".join(shown))
            for i, ts, p, v, shown in recent]
    body = _search("") + "<h2>Newest decisions</h2>" + table(
        ["decision id", "served at", "placement", "model version", "shown"], rows, "no decisions logged yet")
    return page("Decision explorer", body, "/dashboard/decisions", session.csrf)
