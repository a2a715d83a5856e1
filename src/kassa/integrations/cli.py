"""``kassa integrations audit|sync PLATFORM``: probe API access and pull the catalog.

Owns the Typer sub-app: option parsing, the Rich progress bar and tables, the ``--every`` schedule loop,
and the exit codes (0 done, 1 the platform refused or a page could not be read, 2 bad configuration).
``--json`` prints one JSON object as the last line of stdout; progress goes to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from kassa.config import Settings, load_settings
from kassa.integrations.base import Connector, IntegrationError
from kassa.integrations.config import (
    ConfigError,
    UnknownPlatform,
    connector_for,
    factory_for,
    load_integration_settings,
)

integrations_app = typer.Typer(help="Commerce platform connectors: API audit and catalog sync.",
                               no_args_is_help=True)
console = Console(stderr=True)

PlatformArg = Annotated[str, typer.Argument(help="shopify | woocommerce | magento | sfcc | sap")]
ConfigOpt = Annotated[Path, typer.Option(
    "--credentials", help="Integration config (YAML) with the platform's credentials and options.")]
SettingsOpt = Annotated[Optional[Path], typer.Option(  # noqa: UP045
    "--settings", "-s", help="Kassa settings file (YAML; default: $KASSA_CONFIG).")]
DataDirOpt = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--data-dir", help="Where Kassa keeps its files (default: data_dir of the settings, .kassa).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
RetriesOpt = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--retries", min=0, help="Retries of a request the platform does not answer (backoff 0.5 s, doubling); "
                             "default: max_retries of the integration config, else 5.")]
TimeoutOpt = Annotated[Optional[float], typer.Option(  # noqa: UP045
    "--timeout", min=0.001, help="Seconds to wait for each answer; default: timeout of the integration config, "
                                 "else 30.")]


def _open(platform: str, config: Path, settings: Settings, retries: int | None = None,
          timeout: float | None = None) -> tuple[Connector, dict[str, Any]]:
    # One INFO line per page request would bury the progress bar; failures are reported by Kassa itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        factory_for(platform)  # an unknown platform is the first thing to say
        cfg = load_integration_settings(platform, config, settings.integrations)
        for key, value in (("max_retries", retries), ("timeout", timeout)):
            if value is not None:
                cfg.options[key] = value
        return connector_for(platform, cfg, on_retry=_say_retry(platform)), cfg.options
    except (ConfigError, UnknownPlatform) as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


def _say_retry(platform: str) -> Callable[[float, str], None]:
    """Each retry on stderr: a host that does not answer was retried for ~16 s per request, silently."""

    def say(seconds: float, reason: str) -> None:
        console.print(Text.assemble((f"{platform} ", "yellow"), f"{reason}; retrying in {seconds:.1f} s"))

    return say


def _close(connector: Connector) -> None:
    close = getattr(connector, "close", None)
    if callable(close):
        close()


@integrations_app.command()
def audit(platform: PlatformArg, config: ConfigOpt, settings_file: SettingsOpt = None,
          json_out: JsonOpt = False, retries: RetriesOpt = None, timeout: TimeoutOpt = None) -> None:
    """Probe what the configured credentials can reach, per capability.

    OK / missing scope / unreachable with the platform's own error, how far back orders are readable, and
    the setup steps for order webhooks and the confirmation-page snippet. Exit code 1 unless all are OK.
    """
    from kassa.integrations.audit import render, run_audit

    settings = load_settings(settings_file)
    connector, _ = _open(platform, config, settings, retries, timeout)
    try:
        # Each capability is a request, retried with backoff when the platform does not answer (~17 s against a
        # host that refuses): say what is going on meanwhile (on stderr; nothing when not a terminal).
        with console.status(f"probing {platform}'s API: products, orders, webhooks, inventory, customers…"):
            report = run_audit(connector)
    finally:
        _close(connector)
    Console(stderr=json_out).print(render(report))
    if json_out:
        print(json.dumps(report.to_dict()))
    if not report.ok:
        raise typer.Exit(1)


@integrations_app.command()
def sync(
    platform: PlatformArg,
    config: ConfigOpt,
    settings_file: SettingsOpt = None,
    data_dir: DataDirOpt = None,
    every: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Run again at this interval (e.g. 30m, 1h) until interrupted.")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Forget the saved cursor: a full sync.")] = False,
    json_out: JsonOpt = False,
    retries: RetriesOpt = None,
    timeout: TimeoutOpt = None,
    max_pages: Annotated[Optional[int], typer.Option(hidden=True)] = None,  # noqa: UP045
) -> None:
    """Pull the platform's products into the offer catalog.

    Resumable: a killed sync continues after its last committed page; a finished one leaves an incremental
    cursor, so the next run only fetches products changed since.
    """
    from kassa.catalog.store import SqlCatalogStore
    from kassa.features.definitions import parse_duration
    from kassa.startup import metadata_engine

    interval = None
    if every is not None:
        try:
            interval = parse_duration(every)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--every") from None
    settings = load_settings(settings_file, data_dir=data_dir)
    connector, options = _open(platform, config, settings, retries, timeout)
    data = settings.data_path
    data.mkdir(parents=True, exist_ok=True)
    store = SqlCatalogStore(metadata_engine(settings))
    prefix = str(options.get("offer_id_prefix") or "")
    first = True
    try:
        while True:
            report = _sync_once(platform, connector, store, data, reset and first, prefix, json_out, max_pages)
            _summary(report)
            if json_out:
                print(json.dumps(report.to_dict()))
                sys.stdout.flush()
            first = False
            if interval is None:
                break
            console.print(f"next {platform} sync in {every} (Ctrl-C to stop)")
            time.sleep(interval)
    except KeyboardInterrupt:  # 130 as every Ctrl-C (README); each committed page is kept with its cursor
        console.print("stopped; the cursor is saved")
        raise typer.Exit(130) from None
    finally:
        _close(connector)
        store.engine.dispose()


def _sync_once(platform: str, connector: Connector, store: Any, data: Path, reset: bool, prefix: str,
               json_out: bool, max_pages: int | None) -> Any:
    from kassa.integrations.sync import SyncReport, sync_catalog

    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[note]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{platform} products", total=None, note="")

        committed = [0]  # pages written by this run (the except below has no report)

        def on_page(report: SyncReport, total: int | None) -> None:
            committed[0] = report.pages
            note = f"{report.pages} pages"
            if report.waited_seconds:
                note += f", waited {report.waited_seconds:.1f}s on rate limits"
            progress.update(task, completed=report.previously_written + report.products,
                            total=total, note=note)

        try:
            return sync_catalog(connector, store, data, reset=reset, offer_id_prefix=prefix, on_page=on_page,
                                max_pages=max_pages)
        except IntegrationError as exc:
            progress.stop()
            kept = (f"the {committed[0]} page(s) this run wrote are kept with their cursor; run the same command "
                    "again to resume" if committed[0] else
                    "this run wrote nothing; run the same command again (a sync killed earlier resumes where it "
                    "stopped)")
            console.print(f"[red]{platform} sync stopped:[/] {exc}\n({kept})")
            if json_out:
                print(json.dumps({"platform": platform, "error": str(exc), "complete": False}))
            raise typer.Exit(1) from None


def _summary(report: Any) -> None:
    state = "complete" if report.complete else "paused (resume by running it again)"
    line = (f"[green]{report.platform}[/]: {report.products:,} products in {report.pages} pages, "
            f"{report.seconds:.1f}s, {state}")
    if report.resumed:
        line += f"; resumed after {report.previously_written:,} already synced"
    if report.waited_seconds:
        line += f"; waited {report.waited_seconds:.1f}s on rate limits"
    console.print(line)
    if report.skipped:
        console.print(f"[yellow]{report.skipped} products skipped[/] (could not be parsed), e.g.:")
        for example in report.skipped_examples:
            console.print(f"  {example}")
    console.print("Running `kassa serve` processes on this catalog database serve the synced offers within a "
                  "second (no restart).")
