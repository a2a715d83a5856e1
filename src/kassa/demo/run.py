"""`run_demo`: the ``kassa demo`` command end to end.

Owns the demo's lifecycle: build the seeded store and world, write the catalog (with the static
control ranked by the world's ground truth) into a data folder, start a real Kassa server on a thread
with the demo keys, drive the simulated checkouts through it over HTTP, show progress (a Rich live
panel, or a plain line on stderr when headless), then print the summary, a curl to try, the ``--json``
line, and keep the API up on request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.live import Live

from kassa import policies
from kassa.api.demo_page import PATH as DEMO_PAGE
from kassa.api.demo_page import add_demo_page
from kassa.app import Kassa
from kassa.config import load_settings
from kassa.demo.driver import Driver
from kassa.demo.simulator import DEFAULT_SHARES, SLICES, World, decision_request_body
from kassa.demo.stats import Scoreboard
from kassa.demo.store import LEARNED_POLICY, POLICY, DemoStore
from kassa.demo.view import curl_example, live_panel, progress_line, summary_table
from kassa.server import BackgroundServer

PUBLISHABLE_KEY = "demo-publishable"
SECRET_KEY = "demo-secret"
ADMIN_KEY = "demo-admin"
WEBHOOK_SECRET = "demo-webhook-secret"  # signs Shopify order webhooks (`kassa loadtest` sends some)
# A push view like the one `kassa loadtest` profiles write (payload.feature_push); the demo's shoppers never
# write it, so decisions read its default until a load test does.
DEMO_FEATURES = """\
entities:
  - {name: customer, join_key: customer_id}
views:
  - name: customer_signals
    kind: push
    entity: customer
    ttl: 30d
    fields:
      - {name: segment, dtype: str, default: unknown, max_length: 32}
