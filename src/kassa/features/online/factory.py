"""Choosing the online store from the settings: the embedded in-process store (restored from, and saved
to, ``<data_dir>/online.snapshot``) or Redis. Commands that run outside the server (``kassa features
materialize|get``) open the store here so they see and leave the same data the server does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from kassa.config import Settings
from kassa.features.definitions import FeatureView
from kassa.features.online.base import OnlineStore

SNAPSHOT_FILE = "online.snapshot"
# Held (shared flock) by every process serving from the embedded store of a data dir, for its life: the store
# lives in that process's memory, and it writes the snapshot when it stops. `kassa features materialize` run
# beside it reported its rows written, yet the server never saw them and overwrote them at its stop.
IN_USE_FILE = "online.snapshot.lock"


def snapshot_path(settings: Settings) -> Path:
    return settings.data_path / SNAPSHOT_FILE


def hold_embedded_store(settings: Settings) -> int | None:
    """Mark the embedded store of ``settings``' data dir as served by this process (a shared flock, released
    by `release_embedded_store` or when the process dies). ``None`` for Redis, or where flock is missing."""
    if settings.features.online_store == "redis":
        return None
    try:
        import fcntl
    except ImportError:  # not POSIX: no marker, as before
        return None
    settings.data_path.mkdir(parents=True, exist_ok=True)
    fd = os.open(settings.data_path / IN_USE_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def release_embedded_store(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor drops its flock


def embedded_store_served(settings: Settings) -> bool:
    """Whether a running process serves the embedded online store of ``settings``' data dir."""
    path = settings.data_path / IN_USE_FILE
    if settings.features.online_store == "redis" or not path.exists():
        return False
    try:
        import fcntl
    except ImportError:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def open_online_store(settings: Settings, views: Sequence[FeatureView] = (),
                      clock: Callable[[], float] = time.time) -> OnlineStore:
    """The configured online store: Redis when ``features.online_store`` is ``redis``, otherwise the
    embedded store with the rows of its last snapshot."""
    fs = settings.features
    if fs.online_store == "redis":
        from kassa.features.online.redis import RedisOnlineStore  # redis-py only when Redis is configured

        return RedisOnlineStore(fs.redis_url, fs.key_prefix, views=views, clock=clock,
                                breaker_failures=fs.breaker_failures, breaker_reset_seconds=fs.breaker_reset_seconds)
    from kassa.features.online.memory import InMemoryOnlineStore

    store = InMemoryOnlineStore(views, clock=clock)
    path = snapshot_path(settings)
    try:
        store.restore(path)
    except Exception as exc:  # any decode error: the file is not a snapshot Kassa wrote
        from kassa.startup import DamagedDataDir

        raise DamagedDataDir(
            path, f"cannot be read as an online-store snapshot ({type(exc).__name__}: {str(exc)[:200]})",
            f"delete {path.name} (and stream.checkpoint) to start with an empty online store: stream views "
            "are rebuilt from the event log, push views need their signals pushed again, batch views a "
            "`kassa features materialize`") from None
    return store


async def close_online_store(store: OnlineStore, settings: Settings) -> None:
    """Save the embedded store's rows to its snapshot (a remote store keeps its own), then close it."""
    from kassa.features.online.memory import InMemoryOnlineStore

    if isinstance(store, InMemoryOnlineStore):
        store.snapshot(snapshot_path(settings))
    await store.close()
