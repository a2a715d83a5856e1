"""What `kassa serve` rebuilds from the event log at start (customer profiles, product retrieval), saved
at a clean stop with the log position it reflects, so the next start replays only the events after it.

Without it start-up grew with the log (issue 15: 0.8 s → 5.2 s at 812k events): every event was read
and decoded. The file is a cache: the log stays the truth. A missing, damaged, foreign-format file, or one
ahead of the log (the log was replaced), means a full replay, with a warning for the damaged cases.
After a crash the last clean stop's file still holds: its position plus the events after it is the state.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

import msgspec

log = logging.getLogger("kassa.events")

FILE = "replay.state"
FORMAT = "kassa-replay-1"


class Replayable(Protocol):
    """State rebuilt from the log (`CustomerProfiles`, `ProductRetriever`): dumped whole, loaded whole."""

    def dump(self) -> dict[str, Any]: ...
    def load(self, state: dict[str, Any]) -> None: ...


class _State(msgspec.Struct):
    format: str
    seq: int
    profiles: dict[str, Any]
    retriever: dict[str, Any]


def save(path: Path, seq: int, profiles: Replayable, retriever: Replayable) -> None:
    """Write the state as of log position ``seq`` (atomically: a crash mid-write leaves the old file)."""
    payload = msgspec.msgpack.encode(_State(FORMAT, seq, profiles.dump(), retriever.dump()))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path, max_seq: int, profiles: Replayable, retriever: Replayable) -> int:
    """Restore the saved state; returns the log position to replay after (0: replay everything)."""
    if not path.exists():
        return 0
    try:
        state = msgspec.msgpack.decode(path.read_bytes(), type=_State)
    except (msgspec.DecodeError, OSError) as exc:
        log.warning("%s is not usable (%s); replaying the whole event log", path, exc)
        return 0
    if state.format != FORMAT:
        log.warning("%s has format %r, not %r; replaying the whole event log", path, state.format, FORMAT)
        return 0
    if state.seq > max_seq:
        log.warning("%s is ahead of the event log (position %d > %d: the log was replaced); replaying it all",
                    path, state.seq, max_seq)
        return 0
    profiles.load(state.profiles)
    retriever.load(state.retriever)
    return state.seq
