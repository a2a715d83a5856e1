"""Reports of an off-policy evaluation (`kassa.learn.offline.ope.Evaluation`): a plain-text table, a self-contained
HTML page and a PNG plot.

The table is a Rich ``Table`` (one row per policy and estimator: estimate, interval, standard error,
effective sample size). The plot draws, per estimator, each policy's point estimate with its confidence
interval as a horizontal bar — the logged policy's on-policy interval shaded behind as the reference —
and under them the distribution of each policy's importance weights. The same matplotlib figure is
written as PNG and inlined as SVG in the HTML, so the two never disagree; the HTML also embeds the full
evaluation as JSON (``<script type="application/json" id="kassa-ope-data">``, read back with
`read_report_data`) so tools and tests need not scrape it.

matplotlib is imported only when a figure is drawn, keeping ``kassa`` start-up fast.
"""

from __future__ import annotations

import datetime as dt
import html
import io
import json
import math
import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kassa.atomicfile import write_atomic
from kassa.learn.offline.ope import LOGGED, ON_POLICY, UNIFORM, Estimate, Evaluation, GateResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DATA_ID = "kassa-ope-data"
SCHEMA = 1
ESTIMATOR_TITLES = {"ips": "IPS", "snips": "Self-normalised IPS", "dr": "Doubly robust", ON_POLICY: "On-policy mean",
                    "pseudo_inverse": "Pseudo-inverse (slate)", "slot_dr": "Per-slot doubly robust (slate)",
                    "slot_ips": "Per-slot IPS (slate)"}
ESTIMATOR_SHORT = {"ips": "IPS", "snips": "SNIPS", "dr": "DR", "pseudo_inverse": "PI (slate)",
                   "slot_dr": "slot DR (slate)", "slot_ips": "slot IPS (slate)",
                   ON_POLICY: "on-policy mean"}
# Colour-blind-safe (Okabe–Ito) colours for target policies in order; the logged policy is always slate,
# because it is the reference every other bar is read against.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9")
LOGGED_COLOR = "#4B5563"
INK, MUTED, GRID = "#111827", "#6B7280", "#E5E7EB"
PASS_COLOR, FAIL_COLOR = "#047857", "#B91C1C"


def _f(x: float | None, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}" if x == 0 or abs(x) >= 10 ** -(digits - 1) else f"{x:.{digits - 1}g}"


def _colors(evaluation: Evaluation) -> dict[str, str]:
    out: dict[str, str] = {}
    targets = [p for p in evaluation.policies if p != LOGGED]
    for i, name in enumerate(targets):
        out[name] = PALETTE[i % len(PALETTE)]
    out[LOGGED] = LOGGED_COLOR
    return out


def _subtitle(evaluation: Evaluation) -> str:
    parts = [f"n = {evaluation.n:,} logged decisions", f"{evaluation.level:.0%} intervals ({evaluation.method})"]
    if evaluation.max_weight is not None:
        parts.append(f"weights clipped at {evaluation.max_weight:g}")
    return " · ".join(parts)


def _interval(est: Estimate) -> str:
    """``[low, high]``, or ``n/a`` for an undefined estimate (the HTML table read ``[n/a, n/a]``)."""
    return f"[{_f(est.ci_low)}, {_f(est.ci_high)}]" if est.defined else "n/a"


def _policy_label(name: str) -> str:
    return {LOGGED: "logged (on-policy)", UNIFORM: "uniform random"}.get(name, name)


# ---------------------------------------------------------------------------------------------- table


def estimates_table(evaluation: Evaluation, *, title: str | None = None, gate: GateResult | None = None) -> Table:
    """One row per policy and estimator; the logged policy's single row is its observed mean."""
    table = Table(title=Text(title or "Off-policy evaluation"), caption=_subtitle(evaluation), title_justify="left",
                  caption_justify="left", header_style="bold")
    level = f"{evaluation.level:.0%} CI"
    for name, justify in (("policy", "left"), ("estimator", "left"), ("estimate", "right"), (level, "right"),
                          ("std err", "right"), ("ESS", "right"), ("ESS %", "right")):
        # A version cut to "order_confi…" would read the same as the other one: fold it onto a second line.
        table.add_column(name, justify=justify, overflow="fold" if name == "policy" else "ellipsis")  # type: ignore[arg-type]
    names = list(evaluation.policies)
    for i, name in enumerate(names):
        pe = evaluation.policies[name]
        items = list(pe.estimates.items())
        for j, (key, est) in enumerate(items):
            ess_pct = f"{est.ess / est.n:.1%}" if est.n and math.isfinite(est.ess) and key != ON_POLICY else ""
            interval = _interval(est)
            # Text objects, not strings: "[...]" would otherwise be read as Rich markup.
            table.add_row(
                Text(_policy_label(name) if j == 0 else ""), ESTIMATOR_SHORT.get(key, key), _f(est.value),
                Text(interval), _f(est.std_error), f"{est.ess:,.0f}", ess_pct,
                end_section=j == len(items) - 1 and i < len(names) - 1,
            )
    if gate is not None:
        table.caption = Text(f"{table.caption}\ngate {'PASSED' if gate.passed else 'BLOCKED'}: {gate.reason}")
    return table


