"""``kassa features``: apply definitions, materialize batch views, read the online store, check freshness
and build point-in-time training sets. The commands only parse options and print; the work is done by
`FeatureRegistry`, `materialize`, `OfflineStore` and the configured online store.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kassa.atomicfile import replacing, unwritable
from kassa.config import Settings, load_settings
from kassa.features.definitions import DefinitionError, FeatureRepo, load_repo, parse_duration
from kassa.startup import missing_data, shown_path

if TYPE_CHECKING:  # the modules themselves load on use, so `kassa --help` stays quick
    from kassa.features.offline import OfflineStore
    from kassa.features.registry import FeatureRegistry

features_app = typer.Typer(
    help="Feature store: apply definitions, materialize, inspect values, build training sets.",
    no_args_is_help=True,
)
console = Console(stderr=True)
out = Console()

SettingsOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--settings", "-s", help="Kassa settings file (YAML; default: $KASSA_CONFIG).")]
DataDirOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--data-dir", help="Where Kassa keeps its files (default: data_dir of the settings, .kassa).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]


# The catalog's placement ids, to check `training-set --placement` against: the catalog is a layer above the
# feature store (pyproject.toml's import-linter contract), so the `kassa` command (`kassa.cli`) hands its reader in.
_placement_ids: Callable[[Settings], Iterable[str]] | None = None


def check_placements_with(placement_ids: Callable[[Settings], Iterable[str]]) -> None:
    """Have `training-set --from-decisions --placement` refuse a placement ``placement_ids`` does not list."""
    global _placement_ids
    _placement_ids = placement_ids


def _fail(message: str) -> NoReturn:
    console.print(f"[red]{message}[/]", highlight=False)
    raise typer.Exit(1)


def _registry(settings: Settings) -> FeatureRegistry:
    from kassa.features.registry import FeatureRegistry
    from kassa.startup import metadata_engine

    return FeatureRegistry(metadata_engine(settings))


def _applied(settings: Settings) -> FeatureRepo:
    """The applied definitions, for the commands that read them (get, freshness, training-set, materialize): a
    mistyped --data-dir is refused, not made into a fresh empty database that has none."""
    data = missing_data(settings)
    if data is not None:
        raise typer.BadParameter(f"no Kassa data in {shown_path(data)} (give the --data-dir or --settings "
                                 "that `kassa serve` uses; `kassa features apply` or `kassa serve` makes it)",
                                 param_hint="--data-dir")
    repo = _registry(settings).load()
    if not repo.views:
        _fail("no feature definitions are applied yet: run `kassa features apply FILE` first")
    return repo


def _offline(settings: Settings) -> OfflineStore:
    from kassa.features.offline import OfflineStore

    return OfflineStore(settings.data_path / "offline")


def _epoch(text: str | None, option: str) -> float | None:
    """An ISO-8601 time, a unix time or a duration ago (``7d``), as `kassa train|evaluate|drift` read them."""
    if text is None:
        return None
    from kassa.features.offline import to_epoch

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return to_epoch(text)
    except ValueError:
        raise typer.BadParameter(f"not a time: {text!r} (use 2026-11-01, 2026-11-01T12:00, a unix time, "
                                 "or a duration ago like 7d)", param_hint=option) from None


def _on_store(settings: Settings, work: Any) -> Any:
    """``asyncio.run(work)``; a Redis online store that cannot be reached is one line naming it and its setting
    (it was a ConnectionRefusedError traceback)."""
    if settings.features.online_store != "redis":
        return asyncio.run(work)
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from kassa.degraded import CircuitOpen

    try:
        return asyncio.run(work)
    except (OSError, RedisConnectionError, RedisTimeoutError, CircuitOpen) as exc:
        _fail(f"cannot reach the Redis online store at {settings.features.redis_url} (features.redis_url): "
              f"{getattr(exc, 'strerror', None) or exc}")


def _age(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@features_app.command("apply")
def apply(
    file: Annotated[Optional[Path], typer.Argument(  # noqa: UP045
        help="Definitions (YAML, JSON or Python); default: features.definitions_file.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Apply without asking.")] = False,
    allow_destructive: Annotated[bool, typer.Option(
        help="Allow removing views and retyping fields (their stored values are orphaned).")] = False,
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Validate definitions, show what would change, and store them in the registry."""
    from kassa.features.registry import DestructiveChangeError

    settings = load_settings(config, data_dir=data_dir)
    path = file or (Path(settings.features.definitions_file) if settings.features.definitions_file else None)
    if path is None:
        raise typer.BadParameter("give a definitions file (or set features.definitions_file)", param_hint="FILE")
    try:
        repo = load_repo(path)
    except (DefinitionError, OSError) as exc:
        _fail(f"invalid definitions: {exc}")
    registry = _registry(settings)
    try:
        diff = registry.plan(repo)  # also plans the stream views as the stream processor will
    except DefinitionError as exc:
        _fail(f"invalid definitions: {exc}")
    table = Table("kind", "name", "change", "detail", title=f"feature definitions: {path}")
    styles = {"add": "green", "change": "yellow", "remove": "red", "unchanged": "dim"}
    for kind, name, change, detail in diff.rows():
        table.add_row(kind, name, f"[{styles[change]}]{change}[/]", detail)
    out.print(table)
    if not diff.has_changes:
        console.print("nothing to apply")
        return
    if diff.destructive and not allow_destructive:
        _fail("refusing a destructive change: " + "; ".join(diff.destructive)
              + ". Re-run with --allow-destructive to apply it.")
    if not yes:
        try:
            confirmed = typer.confirm("Apply these changes?")
        except typer.Abort:  # no answer (stdin closed, as in CI or a pipe): was a bare "Aborted."
            _fail("\nnot applied: no answer to the question; pass --yes (-y) to apply without asking")
        if not confirmed:
            _fail("not applied")
    try:
        registry.apply(repo, allow_destructive=allow_destructive)
    except DestructiveChangeError as exc:  # someone applied in between
        _fail(str(exc))
    console.print("[green]applied[/]")


