"""`kassa models list|show|promote|rollback`, `kassa train`, `kassa evaluate`, `kassa drift`.

These run beside a live server on the same data directory: they read the decision and event logs and
write only to the model registry, which serving processes poll.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from kassa import errors, schemas
from kassa.atomicfile import unwritable
from kassa.catalog import Catalog, SqlCatalogStore
from kassa.config import Settings, load_settings
from kassa.features.definitions import FeatureRepo, parse_duration
from kassa.learn.artifacts import artifact_store
from kassa.learn.registry import STAGES, ModelRegistry, ModelVersion, feature_schema_hash
from kassa.startup import metadata_engine, missing_data, shown_path

models_app = typer.Typer(help="The model registry: versions, stages, promotion and rollback.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()

# Exit codes a CI or cron job reads besides 0 (done), 1 (an error) and 2 (bad usage, Typer's own: nothing else may use
# it): `kassa evaluate --promote` that did not promote, `kassa drift --fail-on-alert` that checked nothing or alerts.
NOT_PROMOTED_EXIT = 3
NOTHING_CHECKED_EXIT = 3
ALERT_EXIT = 4

SettingsOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--settings", "-s", help="Kassa settings file (YAML; default: $KASSA_CONFIG).")]
DataDirOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--data-dir", help="Where Kassa keeps its files (default: data_dir of the settings, .kassa).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


@dataclass
class OfflineContext:
    settings: Settings
    catalog: Catalog
    repo: FeatureRepo
    registry: ModelRegistry

    def placement(self, placement_id: str) -> schemas.Placement:
        view = self.catalog.snapshot.placements.get(placement_id)
        if view is None:
            known = ", ".join(sorted(self.catalog.snapshot.placements)) or "none"
            raise typer.BadParameter(f"unknown placement {placement_id!r} (known: {known})", param_hint="--placement")
        return view.placement

    def version(self, version: str, param_hint: str) -> ModelVersion:
        """A registered version; an unknown one is a usage error naming the option (was a NotFound traceback)."""
        try:
            return self.registry.get(version)
        except errors.NotFound:
            raise typer.BadParameter(f"unknown model version {version!r} (`kassa models list` shows them)",
                                     param_hint=param_hint) from None

    def schema_hash(self, placement_id: str) -> str:
        return feature_schema_hash(self.placement(placement_id), self.repo)


def context(config: Path | None, data_dir: str | None) -> OfflineContext:
    from kassa.features.registry import FeatureRegistry

    settings = load_settings(config, data_dir=data_dir)
    data = settings.data_path
    if missing_data(settings) is not None:
        raise typer.BadParameter(f"no Kassa data in {shown_path(data)} (run `kassa serve` or `kassa demo` "
                                 "first, or pass --data-dir)", param_hint="--data-dir")
    db = metadata_engine(settings)
    catalog = Catalog(SqlCatalogStore(db))
    repo = FeatureRegistry(db).load()
    return OfflineContext(settings, catalog, repo,
                          ModelRegistry(db, data / "models", store=artifact_store(settings, db)))


def parse_time(text: str | None, now: float) -> float | None:
    """``2026-11-01``, ``2026-11-01T12:00``, a unix time, or a duration ago (``7d``, ``12h``)."""
    if text is None:
        return None
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"not a time: {text!r} (use 2026-11-01, 2026-11-01T12:00, a unix time, "
                                 "or a duration ago like 7d)") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def check_window(start: float | None, end: float | None, start_hint: str = "--since") -> None:
    """Refuse a window that ends before it starts: it selected no decision, and the command said only that
    there was nothing to train or evaluate on (or, for the training set, wrote an empty file)."""
    if start is not None and end is not None and start >= end:
        raise typer.BadParameter(f"the window is empty: it starts at {_fmt_time(start)} and ends at "
                                 f"{_fmt_time(end)} (UTC)", param_hint=start_hint)


def check_writable(path: Path | None, param_hint: str) -> None:
    """Refuse an output file that cannot be written before any work is done: it was an OSError traceback after
    the scoring, with the gate's verdict already recorded."""
    why = unwritable(path) if path is not None else None
    if why is not None:
        raise typer.BadParameter(why, param_hint=param_hint)


def write_output(what: str, path: Path, write: Callable[[], object]) -> None:
    """``write()``, and on an OSError one line naming the file, exit 1 (a disk that filled up meanwhile)."""
    try:
        write()
    except OSError as exc:
        console.print(f"[red]cannot write the {what}[/] {escape(str(path))}: {escape(exc.strerror or str(exc))}",
                      highlight=False)
        raise typer.Exit(1) from None


