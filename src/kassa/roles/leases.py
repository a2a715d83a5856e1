"""The leases of the roles, by name: one per placement for `kassa learn`, one for the decision-log writer.

A placement's lease is ``<lease_prefix>:learn:lease:<placement>`` in Redis (``roles.lease: redis``) or
``<data_dir>/leases/learn-<placement>.lock`` (``file``). The decision-log writer's is
``<lease_prefix>:decision-log:lease:writer`` or ``<data_dir>/leases/decision-log-writer.lock``: another key space,
so no placement's name (any string) can ever name it. `kassa.learn.online.lease` has the lease kinds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Literal

from kassa.config import Settings
from kassa.learn.online.lease import FileLease, Lease, RedisLease

log = logging.getLogger("kassa.learn")
LEASE_LOST_EXIT = 75  # EX_TEMPFAIL: start me again (as a standby)


def lease_factory(settings: Settings, role: Literal["learn", "decision-log"] = "learn") -> Callable[[str], Lease]:
    """Leases of ``role`` by name (a placement's for ``learn``), of the kind ``roles.lease`` names."""
    roles = settings.roles
    if roles.lease == "redis":
        import redis

        client = redis.Redis.from_url(roles.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return lambda name: RedisLease(client, f"{roles.lease_prefix}:{role}:lease:{name}", roles.lease_ttl_seconds)
    return lambda name: FileLease(settings.data_path / "leases" / f"{role}-{name}.lock")


def decision_log_lease(settings: Settings) -> Lease:
    """The lease that makes one decision-log writer per deployment (`kassa.roles.decision_log`)."""
    return lease_factory(settings, "decision-log")("writer")


def exit_stalled(reason: str) -> None:
    """A hung loop cannot be trusted to stop itself: exit from the lease keeper's thread (`LeaseKeeper` on_stall)."""
    log.error("%s: exiting so that I start again as a standby", reason)  # a StreamHandler flushes each line
    os._exit(LEASE_LOST_EXIT)  # not logging.shutdown(): the hung thread may hold a handler's lock