@features_app.command("materialize")
def materialize_cmd(
    view: Annotated[Optional[str], typer.Option(help="Only this batch view (default: all).")] = None,  # noqa: UP045
    start: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="ISO time, unix time or duration ago (7d); rows at or after it (default: all).")] = None,
    end: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="ISO time, unix time or duration ago; rows before it (default: now).")] = None,
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Load the newest value per entity key of batch views into the online store (and log them offline).

    Training sets do not need this: they read batch sources' full history."""
    from kassa.features.materialize import MaterializeError, MaterializeResult, batch_views, materialize
    from kassa.features.online.factory import close_online_store, embedded_store_served, open_online_store

    settings = load_settings(config, data_dir=data_dir)
    start_s, end_s = _epoch(start, "--start"), _epoch(end, "--end")
    repo = _applied(settings)
    if embedded_store_served(settings):  # its rows were reported written, never served, then overwritten
        _fail(f"a running Kassa server holds the embedded online store of {settings.data_path} in its memory: "
              "rows materialized here would not reach it, and it overwrites online.snapshot when it stops. Stop "
              "it and materialize then, or use the Redis online store (features.online_store: redis), which "
              "both share")
    try:
        views = batch_views(repo, view)
    except MaterializeError as exc:
        _fail(str(exc))
    if not views:
        _fail("no batch views to materialize")
    offline = _offline(settings)

    async def run() -> list[MaterializeResult]:
        store = open_online_store(settings)
        results: list[MaterializeResult] = []
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=console, transient=json_out) as bar:
                for v in views:
                    task = bar.add_task(v.name, total=None)

                    def step(done: int, total: int, task: Any = task) -> None:
                        bar.update(task, completed=done, total=total)

                    results.append(await materialize(repo, v, store, offline, start_s, end_s, step))
        finally:
            await close_online_store(store, settings)
        return results

    try:
        results = _on_store(settings, run())
    except MaterializeError as exc:
        _fail(str(exc))
    if json_out:
        print(json.dumps({"views": [{"view": r.view, "rows": r.rows, "online_written": r.online_written,
                                     "offline_written": r.offline_written, "seconds": round(r.seconds, 3)}
                                    for r in results]}))
        return
    table = Table("view", "keys", "online", "offline", "seconds")
    for r in results:
        table.add_row(r.view, str(r.rows), str(r.online_written), str(r.offline_written), f"{r.seconds:.2f}")
    out.print(table)