def _fmt_time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _metric_times(value: Any, key: str = "") -> Any:
    """``value`` (a version's metrics) with its times as `_fmt_time` prints them, for `kassa models show`: an
    evaluation's ``at``/``since``/``until``, a snapshot's ``snapshot_at``, a learner's ``watermark`` were unix
    seconds (1796682638.492095) beside ``created_at`` as a date. ``--json`` keeps the numbers."""
    if isinstance(value, dict):
        return {k: _metric_times(v, str(k)) for k, v in value.items()}
    if key == "watermark" and isinstance(value, list) and len(value) == 2 and _is_number(value[0]):
        return [_fmt_time(value[0]), value[1]]  # (decision time, decision id)
    if isinstance(value, list):
        return [_metric_times(v) for v in value]
    if (key in ("at", "since", "until") or key.endswith("_at")) and _is_number(value):
        return _fmt_time(value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


def reads_the_decision_log(command: Callable[..., None]) -> Callable[..., None]:
    """A command that reads the decision log says which file it cannot read and exits 1 (an empty or damaged
    Parquet file in it was a DuckDB traceback in `kassa train`, `kassa evaluate` and `kassa drift`)."""
    from kassa.events.decision_log import UnreadableDecisionLog

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except UnreadableDecisionLog as exc:
            console.print(f"[red]unreadable decision log:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None

    return run


# ---------------------------------------------------------------------------------------------- models
def models_table(versions: list[Any]) -> Table:
    """Model versions as a table that fits 80 columns: the version is never wrapped, a parent of the same
    placement is shown by its number (``@11``), times are UTC without the year, no vertical rules."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("version", no_wrap=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("source")
    table.add_column("rows", justify="right")
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("eval")
    table.add_column("parent", no_wrap=True)
    for v in versions:
        ev = v.metrics.get("evaluation")
        verdict = ("[green]pass[/]" if ev.get("passed") else "[red]fail[/]") if isinstance(ev, dict) else "-"
        stage_text = v.stage + (f" {v.canary_share:.0%}" if v.stage == "canary" and v.canary_share else "")
        parent = v.parent or "-"
        if parent.startswith(f"{v.placement}@"):
            parent = parent[len(v.placement):]
        created = datetime.fromtimestamp(v.created_at, UTC).strftime("%m-%d %H:%M") if v.created_at else "-"
        table.add_row(v.version, stage_text, v.source, f"{v.rows:,}", created, verdict, parent)
    return table


@models_app.command("list")
def models_list(
    placement: Annotated[Optional[str], typer.Option(help="Only this placement.")] = None,  # noqa: UP045
    stage: Annotated[Optional[str], typer.Option(help="Only this stage.")] = None,  # noqa: UP045
    limit: Annotated[int, typer.Option(help="At most this many versions.")] = 50,
    config: SettingsOpt = None, data_dir: DataDirOpt = None, json_out: JsonOpt = False,
) -> None:
    """Model versions, newest first, with their stage."""
    if stage is not None and stage not in STAGES:
        raise typer.BadParameter(f"stage must be one of {', '.join(STAGES)}", param_hint="--stage")
    ctx = context(config, data_dir)
    versions = ctx.registry.versions(placement, [stage] if stage else None, limit=limit)
    if placement is not None and not versions and not ctx.registry.versions(placement, None, limit=1):
        ctx.placement(placement)  # a mistyped placement printed an empty table: name the known ones
    if json_out:
        _print_json({"versions": [v.to_dict() for v in versions]})
        return
    out.print(models_table(versions))


VersionArg = Annotated[str, typer.Argument(help="A model version, placement@N (`kassa models list` shows them).")]


@models_app.command("show")
def models_show(version: VersionArg, config: SettingsOpt = None, data_dir: DataDirOpt = None,
                json_out: JsonOpt = False) -> None:
    """One version: metadata, metrics, lineage and stage history."""
    ctx = context(config, data_dir)
    mv = ctx.version(version, "VERSION")
    history = ctx.registry.history(version=version)
    if json_out:
        _print_json({**mv.to_dict(), "history": [h.to_dict() for h in history]})
        return
    table = Table(show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")  # a checksum cut to "a406b520…" could not be checked against a file
    for key, value in mv.to_dict().items():
        if key == "metrics":
            value = json.dumps(_metric_times(value), indent=1, default=str)
        elif key in ("created_at", "stage_changed_at", "train_since", "train_until"):
            value = _fmt_time(value)
        table.add_row(key, str(value))
    out.print(table)
    hist = Table("at", "from", "to", "by", "reason", title="stage history")
    for h in history:
        hist.add_row(_fmt_time(h.at), h.from_stage or "-", h.to_stage, h.actor, h.reason)
    out.print(hist)


@models_app.command("promote")
def models_promote(
    version: VersionArg,
    to: Annotated[str, typer.Option("--to", help="shadow | canary | production | candidate | archived")],
    share: Annotated[Optional[float], typer.Option(help="Canary traffic share, e.g. 0.1.")] = None,  # noqa: UP045
    reason: Annotated[Optional[str], typer.Option(help="Recorded in the stage history.")] = None,  # noqa: UP045
    force: Annotated[bool, typer.Option(help="Promote to production without a passing evaluation.")] = False,
    config: SettingsOpt = None, data_dir: DataDirOpt = None, json_out: JsonOpt = False,
) -> None:
    """Move a version to a stage. Production needs a passing `kassa evaluate` (or --force)."""
    from kassa.learn.registry import StageError
    from kassa.learn.rollout import promote_version

    if to not in STAGES:
        raise typer.BadParameter(f"must be one of {', '.join(STAGES)}", param_hint="--to")
    # A bad share is bad usage (exit 2, the option named), not a refused stage change (exit 1), as README says
    if to == "canary" and share is None:
        raise typer.BadParameter("a canary needs its traffic share, e.g. --share 0.1", param_hint="--share")
    if share is not None and to != "canary":
        raise typer.BadParameter(f"only a canary takes a traffic share, not --to {to}", param_hint="--share")
    if share is not None and not 0.0 < share < 1.0:
        raise typer.BadParameter(f"must be between 0 and 1 (exclusive), got {share:g}", param_hint="--share")
    ctx = context(config, data_dir)
    ctx.version(version, "VERSION")
    try:
        mv = promote_version(ctx.registry, version, to, share=share, reason=reason, force=force)
    except StageError as exc:
        console.print(f"[red]refused:[/] {exc.detail}")
        raise typer.Exit(1) from None
    if json_out:
        _print_json(mv.to_dict())
    else:
        console.print(f"[green]{mv.version}[/] is now {mv.stage}"
                      + (f" ({mv.canary_share:.0%} of traffic)" if mv.stage == "canary" else "")
                      + "; serving processes pick it up within seconds")


@models_app.command("rollback")
def models_rollback(
    placement: Annotated[str, typer.Option(help="The placement whose production model to roll back.")],
    reason: Annotated[str, typer.Option(help="Recorded in the stage history.")] = "manual rollback",
    config: SettingsOpt = None, data_dir: DataDirOpt = None, json_out: JsonOpt = False,
) -> None:
    """Undo the production release (the version someone put in production and the learner's snapshots on
    top of it): restore the last version that served before it and does not descend from it. Neither the
    release nor anything descended from it is auto-published again unless promoted by hand."""
    from kassa.learn.registry import StageError

    ctx = context(config, data_dir)
    ctx.placement(placement)
    try:
        mv = ctx.registry.rollback(placement, reason)
    except StageError as exc:
        console.print(f"[red]refused:[/] {exc.detail}")
        raise typer.Exit(1) from None
    if json_out:
        _print_json(mv.to_dict())
    else:
        console.print(f"rolled back: [green]{mv.version}[/] serves {placement} again")


# ---------------------------------------------------------------------------------------------- train
def _product_key(snap: Any) -> Callable[[str], str | None]:
    """The product id (else sku) an offer sells: what the reward join attributes orders by."""

    def product_key(offer_id: str) -> str | None:
        offer = snap.offers.get(offer_id)
        return (offer.product_id or offer.sku) if offer is not None else None

    return product_key


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


class _Stages:
    """A progress callback ``(stage, done, total)`` showing one bar per stage."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            # The whole label: the bars line up on their own (one grid for all tasks).
            self.tasks[stage] = self.bar.add_task(stage, total=max(total, 1))
        self.bar.update(self.tasks[stage], completed=done, total=max(total, 1))


@reads_the_decision_log
def train_command(
    placement: Annotated[str, typer.Option(help="The placement to retrain.")],
    since: Annotated[Optional[str], typer.Option(help="Start: date, unix time or duration ago (7d).")] = None,  # noqa: UP045
    until: Annotated[Optional[str], typer.Option(help="End (exclusive); default now.")] = None,  # noqa: UP045
    every: Annotated[Optional[str], typer.Option(help="Retrain on this schedule (e.g. 1h) until stopped.")] = None,  # noqa: UP045
    passes: Annotated[int, typer.Option(help="Passes over the data.", min=1)] = 1,
    holdout: Annotated[float, typer.Option(help="Leave out this newest share of the window for "
                                                "`kassa evaluate` (e.g. 0.2).")] = 0.0,
    learning_rate: Annotated[Optional[float], typer.Option(help="Default: learn.learning_rate.")] = None,  # noqa: UP045
    config: SettingsOpt = None, data_dir: DataDirOpt = None, json_out: JsonOpt = False,
) -> None:
    """Retrain a placement's learner from logged decisions and joined rewards; registers a candidate."""
    from kassa.learn.offline.train import train_placement

    try:
        interval = parse_duration(every) if every else None
    except ValueError as exc:  # was a ValueError traceback
        raise typer.BadParameter(str(exc), param_hint="--every") from None
    if interval is not None and interval <= 0:
        raise typer.BadParameter("must be a positive duration, e.g. 1h", param_hint="--every")
    if learning_rate is not None and not learning_rate > 0:  # a negative rate trained and registered a candidate
        raise typer.BadParameter(f"must be a positive number, got {learning_rate:g}", param_hint="--learning-rate")
    if not 0.0 <= holdout < 1.0:
        raise typer.BadParameter("must be in [0, 1)", param_hint="--holdout")
    while True:
        ctx = context(config, data_dir)
        pl = ctx.placement(placement)
        now = time.time()
        start, end = parse_time(since, now), parse_time(until, now)
        check_window(start, end)
        with _progress() as bar:
            progress = _Stages(bar)
            result = train_placement(
                ctx.settings.data_path, ctx.registry, ctx.catalog.snapshot, pl, ctx.schema_hash(placement),
                start, end, learning_rate if learning_rate is not None else ctx.settings.learn.learning_rate,
                ctx.settings.learn.vw_extra_args, passes, progress, holdout)
        if result.version is None:
            console.print(f"[yellow]nothing to train on[/]: {result.decisions} closed decisions "
                          f"({result.pending} still inside their reward window) for {placement}")
        else:
            console.print(f"registered [green]{result.version.version}[/] as candidate: {result.decisions:,} "
                          f"decisions, {result.examples:,} examples, mean reward {result.mean_reward:.4f}, "
                          f"{result.seconds:.1f} s. Next: `kassa evaluate --placement {placement} "
                          f"--candidate {result.version.version}`")
        if json_out:
            _print_json(result.to_dict())
        if interval is None:
            if result.version is None:
                raise typer.Exit(1)
            return
        console.print(f"next run in {every} (Ctrl-C to stop)")
        try:
            time.sleep(interval)
        except KeyboardInterrupt:  # between runs: every candidate is registered; 130 as every Ctrl-C (README)
            console.print("stopped")
            raise typer.Exit(130) from None



# ---------------------------------------------------------------------------------------------- evaluate
def _gate_outcome(what: str, ess: float, n: int, min_ess: float, verdict: Any) -> dict[str, Any]:
    """Say when the candidate's sample is too small or there was nothing to compare with, and the gate's
    ``passed``/``reason`` for the candidate's metrics (top-slot and slate evaluation alike). A gate that ran
    has said it under the table already (its verdict names the effective sample size): not said twice."""
    small = ess < min_ess
    if small and verdict is None:
        console.print(f"[red]sample too small:[/] the candidate's {what} rests on an effective sample size of "
                      f"{ess:.0f} (of {n:,} decisions), below the minimum {min_ess:.0f}; its estimate and "
                      "interval are not a basis for promotion. Evaluate on more traffic.")
    if verdict is None:
        console.print("[yellow]no production version to compare with[/]: the gate was not applied")
    return {"passed": bool(verdict.passed) if verdict else False,
            "reason": verdict.reason if verdict else "no production version to compare with" + (
                f"; effective sample size {ess:.0f} below the minimum {min_ess:.0f}" if small else "")}


@reads_the_decision_log
def evaluate_command(
    placement: Annotated[str, typer.Option(help="The placement whose logs to evaluate on.")],
    candidate: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="The version to evaluate (e.g. order_confirmation@13); not with --shadow.")] = None,
    baseline: Annotated[str, typer.Option(help="'production', 'none' or a version.")] = "production",
    since: Annotated[Optional[str], typer.Option(help="Start of the held-out window (default: the end of "  # noqa: UP045
                                                      "the candidate's training range, else all).")] = None,
    until: Annotated[Optional[str], typer.Option(help="End of the window (exclusive; default now).")] = None,  # noqa: UP045
    estimator: Annotated[str, typer.Option(help="Estimator the gate compares: ips | snips | dr.")] = "snips",
    level: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
    margin: Annotated[float, typer.Option(help="The candidate's lower bound must beat production by this.")] = 0.0,
    rule: Annotated[str, typer.Option(help="lcb_beats_estimate | lcb_beats_ucb")] = "lcb_beats_estimate",
    max_weight: Annotated[Optional[float], typer.Option(help="Clip importance weights at this value.")] = None,  # noqa: UP045
    min_ess: Annotated[float, typer.Option(help="Refuse (gate fails) when the candidate's effective sample size "
                                                "is below this.")] = 100.0,
    report: Annotated[Optional[Path], typer.Option(help="Write a self-contained HTML report here.")] = None,  # noqa: UP045
    png: Annotated[Optional[Path], typer.Option(help="Write a PNG plot of the estimates here.")] = None,  # noqa: UP045
    promote: Annotated[bool, typer.Option(help="Promote the candidate to production if the gate passes; exit "
                                               f"{NOT_PROMOTED_EXIT} when it is not promoted.")] = False,
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Scoring processes (default: one per core, at most 4).")] = None,
    slate: Annotated[bool, typer.Option(help="Estimate the whole slate's reward (every shown slot) with the "
                                             "pseudo-inverse estimator and, beside it, the per-slot doubly robust "
                                             "one, on the decisions a uniform slate policy logged (e.g. "
                                             "`policy: uniform`).")] = False,
    shadow: Annotated[bool, typer.Option(help="Evaluate the placement's shadow version(s) from their own log "
                                              "(no re-scoring): decisions scored, agreement with what was served, "
                                              "IPS, SNIPS and DR beside the served mean. Informational: no gate "
                                              "verdict is recorded.")] = False,
    config: SettingsOpt = None, data_dir: DataDirOpt = None, json_out: JsonOpt = False,
) -> None:
    """Off-policy evaluation (IPS, SNIPS, DR with intervals) of a candidate against production,
    uniform-random and the logged policy; records the gate's verdict on the candidate. With --slate, the
    pseudo-inverse and per-slot DR estimates of the whole slate's reward instead (uniformly logged decisions
    only; the gate reads PI). With --shadow, how the shadow version(s) would have done, from the shadow log."""
    from kassa.learn.offline import ope, ope_report
    from kassa.learn.offline.dataset import load_logged
    from kassa.learn.offline.evaluate import evaluate_models
    from kassa.learn.registry import StageError
    from kassa.learn.rollout import promote_version

    if estimator not in ope.ESTIMATORS:
        raise typer.BadParameter(f"must be one of {', '.join(ope.ESTIMATORS)}", param_hint="--estimator")
    if rule not in ("lcb_beats_estimate", "lcb_beats_ucb"):
        raise typer.BadParameter("must be lcb_beats_estimate or lcb_beats_ucb", param_hint="--rule")
    # checked here, before any data is read: these were OPEInputError tracebacks after the scoring
    if not 0.0 < level < 1.0:
        raise typer.BadParameter(f"must be between 0 and 1 (e.g. 0.95), got {level:g}", param_hint="--level")
    if max_weight is not None and not max_weight > 0:
        raise typer.BadParameter(f"must be a positive number, got {max_weight:g}", param_hint="--max-weight")
    if not min_ess >= 0:
        raise typer.BadParameter(f"must be at least 0, got {min_ess:g}", param_hint="--min-ess")
    if workers is not None and workers < 1:  # 0 meant the default and a negative count one process, silently
        raise typer.BadParameter(f"must be at least 1, got {workers}", param_hint="--workers")
    if slate:
        for given, name in ((promote, "--promote"), (max_weight is not None, "--max-weight"),
                            (report is not None, "--report"), (png is not None, "--png")):
            if given:
                raise typer.BadParameter(f"{name} applies to the top-slot evaluation, not to --slate",
                                         param_hint="--slate")
    if shadow:
        for given, name in ((candidate is not None, "--candidate"), (baseline != "production", "--baseline"),
                            (promote, "--promote"), (slate, "--slate"), (report is not None, "--report"),
                            (png is not None, "--png"), (margin != 0.0, "--margin"),
                            (rule != "lcb_beats_estimate", "--rule")):
            if given:  # the gate's options too: no gate runs on a shadow
                raise typer.BadParameter(f"{name} does not apply to --shadow (it evaluates the shadow version(s) "
                                         "that scored in the window)", param_hint="--shadow")
        _evaluate_shadow(placement, since, until, estimator, level, max_weight, min_ess, config, data_dir, json_out)
        return
    check_writable(report, "--report")
    check_writable(png, "--png")
    if candidate is None:
        raise typer.BadParameter("give the version to evaluate (e.g. order_confirmation@13), or --shadow for the "
                                 "placement's shadow version", param_hint="--candidate")
    t0 = time.perf_counter()
    ctx = context(config, data_dir)
    pl = ctx.placement(placement)
    cand = ctx.version(candidate, "--candidate")
    if cand.placement != placement:
        raise typer.BadParameter(f"{candidate} serves {cand.placement}, not {placement}", param_hint="--candidate")
    base = None
    if baseline == "production":
        found = ctx.registry.versions(placement, ["production"], limit=1)
        base = found[0] if found and found[0].version != cand.version else None
    elif baseline != "none":
        base = ctx.version(baseline, "--baseline")
        if base.version == cand.version:  # its rows were merged into the candidate's: one row, no comparison
            raise typer.BadParameter(f"{baseline} is the candidate itself; give another version, 'production' "
                                     "or 'none'", param_hint="--baseline")
        if base.placement != placement:
            raise typer.BadParameter(f"{baseline} serves {base.placement}, not {placement}",
                                     param_hint="--baseline")
    schema = ctx.schema_hash(placement)
    for mv in (cand, base):
        if mv is not None:
            ctx.registry.verify(mv, schema)
    now = time.time()
    start = parse_time(since, now)
    default_start = start is None and cand.source == "batch" and cand.train_until is not None
    if default_start:
        start = cand.train_until
    end = parse_time(until, now)
    check_window(start, end, "--until (the window starts where the candidate's training ended)" if default_start
                 else "--since")
    snap = ctx.catalog.snapshot
    product_key = _product_key(snap)

    with _progress() as bar:
        progress = _Stages(bar)
        data = load_logged(ctx.settings.data_path, pl, product_key, start, end,
                           lambda i, n: progress("join rewards", i, n))
        if len(data) < 2:  # one row was an OPEInputError traceback ("need at least 2 logged rows")
            hint = ("; the window starts where the candidate's training ended: train with --holdout 0.2 to keep "
                    "decisions for it, or pass --since" if default_start else "")
            what = "no closed decisions" if len(data) == 0 else "only 1 closed decision"
            console.print(f"[red]{what} to evaluate on[/] for {placement} in the window {_fmt_time(start)} .. "
                          f"{_fmt_time(end) if end else 'now'} "
                          f"({data.pending} still pending; an interval needs at least 2){hint}", highlight=False)
            raise typer.Exit(1)
        if slate:
            _evaluate_slate(ctx, data, snap, cand, base, pl.slots, level, margin, rule, workers, progress, min_ess,
                            start, end, now, t0, json_out)
            return
        evaluation, verdict = evaluate_models(
            data, snap, (cand.version, ctx.registry.path(cand)),
            (base.version, ctx.registry.path(base)) if base else None,
            estimator, level, margin, rule, max_weight, workers, progress, min_ess)  # type: ignore[arg-type]
    seconds = time.perf_counter() - t0
    title = f"{cand.version} vs {base.version if base else 'no production'} on {len(data):,} decisions"
    out.print(ope_report.estimates_table(evaluation, title=title, gate=verdict))
    cand_est = evaluation.estimate(cand.version, estimator)
    record = {**_gate_outcome(f"{estimator} estimate", cand_est.ess, len(data), min_ess, verdict),
              "min_ess": min_ess,
              "estimator": estimator, "baseline": base.version if base else None, "rows": len(data),
              "since": start, "until": end, "at": now,
              "candidate_estimate": evaluation.estimate(cand.version, estimator).to_dict(),
              "baseline_estimate": evaluation.estimate(base.version, estimator).to_dict() if base else None}
    ctx.registry.update_metrics(cand.version, {"evaluation": record})
    if report is not None:
        write_output("report", report, lambda: ope_report.write_html(evaluation, report, title=title, gate=verdict))
        console.print(f"report: {report}")
    if png is not None:
        write_output("plot", png, lambda: ope_report.write_png(evaluation, png, title=title, gate=verdict))
        console.print(f"plot: {png}")
    promoted = None
    if promote:
        if verdict is not None and verdict.passed:
            try:
                promoted = promote_version(ctx.registry, cand.version, "production", reason="kassa evaluate --promote")
                console.print(f"[green]{cand.version} promoted to production[/]")
            except StageError as exc:
                console.print(f"[red]promotion refused:[/] {exc.detail}")
        else:  # why is said above: the gate's verdict under the table, or that there was none
            console.print("[red]not promoted:[/] " + ("the gate blocked it" if verdict is not None
                                                       else "no gate verdict"))
    if json_out:
        _print_json({"candidate": cand.version, "baseline": base.version if base else None, "rows": len(data),
                     "pending": data.pending, "seconds": round(seconds, 2), "gate": record,
                     "promoted": promoted is not None, "evaluation": evaluation.to_dict()})
    if promote and promoted is None:  # a CI job promoting on a pass must see that it did not (it was exit 0)
        raise typer.Exit(NOT_PROMOTED_EXIT)


