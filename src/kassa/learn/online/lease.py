"""Leases that make exactly one `kassa learn` active per placement (ADR 0009).

A learner holds one lease per placement it learns. ``acquire`` takes a free lease, ``renew`` keeps a held
one (False: it was lost, and the learner must stop learning that placement at once), ``release`` gives
it up on a clean stop so the standby need not wait for it to lapse.

- `RedisLease`: ``SET key token NX PX ttl``; renewal and release are compare-and-set Lua scripts on the
  token, so a learner that stalled past its TTL can never extend or delete its successor's lease. A
  holder killed with ``kill -9`` stops renewing; its lease lapses after ``ttl`` and a standby polling every
  ``ttl / 3`` takes it: takeover within ``ttl + ttl / 3`` (6.7 s at the default 5 s; measured 4.6 and 4.9 s in
  tests/test_roles.py).
- `FileLease`: ``flock`` on ``<data_dir>/leases/<placement>.lock``, for learners sharing one machine (the
  embedded topology). The kernel releases the lock when the holder dies, so a standby takes over on its
  next poll.
- `LeaseKeeper`: renews the held leases from a thread of its own, not from the learning loop, which can block
  for ~13 s at a time on a hung metadata PostgreSQL (`kassa.db.ANSWER_TIMEOUT_SECONDS` plus a 3 s connect); renewed
  from the loop, a 5 s lease lapsed on the first such block and the learner exited 75, then its standby stalled the
  same way. A loop that has not come round for ``roles.learner_stall_seconds`` (60 s) is taken for hung: renewal
  stops, so its lease lapses and a standby takes over (ADR 0009, addendum of 2026-12-07 afternoon).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger("kassa.learn")

_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class LeaseLost(RuntimeError):
    """A lease this process held can no longer be shown to be its own: stop writing at once."""


class Lease(Protocol):
    name: str
    ttl_seconds: float  # how long a successful acquire or renew holds the lease (inf: until released or dead)

    def acquire(self) -> bool: ...

    def renew(self) -> bool: ...

    def release(self) -> None: ...


def holder_token() -> str:
    """Who holds a lease: readable in `redis-cli GET` (host and pid) and unique across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class RedisLease:
    def __init__(self, client: object, key: str, ttl_seconds: float, token: str | None = None) -> None:
        import redis

        assert isinstance(client, redis.Redis)
        self.client = client
        self.name = key
        self.ttl_ms = max(1, int(ttl_seconds * 1000))
        self.ttl_seconds = self.ttl_ms / 1000
        self.token = token or holder_token()
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        return bool(self.client.set(self.name, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.name], args=[self.token, self.ttl_ms]))

    def release(self) -> None:
        self._release(keys=[self.name], args=[self.token])

    def holder(self) -> str | None:
        value = self.client.get(self.name)
        return value.decode() if isinstance(value, bytes) else None


class FileLease:
    ttl_seconds = math.inf  # the kernel holds a flock for as long as the process lives

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self._fd: int | None = None

    def acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, holder_token().encode())
        self._fd = fd
        return True

    def renew(self) -> bool:
        return self._fd is not None  # a flock is held until the process closes it or dies

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


# A held lease counts as this process's until this share of its TTL has passed since the acquire or renew that
# gave it was *sent* (Redis starts the TTL when it receives the command, later): the rest covers the two clocks
# running at slightly different rates and the check-then-write gap of the caller.
_VALID_SHARE = 0.8


class LeaseKeeper:
    """Renews the leases a learner holds every ``ttl / 3`` seconds from a daemon thread, while the learning loop
    proves it is alive by calling `beat`; the loop calls `check` before anything it publishes.

    Fencing, without trusting the renewal thread to have run: each lease is held on this process's monotonic
    clock until ``sent + ttl * 0.8``, ``sent`` being when the last successful acquire or renew was sent. A
    process paused past that (SIGSTOP, a long GC, swapped out: monotonic time goes on) finds its leases expired
    in `check` when it runs again, before the renewal thread could renew one that a standby took meanwhile (that
    renew would fail on the token anyway). A renew that fails or answers "not yours" marks every lease lost.
    A loop that has not beaten for ``stall_seconds`` is hung (a deadlock, a call with no bound): the keeper stops
    renewing, marks the leases lost and calls ``on_stall`` (`kassa learn` exits 75 then, so its supervisor starts
    it again as a standby; a file lease, which never lapses, is released by the kernel that way).
    A write already past `check` when the process pauses is fenced by the registry instead: each takeover takes
    the placement's next lease epoch (`ModelRegistry.take_fence`) and a snapshot carrying an older one is refused.
    """

    def __init__(self, ttl_seconds: float, stall_seconds: float, on_stall: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.every = max(0.1, ttl_seconds / 3)
        self.stall_seconds = stall_seconds
        self.on_stall = on_stall
        self.clock = clock
        self._held: dict[str, tuple[Lease, float]] = {}  # placement -> (lease, held until on `clock`)
        self._lock = threading.Lock()
        self._lost: str | None = None
        self._beat = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._run, name="kassa-lease-keeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def beat(self) -> None:
        """The learning loop came round."""
        self._beat = self.clock()

    def hold(self, placement: str, lease: Lease, sent: float) -> None:
        """``lease`` was acquired by a command sent at ``sent`` (on `clock`): renew it from now on."""
        with self._lock:
            self._held[placement] = (lease, sent + lease.ttl_seconds * _VALID_SHARE)

    def drop(self, placement: str) -> bool:
        """Renew the lease of ``placement`` no more (its placement left the catalog); True if it was held."""
        with self._lock:
            return self._held.pop(placement, None) is not None

    def check(self) -> None:
        """Raises `LeaseLost` unless every held lease is still this process's."""
        if self._lost is not None:
            raise LeaseLost(self._lost)
        now = self.clock()
        with self._lock:
            expired = [(p, lease, now - until) for p, (lease, until) in self._held.items() if now >= until]
        if expired:
            placement, lease, late = expired[0]
            self._lost = (f"lost the lease of {placement} ({lease.name}): not renewed for {late:.1f} s past its "
                          "safe hold (this process was paused or its renewals failed)")
            raise LeaseLost(self._lost)

    def renew_round(self) -> None:
        if self._lost is not None:
            return
        stalled = self.clock() - self._beat
        if stalled > self.stall_seconds:
            self._lost = (f"the learning loop has not come round for {stalled:.0f} s (roles.learner_stall_seconds: "
                          f"{self.stall_seconds:g}); renewing no lease, so they lapse and a standby takes over")
            log.error("%s", self._lost)
            if self.on_stall is not None:
                self.on_stall(self._lost)
            return
        with self._lock:
            held = list(self._held.items())
        for placement, (lease, _) in held:
            sent = self.clock()
            try:
                renewed = lease.renew()
            except Exception as exc:  # Redis away or too slow: the lease can no longer be shown to be ours
                self._lost = f"could not renew the lease of {placement} ({lease.name}; {type(exc).__name__}: {exc})"
                return
            if not renewed:
                self._lost = f"lost the lease of {placement} ({lease.name})"
                return
            with self._lock:
                self._held[placement] = (lease, sent + lease.ttl_seconds * _VALID_SHARE)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.renew_round()