"""
HOST = "127.0.0.1"
LAST_WINDOW = 5_000  # the headline comparison: checkouts among the last 5,000 of the run
LIVE_WINDOW = 2_000
PROGRESS_EVERY_S = 5.0
DEMO_PAGE_TIMEOUT_MS = 400  # the shoppers keep this server busy; the snippet's default is 150 ms


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    # The learner logs every snapshot at INFO: once a second here, which would tear the live panel. Alembic's
    # five lines of creating the demo's new database say nothing to someone trying Kassa.
    names = ("kassa", "uvicorn", "uvicorn.error", "alembic")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _curl_body(world: World) -> dict[str, Any]:
    # A small order from a buyer the policy should have an opinion about: skincare, on a phone.
    sample = world.checkouts(500, stream="curl")
    pick = next((c for c in sample if "skincare" in c.categories and c.device == "mobile" and len(c.items) <= 2
                 and c.customer_id is not None), sample[0])
    return decision_request_body(pick, POLICY)


def keys_line() -> str:
    return (f"Keys of this demo: publishable {PUBLISHABLE_KEY} (browser), secret {SECRET_KEY} (server side: "
            f"events, features, decision lookups), admin {ADMIN_KEY}; Shopify webhook secret {WEBHOOK_SECRET}")


def loadtest_command(url: str, profile: str = "black-friday-peak", rate: float = 100, duration: float = 20) -> str:
    """One `kassa loadtest` command that runs against this demo as it is (every key and secret it needs)."""
    return (f"kassa loadtest --url {url} --profile {profile} --rate {rate:g} --duration {duration:g} "
            f"--key {PUBLISHABLE_KEY} --secret-key {SECRET_KEY} --webhook-secret {WEBHOOK_SECRET}")


def _check_port(port: int) -> None:
    # Fail before building anything: a taken port would otherwise surface as a server start timeout.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535 (was a traceback)
            reason = getattr(exc, "strerror", None) or "ports are 0-65535"
            raise SystemExit(f"cannot serve the demo on {HOST}:{port} ({reason}); pick another --port") from None


def run_demo(
    headless: bool,
    checkouts: int,
    seed: int,
    json_out: bool,
    port: int,
    data_dir: str | None,
    keep_serving: bool,
    *,
    workers: int = 2,
    shares: Sequence[float] = DEFAULT_SHARES,
    policy: str = LEARNED_POLICY,
) -> dict[str, Any]:
    """Run the demo; returns the summary (the object ``--json`` prints)."""
    if checkouts < 1:
        raise SystemExit("--checkouts must be at least 1")
    if not policies.learns(policy):
        learning = ", ".join(n for n in policies.names() if policies.learns(n))
        raise SystemExit(f"--policy {policy!r}: the demo's policy slice needs a learning policy ({learning})")
    _check_port(port)
    human = Console(stderr=json_out)  # with --json, stdout carries only the JSON line
    tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="kassa-demo-", ignore_cleanup_errors=True)
    path = Path(data_dir or tmp.name)  # type: ignore[union-attr]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, or under one (was a FileExistsError traceback)
        raise SystemExit(f"cannot use {path} as the demo's --data-dir: {exc.strerror or exc}") from None
    # Shoppers and server share this process's GIL: a short switch interval (as `kassa serve` sets)
    # stops one thread from sitting on it for the default 5 ms while another has a response ready.
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        with _quiet_logs():
            return _run(headless, checkouts, seed, json_out, port, path, keep_serving, workers, shares, human,
                        policy)
    finally:
        sys.setswitchinterval(switch)
        if tmp is not None:
            tmp.cleanup()


def _run(headless: bool, n: int, seed: int, json_out: bool, port: int, path: Path, keep_serving: bool,
         workers: int, shares: Sequence[float], human: Console, policy: str = LEARNED_POLICY) -> dict[str, Any]:
    t0 = time.perf_counter()
    store = DemoStore.build(seed)
    world = World(store, seed)
    static_order = world.best_static_order()
    catalog_file = path / "demo-catalog.json"
    catalog_file.write_bytes(msgspec.json.encode(store.catalog(static_order, policy)))
    features_file = path / "demo-features.yaml"
    features_file.write_text(DEMO_FEATURES)
    # A per-run prefix keeps order and event ids unique when a --data-dir is reused.
    run_id = f"r{int(time.time()):x}-"
    plan = world.checkouts(n, shares, run_id=run_id)

    settings = load_settings(None, **{
        "data_dir": str(path), "catalog_file": str(catalog_file), "log_level": "warning",
        "admin_key": ADMIN_KEY, "publishable_key": PUBLISHABLE_KEY, "secret_key": SECRET_KEY,
        "server.host": HOST, "server.port": port, "features.definitions_file": str(features_file),
        "integrations": {"shopify": {"webhook_secret": WEBHOOK_SECRET}},
        # Publish models often so the serving side follows the learner within seconds.
        "learn.snapshot_every_seconds": 1.0, "learn.snapshot_min_learns": 50,
    })
    kassa = Kassa(settings, seed=seed)
    try:
        server = BackgroundServer(settings, kassa)
        add_demo_page(server.app, PUBLISHABLE_KEY, [decision_request_body(c, POLICY) for c in world.checkouts(
            100, stream="page")], {p.sku: p.name for p in store.products}, timeout_ms=DEMO_PAGE_TIMEOUT_MS)
        server.start()
    except RuntimeError:
        raise SystemExit(f"could not start the demo server on {HOST}:{port}; is the port in use? "
                         "Pick another with --port.") from None
    url = server.url
    if not headless:
        human.print(f"[bold]Kassa demo[/]: {len(store.products)} products, {len(store.offers)} offers, "
                    f"{n:,} checkouts; API on {url} (set up in {time.perf_counter() - t0:.1f} s)")
        human.print(f"Confirmation page with the snippet: {url}{DEMO_PAGE}", markup=False, highlight=False)
        human.print(keys_line(), markup=False, highlight=False, soft_wrap=True)
    share_of = dict(zip(SLICES, shares, strict=True))
    try:
        board = Scoreboard(plan, window=LIVE_WINDOW)
        interrupted = False
        driver = Driver(world, plan, board, HOST, port, PUBLISHABLE_KEY, workers=workers).start()
        try:
            if headless or not human.is_terminal:
                # Redirected output: a live panel would print nothing until the end; a line every few
                # seconds, flushed, shows the run is moving (and reads well in a log file).
                next_line = time.monotonic() + PROGRESS_EVERY_S
                while driver.alive():
                    driver.join(0.2)
                    board.sample()
                    if time.monotonic() >= next_line:
                        print(progress_line(board), file=sys.stderr if headless or json_out else sys.stdout,
                              flush=True)
                        next_line += PROGRESS_EVERY_S
            else:
                with Live(live_panel(board, url, seed, share_of), console=human, refresh_per_second=4) as live:
                    while driver.alive():
                        driver.join(0.25)
                        board.sample()
                        live.update(live_panel(board, url, seed, share_of))
        except KeyboardInterrupt:
            driver.stop.set()
            driver.join()
            interrupted = True
            human.print("[yellow]interrupted: summarising the checkouts done so far[/]")
        board.finished_at = time.monotonic()
        if driver.error is not None:
            raise SystemExit(f"demo failed: {driver.error}")

        # Let the last decisions' reward windows close, so every outcome of the run is learned and counted.
        drain_until = time.monotonic() + max(v.placement.reward.wait_seconds
                                             for v in kassa.catalog.snapshot.placements.values()) + 1.0
        while len(kassa.joiner) and time.monotonic() < drain_until and not interrupted:
            time.sleep(0.05)
        if not keep_serving:  # its stop takes the learner's last snapshot, the version the run leaves serving
            server.stop()
        result = board.result(seed, LAST_WINDOW)
        result["requests"] = driver.requests
        result["learned_examples"] = kassa.learning.learned
        result["static_order"] = static_order
        result["policy"] = policy
        result["interrupted"] = interrupted  # `kassa demo` then exits 130, after this summary
        # The policy slice's production version in the registry now (as `kassa models list` shows it): the
        # scoreboard's is the last decision's, which predates the snapshots learned from the drained rewards
        # (and the last one, on stop) and is "baseline" or "fallback" when that one decision was.
        production = kassa.model_registry.versions(POLICY, stages=("production",), limit=1)
        result["model_version"] = production[0].version if production else "baseline"
        if not json_out or not headless:
            human.print(summary_table(result))
        if keep_serving or not headless:
            human.print("\nTry it while the demo serves (the model keeps what it learned):" if keep_serving
                        else "\nTry it against a serving demo (drop --exit):")
            # soft_wrap: the terminal may wrap the long JSON, but a copy-paste stays one command.
            human.print(curl_example(url, PUBLISHABLE_KEY, _curl_body(world)), markup=False, highlight=False,
                        soft_wrap=True)
            human.print(f"Placements and models (admin key): curl -s {url}/v1/placements "
                        f"-H 'Authorization: Bearer {ADMIN_KEY}'", markup=False, highlight=False, soft_wrap=True)
            human.print(keys_line(), markup=False, highlight=False, soft_wrap=True)
            human.print("Load-test it (decisions, events, feature pushes and signed order webhooks):",
                        markup=False, highlight=False)
            human.print(loadtest_command(url), markup=False, highlight=False, soft_wrap=True)
        if json_out:
            print(json.dumps(result), flush=True)
        if keep_serving and not interrupted:  # a Ctrl-C during the run means "stop", not "serve"
            human.print(f"\nServing on {url} until Ctrl-C; the confirmation page is {url}{DEMO_PAGE}", soft_wrap=True)
            with contextlib.suppress(KeyboardInterrupt):
                while server.thread.is_alive():
                    time.sleep(0.5)
        return result
    finally:
        server.stop()