def _evaluate_slate(ctx: Any, data: Any, snap: Any, cand: Any, base: Any, slots: int, level: float, margin: float,
                    rule: str, workers: int | None, progress: Any, min_ess: float, start: float | None,
                    end: float | None, now: float, t0: float, json_out: bool) -> None:
    """`kassa evaluate --slate`: PI of the whole slate on uniformly logged decisions, beside the per-slot DR
    estimate (`evaluate_slates`); the gate reads PI."""
    from kassa.learn.offline import ope, ope_report
    from kassa.learn.offline.evaluate import NoUniformRows, evaluate_slates

    try:
        result = evaluate_slates(data, snap, (cand.version, ctx.registry.path(cand)),
                                 (base.version, ctx.registry.path(base)) if base else None, slots, level, margin,
                                 rule, workers, progress, min_ess)  # type: ignore[arg-type]
    except NoUniformRows as exc:
        console.print(f"[red]no slate to evaluate:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    seconds = time.perf_counter() - t0
    evaluation, verdict = result.evaluation, result.gate
    title = (f"{cand.version} vs {base.version if base else 'no production'}: whole {slots}-slot slates on "
             f"{evaluation.n:,} uniformly logged decisions")
    out.print(ope_report.estimates_table(evaluation, title=title, gate=verdict))
    skipped = {k: v for k, v in result.left_out.items() if v}
    if skipped:
        console.print(f"left out {sum(skipped.values()):,} of {result.considered:,} decisions: "
                      + ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in skipped.items()), highlight=False)
    cand_est = evaluation.estimate(cand.version, "pseudo_inverse")
    record = {**_gate_outcome("slate estimate", cand_est.ess, evaluation.n, min_ess, verdict),
              "min_ess": min_ess, "estimator": "pseudo_inverse", "slots": slots,
              "baseline": base.version if base else None, "rows": evaluation.n, "left_out": result.left_out,
              "since": start, "until": end, "at": now, "candidate_estimate": cand_est.to_dict(),
              "baseline_estimate": evaluation.estimate(base.version, "pseudo_inverse").to_dict() if base else None,
              "logged_estimate": evaluation.estimate(ope.LOGGED, ope.ON_POLICY).to_dict(),
              # The per-slot DR estimate beside PI (narrower; assumes a slot's reward depends on its own offer).
              "candidate_slot_estimate": evaluation.estimate(cand.version, "slot_dr").to_dict(),
              "baseline_slot_estimate": evaluation.estimate(base.version, "slot_dr").to_dict() if base else None}
    # Kept apart from "evaluation", the top-slot record the promotion gate reads.
    ctx.registry.update_metrics(cand.version, {"slate_evaluation": record})
    if json_out:
        _print_json({"candidate": cand.version, "baseline": base.version if base else None, "slots": slots,
                     "rows": evaluation.n, "considered": result.considered, "left_out": result.left_out,
                     "pending": data.pending, "seconds": round(seconds, 2), "gate": record,
                     "evaluation": evaluation.to_dict()})


