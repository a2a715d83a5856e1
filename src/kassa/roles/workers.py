"""`kassa serve --workers N`: a supervisor that forks N stateless HTTP workers (and, if asked, the learner).

The supervisor binds the port first (a busy port is the first and only thing said), then forks the
workers. Each worker builds its own `Kassa(role="serve")` after the fork (nothing with threads or sockets
of its own exists in the supervisor at fork time), with its JetStream bus on the server's own loop rather
than a thread of its own (ADR 0009, addendum of 2026-12-07), and serves either the inherited listening socket
(``balance="shared"``) or a socket of its own bound with ``SO_REUSEPORT`` (the kernel spreads new connections
across workers by a hash of the 4-tuple; ``balance="auto"``, the default, on Linux). ADR 0009 has the
measurements behind the default. A worker that dies is forked again (at most once a second); SIGTERM/SIGINT
stop every child gracefully (SIGTERM, then SIGKILL after ``grace`` seconds), then the supervisor exits 143/130.

With ``roles.learner = "child"`` the supervisor also runs `kassa learn` as a child process (restarted
when it dies), so `kassa serve` stays one command with the learner off the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import uvicorn
import uvloop

from kassa.config import Settings
from kassa.db import wait_for_database

log = logging.getLogger("kassa")


def describe_exit(code: int | None) -> str:
    """How a child ended, from its exit code as `os.waitstatus_to_exitcode` or `Popen.returncode` give it (a signal
    as its negative number): "exited with 1", "exited: killed by SIGKILL"; None: reaped elsewhere, unknown."""
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"exited: killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"exited: killed by signal {-code}"
    return f"exited with {code}"


def stop_with_parent(parent: int) -> None:
    """In a child of the supervisor (a forked worker, or the learner before its exec): receive SIGTERM when the
    supervisor dies, however it dies (Linux `PR_SET_PDEATHSIG`), so a `kill -9` of it does not leave workers serving
    the port and a learner holding its leases; SIGTERM stops them gracefully. ``parent`` is the supervisor's pid: if
    it died before the call, SIGTERM at once. Elsewhere than Linux: nothing (the supervisor's own stop still ends
    them)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def uvicorn_config(settings: Settings, app: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=settings.server.host, port=settings.server.port, loop="uvloop", http="httptools",
        lifespan="on", access_log=False, log_level=settings.log_level, server_header=False,
        date_header=False, timeout_keep_alive=30,
    )


def bind(host: str, port: int, reuseport: bool = False) -> socket.socket:
    """The listening socket, bound before anything else starts: a busy port is the first thing said (and
    the only thing), not an error after the start-up log claimed to be serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot serve on {host}:{port}: {exc.strerror or exc}; stop what holds the port or "
                         "choose another with --port (or server.port in the settings)") from None
    sock.set_inheritable(True)
    return sock


def uses_reuseport(settings: Settings) -> bool:
    """Whether each worker binds its own ``SO_REUSEPORT`` socket. "auto" picks it on Linux: on a shared socket
    libuv accepts every queued connection in one go, so whichever worker wakes first takes a burst of new
    keep-alive connections (60-80 % of 64 to one worker when idle, all of them in some loaded runs), while
    Linux hashes connections across reuseport sockets (53-59 %); ADR 0009's 2026-12-07 addendum."""
    balance = settings.roles.balance
    return balance == "reuseport" or (balance == "auto" and sys.platform.startswith("linux"))


def resolve_workers(settings: Settings) -> tuple[int, str]:
    """How many HTTP workers and where the learner runs. ``workers = 0`` means one per core when the learner
    runs apart, else 1; more than one worker moves an in-process learner to a child (each worker would
    otherwise learn only its own decisions)."""
    roles = settings.roles
    learner = roles.learner
    workers = roles.workers if roles.workers > 0 else (1 if learner == "inprocess" else (os.cpu_count() or 1))
    if workers > 1 and learner == "inprocess":
        learner = "child"
    return workers, learner


def _serve_worker(settings: Settings, sock: socket.socket | None, index: int, built_fd: int | None = None) -> None:
    """In a forked worker: build a serving Kassa and run uvicorn until told to stop."""
    from kassa.api.app import create_app
    from kassa.app import Kassa

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.setswitchinterval(0.0005)
    if sock is None:  # SO_REUSEPORT: a listening socket of this worker's own
        sock = bind(settings.server.host, settings.server.port, reuseport=True)
    # `uvicorn.Server.run` (an `asyncio.Runner` on the configured loop around `serve`), with the loop made
    # first: the JetStream bus is built on it, so requests hand it their events and decisions without a
    # thread of its own in between (ADR 0009). Signals are still `serve`'s to catch.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # uvicorn_config's loop="uvloop"
        kassa = Kassa(settings, role="serve", bus_loop=runner.get_loop())
        if built_fd is not None:  # the supervisor starts the others once this one created the databases
            os.write(built_fd, b"1")
            os.close(built_fd)
        app = create_app(kassa)
        log.info("worker %d (pid %d) serving", index, os.getpid())
        runner.run(uvicorn.Server(uvicorn_config(settings, app)).serve(sockets=[sock]))


