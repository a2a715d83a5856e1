"""What the demo shows a person: the live panel, the headless progress line, the summary and a curl.

Pure rendering of `Scoreboard` figures with Rich; no simulation or HTTP here.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from kassa.demo.simulator import SLICE_PLACEMENT, SLICES
from kassa.demo.stats import Scoreboard, ratio

_LABEL = {"policy": "policy (learned)", "random": "random control", "static": "best static control"}


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _lift(x: float | None) -> str:
    return "-" if x is None else f"×{x:.2f}"


def _interval(ci: list[float] | None) -> str:
    return "" if ci is None else f" (95 % {_lift(ci[0])}-{_lift(ci[1])})"


COLD_START_NOTE = (
    "this window is the whole run, the policy's cold start included: it starts from nothing, explores, and at the "
    "demo's speed its models follow rewards ~1-2 s (over a thousand checkouts) behind; compare over the last "
    "5,000 of a longer run (the default 20,000 checkouts)")


def live_panel(board: Scoreboard, url: str, seed: int, shares: dict[str, float]) -> RenderableType:
    done, total = board.done, board.total
    dps = board.decisions_per_s()
    s50, s99, c50, c99 = board.window_latency()
    head = Table.grid(padding=(0, 2))
    head.add_row(ProgressBar(total=total, completed=done, width=40),
                 Text(f"{done:,} / {total:,} checkouts", style="bold"),
                 Text(f"{dps:,.0f} decisions/s"), Text(f"{board.elapsed():.0f} s"))
    lat = Text.assemble(("latency  ", "bold"), f"server p50 {s50:.2f} ms  p99 {s99:.2f} ms   ",
                        f"client p50 {c50:.2f} ms  p99 {c99:.2f} ms")

    window, overall = board.window_rates(), board.overall_rates()
    table = Table(title=f"accepts per checkout (last {board.window:,} checkouts · whole run)",
                  title_justify="left", expand=False)
    table.add_column("slice")
    table.add_column("share", justify="right")
    table.add_column("window", justify="right")
    table.add_column("overall", justify="right")
    table.add_column("policy ×", justify="right")
    for s in SLICES:
        pol = window["policy"].rate
        table.add_row(_LABEL[s], f"{shares[s]:.0%}", _rate(window[s].rate), _rate(overall[s]),
                      "" if s == "policy" else _lift(ratio(pol, window[s].rate)))
    explored = board.window_explored()
    model = Text.assemble(("model serving  ", "bold"), board.model_version, "   explored ",
                          "-" if explored is None else f"{explored:.0%}", f"   fallbacks {board.fallbacks}")
    return Panel(Group(head, lat, table, model), title=f"Kassa demo · seed {seed} · {url}", border_style="cyan")


def progress_line(board: Scoreboard) -> str:
    w = board.window_rates()
    s50, s99, _, _ = board.window_latency()
    return (f"[kassa demo] {board.done:,}/{board.total:,} checkouts, {board.decisions_per_s():,.0f}/s, "
            f"reward policy {_rate(w['policy'].rate)} random {_rate(w['random'].rate)} "
            f"static {_rate(w['static'].rate)}, server p50 {s50:.2f} ms p99 {s99:.2f} ms, "
            f"model {board.model_version}")


def summary_table(result: dict[str, Any]) -> Table:
    last = result["last_window"]
    table = Table(title=f"Kassa demo: {result['checkouts']:,} checkouts in {result['seconds']:.1f} s "
                        f"({result['decisions_per_s']:,.0f} decisions/s), seed {result['seed']}\n"
                        f"accepts per checkout over the last {last:,} checkouts; expected: the true mean"
                        " of what was shown; overall: the whole run",
                  title_justify="left")
    table.add_column("slice")
    table.add_column("placement")
    table.add_column("n", justify="right")
    table.add_column("rate", justify="right")
    table.add_column("expected", justify="right")
    table.add_column("overall", justify="right")
    rows = (("policy", "policy_reward_rate", "policy_expected_rate"),
            ("random", "random_reward_rate", "random_expected_rate"),
            ("static", "best_static_reward_rate", "best_static_expected_rate"))
    for s, key, expected in rows:
        table.add_row(s, SLICE_PLACEMENT[s], f"{result['slice_checkouts'][s]:,}", _rate(result[key]),
                      _rate(result[expected]), _rate(result[f"{key}_overall"]))
    lines = [
        f"policy lift: {_lift(result['lift_vs_random'])}{_interval(result.get('lift_vs_random_95'))} vs random, "
        f"{_lift(result['lift_vs_static'])}{_interval(result.get('lift_vs_static_95'))} vs best static",
        f"server p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms · "
        f"client p50 {result['client_p50_ms']:.2f} ms p99 {result['client_p99_ms']:.2f} ms",
        f"production model {result['model_version']} · explored {result['explored_share']:.0%} of policy decisions",
    ]
    if result.get("window_is_whole_run"):
        lines.append(COLD_START_NOTE)
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table


def curl_example(url: str, key: str, body: dict[str, Any]) -> str:
    payload = json.dumps(body, separators=(",", ":"))
    return (f"curl -s {url}/v1/decisions \\\n  -H {shlex.quote('Authorization: Bearer ' + key)} \\\n"
            f"  -H 'Content-Type: application/json' \\\n  -d {shlex.quote(payload)}")
