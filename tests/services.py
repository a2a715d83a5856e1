"""Real external services for the tests: find a running one or start a throwaway one, never a mock.

`ensure_redis` returns the URL of a Redis server: ``REDIS_URL`` or ``redis://127.0.0.1:6379`` when it answers
PING; otherwise a ``redis-server`` from PATH started on a free port without persistence (stopped when the
test process exits); otherwise, as root, one installed with apt-get first. When none of that works the
calling test fails with a message that says how to provide Redis: a missing service is never a skip, so
a CI run without Redis cannot pass by testing nothing (``CI=true`` included).

`ensure_promtool` returns the path of Prometheus's ``promtool``: from PATH, else (as root) installed with
apt-get (Debian's ``prometheus`` package), else the test fails saying how to get it.

`ensure_redis_cluster` does the same for a Redis Cluster: ``REDIS_CLUSTER_URL``, else a one-node cluster
(``--cluster-enabled yes`` owning all 16384 slots) started from the same ``redis-server``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import NoReturn

import pytest
import redis

DEFAULT_URL = "redis://127.0.0.1:6379"
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
    """A `redis-server` of the test's own on a free port, for outage tests: `kill` it (SIGKILL) and `start` it
    again on the same port. Never the shared server. Stopped when the test process exits."""

    def __init__(self) -> None:
        self.server = _redis_server([])
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.workdir = tempfile.mkdtemp(prefix="kassa-redis-outage-")
        self.proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while not _answers(self.url):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                _unavailable(f"a throwaway {self.server} on port {self.port} did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc, self.workdir)
