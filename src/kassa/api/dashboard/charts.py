"""Inline SVG charts for the dashboard: a line chart over time and horizontal bars.

Server-rendered, no chart library, no script: the page's Content-Security-Policy allows neither inline
scripts nor inline styles, so colours and sizes are SVG presentation attributes. Every label passes
through `html.escape` (offer ids and model versions come from operators and the API).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from html import escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")
# past the palette, lines repeat its colours with a dash pattern: a placement's learning curve has a line per
# model version, and its 9th ("all versions" after 8 versions) was drawn exactly like the 1st
DASHES = ("", "7 4", "2 3", "9 3 2 3")


def series_style(i: int) -> tuple[str, str]:
    """(colour, stroke-dasharray) of the i-th line: distinct for the first len(PALETTE) * len(DASHES) lines."""
    return PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out = []
    v = start
    while v <= hi + step * 1e-9:
        out.append(round(v, 10))
        v += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}".rstrip("0").rstrip(".")
    return f"{v:.3f}".rstrip("0").rstrip(".")


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, y_label: str = "",
               width: int = 640, height: int = 220, y_min: float | None = 0.0) -> str:
    """Lines of (unix time, value) per series name, with time on the x axis and a legend."""
    points = [p for pts in series.values() for p in pts]
    label = escape(title)
    if not points:
        return (f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {width} 60" width="{width}" '
                f'height="60"><text x="8" y="34" fill="#6b7280" font-size="13">{label}: no data yet</text></svg>')
    left, right, top, bottom = 56, 12, 26, 34
    # the legend wraps: place its items first, then grow the chart by its extra rows
    legend: list[tuple[float, int]] = []
    lx, row = float(left), 0
    for name in series:
        item = 24 + 7 * min(len(name), 28)
        if lx + item > width - right and lx > left:
            lx, row = float(left), row + 1
        legend.append((lx, row))
        lx += item
    extra = 14 * row
    height += extra
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    if x1 == x0:
        x0, x1 = x0 - 30, x1 + 30
    lo = min(p[1] for p in points) if y_min is None else min(y_min, min(p[1] for p in points))
    hi = max(p[1] for p in points)
    if hi == lo:
        hi = lo + 1
    hi += (hi - lo) * 0.08
    pw, ph = width - left - right, height - top - bottom - extra

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - lo) / (hi - lo) * ph

    parts = [f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{left}" y="16" font-size="13" font-weight="600" fill="#111827">{label}</text>']
    if y_label:
        parts.append(f'<text x="{width - right}" y="16" font-size="11" fill="#6b7280" text-anchor="end">'
                     f'{escape(y_label)}</text>')
    for t in _ticks(lo, hi):
        y = sy(t)
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" fill="#6b7280" '
                     f'text-anchor="end">{_fmt(t)}</text>')
    for i, anchor in enumerate(("start", "middle", "middle", "end")):
        x = x0 + (x1 - x0) * i / 3
        parts.append(f'<text x="{sx(x):.1f}" y="{top + ph + 16}" font-size="11" fill="#6b7280" '
                     f'text-anchor="{anchor}">{_clock(x)}{" UTC" if i == 3 else ""}</text>')
    parts.append(f'<line x1="{left}" x2="{width - right}" y1="{top + ph}" y2="{top + ph}" stroke="#9ca3af"/>')
    for i, (name, pts) in enumerate(series.items()):
        color, dash = series_style(i)
        dashed = f' stroke-dasharray="{dash}"' if dash else ""
        pts = sorted(pts)
        if len(pts) == 1:
            parts.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{color}"/>')
        elif pts:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dashed}/>')
        lx, row = legend[i]
        ly = top + ph + 22 + 14 * row
        swatch = (f'<line x1="{lx}" x2="{lx + 11}" y1="{ly + 5}" y2="{ly + 5}" stroke="{color}" stroke-width="3"'
                  f'{dashed}/>' if dash else f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{color}"/>')
        parts.append(f'{swatch}<text x="{lx + 14}" y="{ly + 9}" font-size="11" fill="#374151">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(bars: list[tuple[str, float]], title: str, width: int = 640, unit: str = "") -> str:
    """Horizontal bars, one per (label, value), longest label first in the given order."""
    label = escape(title)
    if not bars:
        return (f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {width} 60" width="{width}" '
                f'height="60"><text x="8" y="34" fill="#6b7280" font-size="13">{label}: no data yet</text></svg>')
    row, left, top = 22, 170, 26
    height = top + row * len(bars) + 8
    hi = max(max(v for _, v in bars), 1e-9)
    pw = width - left - 70
    parts = [f'<svg class="chart" role="img" aria-label="{label}" viewBox="0 0 {width} {height}" '
             f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="8" y="16" font-size="13" font-weight="600" fill="#111827">{label}</text>']
    for i, (name, value) in enumerate(bars):
        y = top + i * row
        w = max(0.0, value) / hi * pw
        shown = name if len(name) <= 24 else name[:23] + "…"
        parts.append(f'<text x="{left - 8}" y="{y + 14}" font-size="12" fill="#374151" text-anchor="end">'
                     f'{escape(shown)}</text>'
                     f'<rect x="{left}" y="{y + 3}" width="{w:.1f}" height="14" fill="{PALETTE[0]}"/>'
                     f'<text x="{left + w + 6:.1f}" y="{y + 14}" font-size="12" fill="#111827">'
                     f'{_fmt(value)}{escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)
