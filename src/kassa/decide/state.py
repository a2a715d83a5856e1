"""The per-buyer and per-request state one decision reads and writes, behind one small protocol.

A decision reads three things that outlive the request: the response already given for its
``request_id`` (idempotency), the buyer's profile and the offers already shown to the buyer (frequency
caps). It writes three: the response under its ``request_id``, the offers it showed, and the decision
awaiting its reward window. `DecisionState` is that contract: `load` once before deciding (one round
trip on a remote backend), `commit` once after. Implementations:

- `LocalDecisionState` (here, pure): the in-process objects of the embedded default (`IdempotencyCache`,
  `FrequencyLedger`, `CustomerProfiles`, the reward joiner), each change also handed to an optional
  `StateJournal` that makes it durable (``kassa.state.local``: SQLite WAL beside the data).
- ``kassa.state.redis.RedisDecisionState``: shared by every serving process.

``decide`` does no I/O of its own: the backends live in ``kassa.state`` above it, and ``kassa.app``
chooses one from ``state.backend``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from kassa import errors, schemas
from kassa.decide.rules import CapCounts, FrequencyLedger
from kassa.decide.sinks import RewardSink
from kassa.events.join import PendingDecision
from kassa.features.definitions import FeatureView
from kassa.features.online.base import EntityKey, Row
from kassa.features.profile import CustomerProfiles

RowsWanted = tuple[list[EntityKey], list[FeatureView]]  # online-store keys, and the views to read of them

_encoder = msgspec.json.Encoder()
_response_decoder = msgspec.json.Decoder(schemas.DecisionResponse)


def fingerprint(req: schemas.DecisionRequest) -> int:
    """A request's identity for idempotency, the same in every process and after a restart (Python's
    ``hash`` of bytes is salted per process, so it cannot be shared)."""
    return int.from_bytes(hashlib.blake2b(_encoder.encode(req), digest_size=8).digest(), "big") >> 1


def encode_response(response: schemas.DecisionResponse) -> bytes:
    return _encoder.encode(response)


def decode_response(blob: bytes) -> schemas.DecisionResponse:
    return _response_decoder.decode(blob)


class IdempotencyCache:
    """request_id -> (fingerprint of the request, response); bounded LRU with a TTL."""

    def __init__(self, ttl: float = 600.0, max_entries: int = 100_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[float, int, schemas.DecisionResponse]] = OrderedDict()

    def lookup(self, key: str, now: float) -> tuple[int, schemas.DecisionResponse] | None:
        hit = self._items.get(key)
        if hit is None:
            return None
        ts, fp, response = hit
        if now - ts > self.ttl:
            del self._items[key]
            return None
        return fp, response

    def get(self, key: str, fingerprint: int, now: float) -> schemas.DecisionResponse | None:
        return BuyerState(self.lookup(key, now)).replay(fingerprint)

    def put(self, key: str, fingerprint: int, response: schemas.DecisionResponse, now: float) -> None:
        self._items[key] = (now, fingerprint, response)
        if len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class ShownTimes:
    """`CapCounts` over the show times of one buyer loaded with the request: ``{offer_id: [ts, ...]}``."""

    __slots__ = ("customer_id", "times")

    def __init__(self, customer_id: str | None, times: dict[str, list[float]]) -> None:
        self.customer_id = customer_id
        self.times = times

    def count(self, customer_id: str, offer_id: str, window: float, now: float) -> int:
        if customer_id != self.customer_id:
            return 0
        since = now - window
        return sum(1 for t in self.times.get(offer_id, ()) if t >= since)


@dataclass(slots=True)
class BuyerState:
    """What one decision read: a response already given for its request_id (with that request's
    fingerprint), the buyer's profile, the buyer's frequency-cap counts, and whether the state could not
    be read in time (then the decision is served as a fallback, from defaults)."""

    cached: tuple[int, schemas.DecisionResponse] | None = None
    profile: dict | None = None
    caps: CapCounts | None = None
    fallback: bool = False
    rows: list[Row | None] | None = None  # the online-store rows asked for in `load`, when read with the state

    def replay(self, fp: int) -> schemas.DecisionResponse | None:
        """The cached response for a retry of the same request; 409 for a different one."""
        if self.cached is None:
            return None
        stored, response = self.cached
        if stored != fp:
            raise errors.Conflict(
                "request_id was already used for a different request; use a new request_id", "request_id"
            )
        return response


@dataclass(slots=True)
class DecisionWrite:
    """What one answered decision leaves behind."""

    now: float
    request_id: str | None
    fingerprint: int
    response: schemas.DecisionResponse
    customer_id: str | None
    shown: list[str]
    pending: PendingDecision | None


class DecisionState(Protocol):
    async def load(self, request_id: str | None, customer_id: str | None, now: float,
                   timeout: float, rows: RowsWanted | None = None) -> BuyerState:
        """Everything the decision reads, within ``timeout`` seconds (else ``fallback=True``). ``rows``: the
        online-store rows the decision reads next; a backend that can read them in the same round trip (the
        store is on its server) returns them in ``BuyerState.rows``, otherwise it leaves that None."""
        ...

    async def commit(self, write: DecisionWrite, timeout: float) -> schemas.DecisionResponse | None:
        """Store what the decision leaves behind. Returns the response to answer with: ``write.response``,
        or the one another process stored first for the same request_id; None when it could not be
        stored in time (the caller answers, flagged as a fallback)."""
        ...


class StateJournal(Protocol):
    """Makes the embedded state durable: told every change, it replays them after a restart."""

    def idempotent(self, key: str, fp: int, blob: bytes, now: float) -> None: ...

    def shown(self, customer_id: str, offer_ids: Iterable[str], now: float) -> None: ...


class LocalDecisionState:
    """The embedded `DecisionState`: in-process objects (no await on the hot path), journaled when a
    journal is given."""

    def __init__(self, idempotency: IdempotencyCache, ledger: FrequencyLedger, profiles: CustomerProfiles,
                 joiner: RewardSink, journal: StateJournal | None = None) -> None:
        self.idempotency = idempotency
        self.ledger = ledger
        self.profiles = profiles
        self.joiner = joiner
        self.journal = journal

    async def load(self, request_id: str | None, customer_id: str | None, now: float,
                   timeout: float, rows: RowsWanted | None = None) -> BuyerState:
        return self.read(request_id, customer_id, now)

    def read(self, request_id: str | None, customer_id: str | None, now: float) -> BuyerState:
        cached = self.idempotency.lookup(request_id, now) if request_id is not None else None
        profile = self.profiles.get(customer_id) if customer_id is not None else None
        return BuyerState(cached, profile, self.ledger)

    async def commit(self, write: DecisionWrite, timeout: float) -> schemas.DecisionResponse | None:
        self.write(write)
        return write.response

    def write(self, write: DecisionWrite) -> None:
        journal = self.journal
        if write.customer_id is not None and write.shown:
            self.ledger.record(write.customer_id, write.shown, write.now)
            if journal is not None:
                journal.shown(write.customer_id, write.shown, write.now)
        if write.pending is not None:
            self.joiner.register(write.pending)  # the joiner journals its own changes
        if write.request_id is not None:
            self.idempotency.put(write.request_id, write.fingerprint, write.response, write.now)
            if journal is not None:
                journal.idempotent(write.request_id, write.fingerprint, encode_response(write.response), write.now)