def render_text(evaluation: Evaluation, *, title: str | None = None, gate: GateResult | None = None,
                width: int = 100) -> str:
    """The table as plain text (no colour codes), for logs, files and ``kassa evaluate`` without a TTY."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False, record=True)
    console.print(estimates_table(evaluation, title=title, gate=gate))
    return console.export_text()


# ----------------------------------------------------------------------------------------------- data


def report_data(evaluation: Evaluation, *, title: str | None = None, gate: GateResult | None = None) -> dict[str, Any]:
    """Everything the report shows, JSON-ready (this is what the HTML embeds)."""
    return {
        "schema": SCHEMA, "title": title or "Off-policy evaluation",
        "generated_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "evaluation": evaluation.to_dict(), "gate": gate.to_dict() if gate is not None else None,
    }


def read_report_data(page: str) -> dict[str, Any]:
    """The JSON a report page embeds (inverse of the ``<script id="kassa-ope-data">`` in `render_html`)."""
    m = re.search(rf'<script type="application/json" id="{DATA_ID}">(.*?)</script>', page, re.S)
    if m is None:
        raise ValueError(f"no <script id={DATA_ID!r}> in this page; is it a Kassa OPE report?")
    data: dict[str, Any] = json.loads(m.group(1))
    return data


# --------------------------------------------------------------------------------------------- figure


def _style_axes(ax: Axes) -> None:
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_color("#9CA3AF")
    ax.tick_params(colors=MUTED, labelsize=8.5, length=3)
    ax.tick_params(axis="y", length=0, colors=INK, labelsize=9.5)
    ax.set_axisbelow(True)


def _interval_panel(ax: Axes, evaluation: Evaluation, estimator: str, colors: dict[str, str],
                    xlim: tuple[float, float]) -> None:
    names = list(evaluation.policies)
    ax.set_title(ESTIMATOR_TITLES.get(estimator, estimator), loc="left", fontsize=10.5, color=INK,
                 fontweight="bold", pad=6)
    ax.grid(axis="x", color=GRID, linewidth=0.8)
    logged = evaluation.policies.get(LOGGED)
    ref = logged.get(ON_POLICY) if logged is not None else None
    if ref is not None and ref.defined:
        ax.axvspan(ref.ci_low, ref.ci_high, color=LOGGED_COLOR, alpha=0.09, linewidth=0, zorder=0)
        ax.axvline(ref.value, color=LOGGED_COLOR, linewidth=0.8, linestyle=(0, (3, 3)), zorder=1)
    span = xlim[1] - xlim[0]
    for y, name in enumerate(names):
        est = evaluation.policies[name].get(estimator)
        color = colors[name]
        if est is None or not est.defined:
            ax.text(xlim[0] + 0.02 * span, y, "not estimated" if est is None else "undefined (no overlap)",
                    va="center", ha="left", fontsize=8.5, color=MUTED, style="italic",
                    bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
            continue
        ax.plot([est.ci_low, est.ci_high], [y, y], color=color, linewidth=2.6, solid_capstyle="butt", zorder=3)
        ax.plot([est.ci_low, est.ci_high], [y, y], linestyle="none", marker="|", markersize=10,
                markeredgewidth=1.6, color=color, zorder=3)
        ax.plot([est.value], [y], marker="o", markersize=7.5, color=color, markeredgecolor="white",
                markeredgewidth=1.4, zorder=4)
        ax.annotate(_f(est.value, 3), (est.value, y), xytext=(0, 7.5), textcoords="offset points", ha="center",
                    va="bottom", fontsize=8, color=INK,
                    bbox={"boxstyle": "round,pad=0.12", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
    ax.set_yticks(range(len(names)), [_policy_label(n) for n in names])
    ax.set_ylim(len(names) - 0.45, -0.75)
    ax.set_xlim(*xlim)


def _common_xlim(evaluation: Evaluation, estimators: list[str]) -> tuple[float, float]:
    bounds: list[float] = []
    for pe in evaluation.policies.values():
        for key in estimators:
            est: Estimate | None = pe.get(key)
            if est is not None and est.defined:
                bounds += [est.ci_low, est.ci_high]
    if not bounds:
        return (0.0, 1.0)
    lo, hi = min(bounds), max(bounds)
    pad = (hi - lo) * 0.08 or max(abs(hi), 1e-3) * 0.1
    return (lo - pad, hi + pad)


def _bin_label(exp: int) -> str:
    return f"{2 ** exp:g}" if exp >= 0 else f"1/{2 ** -exp}"


def _weights_panel(ax: Axes, evaluation: Evaluation, colors: dict[str, str]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title("Importance weights  w = target / logged probability", loc="left", fontsize=10.5, color=INK,
                 fontweight="bold", pad=6)
    summaries = {n: p.weights for n, p in evaluation.policies.items() if p.weights is not None}
    if not summaries:
        ax.text(0.5, 0.5, "no target policies", ha="center", va="center", transform=ax.transAxes, color=MUTED)
        ax.set_axis_off()
        return
    # Show only the occupied range of bins (always including w = 1, the on-policy weight).
    occupied = [e for s in summaries.values() for e, c in zip(s.hist_exponents, s.hist_counts, strict=True) if c]
    exps = list(range(min([0, *occupied]), max([0, *occupied]) + 1))
    labels = ["0", *(_bin_label(e) for e in exps)]
    width = 0.8 / len(summaries)
    for i, (name, s) in enumerate(summaries.items()):
        by_exp = dict(zip(s.hist_exponents, s.hist_counts, strict=True))
        counts = [s.zero_count, *(by_exp.get(e, 0) for e in exps)]
        shares = [100.0 * c / evaluation.n for c in counts]
        xs = [k - 0.4 + width * (i + 0.5) for k in range(len(labels))]
        label = (f"{_policy_label(name)}: ESS {s.ess_fraction:.1%} · mean w {_f(s.mean, 3)} · max {_f(s.max, 3)}"
                 + (f" · {s.clipped:,} clipped" if s.clipped else ""))
        ax.bar(xs, shares, width=width * 0.92, color=colors[name], label=label, zorder=3)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_xlabel("weight bin [w, 2w)  (the first bin after 0 also holds smaller weights)", fontsize=8.5,
                  color=MUTED)
    ax.set_ylabel("share of rows (%)", fontsize=8.5, color=MUTED)
    ax.grid(axis="y", color=GRID, linewidth=0.8)
    ax.tick_params(axis="y", colors=MUTED, labelsize=8.5)
    top = max(max(100.0 * c / evaluation.n for c in (s.zero_count, *s.hist_counts)) for s in summaries.values())
    # Ticks only up to the tallest bar; the headroom above is for the legend, so it never covers a bar.
    ticks = [v for v in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(0, top) if v <= top * 1.05]
    ax.set_yticks(ticks)
    ax.set_ylim(0, max(top, 1e-9) * (1.3 + 0.09 * len(summaries)))
    ax.legend(loc="upper left", fontsize=8.5, frameon=False, labelcolor=INK, handlelength=1.2)


def figure(evaluation: Evaluation, *, title: str | None = None, gate: GateResult | None = None,
           header: bool = True) -> Figure:
    """The report figure: one interval panel per estimator over a weight-distribution histogram.

    ``header`` draws the title, the sample line and the gate verdict above the panels (the PNG wants
    them; the HTML page has its own)."""
    from matplotlib.figure import Figure

    estimators = [e for e in evaluation.estimators
                  if any(e in p.estimates for p in evaluation.policies.values())] or [ON_POLICY]
    colors = _colors(evaluation)
    npol = len(evaluation.policies)
    gate_lines = _gate_lines(gate)
    head_h = ((GATE_TOP_PT + GATE_LINE_PT * len(gate_lines) + 2) / 72 if gate_lines else 0.5) if header else 0.0
    top_h = 0.95 + 0.5 * npol
    fig = Figure(figsize=(11.5, head_h + top_h + 3.0), dpi=100, facecolor="white", layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1, w_pad=0.1, hspace=0.05, wspace=0.04)  # type: ignore[call-arg, union-attr]
    ratios = [head_h, top_h, 3.0] if header else [top_h, 3.0]
    grid = fig.add_gridspec(len(ratios), len(estimators), height_ratios=ratios)
    row = 1 if header else 0
    if header:
        _header(fig.add_subplot(grid[0, :]), evaluation, title, gate, gate_lines)
    xlim = _common_xlim(evaluation, estimators)
    first: Axes | None = None
    for k, est in enumerate(estimators):
        ax = fig.add_subplot(grid[row, k], sharey=first) if first is not None else fig.add_subplot(grid[row, k])
        first = first or ax
        _style_axes(ax)
        _interval_panel(ax, evaluation, est, colors, xlim)
        if k:
            ax.tick_params(axis="y", labelleft=False)
        ax.set_xlabel("estimated reward per decision", fontsize=8.5, color=MUTED)
    hax = fig.add_subplot(grid[row + 1, :])
    _style_axes(hax)
    _weights_panel(hax, evaluation, colors)
    return fig


GATE_WRAP = 100  # characters a line: the verdict starts right of the panels' labels, and ran past the PNG's edge
SUBTITLE_TOP_PT, GATE_TOP_PT, GATE_LINE_PT = 25, 40, 14  # below the header's top; a line of the verdict


def _gate_lines(gate: GateResult | None) -> list[str]:
    if gate is None:
        return []
    return textwrap.wrap(f"Promotion gate {'passed' if gate.passed else 'blocked'}: {gate.reason}", GATE_WRAP)


def _header(header: Axes, evaluation: Evaluation, title: str | None, gate: GateResult | None,
            gate_lines: list[str]) -> None:
    # An empty axes rather than figure text, so constrained layout reserves room for it; each line is placed in
    # points below its top, so a verdict on two lines does not run into the line above it.
    header.set_axis_off()

    def line(text: str, below_pt: float, **kw: Any) -> None:
        header.annotate(text, xy=(0.0, 1.0), xycoords="axes fraction", xytext=(0, -below_pt),
                        textcoords="offset points", ha="left", va="top", **kw)

    line(title or "Off-policy evaluation", 0, fontsize=13.5, fontweight="bold", color=INK)
    line(_subtitle(evaluation) + "  ·  shaded band: the logged policy's own interval", SUBTITLE_TOP_PT, fontsize=9,
         color=MUTED)
    if gate is not None:
        line("\n".join(gate_lines), GATE_TOP_PT, fontsize=9.5, fontweight="bold",
             color=PASS_COLOR if gate.passed else FAIL_COLOR, linespacing=1.25)


def _svg(fig: Figure) -> str:
    import matplotlib as mpl

    buf = io.StringIO()
    # Text stays text (searchable, small); ids are salted deterministically so pages diff cleanly.
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": "kassa-ope"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def write_png(evaluation: Evaluation, path: str | Path, *, title: str | None = None, gate: GateResult | None = None,
              dpi: int = 150) -> Path:
    """Draw `figure` to a PNG file and return its path. Drawn in memory, then written under a temporary name and
    renamed: a Ctrl-C or SIGTERM while Matplotlib draws (tens of ms) leaves the previous file, not half a PNG."""
    buf = io.BytesIO()
    figure(evaluation, title=title, gate=gate).savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------- html

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#111827;margin:0;
background:#F9FAFB}
main{max-width:1180px;margin:0 auto;padding:28px 24px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 10px}
.sub{color:#6B7280;margin:0 0 18px}
.gate{padding:12px 16px;border-radius:8px;font-weight:600;margin:0 0 18px;border:1px solid}
.gate.pass{background:#ECFDF5;color:#047857;border-color:#A7F3D0}
.gate.fail{background:#FEF2F2;color:#B91C1C;border-color:#FECACA}
figure{margin:0;background:#fff;border:1px solid #E5E7EB;border-radius:8px;padding:8px}
figure svg{width:100%;height:auto;display:block}
figcaption{padding:0 8px 4px}
table{border-collapse:collapse;background:#fff;border:1px solid #E5E7EB;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:6px 10px;border-bottom:1px solid #F3F4F6;text-align:right;white-space:nowrap}
th{background:#F3F4F6;font-weight:600}
td.l,th.l{text-align:left}
tr.first td{border-top:1px solid #D1D5DB}
.dot{display:inline-block;width:10px;height:10px;border-radius:50%;margin-right:6px;vertical-align:baseline}
.note{color:#6B7280;font-size:12.5px;margin-top:8px}
"""


