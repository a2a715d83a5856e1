"""Real external services for the tests: find a running one or start a throwaway one, never a mock.

`ensure_redis` returns the URL of a Redis server: ``REDIS_URL`` or ``redis://127.0.0.1:6379`` when it answers
PING; otherwise a ``redis-server`` from PATH started on a free port without persistence (stopped when the
test process exits); otherwise, as root, one installed with apt-get first. When none of that works the
calling test fails with a message that says how to provide Redis: a missing service is never a skip, so
a CI run without Redis cannot pass by testing nothing (``CI=true`` included).

`ensure_promtool` returns the path of Prometheus's ``promtool``: from PATH, else (as root) installed with
apt-get (Debian's ``prometheus`` package), else the test fails saying how to get it.

`ensure_nats` returns the URL of a NATS server with JetStream: ``NATS_URL`` or ``nats://127.0.0.1:4222`` when it
answers with JetStream enabled; otherwise a throwaway ``nats-server -js`` from PATH (or /usr/sbin), installed
with apt-get (Debian's ``nats-server``) as root if missing. `start_nats` always starts a throwaway one (for outage
tests that kill and restart it on the same port and store directory) and returns a `NatsServer` handle.

`ensure_redis_cluster` does the same for a Redis Cluster: ``REDIS_CLUSTER_URL``, else a one-node cluster
(``--cluster-enabled yes`` owning all 16384 slots) started from the same ``redis-server``.

`ensure_postgres` returns a SQLAlchemy URL of a PostgreSQL server the tests may create databases on:
``POSTGRES_URL`` or ``postgresql+psycopg://postgres@127.0.0.1:5432/test`` when it answers, else a
throwaway `PostgresServer` (``initdb`` + ``pg_ctl`` from PATH or /usr/lib/postgresql/*/bin, run as the
``postgres`` user when we are root; Debian's ``postgresql`` package installed with apt-get as root when
missing). `fresh_database` makes a uniquely named database on it (dropped by the caller's cleanup).
`PostgresServer` is also what outage tests stop and start: never the shared server.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import NoReturn

import pytest
import redis

DEFAULT_URL = "redis://127.0.0.1:6379"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
_started: dict[str, str] = {}  # kind -> URL of a server this process started, reused by later calls


def ensure_redis() -> str:
    if "plain" in _started:
        return _started["plain"]
    tried = []
    for url in (os.environ.get("REDIS_URL"), DEFAULT_URL):
        if url and url not in tried:
            tried.append(url)
            if _answers(url):
                return url
    _started["plain"] = _start(_redis_server(tried))
    return _started["plain"]


def ensure_redis_cluster() -> str:
    if "cluster" in _started:
        return _started["cluster"]
    url = os.environ.get("REDIS_CLUSTER_URL")
    if url and _answers(url):
        return url
    server = _redis_server([url] if url else [])
    _started["cluster"] = _start(server, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                                 setup=_own_all_slots)
    return _started["cluster"]


def ensure_nats() -> str:
    if "nats" in _started:
        return _started["nats"]
    tried = []
    for url in (os.environ.get("NATS_URL"), DEFAULT_NATS_URL):
        if url and url not in tried:
            tried.append(url)
            if _jetstream_answers(url):
                return url
    server = start_nats(tried)
    atexit.register(server.stop)
    _started["nats"] = server.url
    return server.url


class NatsServer:
    """A throwaway ``nats-server -js`` on a fixed port and store directory, killable and restartable."""

    def __init__(self, binary: str, port: int, store: str) -> None:
        self.binary, self.port, self.store = binary, port, store
        self.url = f"nats://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = os.path.join(self.store, "nats.log")
        self.proc = subprocess.Popen(
            [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.store, "-l", log],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self.proc.poll() is None:
            if _jetstream_answers(self.url):
                return
            time.sleep(0.05)
        last = ""
        with contextlib.suppress(OSError), open(log, errors="replace") as f:
            last = f.read()[-2000:]
        self.kill()
        _nats_unavailable(f"{self.binary} did not start with JetStream on port {self.port}; its log: {last}")

    def kill(self) -> None:
        """SIGKILL: the outage a test simulates (no graceful shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.store, ignore_errors=True)