class Supervisor:
    def __init__(self, settings: Settings, workers: int, learner: str, grace: float = 15.0) -> None:
        self.settings = settings
        self.workers = workers
        self.learner = learner
        self.grace = grace
        self.children: dict[int, int] = {}  # pid -> worker index
        self.learner_proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._stopped_by = 0  # the signal that stopped it: the exit status says which, as one `kassa serve` does
        self._settings_file: Path | None = None

    def _fork(self, index: int, sock: socket.socket | None, built_fd: int | None = None) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                stop_with_parent(parent)
                _serve_worker(self.settings, sock, index, built_fd)
            except SystemExit as exc:
                if isinstance(exc.code, str):  # "cannot start: …": said, not lost with the exit status
                    print(exc.code, file=sys.stderr, flush=True)
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        self.children[pid] = index

    def _start_learner(self) -> None:
        """Start `kassa learn` with this process's settings. They hold keys and database URLs, so on Linux they go
        through a memory file the child inherits (`--settings /proc/self/fd/N`), which no kill -9 can leave behind;
        elsewhere through a private temporary file, removed when the supervisor stops."""
        parent = os.getpid()
        encoded = msgspec.json.encode(self.settings)  # JSON is YAML: `--settings` reads it as is
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None:
            fd = memfd("kassa-learn-settings")
            try:
                os.write(fd, encoded)
                self.learner_proc = subprocess.Popen(
                    [sys.executable, "-m", "kassa", "learn", "--settings", f"/proc/self/fd/{fd}"], pass_fds=(fd,),
                    preexec_fn=lambda: stop_with_parent(parent))
            finally:
                os.close(fd)
        else:
            if self._settings_file is None:
                fd, name = tempfile.mkstemp(prefix="kassa-learn-", suffix=".json")
                with os.fdopen(fd, "wb") as f:
                    f.write(encoded)
                self._settings_file = Path(name)
            self.learner_proc = subprocess.Popen(
                [sys.executable, "-m", "kassa", "learn", "--settings", str(self._settings_file)],
                preexec_fn=lambda: stop_with_parent(parent))
        log.info("learner (pid %d) started", self.learner_proc.pid)

    def _stop(self, signum: int, _frame: object) -> None:
        self._stopping = True
        self._stopped_by = self._stopped_by or signum

    def run(self) -> None:
        reuseport = uses_reuseport(self.settings)
        # With SO_REUSEPORT the supervisor still binds (not listens): the port is checked and held.
        sock = bind(self.settings.server.host, self.settings.server.port, reuseport=reuseport)
        if not reuseport:
            sock.listen(2048)
        # Before any worker forks (they would each exit on it, and the supervisor after the first): the metadata
        # database unreachable is waited for, a line per 10 s; SIGTERM meanwhile ends the process as usual.
        if not wait_for_database(self.settings.metadata_url):
            sock.close()
            raise SystemExit(130)  # Ctrl-C while waiting
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info("serving on http://%s:%d with %d worker(s), learner %s", self.settings.server.host,
                 self.settings.server.port, self.workers, self.learner)
        # The first worker alone creates the metadata and log databases (concurrent `CREATE TABLE`s of
        # several processes on one SQLite file fail); the others and the learner start once it has.
        read_fd, write_fd = os.pipe()
        self._fork(0, None if reuseport else sock, write_fd)
        os.close(write_fd)
        ready = select.select([read_fd], [], [], 120.0)[0]
        died = bool(ready) and not os.read(read_fd, 1)  # the pipe closed without the byte: it exited
        os.close(read_fd)
        if died:
            # A start-up error (a missing catalog file, a data dir that is a file) does not heal: restarting
            # workers every second forever only repeated it. Stop, with the worker's message above.
            self._shutdown()
            sock.close()
            raise SystemExit("the first worker exited while starting; see its message above")
        if not ready:
            log.error("the first worker did not start within 120 s; see its log above")
        if self.learner == "child":
            self._start_learner()
        for i in range(1, self.workers):
            self._fork(i, None if reuseport else sock)
        last_fork = 0.0
        try:
            while not self._stopping:
                for pid, status in self._reap():
                    if not self._stopping:
                        index = self.children.pop(pid)
                        log.warning("worker %d (pid %d) %s; starting it again", index, pid, describe_exit(status))
                        time.sleep(max(0.0, 1.0 - (time.monotonic() - last_fork)))
                        last_fork = time.monotonic()
                        self._fork(index, None if reuseport else sock)
                if self.learner_proc is not None and self.learner_proc.poll() is not None and not self._stopping:
                    log.warning("learner (pid %d) %s; starting it again", self.learner_proc.pid,
                                describe_exit(self.learner_proc.returncode))
                    time.sleep(1.0)
                    self._start_learner()
                time.sleep(0.2)
        finally:
            self._shutdown()
            sock.close()
        # 130 for a Ctrl-C, 143 for SIGTERM, after every child stopped: what uvicorn gives `kassa serve` in one
        # process (it re-raises the signal once shut down); the supervisor exited 0 on both.
        raise SystemExit(128 + self._stopped_by)

    def _reap(self) -> list[tuple[int, int | None]]:
        """Workers that exited, with their exit codes (a signal as its negative number; only ours: the learner's
        `Popen` reaps its own child)."""
        gone: list[tuple[int, int | None]] = []
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped already: how it ended is not known
                gone.append((pid, None))
                continue
            if done:
                gone.append((pid, os.waitstatus_to_exitcode(status)))
        return gone

    def _shutdown(self) -> None:
        procs = list(self.children)
        for pid in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.learner_proc is not None and self.learner_proc.poll() is None:
            self.learner_proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while self.children and time.monotonic() < deadline:
            for pid, _ in self._reap():
                self.children.pop(pid, None)
            time.sleep(0.05)
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        if self.learner_proc is not None:
            try:
                self.learner_proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.learner_proc.kill()
                self.learner_proc.wait()
        if self._settings_file is not None:
            self._settings_file.unlink(missing_ok=True)
