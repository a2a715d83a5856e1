"""``kassa loadtest`` (run one load test) and ``kassa loadtest plan`` (size a fleet for a profile).

Owns the Typer sub-app: options, the live Rich view on stderr while the generator runs, the summary
table, ``--report`` (HTML) and ``--json`` (one JSON object, last on stdout). Exit codes: 0 PASS,
1 FAIL (the server missed the SLO), 2 bad input (profile, URL, rejected pre-flight), 3 the run was
invalid (the generator fell behind; the verdict is FAIL and says so), 130 Ctrl-C (the requests sent until
then are summarised and reported, as an invalid run).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import msgspec
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from kassa.loadtest.hist import MIN_BEYOND
from kassa.loadtest.profiles import REQUEST_TYPES, Profile, ProfileError, default_profile, load_profile
from kassa.loadtest.runner import LoadTestError, RunConfig, RunInterrupted

loadtest_app = typer.Typer(
    help="Open-loop load tests against a Kassa deployment, with an honest report and a capacity plan.",
    add_completion=False,
)
err = Console(stderr=True)

EXIT_PASS, EXIT_FAIL, EXIT_INPUT, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

UrlOpt = Annotated[Optional[str], typer.Option("--url", help="Kassa base URL, http://host:port.")]  # noqa: UP045
ProfileOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--profile", "-p", help="Profile YAML file, or a built-in name (100k-checkouts-day, black-friday-peak, "
                            "7.5b-transactions-year).")]
KeyOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--key", envvar="KASSA_PUBLISHABLE_KEY", help="Publishable key for decisions and events.")]
SecretOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--secret-key", envvar="KASSA_SECRET_KEY", help="Secret key for feature pushes.")]
WebhookOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--webhook-secret", envvar="KASSA_WEBHOOK_SECRET",
    help="Shared secret that signs order webhooks (default: KASSA_INTEGRATIONS__<PLATFORM>__WEBHOOK_SECRET, "
         "the variable the server reads).")]
MixOpt = Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
    "--mix", help="Override a mix share, TYPE=SHARE (e.g. feature_push=0); repeatable.")]
WorkersOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--workers", min=1, max=64, help="Generator processes (default: one per 4,000 requests/s, at most the cores).")]
IdleOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--idle", min=0, help="Idle keep-alive connections to hold (default: the profile's).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="End the output with one JSON object.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the schedule and the payloads.")]
# Above 0: a timeout of 0 never timed out and -1 gave up on requests at random; a lag limit <= 0 made every run
# invalid.
TimeoutOpt = Annotated[float, typer.Option(min=0.001, help="Per-request timeout, seconds.")]
LagOpt = Annotated[Optional[float], typer.Option(  # noqa: UP045
    "--max-lag-ms", min=0.001,
    help="Generator send-lag P99 above this makes the run invalid (default: 5% of the SLO P99).")]


def _apply_mix(profile: Profile, overrides: list[str] | None) -> Profile:
    if not overrides:
        return profile
    mix = msgspec.to_builtins(profile.mix)
    for item in overrides:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in REQUEST_TYPES:
            raise ProfileError(f"--mix {item!r}: expected TYPE=SHARE with TYPE one of {', '.join(REQUEST_TYPES)}")
        try:
            share = float(value)
        except ValueError:
            raise ProfileError(f"--mix {item!r}: SHARE must be a number") from None
        if not math.isfinite(share) or share < 0:
            raise ProfileError(f"--mix {item!r}: SHARE must be a number >= 0")
        mix[name] = share
    data = msgspec.to_builtins(profile)
    data["mix"] = mix
    source = data.pop("source", "")
    from kassa.loadtest.profiles import parse_profile

    return parse_profile(data, source or "<profile>")


def _webhook_secret(given: str | None, prof: Profile) -> str | None:
    """The secret the server itself is configured with, when this shell has it and none was given."""
    if given:
        return given
    return os.environ.get(f"KASSA_INTEGRATIONS__{prof.payload.webhook.platform.upper()}__WEBHOOK_SECRET")


def _build_profile(profile: str | None, rate: float | None, duration: float | None,
                   mix: list[str] | None, schedule: str | None) -> Profile:
    if profile is None:
        if rate is None or duration is None:
            raise ProfileError("give --profile FILE, or both --rate and --duration (decisions only)")
        prof = default_profile(rate, duration)
    else:
        prof = load_profile(profile)
    prof = _apply_mix(prof, mix)
    if schedule is not None:
        if schedule not in ("fixed", "poisson"):
            raise ProfileError(f"--schedule must be fixed or poisson, got {schedule!r}")
        prof = msgspec.structs.replace(prof, schedule=schedule)
    return prof


def _check_report_path(path: Path) -> None:
    """Refuse a ``--report`` that cannot be written before the run starts: after it, the run was lost to a
    traceback (``IsADirectoryError``) and exit code 1, which reads as a FAIL."""
    if path.is_dir():
        raise LoadTestError(f"--report {path}: is a folder; give a file name, e.g. {path / 'report.html'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoadTestError(f"--report {path}: cannot create its folder {path.parent}: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise LoadTestError(f"--report {path}: not writable")


class _View:
    """The live terminal view: a time bar and the figures of the last few seconds."""

    def __init__(self, title: str) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=36),
                                 TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(), console=err)
        self.task = self.progress.add_task(title, total=1.0)
        self.line = Text("starting the generator…", style="dim")
        self.live = Live(Group(self.progress, self.line), console=err, refresh_per_second=4, transient=True)

    def update(self, snap: dict[str, Any]) -> None:
        if snap.get("phase") != "running":
            self.line = Text(f"{snap.get('phase', '')}: {snap.get('ready', 0)}/{snap.get('workers', '?')} "
                             f"generator processes ready", style="dim")
        else:
            self.progress.update(self.task, completed=min(1.0, snap["t"] / max(1e-9, snap["total"])))
            p50, p99 = snap["p50_ms"], snap["p99_ms"]
            behind = snap["behind_ms"]
            self.line = Text.assemble(
                (f"{snap['rate_now']:,.0f}/s  ", "bold"),
                (f"p50 {p50:,.1f} ms  " if p50 is not None else "p50 –  "),
                (f"p99 {p99:,.1f} ms  " if p99 is not None else "p99 –  ", "bold"),
                (f"errors {snap['errors']:,}  ", "red" if snap["errors"] else ""),
                (f"in flight {snap['outstanding']:,}  idle {snap['idle_held']:,}  "),
                (f"{'generator behind ' + format(behind, ',.0f') + ' ms' if behind > 5 else 'generator on time'}  ",
                 "yellow" if behind > 5 else "green"),
                (f"cpu {' '.join(f'{u:.0%}' for u in snap['cpu_util'])}", "dim"),
            )
        self.live.update(Group(self.progress, self.line))


def _summary_table(s: dict[str, Any]) -> Table:
    def ms(v: float | None) -> str:
        return "–" if v is None else f"{v:,.2f}"

    t = Table(title=f"{s['profile']}: {s['asked_rate']:,.1f}/s asked, {s['duration_s']:g} s measured",
              title_justify="left")
    for col in ("", "requests", "errors", "p50 ms", "p99 ms", "p99.9 ms", "max ms"):
        t.add_column(col, justify="left" if not col else "right")
    t.add_row("[bold]all", f"{s['requests']:,}", f"{s['errors']:,}", ms(s["p50_ms"]), ms(s["p99_ms"]),
              ms(s["p999_ms"]), ms(s["max_ms"]))
    thin = False
    for name, v in s["by_type"].items():
        marked = v.get("thin_percentiles", ())
        thin = thin or bool({"p50", "p99", "p999"} & set(marked))

        def pct(key: str, v: dict[str, Any] = v, marked: Any = marked) -> str:
            return ms(v[f"{key}_ms"]) + (" †" if key in marked else "")
        t.add_row(name, f"{v['requests']:,}", f"{v['errors']:,}", pct("p50"), pct("p99"), pct("p999"),
                  ms(v["max_ms"]))
    took = s["server"]["took_ms"]
    if took["p50"] is not None:
        t.add_row("[dim]server took_ms", "", "", ms(took["p50"]), ms(took["p99"]), ms(took["p999"]), ms(took["max"]))
    g = s["generator"]
    t.caption = (f"achieved {s['achieved_rate']:,.1f}/s; generator: {g['workers']} process(es), send lag p99 "
                 f"{ms(g['send_lag_ms']['p99_ms'])} ms (limit {g['lag_limit_ms']:g}), "
                 f"{g['cpu_us_per_request'] or 0:,.0f} µs CPU per request; idle connections held "
                 f"{s['idle_connections']['min_held']:,} of "
                 f"{s['idle_connections']['asked']:,}"
                 + (f"\n† fewer than {MIN_BEYOND} of the type's latencies lie beyond: its slowest few, not its tail"
                    if thin else ""))
    return t


@loadtest_app.callback(invoke_without_command=True)
def loadtest(
    ctx: typer.Context,
    url: UrlOpt = None,
    rate: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--rate", min=0.001, help="Requests/s in the measured window (default: the profile's peak).")] = None,
    duration: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--duration", min=0.1, help="Measured seconds (default: the profile's).")] = None,
    profile: ProfileOpt = None,
    report: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--report", help="Write the self-contained HTML report here.")] = None,
    json_out: JsonOpt = False,
    key: KeyOpt = None,
    secret_key: SecretOpt = None,
    webhook_secret: WebhookOpt = None,
    ramp: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--ramp", min=0, help="Ramp seconds before the measured window (default: the profile's).")] = None,
    schedule: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--schedule", help="fixed or poisson (default: the profile's).")] = None,
    mix: MixOpt = None,
    workers: WorkersOpt = None,
    idle: IdleOpt = None,
    timeout: TimeoutOpt = 5.0,
    seed: SeedOpt = 0,
    max_lag_ms: LagOpt = None,
) -> None:
    """Run an open-loop load test: `kassa loadtest --url URL --rate R --duration S` or `--profile FILE`."""
    if ctx.invoked_subcommand is not None:
        return
    if url is None:
        err.print("[red]--url is required[/] (e.g. --url http://127.0.0.1:8000); see `kassa loadtest --help`")
        raise typer.Exit(EXIT_INPUT)
    try:
        prof = _build_profile(profile, rate, duration, mix, schedule)
        cfg = RunConfig(url=url, profile=prof, rate=rate, duration=duration, ramp=ramp, workers=workers, key=key,
                        secret_key=secret_key, webhook_secret=_webhook_secret(webhook_secret, prof),
                        timeout=timeout, seed=seed, max_lag_ms=max_lag_ms, idle=idle)
        from kassa.loadtest.runner import parse_url

        parse_url(url)
        if report is not None:
            _check_report_path(report)
        result = _run_with_view(cfg, f"{prof.name} @ {cfg.steady_rate:,.0f}/s")
    except (RunInterrupted, KeyboardInterrupt) as exc:
        said = str(exc) or "interrupted before the measured window: nothing was measured"  # a bare Ctrl-C has no text
        err.print(f"[yellow]{said}[/]; no report")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (ProfileError, LoadTestError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_INPUT) from None
    s = result["summary"]
    err.print(_summary_table(s))
    colour = "green" if s["verdict"] == "PASS" else "red"
    err.print(f"[bold {colour}]{s['verdict']}[/]: {s['verdict_reason']}")
    for w in s["warnings"]:
        err.print(f"[yellow]warning:[/] {w}")
    if report is not None:
        from kassa.loadtest.report import write_report

        err.print(f"report: {write_report(result, report)}")
    if json_out:
        print(json.dumps(_json_safe(s), separators=(",", ":")), flush=True)
    if s["interrupted"]:
        raise typer.Exit(EXIT_INTERRUPTED)
    if not s["valid"]:
        raise typer.Exit(EXIT_INVALID)
    if s["verdict"] != "PASS":
        raise typer.Exit(EXIT_FAIL)


def _json_safe(obj: Any) -> Any:
    from kassa.loadtest.report import _clean

    return _clean(obj)


def _run_with_view(cfg: RunConfig, title: str) -> dict[str, Any]:
    from kassa.loadtest.runner import run_loadtest

    view = _View(title)
    with view.live:
        return run_loadtest(cfg, on_progress=view.update)


@loadtest_app.command("plan")
def plan(
    profile: Annotated[str, typer.Option("--profile", "-p", help="Profile YAML file or built-in name.")],
    url: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--url", help="Kassa base URL of ONE node, http://host:port (not with --measured).")] = None,
    measured: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--measured", help="Plan from a saved `bench/topology.py --json` result instead of stepping a live node.",
        exists=True, dir_okay=False)] = None,
    measured_workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--measured-workers", min=1, help="Worker count of the --measured run to use (default: largest).")] = None,
    key: KeyOpt = None,
    secret_key: SecretOpt = None,
    webhook_secret: WebhookOpt = None,
    start_rate: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--start-rate", min=0.001,
        help="First step's rate (default: min(peak, 50)/s, or the rate whose step holds the latencies a P99 (P99.9) "
             "needs).")] = None,
    step_seconds: Annotated[float, typer.Option("--step-seconds", min=1, help="Measured seconds per step.")] = 15.0,
    factor: Annotated[float, typer.Option("--factor", min=1.05, help="Rate multiplier between steps.")] = 1.5,
    max_rate: Annotated[Optional[float], typer.Option(  # noqa: UP045
        "--max-rate", min=0.001, help="Stop stepping here.")] = None,
    refine: Annotated[int, typer.Option("--refine", min=0, max=6, help="Bisection steps after the first FAIL.")] = 2,
    mix: MixOpt = None,
    workers: WorkersOpt = None,
    idle: IdleOpt = None,
    timeout: TimeoutOpt = 5.0,
    seed: SeedOpt = 0,
    max_lag_ms: LagOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Step the rate up to the highest that meets the profile's SLO, then the nodes its peak needs.

    With ``--measured FILE`` it runs nothing: the steps are the rates a topology benchmark measured.
    """
    from kassa.loadtest.plan import plan_capacity
    from kassa.loadtest.runner import parse_url

    if (url is None) == (measured is None):
        err.print("[red]give either --url (step a live node) or --measured (a bench/topology.py --json file)[/]")
        raise typer.Exit(EXIT_INPUT)
    if measured is not None:
        _plan_measured(profile, mix, measured, measured_workers, json_out)
        return
    assert url is not None
    try:
        parse_url(url)
        prof = _build_profile(profile, None, None, mix, None)
        base = RunConfig(url=url, profile=prof, workers=workers, key=key, secret_key=secret_key,
                         webhook_secret=_webhook_secret(webhook_secret, prof), timeout=timeout, seed=seed,
                         max_lag_ms=max_lag_ms, idle=idle)
        table = Table("rate/s", "verdict", "p50 ms", "p99 ms", "errors", "achieved/s", "lag p99 ms",
                      title=f"capacity plan: {prof.name} (peak {prof.peak_rate():,.1f} requests/s)",
                      title_justify="left")

        def on_step(rec: dict[str, Any]) -> None:
            colour = "green" if rec["verdict"] == "PASS" else "red"
            verdict = rec["verdict"] if rec["valid"] else "INVALID"
            table.add_row(f"{rec['rate']:,.1f}", f"[{colour}]{verdict}", f"{rec['p50_ms'] or 0:,.2f}",
                          f"{rec['p99_ms'] or 0:,.2f}", f"{rec['error_rate']:.3%}", f"{rec['achieved_rate']:,.1f}",
                          f"{rec['lag_p99_ms'] or 0:,.2f}")
            err.print(f"step {rec['rate']:,.1f}/s: {verdict} — {rec['reason']}")

        result = plan_capacity(base, start_rate=start_rate, step_seconds=step_seconds, factor=factor,
                               max_rate=max_rate, refine=refine, on_step=on_step,
                               run=lambda cfg: _run_with_view(cfg, f"step {cfg.steady_rate:,.0f}/s"))
    except (RunInterrupted, KeyboardInterrupt) as exc:  # the steps done so far were each printed as they ended
        err.print(f"[yellow]{str(exc) or 'interrupted before the first step ended'}[/]; no plan")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except (ProfileError, LoadTestError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_INPUT) from None
    err.print(table)
    err.print(f"[bold]{result['summary']}[/]")
    if json_out:
        print(json.dumps(_json_safe(result), separators=(",", ":")), flush=True)
    if result["nodes"] is None:
        raise typer.Exit(EXIT_FAIL)


