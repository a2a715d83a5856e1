"""The load-test report: one self-contained HTML file, readable offline, charts drawn here as SVG.

Owns :func:`render_report` and :func:`write_report`. No script, font or style is fetched from anywhere:
the page carries its CSS, its inline SVG charts (latency over time, the percentile curve, throughput)
and the whole result as JSON in ``<script type="application/json" id="kassa-loadtest-data">`` so a
program (or a test) can read the numbers back from the file it was given. The charts use log scales
for latency because a stall and a sub-millisecond median belong on the same picture.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kassa.atomicfile import write_atomic
from kassa.loadtest.hist import MIN_BEYOND

DATA_ID = "kassa-loadtest-data"
_PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#0891b2", "#ca8a04", "#db2777", "#475569"]
_W, _H = 860, 300
_M = {"l": 64, "r": 18, "t": 18, "b": 44}


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _fmt_ms(v: float | None) -> str:
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v / 1000:,.2f} s"
    if v >= 100:
        return f"{v:,.0f} ms"
    if v >= 10:
        return f"{v:,.1f} ms"
    return f"{v:,.2f} ms"


def _fmt_num(v: float | None, nd: int = 1) -> str:
    return "–" if v is None else f"{v:,.{nd}f}"


# --------------------------------------------------------------------------- scales
def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    e = math.floor(math.log10(lo))
    while 10**e <= hi * 1.0001:
        for m in (1, 2, 5):
            v = m * 10**e
            if lo <= v <= hi * 1.0001:
                ticks.append(v)
        e += 1
    if len(ticks) > 9:
        ticks = [t for t in ticks if str(t).lstrip("0.").startswith("1")]
    return ticks


def _lin_ticks(hi: float, n: int = 5) -> list[float]:
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(hi / step) + 2) if i * step <= hi * 1.0001 + step * 0.5]


def _tick_label_ms(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g} s"
    return f"{v:g} ms"


class _Chart:
    """A small SVG line/bar chart with a linear x axis and a log or linear y axis."""

    def __init__(self, chart_id: str, title: str, x_max: float, y_lo: float, y_hi: float, *, log_y: bool,
                 x_label: str, y_label: str, x_min: float = 0.0) -> None:
        self.id, self.title = chart_id, title
        self.x_min, self.x_max = x_min, max(x_max, x_min + 1e-9)
        self.log_y = log_y
        if log_y:
            y_lo = max(y_lo, 1e-3)
            self.y_lo = 10 ** math.floor(math.log10(y_lo))
            self.y_hi = 10 ** math.ceil(math.log10(max(y_hi, self.y_lo * 10)))
        else:
            self.y_lo, self.y_hi = 0.0, max(y_hi * 1.08, 1.0)
        self.x_label, self.y_label = x_label, y_label
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []

    def x(self, v: float) -> float:
        pw = _W - _M["l"] - _M["r"]
        return _M["l"] + (v - self.x_min) / (self.x_max - self.x_min) * pw

    def y(self, v: float) -> float:
        ph = _H - _M["t"] - _M["b"]
        if self.log_y:
            v = min(max(v, self.y_lo), self.y_hi)
            f = (math.log10(v) - math.log10(self.y_lo)) / (math.log10(self.y_hi) - math.log10(self.y_lo))
        else:
            f = (v - self.y_lo) / (self.y_hi - self.y_lo)
        return _M["t"] + ph * (1 - f)

    def band(self, x0: float, x1: float, label: str) -> None:
        self.parts.append(
            f'<rect class="band" x="{self.x(x0):.1f}" y="{_M["t"]}" width="{max(0, self.x(x1) - self.x(x0)):.1f}" '
            f'height="{_H - _M["t"] - _M["b"]}" fill="#f1f5f9"/>'
            f'<text x="{self.x(x0) + 4:.1f}" y="{_M["t"] + 12}" class="note">{_esc(label)}</text>')

    def hline(self, v: float, color: str, label: str, left: bool = False) -> None:
        y = self.y(v)
        x, anchor = (_M["l"] + 6, "start") if left else (_W - _M["r"] - 4, "end")
        self.parts.append(
            f'<line class="target" x1="{_M["l"]}" x2="{_W - _M["r"]}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" '
            f'stroke-dasharray="6 4" stroke-width="1.5"/><text x="{x}" y="{y - 5:.1f}" '
            f'text-anchor="{anchor}" class="note" fill="{color}">{_esc(label)}</text>')

    def line(self, name: str, xs: Sequence[float], ys: Sequence[float | None], color: str, width: float = 2.0,
             dash: str = "") -> None:
        segs: list[list[str]] = [[]]
        for xv, yv in zip(xs, ys, strict=True):
            if yv is None or (self.log_y and yv <= 0):
                if segs[-1]:
                    segs.append([])
                continue
            segs[-1].append(f"{self.x(xv):.1f},{self.y(yv):.1f}")
        d = " ".join("M" + " L".join(s) for s in segs if s)
        extra = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<path class="series" data-name="{_esc(name)}" d="{d}" fill="none" stroke="{color}" '
                          f'stroke-width="{width}" stroke-linejoin="round"{extra}/>')
        self.legend.append((name, color, dash))

    def bars(self, name: str, xs: Sequence[float], ys: Sequence[float], color: str) -> None:
        w = max(1.0, (self.x(1) - self.x(0)) * 0.8)
        rects = "".join(
            f'<rect x="{self.x(xv) - w / 2:.1f}" y="{self.y(yv):.1f}" width="{w:.1f}" '
            f'height="{self.y(0) - self.y(yv):.1f}"/>'
            for xv, yv in zip(xs, ys, strict=True) if yv > 0
        )
        self.parts.append(f'<g class="series" data-name="{_esc(name)}" fill="{color}" opacity="0.75">{rects}</g>')
        self.legend.append((name, color, "bar"))

    def svg(self, x_ticks: list[tuple[float, str]]) -> str:
        grid = []
        yt = _log_ticks(self.y_lo, self.y_hi) if self.log_y else _lin_ticks(self.y_hi)
        for t in yt:
            y = self.y(t)
            lab = _tick_label_ms(t) if self.log_y else f"{t:,.0f}"
            grid.append(f'<line x1="{_M["l"]}" x2="{_W - _M["r"]}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                        f'<text x="{_M["l"] - 8}" y="{y + 4:.1f}" text-anchor="end" class="tick">{lab}</text>')
        for v, lab in x_ticks:
            x = self.x(v)
            grid.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_M["t"]}" y2="{_H - _M["b"]}" class="grid"/>'
                        f'<text x="{x:.1f}" y="{_H - _M["b"] + 16}" text-anchor="middle" class="tick">{lab}</text>')
        axes = (f'<line x1="{_M["l"]}" x2="{_W - _M["r"]}" y1="{_H - _M["b"]}" y2="{_H - _M["b"]}" class="axis"/>'
                f'<line x1="{_M["l"]}" x2="{_M["l"]}" y1="{_M["t"]}" y2="{_H - _M["b"]}" class="axis"/>'
                f'<text x="{(_W + _M["l"]) / 2:.0f}" y="{_H - 6}" text-anchor="middle" class="label">'
                f'{_esc(self.x_label)}</text>'
                f'<text transform="translate(14,{(_H - _M["b"] + _M["t"]) / 2:.0f}) rotate(-90)" text-anchor="middle" '
                f'class="label">{_esc(self.y_label)}</text>')
        legend = "".join(
            '<span class="key"><svg width="22" height="10">'
            + (f'<rect width="22" height="10" fill="{c}" opacity="0.75"/>' if d == "bar" else
               f'<line x1="0" x2="22" y1="5" y2="5" stroke="{c}" stroke-width="2.5"'
               + (f' stroke-dasharray="{d}"' if d else "") + "/>")
            + f"</svg>{_esc(n)}</span>"
            for n, c, d in self.legend
        )
        body = "".join(self.parts)
        return (f'<figure class="chart"><figcaption>{_esc(self.title)}<span class="legend">{legend}</span>'
                f'</figcaption><svg id="{_esc(self.id)}" viewBox="0 0 {_W} {_H}" role="img" '
                f'aria-label="{_esc(self.title)}">{"".join(grid)}{body}{axes}</svg></figure>')


def _time_ticks(span: float) -> list[tuple[float, str]]:
    step = next(s for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600) if span / s <= 10)
    return [(float(t), f"{t:g} s" if span < 180 else f"{t / 60:g} min") for t in range(0, int(span) + 1, step)]


# --------------------------------------------------------------------------- charts
def latency_chart(result: dict[str, Any]) -> str:
    tl, s = result["timeline"], result["summary"]
    xs = [t + 0.5 for t in tl["t"]]
    span = float(len(tl["t"]))
    vals = [v for k in ("p50_ms", "p99_ms", "max_ms") for v in tl[k] if v]
    slo = s["slo"]["p99_ms"]
    lo = min([*vals, slo]) if vals else 0.1
    hi = max([*vals, slo]) if vals else 10
    ch = _Chart("chart-latency", "Latency over time (per second, by intended send time)", span, lo, hi, log_y=True,
                x_label="time since start", y_label="latency")
    if s["ramp_s"]:
        ch.band(0, s["ramp_s"], "ramp")
    ch.line("max", xs, tl["max_ms"], "#94a3b8", 1.2)
    ch.line("p99", xs, tl["p99_ms"], _PALETTE[1])
    ch.line("p50", xs, tl["p50_ms"], _PALETTE[0])
    ch.hline(slo, "#dc2626", f"SLO P99 {_fmt_ms(slo)}")
    return ch.svg(_time_ticks(span))


def _pct_x(p: float) -> float:
    return math.log10(1.0 / (1.0 - p / 100.0)) if p < 100 else math.inf


def percentile_chart(result: dict[str, Any]) -> str:
    curves, s = result["curves"], result["summary"]
    finite = [_pct_x(p) for c in curves.values() for p, _ in c if p < 100]
    x_max = max(2.0, math.ceil(max(finite) if finite else 2.0) + 0.25)
    vals = [v for c in curves.values() for _, v in c if v > 0]
    slo = s["slo"]["p99_ms"]
    ch = _Chart("chart-percentiles", "Latency by percentile (steady window, HDR histograms)", x_max,
                min([*vals, slo]) if vals else 0.1, max([*vals, slo]) if vals else 10, log_y=True,
                x_label="percentile", y_label="latency")
    names = ["all", *sorted(k for k in curves if k != "all")]
    if len(names) == 2:  # one request type: its curve is the "all" curve
        names = ["all"]
    for i, name in enumerate(names):
        pts = curves.get(name) or []
        xs = [min(_pct_x(p), x_max) for p, _ in pts]
        ys: list[float | None] = [v for _, v in pts]
        ch.line(name, xs, ys, "#0f172a" if name == "all" else _PALETTE[(i - 1) % len(_PALETTE)],
                2.6 if name == "all" else 1.6)
    ch.hline(slo, "#dc2626", f"SLO P99 {_fmt_ms(slo)}", left=True)  # the curves rise to the right
    labels = {0: "0%", 1: "90%", 2: "99%", 3: "99.9%", 4: "99.99%", 5: "99.999%", 6: "99.9999%"}
    ticks = [(float(k), v) for k, v in labels.items() if k <= x_max]
    return ch.svg(ticks)


def throughput_chart(result: dict[str, Any]) -> str:
    tl = result["timeline"]
    xs = [t + 0.5 for t in tl["t"]]
    span = float(len(tl["t"]))
    hi = max([*tl["asked"], *tl["answered"], 1])
    ch = _Chart("chart-throughput", "Throughput (requests per second)", span, 0, hi, log_y=False,
                x_label="time since start", y_label="requests/s")
    if result["summary"]["ramp_s"]:
        ch.band(0, result["summary"]["ramp_s"], "ramp")
    ch.bars("errors", xs, tl["errors"], "#dc2626")
    ch.line("asked (schedule)", xs, tl["asked"], "#64748b", 1.5, "5 4")
    ch.line("answered 2xx", xs, tl["answered"], _PALETTE[2])
    return ch.svg(_time_ticks(span))


# --------------------------------------------------------------------------- page
_CSS = """
:root{--fg:#0f172a;--muted:#64748b;--line:#e2e8f0;--bg:#f8fafc;--card:#fff;--pass:#15803d;--fail:#b91c1c;--warn:#b45309}
*{box-sizing:border-box}body{margin:0;background:var(--bg);color:var(--fg);
font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:940px;margin:0 auto;padding:28px 20px 48px}
header h1{font-size:22px;margin:0 0 4px}header p{margin:0;color:var(--muted)}
.verdict{display:flex;gap:16px;align-items:center;border-radius:10px;padding:14px 18px;margin:20px 0 8px;
background:var(--card);border:1px solid var(--line);border-left:6px solid var(--pass)}
.verdict.fail{border-left-color:var(--fail)}.verdict .pill{font-weight:700;font-size:18px;letter-spacing:.04em;
color:#fff;background:var(--pass);border-radius:6px;padding:4px 12px}.verdict.fail .pill{background:var(--fail)}
.verdict .why{color:var(--fg)}.invalid{background:#fffbeb;border:1px solid #fcd34d;color:var(--warn);
border-radius:8px;padding:10px 14px;margin:8px 0}
.kpis{display:grid;grid-template-columns:repeat(4,1fr);gap:10px;margin:16px 0}
.kpi{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 14px}
.kpi .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.kpi .v{font-size:22px;font-weight:650;font-variant-numeric:tabular-nums}.kpi .s{color:var(--muted);font-size:12px}
.chart{background:var(--card);border:1px solid var(--line);border-radius:10px;margin:14px 0;padding:12px 12px 4px}
figcaption{font-weight:600;margin:0 0 6px 6px;display:flex;justify-content:space-between;flex-wrap:wrap;gap:8px}
.legend{font-weight:400;color:var(--muted);font-size:12px}.key{margin-left:12px;white-space:nowrap}
.key svg{vertical-align:middle;margin-right:4px}
svg text{font:11px system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
.grid{stroke:#eef2f7}.axis{stroke:#94a3b8}.tick{fill:#64748b}.label{fill:#475569;font-size:12px}
.note{fill:#64748b;font-size:11px;paint-order:stroke;stroke:#fff;stroke-width:3px;stroke-linejoin:round}
h2{font-size:16px;margin:26px 0 8px}table{border-collapse:collapse;width:100%;background:var(--card);
border:1px solid var(--line);border-radius:10px;overflow:hidden;font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;border-bottom:1px solid var(--line);text-align:right}th{background:#f1f5f9;font-weight:600}
td:first-child,th:first-child{text-align:left}tr:last-child td{border-bottom:0}
.two{display:grid;grid-template-columns:1fr 1fr;gap:14px}code{font-size:12px;background:#f1f5f9;padding:1px 4px;
border-radius:4px}.small{color:var(--muted);font-size:12px}footer{margin-top:28px;color:var(--muted);font-size:12px}
"""


def _clean(obj: Any) -> Any:
    """NaN/inf -> null, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv(rows: list[tuple[str, Any]]) -> str:
    return _table(["", ""], [[k, v] for k, v in rows]).replace("<thead><tr><th></th><th></th></tr></thead>", "")


def render_report(result: dict[str, Any]) -> str:
    """The whole report page as a string."""
    s = result["summary"]
    g, idle, server = s["generator"], s["idle_connections"], s["server"]
    fail = s["verdict"] != "PASS"
    kpis = [
        ("Asked rate", f"{_fmt_num(s['asked_rate'])}/s", f"{s['schedule']} schedule"),
        ("Achieved", f"{_fmt_num(s['achieved_rate'])}/s", "2xx responses per second"),
        ("P50", _fmt_ms(s["p50_ms"]), f"P90 {_fmt_ms(s['p90_ms'])}"),
        ("P99", _fmt_ms(s["p99_ms"]), f"SLO {_fmt_ms(s['slo']['p99_ms'])}"),
        ("P99.9", _fmt_ms(s["p999_ms"]), f"max {_fmt_ms(s['max_ms'])}"),
        ("Errors", f"{s['errors']:,}",
         f"{s['error_rate']:.3%} of {s['requests']:,} (SLO {s['slo']['error_rate']:.2%})"),
        ("Generator lag P99", _fmt_ms(g["send_lag_ms"]["p99_ms"]), f"limit {_fmt_ms(g['lag_limit_ms'])}"),
        ("Idle connections", f"{idle['min_held']:,}" if idle["asked"] else "–",
         f"held of {idle['asked']:,} asked" if idle["asked"] else "none asked"),
    ]
    kpi_html = "".join(f'<div class="kpi"><div class="k">{_esc(k)}</div><div class="v">{_esc(v)}</div>'
                       f'<div class="s">{_esc(sub)}</div></div>' for k, v, sub in kpis)
    # A sample too small for the SLO's percentile says what to do itself; the generator's advice does not fit it.
    invalid = "".join(f'<div class="invalid"><b>Run invalid.</b> {_esc(r)}'
                      + ("" if "latencies in the measured window" in r else
                         " — the latencies above describe the generator, not the server; rerun with more --workers "
                         "or on a less loaded machine.") + "</div>"
                      for r in s["invalid_reasons"])
    def pct(v: dict[str, Any], key: str) -> str:  # † : fewer than MIN_BEYOND latencies beyond it
        return _fmt_ms(v[f"{key}_ms"]) + (" †" if key in v.get("thin_percentiles", ()) else "")

    by_type = _table(
        ["request type", "requests", "errors", "P50", "P90", "P99", "P99.9", "max"],
        [[t, f"{v['requests']:,}", f"{v['errors']:,}", pct(v, "p50"), pct(v, "p90"), pct(v, "p99"), pct(v, "p999"),
          _fmt_ms(v["max_ms"])] for t, v in s["by_type"].items()],
    )
    if any(v.get("thin_percentiles") for v in s["by_type"].values()):
        by_type += (f'<p class="small" data-testid="thin-percentiles">† fewer than {MIN_BEYOND} of the type\'s '
                    "latencies lie beyond this percentile: it is the slowest few of a small sample, not the "
                    "type's tail (its curve above stops at the percentile its sample supports, 1 - 1/n); run "
                    "longer for a stable figure.</p>")
    took = server["took_ms"]
    server_rows = [["decision took_ms (in the response)", f"{s['by_type'].get('decision', {}).get('requests', 0):,}",
                    _fmt_ms(took["p50"]), _fmt_ms(took["p99"]), _fmt_ms(took["max"])]]
    metrics = server["metrics"]
    if metrics.get("available"):
        for h in metrics["histograms"]:
            server_rows.append([h["metric"], f"{h['count']:,}", _fmt_ms(h["p50_ms"]), _fmt_ms(h["p99_ms"]),
                                f"mean {_fmt_ms(h['mean_ms'])}"])
    server_html = _table(["server-side timing", "count", "P50", "P99", "max / mean"], server_rows)
    counters = metrics.get("counters", {}) if metrics.get("available") else {}
    counters_html = (_table(["/metrics counter", "change during the run"],
                            [[k, f"{v:,.0f}"] for k, v in list(counters.items())[:24]])
                     if counters else '<p class="small">/metrics was not available.</p>')
    errors_html = (_table(["error kind", "count"], [[k, f"{v:,}"] for k, v in s["errors_by_kind"].items()])
                   if s["errors_by_kind"] else '<p class="small">No errors in the steady window.</p>')
    first = "".join(f"<li><code>{_esc(k)}</code>: {_esc(v)}</li>" for k, v in list(s["first_errors"].items())[:8])
    gen_rows = [
        ("generator processes", g["workers"]),
        ("send lag P50 / P99 / P99.9 / max",
         " / ".join(_fmt_ms(g["send_lag_ms"][k]) for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms"))),
        ("CPU per request sent", f"{_fmt_num(g['cpu_us_per_request'])} µs"),
        ("CPU use per process", ", ".join(f"{u:.0%}" for u in g["cpu_util_per_worker"] if u is not None)),
        ("peak requests in flight or queued", f"{g['max_outstanding']:,}"),
        ("connections that failed to open", f"{g.get('pool_connect_errors', 0):,}"),
        ("open-file limit (soft / hard)", f"{g['fd_limit']['soft']:,} / {g['fd_limit']['hard']:,}"),
    ]
    idle_rows = [
        ("asked", f"{idle['asked']:,}"), ("open and answered at start", f"{idle['opened_at_start']:,}"),
        ("lowest held during the run", f"{idle['min_held']:,}"), ("held at the end", f"{idle['held_at_end']:,}"),
        ("seconds to open", _fmt_num(idle["seconds_to_open"], 2)),
        ("closed by the server / reopened", f"{idle['closed_by_server']:,} / {idle['reopened']:,}"),
        ("keep-alive refreshes (failed)", f"{idle['refresh_requests']:,} ({idle['refresh_failed']:,})"),
        ("failures", "; ".join(f"{k}: {v:,}" for k, v in idle["failed"].items()) or "none"),
    ]
    slo = s["slo"]
    profile_rows = [
        ("profile", f"{s['profile']}" + (f" ({s['profile_source']})" if s["profile_source"] else "")),
        ("rate", s["rate_derivation"]),
        ("mix (share of requests)", ", ".join(f"{k} {v:.1%}" for k, v in s["mix"].items())),
        ("window", f"{s['ramp_s']:g} s ramp + {s['duration_s']:g} s measured"),
        ("SLO", f"P99 ≤ {_fmt_ms(slo['p99_ms'])}, errors ≤ {slo['error_rate']:.2%}, throughput ≥ "
                f"{slo['min_throughput_ratio']:.0%} of scheduled"
                + "".join(f", {k.replace('_ms', '').upper()} ≤ {_fmt_ms(slo[k])}"
                          for k in ("p50_ms", "p999_ms", "max_ms") if slo.get(k))),
    ]
    m = s["machine"]
    machine_rows = [("target", s["url"]), ("started", s["started_at"]),
                    ("generator machine", f"{m['cpu']} ({m['cores']} cores), {m['platform']}, Python {m['python']}"),
                    ("load average (1 min) at start / end", f"{m['loadavg_1m']} / {m.get('loadavg_1m_end')}")]
    warnings = "".join(f"<li>{_esc(w)}</li>" for w in s["warnings"])
    data = json.dumps(_clean({k: v for k, v in result.items() if k != "raw"}), separators=(",", ":"),
                      allow_nan=False, default=str)
    # JSON escapes, so no byte of the data can close the script element or look like markup.
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = f"Kassa load test — {s['profile']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{_esc(title)}</title><style>{_CSS}</style></head>
<body><main>
<header><h1>{_esc(title)}</h1>
<p>{_esc(s['url'])} · {_esc(s['started_at'])} · {s['asked_rate']:,.1f} requests/s asked for {s['duration_s']:g} s
after a {s['ramp_s']:g} s ramp · open loop, latency from each request's intended send time</p></header>
<section class="verdict{' fail' if fail else ''}" id="verdict" data-verdict="{_esc(s['verdict'])}">
<span class="pill">{_esc(s['verdict'])}</span><span class="why">{_esc(s['verdict_reason'])}</span></section>
{invalid}
<section class="kpis">{kpi_html}</section>
{latency_chart(result)}
{percentile_chart(result)}
{throughput_chart(result)}
<h2>By request type (steady window)</h2>{by_type}
<h2>Server-side timings</h2>
<p class="small">From the server itself: each decision's <code>took_ms</code>, and the histograms and counters of
<code>/metrics</code> scraped before and after the run (bucket-estimated percentiles). Client latency minus
server time is the network, the HTTP stack and any queueing in front of the handler.</p>
{server_html}
<h2>Server counters during the run</h2>{counters_html}
<h2>Errors</h2>{errors_html}{f'<ul class="small">{first}</ul>' if first else ''}
<div class="two"><div><h2>Generator</h2>{_kv(gen_rows)}</div>
<div><h2>Idle keep-alive connections</h2>{_kv(idle_rows)}</div></div>
<h2>Profile and SLO</h2>{_kv(profile_rows)}
<h2>Run</h2>{_kv(machine_rows)}
{f'<h2>Warnings</h2><ul class="small">{warnings}</ul>' if warnings else ''}
<footer>Generated by <code>kassa loadtest</code>. Requests were sent on a {s['schedule']} schedule whatever the
server did; each latency runs from the time the request was <em>meant</em> to go out, so a stalled server
cannot hide its stall. The run is valid only if the generator kept its schedule (send lag P99 within
{_fmt_ms(g['lag_limit_ms'])}). The numbers are in the JSON block <code>#{DATA_ID}</code> of this file.</footer>
</main>
<script type="application/json" id="{DATA_ID}">{data}</script>
</body></html>
"""


def write_report(result: dict[str, Any], path: str | Path) -> Path:
    """Write `render_report` to ``path``, whole or not at all (`kassa.atomicfile`): a stop or a full disk
    mid-write leaves the previous report."""
    return write_atomic(path, render_report(result))


def read_report_data(text: str) -> dict[str, Any]:
    """The JSON block of a report page (for tests and tools)."""
    marker = f'<script type="application/json" id="{DATA_ID}">'
    start = text.index(marker) + len(marker)
    end = text.index("</script>", start)
    data: dict[str, Any] = json.loads(text[start:end])
    return data
