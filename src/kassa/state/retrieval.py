"""Retrieval counts shared through Redis: one order stream that every process's `ProductRetriever` folds.

The co-purchase, replenishment-history and popularity signals are read on the hot path ~50 times per
decision (up to 20 seeds' neighbour lists merged, a 200-entry popularity list, the buyer's history). Read
from Redis that is ~1,000 scored members per decision to fetch and parse; kept in process it is a few
numpy ops (``python -m kassa.decide.retrieval``: P99 well under 100 µs). So on the Redis backend the counts
are *replicated*, not remote: each order a process ingests is appended (its product keys, buyer and time) to
the stream ``{prefix}:retrieval:orders``, and every process applies the stream, in stream order, to its own
`ProductRetriever` — the same orders, so the same counts everywhere, and nothing a decision needs lives only
in one process. The ingesting process reads the stream right after appending (read-your-writes before the
ack); the others poll it every ``poll_seconds`` (50 ms). A process that starts rebuilds from the stream.

The stream is capped at ``maxlen`` orders (approximate trimming, default 2,000,000); with the 30-day half-life
of the co-purchase and popularity weights, orders older than that cap contribute little. The retriever
itself (``kassa.decide.retrieval``) is unchanged: `OrderFeed` is the only writer it sees on this backend.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from kassa import schemas
from kassa.decide.retrieval import ProductRetriever, product_key
from kassa.state.redis import RedisState, StateUnavailable

log = logging.getLogger("kassa.state")

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(tuple[list[str], str | None, float]).decode


class OrderFeed:
    """The retriever's order input on the Redis backend: ``observe_order`` queues, `flush` appends to the
    shared stream and pulls, `run` pulls the other processes' orders in the background."""

    def __init__(self, redis: RedisState, retriever: ProductRetriever, *, maxlen: int = 2_000_000,
                 poll_seconds: float = 0.05, batch: int = 5_000) -> None:
        self.redis = redis
        self.retriever = retriever
        self.maxlen = maxlen
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.key = f"{redis.prefix}:retrieval:orders"
        self.last_id = b"0-0"
        self.applied = 0
        self.replaying = False  # while the event log is replayed at start: the stream already holds it
        self._queue: list[bytes] = []
        self._lock = asyncio.Lock()

    def observe_order(self, order: schemas.Order, customer_id: str | None, ts: float) -> None:
        if self.replaying:
            return
        keys = list(dict.fromkeys(k for k in map(product_key, order.items) if k))
        if keys:
            self._queue.append(_encode((keys, customer_id, ts)))

    async def flush(self, pull: bool = True) -> None:
        """Append the queued orders; then, when ``pull`` or when orders were appended (read-your-writes
        before the ingest acknowledges them), apply the stream."""
        queue, self._queue = self._queue, []
        if queue:
            try:
                await self.redis.run([("XADD", self.key, "MAXLEN", "~", self.maxlen, "*", "o", blob)
                                      for blob in queue])
            except StateUnavailable:
                self._queue[:0] = queue
                raise
        if pull or queue:
            await self.pull()

    async def pull(self) -> int:
        """Apply every order appended since the last pull (by any process); returns how many."""
        n = 0
        async with self._lock:
            while True:
                (rows,) = await self.redis.run([("XRANGE", self.key, b"(" + self.last_id, "+", "COUNT",
                                                 self.batch)])
                for entry_id, fields in rows:
                    blob = fields[b"o"] if isinstance(fields, dict) else fields[fields.index(b"o") + 1]
                    keys, customer_id, ts = _decode(blob)
                    self.retriever.observe_order(schemas.Order(id="", items=[schemas.OrderItem(sku=k) for k in keys]),
                                                 customer_id, ts)
                    self.last_id = entry_id
                n += len(rows)
                if len(rows) < self.batch:
                    break
                await asyncio.sleep(0)  # a long catch-up yields to requests between batches
        self.applied += n
        return n

    async def run(self) -> None:
        while True:
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except StateUnavailable:
                pass
            except Exception:
                log.warning("retrieval order feed step failed; retrying", exc_info=True)
            await asyncio.sleep(self.poll_seconds)