def _rows_html(evaluation: Evaluation, colors: dict[str, str]) -> str:
    rows = []
    for name, pe in evaluation.policies.items():
        for j, (key, est) in enumerate(pe.estimates.items()):
            policy = (f'<span class="dot" style="background:{colors[name]}"></span>{html.escape(_policy_label(name))}'
                      if j == 0 else "")
            ess_pct = f"{est.ess / est.n:.1%}" if key != ON_POLICY and math.isfinite(est.ess) else ""
            rows.append(
                f'<tr class="{"first" if j == 0 else ""}" data-policy="{html.escape(name)}" '
                f'data-estimator="{html.escape(key)}"><td class="l">{policy}</td>'
                f'<td class="l">{html.escape(ESTIMATOR_TITLES.get(key, key))}</td><td>{_f(est.value)}</td>'
                f"<td>{_interval(est)}</td><td>{_f(est.std_error)}</td>"
                f"<td>{est.ess:,.0f}</td><td>{ess_pct}</td></tr>"
            )
    return "\n".join(rows)


def _weights_html(evaluation: Evaluation, colors: dict[str, str]) -> str:
    rows = []
    for name, pe in evaluation.policies.items():
        s = pe.weights
        if s is None:
            continue
        rows.append(
            f'<tr data-policy="{html.escape(name)}"><td class="l"><span class="dot" style="background:{colors[name]}">'
            f"</span>{html.escape(_policy_label(name))}</td><td>{_f(s.mean, 3)}</td><td>{_f(s.max, 3)}</td>"
            f"<td>{s.ess:,.0f}</td><td>{s.ess_fraction:.1%}</td><td>{s.zero_count:,}</td><td>{s.clipped:,}</td></tr>"
        )
    return "\n".join(rows)