def _evaluate_shadow(placement: str, since: str | None, until: str | None, estimator: str, level: float,
                     max_weight: float | None, min_ess: float, config: Path | None, data_dir: str | None,
                     json_out: bool) -> None:
    """`kassa evaluate --shadow`: each shadow version that scored in the window, from its own log
    (`kassa.learn.offline.shadow_eval`); reads only, records nothing."""
    from kassa.learn.offline import ope, ope_report
    from kassa.learn.offline.dataset import load_logged
    from kassa.learn.offline.shadow_eval import evaluate_shadow, read_shadow_log

    t0 = time.perf_counter()
    ctx = context(config, data_dir)
    pl = ctx.placement(placement)
    now = time.time()
    start, end = parse_time(since, now), parse_time(until, now)
    check_window(start, end)
    # read "in the window from the first logged decision to now" (was "the start .. now")
    window = f"from {_fmt_time(start) if start else 'the first logged decision'} to {_fmt_time(end) if end else 'now'}"
    shadow_log = read_shadow_log(ctx.settings.data_path, placement, start, end)
    if shadow_log.num_rows == 0:
        console.print(f"[red]no shadow decisions[/] for {placement} in the window {window}: put a model in shadow "
                      f"with `kassa models promote VERSION --to shadow` (it then scores every request of {placement} "
                      "off the request path into its own log), let traffic run, and evaluate again",
                      highlight=False)
        raise typer.Exit(1)
    snap = ctx.catalog.snapshot
    product_key = _product_key(snap)

    with _progress() as bar:
        progress = _Stages(bar)
        data = load_logged(ctx.settings.data_path, pl, product_key, start, end,
                           lambda i, n: progress("join rewards", i, n))
    reports = evaluate_shadow(data, shadow_log, level, max_weight)
    seconds = time.perf_counter() - t0
    summary = Table(title=f"shadow of {placement}, {window} (UTC): {len(data):,} closed served decisions",
                    title_justify="left", header_style="bold", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                    padding=(0, 1), collapse_padding=True)
    for name in ("shadow", "scored", "closed", "open", "missed", "outside", "top agrees", "favourite agrees"):
        summary.add_column(name, justify="left" if name == "shadow" else "right", no_wrap=name == "shadow")
    for r in reports:
        summary.add_row(r.version, f"{r.scored:,}", f"{r.evaluated:,}", f"{r.open:,}", f"{r.missed:,}",
                        f"{r.outside:,}", f"{r.agreement:.1%}" if r.evaluated else "-",
                        f"{r.greedy_agreement:.1%}" if r.evaluated else "-")
    summary.caption = ("closed: scored decisions whose served reward is known (the estimates' rows); open: the reward "
                       "window is still open; missed: served while in shadow but not scored (queue full or scoring "
                       "failed); outside: served before or after its time in shadow; top agrees: it would have shown "
                       "the same offer first; favourite agrees: its most probable offer is the served policy's")
    summary.caption_justify = "left"
    out.print(summary)
    if all(r.evaluation is None for r in reports):  # as `kassa evaluate`: one closed row was an OPEInputError
        console.print(f"[red]too few closed decisions to evaluate on[/] for {placement} in the window {window}: "
                      f"no shadow version has 2 scored decisions with a closed reward ({data.pending:,} served "
                      "decisions still pending); evaluate later or over a wider window (--since)", highlight=False)
        raise typer.Exit(1)
    versions = []
    for r in reports:
        item = r.to_dict()
        if r.evaluation is None:
            console.print(f"[yellow]{r.version}: {r.evaluated} scored decision(s) with a closed reward[/]; an interval "
                          "needs at least 2: evaluate later or over a wider window", highlight=False)
            item.update(estimate=None, too_small=True)
            versions.append(item)
            continue
        out.print(ope_report.estimates_table(r.evaluation, title=f"shadow {r.version} vs served on {r.evaluated:,} "
                                                                    "decisions it scored"))
        est = r.evaluation.estimate(r.version, estimator)
        small = not est.ess >= min_ess
        if small:
            console.print(f"[red]sample too small:[/] {r.version}'s {estimator} estimate rests on an effective sample "
                          f"size of {est.ess:.0f} (of {r.evaluated:,} decisions), below the minimum {min_ess:.0f}; "
                          "it is not a basis for a decision. Leave it in shadow on more traffic.", highlight=False)
        served_mean = r.evaluation.estimate(ope.LOGGED, ope.ON_POLICY)
        item.update(estimate=est.to_dict(), served=served_mean.to_dict(), too_small=small)
        versions.append(item)
    if json_out:
        _print_json({"placement": placement, "shadow": True, "since": start, "until": end, "at": now,
                     "rows": len(data), "pending": data.pending, "estimator": estimator, "min_ess": min_ess,
                     "seconds": round(seconds, 2), "versions": versions})


