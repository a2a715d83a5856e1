"""Run the ASGI app under uvicorn (uvloop + httptools), in the foreground or on a background thread."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from typing import Any

import uvicorn

from kassa.config import Settings
from kassa.db import wait_for_database
from kassa.roles.workers import Supervisor, bind, resolve_workers, uvicorn_config

__all__ = ["BackgroundServer", "bind", "raise_open_file_limit", "run_server", "start_up_hints"]

log = logging.getLogger("kassa")


def _config(settings: Settings, app: Any) -> uvicorn.Config:
    return uvicorn_config(settings, app)


def raise_open_file_limit() -> int | None:
    """Raise the soft open-file limit to the hard one: every idle keep-alive browser holds a socket, and
    the default soft limit (often 1,024) would refuse connections long before the CPU is busy."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit from %d to %d", soft, hard)
    return soft


def start_up_hints(kassa: Any) -> list[str]:
    """What a bare start is missing, said once in the log rather than as a wall of 401s and empty answers."""
    hints = []
    if kassa.settings.auth and not any(not k["revoked"] for k in kassa.keys.list()):
        hints.append("no API keys: every request will be refused (401). Create one with `kassa keys create "
                     "secret` (and `admin`, `publishable`), set secret_key/admin_key/publishable_key in the settings, "
                     "or start from `kassa init DIR`")
    if not kassa.catalog.snapshot.placements:
        hints.append("no placements: /readyz answers 503 until there is one. Load a catalog with --catalog FILE "
                     "(or catalog_file in the settings), or PUT /v1/placements/{id} with an admin key")
    return hints


def run_server(settings: Settings, seed: int | None = None) -> None:
    from kassa.api.app import create_app

    # Background threads (event-log writer, decision-log flusher) run Python too; a short switch
    # interval bounds how long one of them can keep the GIL from the request loop (default 5 ms).
    sys.setswitchinterval(0.0005)
    raise_open_file_limit()
    workers, learner = resolve_workers(settings)
    if workers > 1 or learner != "inprocess":
        # Stateless workers (and the learner as a child, or elsewhere): `kassa.roles.workers`.
        Supervisor(settings, workers, learner).run()
        return
    from kassa.app import Kassa

    sock = bind(settings.server.host, settings.server.port)
    if not wait_for_database(settings.metadata_url):  # not serving (so not ready) meanwhile; docs/deploy.md
        raise SystemExit(130)  # Ctrl-C while waiting
    t0 = time.perf_counter()
    kassa = Kassa(settings, seed=seed)
    app = create_app(kassa)
    for hint in start_up_hints(kassa):
        log.warning(hint)
    log.info("Kassa built in %.0f ms; serving on http://%s:%d", (time.perf_counter() - t0) * 1000,
             settings.server.host, settings.server.port)
    uvicorn.Server(_config(settings, app)).run(sockets=[sock])


class BackgroundServer:
    """A Kassa server on a thread of this process (tests, the demo). ``stop()`` shuts it down."""

    def __init__(self, settings: Settings, kassa: object | None = None) -> None:
        from kassa.api.app import create_app
        from kassa.app import Kassa

        self.kassa = kassa if kassa is not None else Kassa(settings)
        self.app = create_app(self.kassa)  # type: ignore[arg-type]
        self.server = uvicorn.Server(_config(settings, self.app))
        self.url = f"http://{settings.server.host}:{settings.server.port}"
        self.thread = threading.Thread(target=self._run, name="kassa-server", daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's loop, once started

    def _run(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            self.loop.close()

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"Kassa server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