@features_app.command("get")
def get(
    view: Annotated[str, typer.Argument(help="Feature view.")],
    key: Annotated[str, typer.Argument(help="Entity key, e.g. a customer id.")],
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Print a view's values for one entity key from the online store, with their age."""
    from kassa.features.online.factory import SNAPSHOT_FILE, embedded_store_served, open_online_store

    settings = load_settings(config, data_dir=data_dir)
    repo = _applied(settings)
    v = repo.view(view)
    if v is None:  # a typo was "unknown view" with nothing to pick from
        _fail(f"unknown view {view!r} (known: {', '.join(x.name for x in repo.views)})")

    async def read() -> Any:
        store = open_online_store(settings)
        try:
            rows = await store.read([(v.entity, key)], [v])
        finally:
            await store.close()  # read-only: nothing to snapshot
        row = rows[0] if rows else None
        return row.get(v.name) if row else None

    found = _on_store(settings, read())
    if embedded_store_served(settings):  # "defaults are served" was said of values the server did serve
        console.print(f"[yellow]note[/]: a running Kassa server holds this data dir's embedded online store; "
                      f"this reads {SNAPSHOT_FILE} as it saved it when it last stopped. Its current values: "
                      f"GET /v1/features/{v.name}/{{key}} with a secret key", highlight=False)
    now = time.time()
    result: dict[str, Any] = {"view": v.name, "entity": v.entity, "key": key, "found": found is not None}
    if found is not None:
        result |= {"ts": found.ts, "age_seconds": round(now - found.ts, 3), "values": found.values}
    if json_out:
        print(json.dumps(result, default=str))
    elif found is None:
        console.print(f"no values of {v.name!r} for {v.entity} {key!r} (missing or expired: defaults are served)")
    else:
        console.print(f"{v.name} for {v.entity} {key!r}: event time {_iso(found.ts)}, age {_age(now - found.ts)}",
                      highlight=False)
        table = Table("field", "value")
        for f in v.fields:
            table.add_row(f.name, json.dumps(found.values.get(f.name), default=str))
        out.print(table)
    if found is None:
        raise typer.Exit(1)


@features_app.command("freshness")
def freshness(config: SettingsOpt = None, data_dir: DataDirOpt = None, json_out: JsonOpt = False) -> None:
    """Age of each view's newest value against its freshness target (from the offline log, which holds
    every materialized and pushed value)."""
    settings = load_settings(config, data_dir=data_dir)
    repo = _applied(settings)
    offline = _offline(settings)
    now = time.time()
    views: list[dict[str, Any]] = []
    for v in repo.views:
        if v.kind == "request":  # computed per request: always fresh, nothing stored
            continue
        newest = offline.newest(v.name)
        target = parse_duration(v.freshness_target)
        age = None if newest is None else now - newest
        views.append({"view": v.name, "kind": v.kind, "newest_ts": newest,
                      "age_seconds": None if age is None else round(age, 3), "target_seconds": target,
                      "fresh": None if age is None else age <= target})
    if json_out:
        print(json.dumps({"views": views, "stale": sum(1 for r in views if r["fresh"] is False),
                          "empty": sum(1 for r in views if r["fresh"] is None)}))
        return
    table = Table("view", "kind", "newest value", "age", "target", "status")
    for r in views:
        status = ("[dim]no data[/]" if r["fresh"] is None else "[green]fresh[/]" if r["fresh"] else "[red]stale[/]")
        table.add_row(r["view"], r["kind"], "-" if r["newest_ts"] is None else _iso(r["newest_ts"]),
                      "-" if r["age_seconds"] is None else _age(r["age_seconds"]), _age(r["target_seconds"]), status)
    out.print(table)


@features_app.command("training-set")
def training_set(
    features: Annotated[list[str], typer.Option(
        "--features", help="view:field[,view:field...] (view:* for every field); repeatable.")],
    out_file: Annotated[Path, typer.Option("--out", help="Parquet file to write.")],
    entities: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Parquet/CSV of entity rows: join key(s) and a timestamp column.")] = None,
    timestamp_field: Annotated[str, typer.Option(help="Timestamp column of the entity rows.")] = "event_timestamp",
    from_decisions: Annotated[bool, typer.Option(
        "--from-decisions", help="Use the decision log's decisions as the entity rows.")] = False,
    placement: Annotated[Optional[str], typer.Option(help="With --from-decisions: one placement.")] = None,  # noqa: UP045
    since: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="With --from-decisions: ISO time, unix time or duration ago (7d); inclusive.")] = None,
    until: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="With --from-decisions: ISO time, unix time or duration ago; exclusive.")] = None,
    full_names: Annotated[bool, typer.Option(help="Name feature columns view__field.")] = False,
    no_defaults: Annotated[bool, typer.Option(
        "--no-defaults", help="Leave missing and stale values null instead of the fields' defaults.")] = False,
    filter_by_created_timestamp: Annotated[bool, typer.Option(
        "--filter-by-created-timestamp",
        help="Ignore versions created after each row's time (no leakage through late corrections).")] = False,
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Join entity rows with every feature's value as of each row's time (never a later one).

    Batch views are read from their source's full history (no materialize needed); push and stream
    views from the offline log."""
    import pyarrow.parquet as pq

    from kassa.events.decision_log import UnreadableDecisionLog
    from kassa.features.offline import EntityRowsError, entities_from_decisions, resolve_features

    if (entities is None) == (not from_decisions):
        raise typer.BadParameter("give exactly one of --entities FILE or --from-decisions", param_hint="--entities")
    why = unwritable(out_file)  # was an OSError traceback after the join
    if why is not None:
        raise typer.BadParameter(why, param_hint="--out")
    if not from_decisions:  # they were ignored: every row of the file was joined
        for given, name in ((placement, "--placement"), (since, "--since"), (until, "--until")):
            if given is not None:
                raise typer.BadParameter("selects decisions of the decision log: it goes with --from-decisions, "
                                         "not with --entities", param_hint=name)
    settings = load_settings(config, data_dir=data_dir)
    repo = _applied(settings)
    try:
        wanted = resolve_features(repo, [ref for item in features for ref in item.split(",")])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--features") from None
    if from_decisions:
        start, end = _epoch(since, "--since"), _epoch(until, "--until")
        if start is not None and end is not None and start >= end:
            raise typer.BadParameter(f"the window is empty: it starts at {_iso(start)} and ends at {_iso(end)}",
                                     param_hint="--since")
        try:
            rows: Any = entities_from_decisions(settings.data_path, placement, start, end)
        except UnreadableDecisionLog as exc:  # was a DuckDB traceback
            _fail(str(exc))
        if rows.num_rows == 0 and placement is not None and _placement_ids is not None:
            # a mistyped placement was "no logged decisions of ..." (exit 1); checked only here, so a placement
            # since removed from the catalog still gives the decisions it logged
            known = sorted(_placement_ids(settings))
            if placement not in known:
                raise typer.BadParameter(f"unknown placement {placement!r} (known: {', '.join(known) or 'none'})",
                                         param_hint="--placement")
        if rows.num_rows == 0:  # an empty Parquet file was written, and the command said "wrote 0 rows"
            window = (f" from {_iso(start)}" if start is not None else "") + (
                f" until {_iso(end)}" if end is not None else "")
            _fail(f"no logged decisions{f' of {placement}' if placement else ''}{window} in "
                  f"{settings.data_path / 'decisions'}: no training set written")
        timestamp_field = "event_timestamp"
    else:
        rows = entities
        if rows is None or not rows.exists():
            raise typer.BadParameter(f"no such file: {rows}", param_hint="--entities")
    try:
        table = _offline(settings).training_set(rows, wanted, entities=repo.entities,
                                                timestamp_field=timestamp_field, full_names=full_names,
                                                defaults=not no_defaults,
                                                filter_by_created_timestamp=filter_by_created_timestamp)
    except EntityRowsError as exc:  # a file that cannot be read or lacks a column: bad input, named (was exit 1)
        if entities is None:  # the decision log's rows: not the user's input
            _fail(str(exc))
        raise typer.BadParameter(str(exc), param_hint="--entities") from None
    except ValueError as exc:  # the join itself: a batch source DuckDB cannot read, feature names that clash
        _fail(f"cannot join the entity rows of {entities} (timestamp column {timestamp_field!r}): {exc}"
              if entities is not None else str(exc))
    try:
        with replacing(out_file) as tmp:  # a stop or a failure mid-write leaves the previous file, not half of one
            pq.write_table(table, tmp)
    except OSError as exc:  # a disk that filled up meanwhile
        _fail(f"cannot write {out_file}: {exc.strerror or exc}")
    names = [f"{v.name}:{f}" for v, fields in wanted for f in fields]
    if json_out:
        print(json.dumps({"rows": table.num_rows, "columns": table.num_columns, "features": names,
                          "out": str(out_file), "defaults": not no_defaults,
                          "filter_by_created_timestamp": filter_by_created_timestamp}))
    else:
        console.print(f"wrote {table.num_rows} rows × {len(names)} features to {out_file}")
