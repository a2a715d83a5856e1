"""Dashboard pages that read: the overview, one placement's reward and models, feature freshness."""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from starlette.requests import Request
from starlette.responses import Response

from kassa import errors
from kassa.api.dashboard.charts import bar_chart, line_chart
from kassa.api.dashboard.outcomes import Tally
from kassa.api.dashboard.render import Markup, badge, card, h, link, ms, num, page, paged, pct, table, url, when
from kassa.api.dashboard.session import Session
from kassa.api.dashboard.traffic import read_traffic
from kassa.learn.registry import ModelVersion
from kassa.learn.rollout import gate_status
from kassa.monitor.drift.config import SEVERITY_RANK

if TYPE_CHECKING:
    from kassa.api.dashboard.state import Dashboard
    from kassa.app import Kassa

THROUGHPUT_SECONDS = 3600.0  # the overview's charts cover the last hour of the decision log
WINDOW_SECONDS = 24 * 3600.0  # the reward tables and the learning curve cover the last day of decisions
CHART_OFFERS = 12  # the placement page charts the reward of this many of the most-shown offers
_SEVERITY = {"ok": "good", "warn": "warn", "alert": "bad"}  # the badge class of each drift severity


def throughput_series(bucket: float, series: list[tuple[float, float, float, float, float]], now: float
                      ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[tuple[float, float]]]]:
    """The overview's two charts as lines: decisions/s and fallbacks/s (one axis, one unit), P50 and P99 ms."""
    counted = {t: (r, fb) for t, r, fb, _, _ in series}
    # a bucket without decisions is a zero, not a gap the line would bridge
    starts = [series[0][0] + i * bucket for i in range(int((now - series[0][0]) // bucket) + 1)] if series else []
    rates = [(t, counted.get(t, (0.0, 0.0))) for t in starts]
    # fallbacks as a rate, not a share: a share (0..1) on the decisions/s axis is a flat line at the bottom
    rate = {"decisions/s": [(t, r) for t, (r, _) in rates], "fallbacks/s": [(t, r * fb) for t, (r, fb) in rates]}
    latency = {"P50": [(t, p50) for t, _, _, p50, _ in series], "P99": [(t, p99) for t, _, _, _, p99 in series]}
    return rate, latency


def _throughput_charts(bucket: float, series: list[tuple[float, float, float, float, float]]) -> str:
    """Decisions/s and server decision time over the last hour, from the decision log."""
    rate, latency = throughput_series(bucket, series, time.time())
    return ('<section class="charts">'
            + line_chart(rate, f"Decisions per second, last hour ({bucket:g} s buckets)", "decision log",
                         width=560)
            + line_chart(latency, "Decision time (ms, server side)", "decision log", width=560)
            + "</section>")


def rate_span(seconds: float) -> str:
    """What the decisions/s card averages over: a minute between frequent reads, longer on a first or rare
    visit (it said "last minute" after an hour without a read, over a rate that had long gone to zero)."""
    if seconds <= 90:
        return "last minute"
    if seconds < 5400:
        return f"average over the last {seconds / 60:.0f} min"
    return f"average over the last {seconds / 3600:.1f} h"



def _drift_badge(dash: Dashboard, placement: str) -> Markup:
    report = dash.kassa.drift.last_reports.get(placement)
    if report is None:
        return badge("not checked yet", "muted")
    if not report.rows:  # nothing was compared (no reference yet): "ok" would claim a check that did not happen
        return badge("nothing to compare yet", "muted")
    return badge(report.severity, _SEVERITY.get(report.severity, ""))


def redact_url(raw: str) -> str:
    """A backend URL without its password (``redis://:***@host:6379/0``), for pages an operator may share."""
    try:
        parts = urlsplit(raw)
        if parts.password is None:
            return raw
        user = parts.username or ""
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6
        port = f":{parts.port}" if parts.port is not None else ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "(unparsable URL)"


def _breaker_badge(breaker: Any) -> Markup:
    state = getattr(breaker, "state", "closed")
    return badge("available" if state == "closed" else f"circuit {state}", "good" if state == "closed" else "bad")


def system_rows(kassa: Kassa) -> list[tuple[Any, ...]]:
    """This process's backends and their state, from what it holds (no round trip): component, backend, where,
    status, detail. What a process on another host sees may differ; each serving worker answers for itself."""
    st = kassa.settings
    rows: list[tuple[Any, ...]] = []
    bus = kassa.bus
    if bus is not None:
        depth = bus.spool_depth
        if bus.spooling or depth:
            status = badge("spooling", "warn")
        else:
            status = badge("connected", "good") if bus.connected else badge("disconnected", "bad")
        rows.append(("Events and decision records", "NATS JetStream", redact_url(st.events.nats_url), status,
                     f"prefix {st.events.prefix}; {depth:,} acknowledged and waiting in the local spool"))
    else:
        rows.append(("Events and decision records", "SQLite (embedded)", str(st.data_path / "events.db"),
                     badge("local", "good"), "decision log: Parquet under the data directory"))
    redis = kassa.state.redis
    if redis is not None:
        dropped = kassa.metrics.dropped_state_writes()
        rows.append(("Per-buyer state", "Redis", redact_url(st.state.redis_url),
                     badge("available", "good") if redis.available else badge("unavailable: fallback", "bad"),
                     f"key prefix {st.state.key_prefix}; {dropped:,} writes of served decisions given up"))
    else:
        rows.append(("Per-buyer state", "embedded", str(st.data_path / "state.db"), badge("local", "good"),
                     "profiles, caps, idempotency and open decisions journaled locally"))
    if st.features.online_store == "redis":
        breaker = getattr(kassa.store, "breaker", None)
        rows.append(("Online feature store", "Redis", redact_url(st.features.redis_url), _breaker_badge(breaker),
                     f"key prefix {st.features.key_prefix}; streaming views: {st.features.streaming}"))
    else:
        rows.append(("Online feature store", "in process", str(st.data_path), badge("local", "good"),
                     "snapshotted under the data directory"))
    engine, feed = kassa.db, kassa.changes
    if feed.listens:  # PostgreSQL: LISTEN/NOTIFY, counters re-read every recheck_seconds
        status = badge("listening", "good") if feed.listening else badge("not listening: re-reading", "warn")
    else:
        status = badge("local", "good")
    rows.append(("Metadata (catalog, keys, registries)", engine.dialect.name,
                 engine.url.render_as_string(hide_password=True), status,
                 f"changes: {feed.checks:,} checks, {feed.failures:,} failed, every {feed.interval:g} s"
                 + (" and on NOTIFY" if feed.listens else "")))
    learner = {"inprocess": "in this process", "child": "a child process of the supervisor",
               "external": "a separate `kassa learn`"}.get(st.roles.learner, st.roles.learner)
    does = {"all": "serves and learns", "serve": "serves only", "learn": "learns only"}.get(kassa.role, kassa.role)
    rows.append(("Learner", learner, f"lease: {st.roles.lease}", badge(f"this process {does}", ""),
                 f"{kassa.learning.learned:,} examples learned by this process"))
    rows.append(("This process", f"pid {os.getpid()}", str(st.data_path), badge("ready" if kassa.ready else
                 "starting", "good" if kassa.ready else "warn"), f"up since {when(kassa.started_at or None)}"))
    return rows


async def overview(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    kassa = dash.kassa
    traffic = read_traffic(kassa.metrics.registry, dash.meter, kassa.started_at or dash.started)
    cards = "".join([
        card("Decisions / s", f"{traffic.per_second:,.1f}", rate_span(traffic.per_second_over), "kpi-rate"),
        card("P50 decision time", ms(traffic.quantile(0.5)), "server side", "kpi-p50"),
        card("P99 decision time", ms(traffic.quantile(0.99)), "server side", "kpi-p99"),
        card("Fallback share", pct(traffic.fallback_share), f"{traffic.fallbacks:,} of {traffic.decisions:,}",
             "kpi-fallback"),
        card("Error share", pct(traffic.error_share),
             f"{sum(traffic.problems.values()):,} problem responses, 5xx {pct(traffic.server_error_share)}",
             "kpi-errors"),
        card("Decisions served", f"{traffic.decisions:,}", f"since {when(kassa.started_at or dash.started)}",
             "kpi-total"),
    ])
    bucket, series = await asyncio.to_thread(dash.outcomes.throughput, time.time() - THROUGHPUT_SECONDS)
    logged = await asyncio.to_thread(kassa.event_log.count)  # blocking (on JetStream a request to the bus)
    rows = []
    for placement_id in kassa.catalog.snapshot.placements:
        t = traffic.placements.get(placement_id)
        serving = kassa.models.serving(placement_id)
        production = serving.production.version if serving and serving.production else None
        canary = (f"{serving.canary.version} ({pct(serving.canary_share)})"
                  if serving and serving.canary else "—")
        rows.append((link(placement_id, url("/dashboard/placements", placement_id)),
                     num(t.decisions if t else 0), ms(t.quantile(0.5) if t else None),
                     ms(t.quantile(0.99) if t else None), pct(t.fallback_share if t else None),
                     production or "baseline", canary, _drift_badge(dash, placement_id)))
    errors_rows = sorted(traffic.problems.items())
    body = (f'<section class="cards">{cards}</section>'
            + _throughput_charts(bucket, series)
            + "<h2>Placements</h2>"
            + table(["placement", "decisions", "P50", "P99", "fallback", "production", "canary", "drift"], rows,
                    "no placements in the catalog")
            + "<h2>System</h2>"
            + table(["component", "backend", "where", "status", "detail"], system_rows(kassa))
            + "<h2>Problem responses</h2>"
            + table(["HTTP status", "responses"], [(s, num(n)) for s, n in errors_rows], "none")
            + f'<p class="muted">Learning: {num(kassa.learning.learned)} joined examples this process; '
            f'{num(len(kassa.joiner))} decisions waiting for their reward window; '
            f'{num(logged)} events logged.</p>')
    return page("Overview", body, "/dashboard", session.csrf, refresh=5)


async def placement(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    kassa = dash.kassa
    placement_id = request.path_params["placement_id"]
    view = kassa.catalog.snapshot.placements.get(placement_id)
    if view is None:
        raise errors.NotFound(f"unknown placement {placement_id!r}")
    now = time.time()
    stats = (await asyncio.to_thread(dash.outcomes.placements, now - WINDOW_SECONDS, now=now)).get(placement_id)
    versions = await asyncio.to_thread(kassa.model_registry.versions, placement_id, None, 50)
    history = await asyncio.to_thread(kassa.model_registry.history, placement_id, None, 30)
    p = view.placement
    reward = p.reward
    intro = (f'<p>Policy <b>{h(p.policy)}</b>, {h(p.slots)} slot(s), {h(len(view.static_offers))} eligible '
             f'offers; reward window {h(reward.wait_seconds if reward else "—")} s. '
             f'{link("Edit this placement", url("/dashboard/placements", placement_id, "edit"))}</p>')
    # ---- reward by model version and by offer
    by_version = sorted((stats.by_version if stats else {}).items())
    version_rows = [(v, num(t.decisions), num(t.open), num(t.reward_rate), num(t.revenue_per_1000, 2))
                    for v, t in by_version]
    by_offer = most_shown(stats.by_offer if stats else {})
    offer_rows = [(o, num(t.decisions), num(t.open), num(t.reward_rate), num(t.revenue_per_1000, 2))
                  for o, t in by_offer]
    offer_rows_shown, offer_pager = paged(offer_rows, request.query_params, "offers", "offers")
    curve = {v: [(x, y) for x, y, _ in pts] for v, pts in (stats.curve if stats else {}).items()}
    bucket = int(stats.bucket_seconds) if stats else 60
    learned = [(mv.created_at, float(mv.rows)) for mv in versions if mv.source == "online"]
    body = (intro
            + '<h2>Reward by model version</h2><div data-testid="reward-by-version">'
            + table(["model version", "closed decisions", "open", "reward / decision", "revenue / 1,000 decisions"],
                    version_rows, "no decisions logged in the last day") + "</div>"
            + '<h2>Reward by offer</h2><div data-testid="reward-by-offer">'
            + table(["offer", "impressions", "open", "reward / impression", "revenue / 1,000 impressions"],
                    offer_rows_shown, "no impressions logged in the last day") + offer_pager + "</div>"
            + bar_chart(sorted(((o, t.reward_rate or 0.0) for o, t in by_offer[:CHART_OFFERS]), key=lambda b: -b[1]),
                        f"Reward per impression, the {min(CHART_OFFERS, len(by_offer))} most-shown offers"
                        if by_offer else "Reward per impression")
            + "<h2>Learning curve</h2>"
            + line_chart(curve, f"Reward per decision, {bucket} s buckets", "by serving model version", width=1000)
            + line_chart({"examples learned": learned}, "Examples learned by the online learner",
                         "at each registered snapshot", width=1000)
            + '<p class="muted">Decisions of the last 24 hours (the newest 100,000), joined here with their '
            "events from the decision and event logs using today's reward definition; orders attributed by "
            "customer (no decision_id) are counted by the learner only.</p>"
            + _events_cut(stats.events_cut_at if stats else None, dash.outcomes.max_events)
            + _canary(dash, placement_id)
            + "<h2>Evaluations and gate decisions</h2>" + _evaluations(versions)
            + "<h2>Stage history</h2>"
            + table(["when", "version", "from", "to", "actor", "reason"],
                    [(when(e.at), e.version, e.from_stage or "—", e.to_stage, e.actor, e.reason) for e in history],
                    "no stage changes yet")
            + "<h2>Drift</h2>" + _drift(dash, placement_id))
    return page(f"Placement {placement_id}", body, "/dashboard/placements", session.csrf)


def most_shown(by_offer: dict[str, Tally]) -> list[tuple[str, Tally]]:
    """Offers by impressions, most first (ties: higher reward first, then id). Ranked by reward per impression,
    an offer shown once and accepted once (1.000) topped the table and the chart over offers with hundreds of
    impressions: noise in first place."""
    return sorted(by_offer.items(), key=lambda kv: (-kv[1].decisions, -(kv[1].reward_rate or 0.0), kv[0]))


def _events_cut(cut_at: float | None, max_events: int) -> str:
    """The note when the event log was not read to its end (JetStream: the read cap, or NATS unreachable)."""
    if cut_at is None:
        return ""
    return (f'<p class="error" data-testid="events-cut">Outcome events read only up to {when(cut_at)} (at most '
            f"{max_events:,} events are read from the JetStream events stream per page, or NATS did not answer): "
            "rewards of decisions whose window ends after that are undercounted.</p>")


def _canary(dash: Dashboard, placement_id: str) -> str:
    serving = dash.kassa.models.serving(placement_id)
    rows = []
    if serving is not None:
        for role, model, share in (("production", serving.production, None),
                                   ("canary", serving.canary, serving.canary_share),
                                   ("shadow", serving.shadow, None)):
            if model is not None:
                rows.append((badge(role, "good" if role == "production" else "warn"), model.version,
                             pct(share) if share is not None else ("rest" if role == "production" else "0% (scored)"),
                             num(model.meta.get("learned")) if model.meta else "—"))
    breaches = [b for b in dash.kassa.learning.rollbacks if b.placement == placement_id]
    refused = (dash.kassa.learning.sync.refused if dash.kassa.learning.sync else {}).get(placement_id)
    out = ('<h2>Canary vs production</h2><div data-testid="canary">'
           + table(["role", "version", "traffic share", "examples learned"], rows,
                   "no model serves: the baseline policy answers") + "</div>")
    if breaches:
        out += "<h3>Guardrail rollbacks</h3>" + table(["version", "reason"],
                                                     [(b.version, b.reason) for b in breaches])
    if refused:
        out += f'<p class="error">Registry sync refused: {h(refused)}</p>'
    return out


def _evaluations(versions: list[ModelVersion]) -> str:
    """Each version's last `kassa evaluate` and what the promotion gate makes of it (`gate_status`)."""
    rows = []
    for mv in versions:
        evaluation = mv.metrics.get("evaluation")
        if isinstance(evaluation, dict):
            passed, why = gate_status(mv)
            verdict = badge("passed", "good") if passed else badge("failed", "bad")
            estimate = evaluation.get("candidate_estimate") or {}
            base = evaluation.get("baseline_estimate") or {}
            detail = (f"{evaluation.get('estimator', '')}: {num(estimate.get('value'))} "
                      f"(low {num(estimate.get('ci_low'))}) vs production {num(base.get('value'))}; {why}")
        else:
            verdict, detail = badge("not evaluated", "muted"), "—"
        rows.append((mv.version, badge(mv.stage, "good" if mv.stage == "production" else ""), mv.source,
                     num(mv.rows), verdict, detail, when(mv.created_at)))
    return (table(["version", "stage", "source", "rows", "gate", "evaluation", "registered"], rows,
                  "no model versions registered")
            + '<p class="muted">Production needs a passing <code>kassa evaluate</code> (or a forced promotion, '
            "recorded in the history below); the online learner's own snapshots publish as configured by "
            "<code>learn.auto_publish</code>.</p>")


def _drift(dash: Dashboard, placement_id: str) -> str:
    report = dash.kassa.drift.last_reports.get(placement_id)
    every = dash.kassa.settings.learn.drift_check_seconds
    if report is None:
        return f'<p class="muted" data-testid="drift">Not checked yet (the check runs every {h(every)} s).</p>'
    # worst first, as `kassa drift` prints them; a p-value in significant digits (7e-9 is not 0.000)
    ordered = sorted(report.rows, key=lambda r: (-SEVERITY_RANK.get(r.severity, 0), r.group, r.kind, r.feature))
    rows = [(r.feature, r.kind, num(r.statistic), "—" if r.p_value is None else f"{r.p_value:.3g}",
             badge(r.severity, _SEVERITY.get(r.severity, "")), num(r.reference_n), num(r.live_n)) for r in ordered]
    return (f'<p data-testid="drift">Checked {h(when(report.checked_at))}: {_drift_badge(dash, placement_id)} '
            f"({h(report.reference_n)} reference vs {h(report.live_n)} live decisions)</p>"
            + table(["feature", "statistic", "value", "p", "severity", "reference n", "live n"], rows))


async def features(dash: Dashboard, request: Request, session: Session, form: dict[str, str]) -> Response:
    kassa = dash.kassa
    defaults: dict[str, int] = {}
    for metric in kassa.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "kassa_feature_defaults_total":
                defaults[s.labels["view"]] = defaults.get(s.labels["view"], 0) + int(s.value)
    decisions = sum(t.decisions for t in read_traffic(kassa.metrics.registry, dash.meter,
                                                       kassa.started_at or dash.started).placements.values())
    rows = []
    for v in kassa.repo.views:
        n = defaults.get(v.name, 0)
        share = n / decisions if decisions else None
        state = badge("ok", "good") if not n else badge("stale or missing rows served", "warn" if (share or 0) < 0.2
                                                                                          else "bad")
        rows.append((v.name, v.kind, v.entity, v.ttl or "none", v.freshness_target, num(n), pct(share), state))
    body = ('<p>A row older than its view\'s TTL, or missing, is served as the defaults; the count below is '
            "how often that happened in this process.</p>"
            + table(["view", "kind", "entity", "TTL", "freshness target", "defaults served", "per decision",
                     "state"], rows, "no feature views defined"))
    return page("Feature freshness", body, "/dashboard/features", session.csrf)