def start_nats(tried: list[str] | None = None) -> NatsServer:
    """A new throwaway JetStream server on a free port (the caller stops it)."""
    binary = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server")
                                             else None)
    if binary is None and _is_root() and shutil.which("apt-get"):
        _apt_install("nats-server", fail=_nats_unavailable)
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
    if binary is None:
        where = f"no NATS with JetStream answers at {', '.join(tried)} and " if tried else ""
        _nats_unavailable(f"{where}`nats-server` is not on PATH"
                          + ("" if _is_root() else " (and not root, so it was not installed)"))
    server = NatsServer(binary, _free_port(), tempfile.mkdtemp(prefix="kassa-nats-"))
    server.start()
    return server


def _jetstream_answers(url: str) -> bool:
    """True when a NATS server at ``url`` answers the JetStream account-info request."""
    import asyncio

    import nats

    async def probe() -> bool:
        try:
            nc = await nats.connect(url, connect_timeout=0.5, allow_reconnect=False, max_reconnect_attempts=0)
        except Exception:
            return False
        try:
            await nc.jetstream().account_info()
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    return asyncio.run(probe())


def _nats_unavailable(reason: str) -> NoReturn:
    ci = " CI=true: a missing service fails the run." if os.environ.get("CI", "").lower() == "true" else ""
    pytest.fail(f"NATS with JetStream is required by these tests: {reason}. Start one (`nats-server -js`, "
                f"`docker run -p 4222:4222 nats -js`) or point NATS_URL at one.{ci}", pytrace=False)


def ensure_promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None and _is_root() and shutil.which("apt-get"):
        _apt_install("prometheus", fail=_no_promtool)
        tool = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
    if tool is None:
        _no_promtool("it is not on PATH" + ("" if _is_root() else " (and not root, so it was not installed)"))
    return tool


def _no_promtool(reason: str) -> NoReturn:
    ci = " CI=true: a missing tool fails the run." if os.environ.get("CI", "").lower() == "true" else ""
    pytest.fail(f"promtool is required to check deploy/prometheus/alerts.yml: {reason}. Install Debian's "
                f"`prometheus` package (`apt-get install prometheus`).{ci}", pytrace=False)


def _own_all_slots(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10.0
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                _unavailable(f"the one-node cluster at {url} did not reach cluster_state:ok")
            time.sleep(0.05)
    finally:
        client.close()


def _redis_server(tried: list[str]) -> str:
    server = shutil.which("redis-server")
    if server is None and _is_root() and shutil.which("apt-get"):
        _apt_install("redis-server")
        server = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server")
                                                  else None)
    if server is None:
        where = f"no Redis answers at {', '.join(tried)} and " if tried else ""
        _unavailable(f"{where}`redis-server` is not on PATH"
                     + ("" if _is_root() else " (and not root, so it was not installed)"))
    return server


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _start(server: str, *extra: str, setup: Callable[[str], None] | None = None) -> str:
    last = ""
    for _ in range(3):  # a free port can be taken between choosing it and the server binding it
        port = _free_port()
        args = list(extra)
        if "--cluster-enabled" in args:  # the cluster bus needs a port of its own (default: port + 10000)
            args += ["--cluster-port", str(_free_port(exclude=port))]
        workdir = tempfile.mkdtemp(prefix="kassa-redis-")
        log = os.path.join(workdir, "redis.log")
        proc = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", workdir, "--daemonize", "no", "--loglevel", "warning", "--logfile", log, *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        atexit.register(_stop, proc, workdir)
        url = f"redis://127.0.0.1:{port}"
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(url):
                if setup is not None:
                    setup(url)
                return url
            time.sleep(0.05)
        with contextlib.suppress(OSError), open(log, errors="replace") as f:
            last = f.read()[-2000:]
        _stop(proc, workdir)
    _unavailable(f"{server} did not start and answer PING (3 attempts); its log: {last}")


def _free_port(exclude: int = 0) -> int:
    # Below 55536: a cluster node refuses ports whose default bus port (+10000) would overflow.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= 55535 and port != exclude:
            return port


def _stop(proc: subprocess.Popen[bytes], workdir: str) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(workdir, ignore_errors=True)


def _apt_install(package: str, fail: Callable[[str], NoReturn] | None = None) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
        # A fresh image often has no package lists yet.
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")[-2000:]
            (fail or _unavailable)(f"`apt-get install {package}` failed: {stderr}")


def _is_root() -> bool:
    with contextlib.suppress(AttributeError):  # no geteuid on Windows
        return os.geteuid() == 0
    return False


