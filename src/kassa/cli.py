"""The ``kassa`` command."""

from __future__ import annotations

import inspect
import logging
import sys
import time
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from kassa.config import RoleSettings, Settings, load_settings
from kassa.features.cli import check_placements_with, features_app
from kassa.integrations.cli import integrations_app
from kassa.learn.cli import drift_command, evaluate_command, models_app, train_command
from kassa.loadtest.cli import loadtest_app


def rewrite_aliases(args: list[str]) -> list[str]:
    """The old option names, accepted but no longer shown: ``--config``/``-c`` was Kassa's settings file
    everywhere except under ``integrations``, where it named the platform credentials (now ``--credentials``;
    Kassa's settings are ``--settings`` in every command)."""
    credentials = bool(args) and args[0] == "integrations"
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if name in ("--config", "-c"):
            arg = ("--credentials" if credentials else "--settings") + eq + value
        out.append(arg)
    return out


def one_line_summaries(group: Any) -> None:
    """Give every command under ``group`` its docstring's first paragraph on one line as its summary in the
    command lists: Typer's rich help keeps that paragraph's line breaks there ("against production,"
    then "uniform-random and ..." on the next line, mid-sentence), though not on the command's own page."""
    for command in getattr(group, "commands", {}).values():
        if command.short_help is None and command.help:
            first = inspect.cleandoc(command.help).split("\n\n")[0]
            if "\n" in first:
                command.short_help = " ".join(first.split())
        one_line_summaries(command)


class _KassaGroup(TyperGroup):
    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's vendored click Context
        one_line_summaries(self)
        return super().parse_args(ctx, rewrite_aliases(args))

    def invoke(self, ctx: Any) -> Any:
        # A Ctrl-C ends every command as one during start-up does (`kassa.__main__`): exit 130 and the line
        # `interrupted`. Typer exits 130 without a word, so a log or a half-drawn progress bar just stopped.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            raise typer.Exit(130) from None


app = typer.Typer(help="Kassa: real-time decisions for checkout.", no_args_is_help=True, add_completion=False,
                  cls=_KassaGroup)
