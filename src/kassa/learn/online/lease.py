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
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from pathlib import Path
from typing import Protocol

_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class Lease(Protocol):
    name: str

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