def _unavailable(reason: str) -> NoReturn:
    hint = ("Start one (e.g. `docker run -p 6379:6379 redis:7` or `apt-get install redis-server`) "
            "or point REDIS_URL at one.")
    ci = " CI=true: a missing service fails the run." if os.environ.get("CI", "").lower() == "true" else ""
    pytest.fail(f"Redis is required by these tests: {reason}. {hint}{ci}", pytrace=False)


class ThrowawayRedis:
    """A `redis-server` of a test's own on a free port, for outages: `kill` SIGKILLs it (only it, by its
    pid; never the shared server), `start` brings it back on the same port, empty. It starts when made
    (`start` on a running one does nothing) and is stopped when the test process exits."""

    def __init__(self) -> None:
        self.server = _redis_server([])
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.workdir = tempfile.mkdtemp(prefix="kassa-redis-outage-")
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)
        self.start()

    def start(self) -> ThrowawayRedis:
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while not _answers(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                _unavailable(f"a throwaway redis-server on port {self.port} did not answer PING")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL: no goodbye to connected clients
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, self.workdir)


# ------------------------------------------------------------------ PostgreSQL
PG_DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def ensure_postgres() -> str:
    if "postgres" in _started:
        return _started["postgres"]
    tried = []
    for url in (os.environ.get("POSTGRES_URL"), PG_DEFAULT_URL):
        if url and url not in tried:
            tried.append(url)
            if _pg_answers(url):
                return url
    server = PostgresServer()
    server.start()
    atexit.register(server.destroy)
    _started["postgres"] = server.url
    return server.url


def fresh_database(server_url: str, prefix: str = "kassa_test") -> tuple[str, Callable[[], None]]:
    """A new empty database on ``server_url``'s server: (its URL, a function that drops it)."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = make_url(server_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return make_url(server_url).set(database=name).render_as_string(hide_password=False), drop


def _pg_answers(url: str) -> bool:
    import psycopg
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)),
                                       None)
    if found is None and _is_root() and shutil.which("apt-get"):
        _apt_install("postgresql", fail=_no_postgres)
        found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                                                       reverse=True)), None)
    if found is None:
        _no_postgres(f"`{name}` is not on PATH nor in /usr/lib/postgresql/*/bin"
                     + ("" if _is_root() else " (and not root, so it was not installed)"))
    return found


class PostgresServer:
    """A throwaway PostgreSQL cluster on a free port (trust auth, no fsync): start, stop (fast), start again."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.dir = tempfile.mkdtemp(prefix="kassa-pg-")
        self.data = os.path.join(self.dir, "data")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._initialised = False
        self._paused: list[int] = []

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        args = list(cmd)
        if _is_root():  # initdb and postgres refuse to run as root
            shutil.chown(self.dir, "postgres")
            args = ["runuser", "-u", "postgres", "--", *args]
        return subprocess.run(args, capture_output=True, timeout=timeout)

    def init(self) -> None:
        """``initdb`` (the slow part of the first `start`), without starting the server."""
        if not self._initialised:
            result = self._run(_pg_bin("initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
            if result.returncode != 0:
                _no_postgres(f"initdb failed: {result.stderr.decode(errors='replace')[-2000:]}")
            self._initialised = True

    def start(self) -> None:
        self.init()
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} -c fsync=off"
        result = self._run(_pg_bin("pg_ctl"), "-D", self.data, "-o", opts, "-l", os.path.join(self.dir, "log"),
                           "-w", "-t", "30", "start")
        if result.returncode != 0 or not _pg_answers(self.url):
            with contextlib.suppress(OSError), open(os.path.join(self.dir, "log"), errors="replace") as f:
                log = f.read()[-2000:]
            _no_postgres(f"pg_ctl start failed: {result.stderr.decode(errors='replace')[-1000:]} {log}")

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop")

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...)."""
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def pause(self) -> None:
        """SIGSTOP every process of the server: connections stay open (the kernel still acks) but nothing answers,
        a hung server; `resume` sends SIGCONT."""
        self._paused = self.pids()
        for pid in self._paused:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self._paused = []

    def destroy(self) -> None:
        self.resume()
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _no_postgres(reason: str) -> NoReturn:
    ci = " CI=true: a missing service fails the run." if os.environ.get("CI", "").lower() == "true" else ""
    pytest.fail(f"PostgreSQL is required by these tests: {reason}. Start one (e.g. `docker run -e "
                f"POSTGRES_HOST_AUTH_METHOD=trust -p 5432:5432 postgres:16` or `apt-get install postgresql`) and "
                f"point POSTGRES_URL at it.{ci}", pytrace=False)