keys_app = typer.Typer(help="Manage API keys (stored hashed).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
log_app = typer.Typer(help="Maintain the decision log.", no_args_is_help=True)
app.add_typer(log_app, name="log")
app.add_typer(features_app, name="features")
app.add_typer(integrations_app, name="integrations")
app.add_typer(models_app, name="models")
app.add_typer(loadtest_app, name="loadtest")
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("drift")(drift_command)


def _catalog_placement_ids(settings: Settings) -> list[str]:
    """The catalog's placement ids, for `kassa features training-set --placement` (the feature store is below the
    catalog, so it cannot read them itself)."""
    from kassa.catalog.store import SqlCatalogStore
    from kassa.startup import metadata_engine

    return [p.id for p in SqlCatalogStore(metadata_engine(settings)).load()[1]]


check_placements_with(_catalog_placement_ids)

console = Console(stderr=True)

SettingsOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--settings", "-s", help="Kassa settings file (YAML; default: $KASSA_CONFIG).")]
DataDirOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--data-dir", help="Where Kassa keeps its files (default: data_dir of the settings, .kassa).")]


def _settings(config: Path | None, **overrides: object) -> Settings:
    return load_settings(config, **overrides)


def _existing(settings: Settings) -> Settings:
    """``settings`` when they name existing Kassa data: a read (`keys list`, `keys revoke`) of a mistyped
    --data-dir made a fresh empty database there and listed no keys, as if the store had none."""
    from kassa.startup import missing_data, shown_path

    data = missing_data(settings)
    if data is not None:
        raise typer.BadParameter(f"no Kassa data in {shown_path(data)} (give the --data-dir or --settings "
                                 "that `kassa serve` uses; `kassa keys create` or `kassa serve` makes it)",
                                 param_hint="--data-dir")
    return settings


def _print_version(value: bool) -> None:
    if value:
        from kassa import __version__

        print(f"kassa {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Kassa: real-time decisions for checkout."""


@app.command()
def init(
    folder: Annotated[Path, typer.Argument(help="The project folder (created if missing).")],
    force: Annotated[bool, typer.Option(help="Overwrite files that are already there.")] = False,
) -> None:
    """Scaffold a project: settings with generated keys, a catalog and feature definitions."""
    from kassa.project import ProjectError, init_project

    try:
        project = init_project(folder, force=force)
    except ProjectError as exc:
        console.print(f"[red]{exc}[/]", highlight=False)
        raise typer.Exit(1) from None
    for path in project.files:
        console.print(f"wrote {path}", highlight=False)
    console.print("keys (also in kassa.yaml, which is git-ignored):", highlight=False)
    for kind, key in project.keys.items():
        console.print(f"  {kind:<12} {key}", highlight=False)
    console.print(f"next: cd {folder} && kassa serve --settings kassa.yaml", highlight=False)


@app.command()
def snippet(
    base_url: Annotated[str, typer.Option(help="Kassa's public URL, for the tag.")] = "https://kassa.example.com",
    out: Annotated[Optional[Path], typer.Option(help="Also write the built script here (self-hosting).")] = None,  # noqa: UP045
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Print the confirmation-page <script> tag with its SRI integrity (and sizes)."""
    from kassa.snippet.build import main as build_main

    argv = ["--base-url", base_url] + (["--out", str(out)] if out else []) + (["--json"] if json_out else [])
    raise typer.Exit(build_main(argv))


@app.command()
def serve(
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
    catalog: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Offers/placements YAML to load at start (default: catalog_file of the settings).")] = None,
    host: Annotated[Optional[str], typer.Option(help="Bind address (default: server.host, 127.0.0.1).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (default: server.port, 8000).")] = None,  # noqa: UP045
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="HTTP worker processes (default: roles.workers; 0 = one per core when the learner runs apart).")] = None,
    learner: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Where the learner runs: inprocess | child | external (default: roles.learner).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed the slot sampling and the shadow scorer: the same "  # noqa: UP045
                                                     "requests against the same models get the same offers.")] = None,
) -> None:
    """Run the decision API on the embedded default (nothing else to start)."""
    # a bad value of an option is bad usage (exit 2, as `--port abc`), not an invalid settings file (exit 1)
    places = typing.get_args(typing.get_type_hints(RoleSettings)["learner"])  # roles.learner's own values
    if learner is not None and learner not in places:
        raise typer.BadParameter(f"{learner!r} is not one of {', '.join(places)}", param_hint="--learner")
    if workers is not None and workers < 0:
        raise typer.BadParameter("must be 0 (one per core) or more", param_hint="--workers")
    overrides: dict[str, object] = {"data_dir": data_dir, "catalog_file": catalog, "roles.workers": workers,
                                    "roles.learner": learner}
    if host is not None:
        overrides["server.host"] = host
    if port is not None:
        overrides["server.port"] = port
    settings = _settings(config, **overrides)
    from kassa.server import run_server

    run_server(settings, seed=seed)


@app.command()
def demo(
    headless: Annotated[bool, typer.Option(help="Run the simulation to completion without the live view.")] = False,
    checkouts: Annotated[int, typer.Option(help="Simulated checkouts.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")] = False,
    port: Annotated[int, typer.Option(help="Port of the demo server.")] = 8000,
    data_dir: Annotated[Optional[str], typer.Option(help="Demo data folder (default: a fresh temp dir).")] = None,  # noqa: UP045
    keep_serving: Annotated[Optional[bool], typer.Option(  # noqa: UP045
        "--keep-serving/--exit", help="Leave the API up for curl when done (default: yes unless headless).")] = None,
    policy: Annotated[str, typer.Option(
        help="The policy slice's learning policy: squarecb (default), epsilon, softmax or ucb.")] = "squarecb",
) -> None:
    """Simulated store + shoppers: watch Kassa decide, log and learn, with control slices."""
    from kassa.demo.run import run_demo

    result = run_demo(headless=headless, checkouts=checkouts, seed=seed, json_out=json_out, port=port,
                      data_dir=data_dir, keep_serving=(not headless) if keep_serving is None else keep_serving,
                      policy=policy)
    if result["interrupted"]:  # a Ctrl-C during the run: the summary so far was printed, but the run is not done
        raise typer.Exit(130)


@app.command()
def learn(
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
    placement: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        help="Learn only this placement (repeatable; default: every placement).")] = None,
) -> None:
    """Run the reward joiner, the online learner and snapshot publishing (one active per placement).

    Start two for a standby: the second waits on the lease (roles.lease: file or redis) and takes over
    within roles.lease_ttl_seconds of the first one dying. Input (roles.learner_input): sqlite tails
    events.db and decision_records.db of the data directory (one machine); jetstream reads the serving
    processes' join records and events from NATS JetStream (events.backend: jetstream; any machine).

    On events.backend: jetstream one learner (a lease of its own) also writes the decision log into its data
    directory (roles.decision_log_writer: learner; off leaves it to `kassa log write`).
    """
    from kassa.roles.learner import run_learner

    code = run_learner(_settings(config, data_dir=data_dir), placement)
    if code == 130:  # stopped gracefully by a Ctrl-C: the line every Ctrl-C of `kassa` ends with (README)
        print("interrupted", file=sys.stderr, flush=True)
    raise typer.Exit(code)


@app.command()
def stream(
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
    poll: Annotated[float, typer.Option(
        help="Seconds between the starts of two reads of the event log (0.02: freshness P99 ~90-110 ms at "
             "10,000 events/s where 0.05 gave 87-2,583 ms; each read costs ~0.5 ms).")] = 0.02,
) -> None:
    """Run the streaming-feature worker: tail the event log into the online store (Ctrl-C to stop).

    `kassa serve` already does this in-process; run it separately when the online store is Redis and
    the server should not carry the aggregation work.
    """
    import asyncio

    from rich.live import Live

    from kassa.db import wait_for_database
    from kassa.events.factory import open_event_log
    from kassa.features.online.factory import close_online_store, open_online_store
    from kassa.features.registry import FeatureRegistry
    from kassa.features.streaming.processor import StreamProcessor
    from kassa.startup import metadata_engine

    settings = _existing(_settings(config, data_dir=data_dir))
    if not wait_for_database(settings.metadata_url):  # PostgreSQL not up yet: a line per 10 s, not a traceback
        raise typer.Exit(130)
    repo = FeatureRegistry(metadata_engine(settings)).load()
    views = [v for v in repo.views if v.kind == "stream"]
    if not views:
        console.print("[red]no stream views applied[/]; run `kassa features apply FILE` first")
        raise typer.Exit(1)

    async def main() -> None:
        store = open_online_store(settings, repo.views)
        log = open_event_log(settings)
        proc = StreamProcessor(views, store, log, checkpoint_path=settings.data_path / "stream.checkpoint")
        task = asyncio.create_task(proc.run(poll, own_process=True))
        def status() -> str:
            return (f"processed {proc.processed:,}  lag {proc.lag_events:,} events / {proc.lag_seconds:.1f} s  "
                    f"late dropped {proc.late_dropped:,}  writes {proc.writes:,}")

        try:
            if console.is_terminal:
                with Live(console=console, refresh_per_second=2) as live:
                    while not task.done():
                        live.update(status())
                        await asyncio.sleep(0.5)
            else:  # a log file or a pipe: one line every 5 s (a Live display leaves its last frame unterminated)
                while not task.done():
                    await asyncio.wait({task}, timeout=5.0)
                    console.print(status())
        finally:
            proc.stop()
            await proc.save_checkpoint()
            task.cancel()
            log.close()
            await close_online_store(store, settings)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # the checkpoint is saved (main's finally); 130 as every Ctrl-C (README)
        console.print("stopped")
        raise typer.Exit(130) from None


@keys_app.command("create")
def keys_create(
    kind: Annotated[str, typer.Argument(help="publishable | secret | admin")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    origin: Annotated[Optional[list[str]], typer.Option(help="Allowed origin (publishable keys).")] = None,  # noqa: UP045
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a key and print it once (only its hash is stored)."""
    if kind not in ("publishable", "secret", "admin"):
        raise typer.BadParameter("kind must be publishable, secret or admin", param_hint="KIND")
    from kassa.keys import InvalidOrigin, KeyStore, browser_origins
    from kassa.startup import metadata_engine

    try:
        browser_origins(origin or [])  # before any file is made
    except InvalidOrigin as exc:
        raise typer.BadParameter(str(exc), param_hint="--origin") from None
    settings = _settings(config, data_dir=data_dir)
    store = KeyStore(metadata_engine(settings))
    key = store.create(kind, name or kind, origin or [])  # type: ignore[arg-type]
    console.print(f"[green]created {kind} key[/] (shown once, store it now):")
    print(key)


@keys_app.command("list")
def keys_list(config: SettingsOpt = None, data_dir: DataDirOpt = None) -> None:
    """List keys (hash prefix, kind, name, origins)."""
    from kassa.keys import KeyStore
    from kassa.startup import metadata_engine

    settings = _existing(_settings(config, data_dir=data_dir))
    table = Table("id", "kind", "name", "origins", "revoked")
    table.columns[3].overflow = "fold"  # an origin cut to "https://shop.exa…" does not say which it is
    for k in KeyStore(metadata_engine(settings)).list():
        table.add_row(k["id"], k["kind"], k["name"], ", ".join(k["origins"]) or "*", str(k["revoked"]))
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's id as `kassa keys list` prints it, or the key itself.")],
    config: SettingsOpt = None, data_dir: DataDirOpt = None,
) -> None:
    """Revoke a key: give its id from `kassa keys list`, or the key itself. Running servers stop
    accepting it within a second, and a restart does not bring it back."""
    from kassa.keys import AmbiguousKeyId, KeyStore
    from kassa.startup import metadata_engine

    settings = _existing(_settings(config, data_dir=data_dir))
    try:
        revoked = KeyStore(metadata_engine(settings)).revoke(key)
    except AmbiguousKeyId as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    if not revoked:
        console.print("[red]no such key[/] (give the id `kassa keys list` prints, or the key)")
        raise typer.Exit(1)
    console.print("revoked")


@log_app.command("compact")
def log_compact(
    before: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Only hours ending at or before this time: ISO (UTC unless it says), a unix time or a duration ago "
             "like 2h (default and latest: 10 minutes ago).")] = None,
    config: SettingsOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Merge each closed hour's small decision-log files (one per flush) into one file, the shadow log's too.
    Safe while Kassa runs; one compaction per directory at a time (`kassa serve`, `kassa learn` and `kassa log
    write` also run it every few minutes)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from kassa.events.compaction import CompactionBusy, compact_decision_log
    from kassa.learn.cli import parse_time

    settings = _settings(config, data_dir=data_dir)
    try:
        cutoff = parse_time(before, time.time())
    except typer.BadParameter as exc:
        exc.param_hint = "--before"
        raise
    data = settings.data_path
    if not (data / "decisions").is_dir():
        raise typer.BadParameter(f"no decision log in {data} (give the --data-dir or --settings that `kassa serve` "
                                 "uses)", param_hint="--data-dir")
    for directory in (data / "decisions", data / "shadow" / "decisions"):
        if not directory.is_dir():
            continue
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task(f"{directory}: hours", total=None)

            def advance(done: int, total: int, task: TaskID = task) -> None:
                progress.update(task, completed=done, total=total)

            try:
                result = compact_decision_log(directory, cutoff, progress=advance)
            except CompactionBusy as exc:
                console.print(f"[red]{exc}[/] (try again when it is done)", highlight=False)
                raise typer.Exit(1) from None
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--before") from None
        console.print(f"{directory}: {result.files:,} files merged into {result.hours:,} "
                      f"({result.rows:,} decisions), {result.removed:,} removed, in {result.seconds:.1f} s",
                      highlight=False)


@log_app.command("write")
def log_write(config: SettingsOpt = None, data_dir: DataDirOpt = None) -> None:
    """Write the decision log from JetStream into the data directory, until SIGTERM or Ctrl-C.

    With events.backend: jetstream the serving processes publish each decision's record instead of writing
    Parquet, and one writer per deployment (a lease, roles.lease) writes <data_dir>/decisions. `kassa learn`
    runs it already (roles.decision_log_writer: learner); run this one where the learners leave it (off). It holds
    the same lease, so it never splits the stream with a learner's writer. Exits 0 on SIGTERM, 130 on Ctrl-C and
    75 when it lost its lease (start it again: it waits as a standby).
    """
    settings = _settings(config, data_dir=data_dir)
    if settings.events.backend != "jetstream":
        console.print(f"kassa log write: with events.backend: {settings.events.backend} each serving process writes "
                      f"the decision log itself ({settings.data_path / 'decisions'}); nothing to run (this is the "
                      "writer for events.backend: jetstream)", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    from kassa.roles.decision_log import run_writer

    raise typer.Exit(run_writer(settings))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()