def render_html(evaluation: Evaluation, *, title: str | None = None, gate: GateResult | None = None) -> str:
    """A self-contained page: gate verdict, estimates table, the figure as inline SVG, weight diagnostics,
    and the data as JSON (`read_report_data`)."""
    head = title or "Off-policy evaluation"
    colors = _colors(evaluation)
    data = json.dumps(report_data(evaluation, title=title, gate=gate), separators=(",", ":"), allow_nan=False)
    # "</" inside a JSON string would end the <script> element early.
    data = data.replace("</", "<\\/")
    gate_html = ""
    if gate is not None:
        gate_html = (f'<p class="gate {"pass" if gate.passed else "fail"}">Promotion gate '
                     f'{"passed" if gate.passed else "blocked"}: {html.escape(gate.reason)}</p>')
    level = f"{evaluation.level:.0%} CI"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(head)}</title><style>{_CSS}</style></head>
<body><main>
<h1>{html.escape(head)}</h1>
<p class="sub">{html.escape(_subtitle(evaluation))} · mean observed reward {_f(evaluation.mean_reward)}</p>
{gate_html}
<figure>{_svg(figure(evaluation, title=title, gate=gate, header=False))}
<figcaption class="note">Dots: point estimates; bars: {level}s. Shaded band and dashed line: the logged
policy's own mean and interval, the reference the others are read against.</figcaption></figure>
<h2>Estimates</h2>
<table id="estimates"><thead><tr><th class="l">policy</th><th class="l">estimator</th><th>estimate</th>
<th>{level}</th><th>std err</th><th>ESS</th><th>ESS %</th></tr></thead><tbody>
{_rows_html(evaluation, colors)}
</tbody></table>
<p class="note">ESS: effective sample size of the importance weights, (Σw)²/Σw² — how many on-policy decisions
the reweighted log is worth. The logged policy's row is its observed mean reward.</p>
<h2>Importance weights</h2>
<table id="weights"><thead><tr><th class="l">policy</th><th>mean w</th><th>max w</th><th>ESS</th><th>ESS %</th>
<th>rows with w = 0</th><th>clipped</th></tr></thead><tbody>
{_weights_html(evaluation, colors)}
</tbody></table>
<p class="note">A mean weight far from 1 points at wrong logged propensities or at a policy choosing actions the
logger never offered.</p>
<script type="application/json" id="{DATA_ID}">{data}</script>
</main></body></html>
"""


def write_html(evaluation: Evaluation, path: str | Path, *, title: str | None = None,
               gate: GateResult | None = None) -> Path:
    """Write `render_html` to ``path`` (whole or not at all: `kassa.atomicfile`) and return it."""
    return write_atomic(path, render_html(evaluation, title=title, gate=gate))