def _plan_measured(profile: str, mix: list[str] | None, path: Path, workers: int | None, json_out: bool) -> None:
    from kassa.loadtest.plan import plan_from_measured

    try:
        prof = _build_profile(profile, None, None, mix, None)
        raw = path.read_text()
        try:
            lines = [ln for ln in raw.splitlines() if ln.strip().startswith("{")]
            data = json.loads(lines[-1] if lines else raw)
        except (json.JSONDecodeError, IndexError):
            raise LoadTestError(f"{path}: not JSON (expected the last line of `bench/topology.py --json`)") from None
        try:
            result = plan_from_measured(prof, data, workers)
        except (ValueError, KeyError, TypeError) as exc:
            raise LoadTestError(f"{path}: {exc}") from None
    except (ProfileError, LoadTestError) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(EXIT_INPUT) from None
    table = Table("rate/s", "verdict", "p99 ms", "errors",
                  title=f"capacity plan from measured figures ({path.name}, {result['workers']} worker(s)): "
                  f"{prof.name} (peak {prof.peak_rate():,.1f} requests/s)", title_justify="left")
    for st in result["steps"]:
        colour = "green" if st["verdict"] == "PASS" else "red"
        verdict = st["verdict"] if st["valid"] else "INVALID"
        table.add_row(f"{st['rate']:,.1f}", f"[{colour}]{verdict}", f"{st['p99_ms'] or 0:,.2f}",
                      f"{st['error_rate']:.3%}")
    err.print(table)
    for c in result["curve"]:
        best = "none" if c["max_rate"] is None else f"{c['max_rate']:,.0f}/s"
        err.print(f"{c['workers']} worker(s): highest measured rate within the SLO {best}"
                  + (f" ({c['note']})" if c["note"] else ""))
    err.print(f"[bold]{result['summary']}[/]")
    if json_out:
        print(json.dumps(_json_safe(result), separators=(",", ":")), flush=True)
    if result["nodes"] is None:
        raise typer.Exit(EXIT_FAIL)