# ---------------------------------------------------------------------------------------------- drift
@reads_the_decision_log
def drift_command(
    placement: Annotated[str, typer.Option(help="The placement to check.")],
    since: Annotated[Optional[str], typer.Option(help="Start of the live window (date, unix time or duration ago; "  # noqa: UP045
                                                      "default 1h).")] = None,
    until: Annotated[Optional[str], typer.Option(help="End of the live window (default now).")] = None,  # noqa: UP045
    reference_since: Annotated[Optional[str], typer.Option(help="Start of the reference window (default: the "  # noqa: UP045
                                                                "production model's training range, else the "
                                                                "same length just before the live window).")] = None,
    reference_until: Annotated[Optional[str], typer.Option(help="End of the reference window.")] = None,  # noqa: UP045
    last: Annotated[Optional[int], typer.Option(help="Live window = the newest N logged decisions, reference = "  # noqa: UP045
                                                     "the N before them (instead of the time windows).")] = None,
    fail_on_alert: Annotated[bool, typer.Option(help=f"Exit with status {ALERT_EXIT} when anything alerts, "
                                                     f"{NOTHING_CHECKED_EXIT} when a window holds no decisions "
                                                     "(nothing was checked), for cron/CI.")] = False,
    config: SettingsOpt = None, data_dir: DataDirOpt = None, json_out: JsonOpt = False,
) -> None:
    """Feature, prediction and reward-rate drift of a placement: a reference window vs the live window."""
    from kassa.events.decision_log import read_decisions
    from kassa.learn.offline.dataset import load_logged
    from kassa.monitor.drift.offline import compare, window_from_decisions

    if last is not None:  # the windows were ignored without a word
        for given, name in ((since, "--since"), (until, "--until"), (reference_since, "--reference-since"),
                            (reference_until, "--reference-until")):
            if given is not None:
                raise typer.BadParameter("--last picks both windows by count; give either --last or the time "
                                         "windows", param_hint=name)
    ctx = context(config, data_dir)
    pl = ctx.placement(placement)
    now = time.time()
    live_start = parse_time(since or "1h", now)
    live_end = parse_time(until, now) or now
    assert live_start is not None
    if live_start >= live_end:
        raise typer.BadParameter("the live window is empty (since >= until)", param_hint="--since")
    ref_start, ref_end = parse_time(reference_since, now), parse_time(reference_until, now)
    source = "given"
    if ref_start is None and ref_end is None:
        prod = ctx.registry.versions(placement, ["production"], limit=1)
        if prod and prod[0].train_since is not None and prod[0].train_until is not None:
            ref_start, ref_end = prod[0].train_since, prod[0].train_until
            source = f"training range of {prod[0].version}"
        else:
            ref_start, ref_end, source = live_start - (live_end - live_start), live_start, "the window before"
    root = ctx.settings.data_path
    if last is not None:
        if last < 100:
            raise typer.BadParameter("use at least 100 decisions per window", param_hint="--last")
        ts = read_decisions(root, placement).column("ts").to_pylist()
        if len(ts) < 2 * last:
            raise typer.BadParameter(f"only {len(ts):,} decisions are logged for {placement}; --last needs "
                                     f"{2 * last:,}", param_hint="--last")
        ref_start, ref_end = ts[-2 * last], ts[-last]
        live_start, live_end = ts[-last], ts[-1] + 1e-6
        source = f"the {last:,} decisions before"
    snap = ctx.catalog.snapshot
    product_key = _product_key(snap)

    windows = []
    for start, end in ((ref_start, ref_end), (live_start, live_end)):
        logged = load_logged(root, pl, product_key, start, end)
        rewards = {d: list(zip(c, r, strict=True)) for d, c, r in zip(logged.decision_ids, logged.chosen,
                                                                          logged.rewards, strict=True)}
        windows.append(window_from_decisions(read_decisions(root, placement, start, end), rewards))
    report = compare(windows[0], windows[1], placement, now)
    min_samples = windows[0].config.min_samples
    if 0 < min(report.reference_n, report.live_n) < min_samples:
        console.print(f"[yellow]note[/]: a window has fewer than {min_samples} decisions, so only reward "
                      "rates are compared (feature and score drift need more data)")
    if report.reference_n == 0 or report.live_n == 0:
        console.print(f"[yellow]not enough data[/]: reference {report.reference_n:,} decisions "
                      f"({_fmt_time(ref_start)} .. {_fmt_time(ref_end)}, {source}), live {report.live_n:,} "
                      f"({_fmt_time(live_start)} .. {_fmt_time(live_end)})"
                      + ("; --last N compares the newest N logged decisions with the N before them" if last is None
                         else ""))
    else:
        console.print(f"reference: {_fmt_time(ref_start)} .. {_fmt_time(ref_end)} ({source}); "
                      f"live: {_fmt_time(live_start)} .. {_fmt_time(live_end)}")
        out.print(report.table(), markup=False, highlight=False)
    if json_out:
        _print_json({**report.to_dict(), "reference_window": [ref_start, ref_end],
                     "live_window": [live_start, live_end],
                     "reference_source": source})
    if fail_on_alert and report.alerts:
        raise typer.Exit(ALERT_EXIT)  # was 2, which a mistyped option also gives
    if fail_on_alert and (report.reference_n == 0 or report.live_n == 0):
        # "not enough data" was exit 0, what a healthy check answers: a cron job could not tell that a placement
        # which stopped logging decisions (or a mistyped window) was never checked
        raise typer.Exit(NOTHING_CHECKED_EXIT)
