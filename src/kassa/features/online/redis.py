"""The production online store: Redis (or Redis Cluster) through async redis-py with the hiredis parser.

Owns `RedisOnlineStore` (the `features.online.base.OnlineStore` protocol), its key layout and write
script, and `OfferFeatureCache`, the serving process's in-memory copy of offer/product rows.

Key layout (`row_key`): ONE hash per entity row, ``{prefix}:{entity}:{<key>}``, e.g.
``kassa:customer:{c-123}``. The braces are a Redis Cluster hash tag: only ``c-123`` is hashed, so every
key ever derived for one entity key lands on the same slot (and node) and can be read or scripted together.
Hash field = view name; hash value = the `codec` blob ``msgpack([ts, schema_hash, [values in field order]])``.
A value written under another schema hash (the view was redefined) is ignored on read and counted as stale.

TTL, twice: each write ``PEXPIREAT``\\s the hash to the event time plus the view's ttl, never shortening an
expiry a longer-lived view set (``GT``) and never expiring a hash that holds a view without ttl; a read
also checks each view's own ttl, because the hash lives as long as its longest-lived view.

Writes are newer-wins, decided inside Redis by `_WRITE_LUA` (it reads the stored event time at its fixed
offset in the blob), so concurrent writers cannot resurrect old values. A read of any number of rows is
one round trip: one pipelined ``HMGET`` per key of the views asked for (``HGETALL`` when none are given).
On one node, reads and writes travel on the process's `kassa.redisconn.PipelinedConnection` (hiredis
packing and parsing, one reader task), not redis-py's asyncio pool, whose checkout, release and per-reply
reads cost ~200 µs of CPU per round trip (cProfile, docs/adr/0011); redis-py still serves pub/sub, scans
and the other admin calls. Cluster mode uses redis-py's cluster pipeline (one round trip per node).

Offer/product writes bump ``{prefix}:version:{entity}`` and publish ``entity|version|change`` on
``{prefix}:changes`` in one script call, pipelined behind the writes (one round trip for both). The change is
msgpack: the written keys with the view and the blobs written (``[keys, view, blobs]``), or just the keys
(``[keys...]``: a delete). `OfferFeatureCache` applies the blobs it is sent newer-wins, as the write script
does, and re-reads only keys without them (a re-read per message was a round trip per event batch on every
serving process); it also polls the version key, so a missed message (a reconnect, a crashed publisher)
heals within ``check_every`` seconds.
Requires Redis >= 7.0 (``PEXPIREAT ... GT``).

Every round trip goes through one `CircuitBreaker` (`kassa.degraded`): after ``breaker_failures``
consecutive connection errors or timeouts the store fails at once with `CircuitOpen` for
``breaker_reset_seconds``, then lets one call probe. A dead Redis then costs a decision a fast fallback,
not redis-py's connect retries (which put the issue-15 outage P99 at 104 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from itertools import islice
from typing import Any

import msgspec
from hiredis import ReplyError, pack_command  # packs in C; redis-py's asyncio connection packs in Python
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kassa.degraded import CircuitBreaker
from kassa.features.definitions import FeatureView
from kassa.features.online.base import EntityKey, Row, WriteItem
from kassa.features.online.codec import CodecCache, StoreStats, ViewCodec
from kassa.redisconn import ConnectionLost, PipelinedConnection, speaks

log = logging.getLogger(__name__)

NOTIFY_ENTITIES = ("offer", "product")  # entities the serving processes cache, so writes announce them
MAX_NOTIFY_KEYS = 1_000  # a change message names at most this many keys; more means "reload everything"
INF = float("inf")

# KEYS: row hashes; ARGV[1]: the view (hash field), then per key i: blob, ts, expire_at_ms (0: the view has no
# ttl). Returns how many rows were written; the others held newer values. Many rows per call on one node
# (the per-call overhead is most of the cost of a one-row call); one row per call on a cluster, where a
# script's keys must share a slot.
_WRITE_LUA = """
local field, written = ARGV[1], 0
for i, key in ipairs(KEYS) do
  local ts = tonumber(ARGV[3 * i])
  local old = redis.call('HGET', key, field)
  local ots = nil
  if old then
    if string.sub(old, 1, 2) == '\\147\\203' then
      ots = struct.unpack('>d', old, 3)
    else
      ots = cmsgpack.unpack(old)[1]
    end
  end
  if not ots or ots <= ts then
    local pttl = redis.call('PTTL', key)
    redis.call('HSET', key, field, ARGV[3 * i - 1])
    local at = tonumber(ARGV[3 * i + 1])
    if at == 0 then
      if pttl >= 0 then redis.call('PERSIST', key) end
    elseif pttl == -2 then
      redis.call('PEXPIREAT', key, at)
    else
      redis.call('PEXPIREAT', key, at, 'GT')
    end
    written = written + 1
  end
end
return written
"""

# KEYS[1] version key; ARGV: channel, entity, msgpack list of keys ('' = everything). Returns the version.
_NOTIFY_LUA = """
local v = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], ARGV[2] .. '|' .. v .. '|' .. ARGV[3])
return v
"""

_encode = msgspec.msgpack.Encoder().encode
_decode_change = msgspec.msgpack.Decoder().decode  # [key, ...] or [[key, ...], view, [blob, ...]]


def row_key(entity: str, key: str, prefix: str = "kassa") -> str:
    """``{prefix}:{entity}:{<key>}``: the entity key inside ``{}`` is the cluster hash tag."""
    return f"{prefix}:{entity}:{{{key}}}"


def version_key(entity: str, prefix: str = "kassa") -> str:
    return f"{prefix}:version:{entity}"


def changes_channel(prefix: str = "kassa") -> str:
    return f"{prefix}:changes"


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


class RedisOnlineStore:
    """Entity rows in Redis hashes; see the module docstring for the layout.

    ``views`` are the definitions reads without an explicit view list decode with (writes and reads
    with views register theirs too); ``client_kwargs`` go to ``redis.asyncio.Redis.from_url`` (or
    ``RedisCluster.from_url``), e.g. ``max_connections``, ``socket_timeout``.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "kassa",
        cluster: bool = False,
        *,
        views: Iterable[FeatureView] = (),
        clock: Callable[[], float] = time.time,
        notify_entities: Iterable[str] = NOTIFY_ENTITIES,
        chunk_size: int = 1_000,
        rows_per_script: int = 100,
        breaker_failures: int = 3,
        breaker_reset_seconds: float = 1.0,
        **client_kwargs: Any,
    ) -> None:
        self.breaker = CircuitBreaker("redis online store", breaker_failures, breaker_reset_seconds)
        self.prefix = prefix
        self.cluster = cluster
        self.channel = changes_channel(prefix)
        self.chunk_size = chunk_size
        # Rows per write-script call on one node: a script blocks Redis while it runs, so this bounds the
        # stall a bulk load adds to concurrent reads (~1 ms at 100 rows).
        self.rows_per_script = rows_per_script
        self.notify_entities = frozenset(notify_entities)
        self.stats = StoreStats()
        self.clock = clock
        self._codecs = CodecCache()
        # Per views list (identity; a placement's list is reused): its codecs and hash fields by entity.
        self._plans: dict[int, tuple[Sequence[FeatureView], dict[str, list[ViewCodec]], dict[str, list[bytes]]]] = {}
        for view in views:
            self._codecs.get(view)
        self._row_prefix = f"{prefix}:"
        self.client: Redis | RedisCluster
        self.conn: PipelinedConnection | None = None  # one node: reads and writes (see the module docstring)
        if cluster:
            self.client = RedisCluster.from_url(url, **client_kwargs)
        else:
            self.client = Redis.from_url(url, **client_kwargs)
            if speaks(url) and not client_kwargs:  # else redis-py's pipeline (TLS, a unix socket, its options)
                self.conn = PipelinedConnection(url)
        self._write_sha = _sha1(_WRITE_LUA)
        self._notify_sha = _sha1(_NOTIFY_LUA)

    def row_key(self, entity: str, key: str) -> str:
        return f"{self._row_prefix}{entity}:{{{key}}}"

    def version_key(self, entity: str) -> str:
        return version_key(entity, self.prefix)

    def register(self, view: FeatureView) -> ViewCodec:
        """Make ``view`` known, so reads without an explicit view list can decode it."""
        return self._codecs.get(view)

    # -- the OnlineStore protocol

    async def read(self, keys: Sequence[EntityKey], views: Sequence[FeatureView] | None = None) -> list[Row | None]:
        """Rows in ``keys`` order, in one round trip; a row is None when nothing current is stored for it
        (missing, expired, or only values of another schema). Without ``views``, every view of the row
        that this store has a definition for."""
        if not keys:
            return []
        if views is None:
            replies = await self._execute([("HGETALL", self.row_key(entity, key)) for entity, key in keys])
            now = self.clock()
            return [self._decode_all(reply, now) for reply in replies]
        plan = self.read_plan(keys, views)
        return plan.decode(await self._execute(plan.commands))

    def read_plan(self, keys: Sequence[EntityKey], views: Sequence[FeatureView]) -> RowsRead:
        """The commands of a `read` of ``views`` for ``keys`` and how to decode their replies, for a caller
        that sends them in a round trip of its own (the shared state's `load`, ``kassa.state.redis``)."""
        cached = self._plans.get(id(views))
        if cached is None or cached[0] is not views:
            by_entity: dict[str, list[ViewCodec]] = {}
            for view in views:
                by_entity.setdefault(view.entity, []).append(self._codecs.get(view))
            fields = {entity: [c.field for c in codecs] for entity, codecs in by_entity.items()}
            if len(self._plans) > 64:
                self._plans.clear()
            cached = self._plans[id(views)] = (views, by_entity, fields)
        _, by_entity, fields = cached
        row_key = self.row_key
        commands = [("HMGET", row_key(entity, key), *fields[entity]) for entity, key in keys if entity in fields]
        return RowsRead(commands, [by_entity.get(entity) for entity, _ in keys], self.clock, self.stats)

    def _decode_all(self, reply: Any, now: float) -> Row | None:
        pairs = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
        row: Row = {}
        for field, blob in pairs:
            name = field.decode() if isinstance(field, bytes) else field
            codec = self._codecs.by_name(name)
            if codec is None:
                self.stats.unknown_view += 1
                continue
            values = codec.decode(blob, now, self.stats)
            if values is not None:
                row[name] = values
        return row or None

    async def write(self, view: FeatureView, key: str, values: dict[str, Any], ts: float) -> None:
        codec = self._codecs.get(view)
        ts = float(ts)
        blob = codec.encode(values, ts)
        commands = [self._write_command(codec, [self.row_key(view.entity, key)], [blob, repr(ts),
                                                                                  codec.expire_at_ms(ts)])]
        if view.entity in self.notify_entities:  # same round trip, run after the write
            commands.append(self._notify_command(view.entity, [key], view.name, [blob]))
        written = (await self._run_scripts(commands))[0]
        if not written:
            self.stats.older_ignored += 1

    async def write_many(self, view: FeatureView, items: Iterable[WriteItem]) -> int:
        """Bulk write: ``chunk_size`` rows per pipeline, two pipelines in flight so encoding the next chunk
        overlaps Redis executing this one; returns the rows stored (rows older than stored ones are skipped).
        A row that fails validation raises `ValueError`; chunks sent before it stay written."""
        codec = self._codecs.get(view)
        entity = view.entity
        notify = entity in self.notify_entities
        per_script = 1 if self.cluster else self.rows_per_script
        written = 0
        inflight: set[asyncio.Task[tuple[int, int]]] = set()

        def commands_of(chunk: list[WriteItem]) -> list[tuple[Any, ...]]:
            commands = []
            blobs: list[bytes] = []
            for part in _chunks(chunk, per_script):
                keys: list[str] = []
                args: list[Any] = []
                for key, values, ts in part:
                    ts = float(ts)
                    keys.append(self.row_key(entity, key))
                    blob = codec.encode(values, ts)
                    blobs.append(blob)
                    args += (blob, repr(ts), codec.expire_at_ms(ts))
                commands.append(self._write_command(codec, keys, args))
            if notify:  # pipelined behind the writes: one round trip, announced after they ran
                commands.append(self._notify_command(entity, [item[0] for item in chunk], view.name, blobs))
            return commands

        async def run(commands: list[tuple[Any, ...]], rows: int) -> tuple[int, int]:
            replies = await self._run_scripts(commands)
            return sum(replies[:-1] if notify else replies), rows

        def collect(done: Iterable[asyncio.Task[tuple[int, int]]]) -> None:
            nonlocal written
            for task in done:
                stored, rows = task.result()
                written += stored
                self.stats.older_ignored += rows - stored

        chunks = _chunks(items, self.chunk_size)
        first = next(iter(chunks), None)
        if first is None:
            return 0
        if len(first) < self.chunk_size:  # the only chunk (a stream batch): no task, no overlap to gain
            stored, rows = await run(commands_of(first), len(first))
            self.stats.older_ignored += rows - stored
            return stored
        try:
            for chunk in itertools.chain((first,), chunks):
                commands = commands_of(chunk)
                if len(inflight) >= 2:
                    done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    collect(done)
                inflight.add(asyncio.create_task(run(commands, len(chunk))))
            if inflight:
                done, inflight = await asyncio.wait(inflight)
                collect(done)
        finally:
            if inflight:  # an error (or cancellation) stops the chunks still in flight
                for task in inflight:
                    task.cancel()
                await asyncio.gather(*inflight, return_exceptions=True)
        return written

    async def delete(self, entity: str, key: str) -> None:
        await self.client.delete(self.row_key(entity, key))
        if entity in self.notify_entities:
            await self._notify(entity, [key])

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        await self.client.aclose()

    # -- beyond the protocol: versions, scans, clean-up

    async def version(self, entity: str) -> int:
        """The change counter of ``entity`` (0 before its first announced write)."""
        value = await self.client.get(self.version_key(entity))
        return int(value) if value is not None else 0

    async def scan_keys(self, entity: str, count: int = 1_000) -> AsyncIterator[str]:
        """Every entity key with a row stored (SCAN: no blocking, duplicates possible while keys change)."""
        head = f"{self._row_prefix}{entity}:{{"
        async for raw in self.client.scan_iter(match=_glob_escape(head) + "*", count=count):
            name = raw.decode() if isinstance(raw, bytes) else raw
            if name.endswith("}"):
                yield name[len(head) : -1]

    async def clear(self) -> int:
        """Delete every key under this store's prefix (tests, benchmarks); returns how many."""
        deleted = 0
        batch: list[Any] = []
        async for raw in self.client.scan_iter(match=_glob_escape(self._row_prefix) + "*", count=1_000):
            batch.append(raw)
            if len(batch) >= 1_000:
                deleted += await self._unlink(batch)
                batch = []
        if batch:
            deleted += await self._unlink(batch)
        return deleted

    async def _unlink(self, keys: list[Any]) -> int:
        if self.cluster:  # keys of a batch live on many slots; one UNLINK per key, pipelined per node
            replies = await self._execute([("UNLINK", k) for k in keys])
            return sum(r for r in replies if isinstance(r, int))
        return int(await self.client.unlink(*keys))

    # -- commands

    def _write_command(self, codec: ViewCodec, keys: list[str], args: list[Any]) -> tuple[Any, ...]:
        """One write-script call: ``args`` holds (blob, ts, expire_at_ms) per key, ts as ``repr`` so Lua reads
        back exactly the double that was encoded."""
        return ("EVALSHA", self._write_sha, len(keys), *keys, codec.field, *args)

    def _notify_command(self, entity: str, keys: list[str], view: str | None = None,
                        blobs: list[bytes] | None = None) -> tuple[Any, ...]:
        change = b""
        if len(keys) <= MAX_NOTIFY_KEYS:
            change = _encode(keys) if view is None or blobs is None else _encode((keys, view, blobs))
        return ("EVALSHA", self._notify_sha, 1, self.version_key(entity), self.channel, entity, change)

    async def _notify(self, entity: str, keys: list[str]) -> None:
        await self._run_scripts([self._notify_command(entity, keys)])

    async def _run_scripts(self, commands: list[tuple]) -> list[Any]:
        """Run EVALSHA commands; a server that lost its script cache gets the scripts again and the whole
        batch is re-sent, which is safe: writes are newer-wins with equal times replacing (idempotent)."""
        replies = await self._execute(commands)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self.client.script_load(_WRITE_LUA)
            await self.client.script_load(_NOTIFY_LUA)
            replies = await self._execute(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _execute(self, commands: list[tuple]) -> list[Any]:
        """Send ``commands`` in one round trip (per node on a cluster); error replies come back as
        exceptions in their place."""
        if not commands:
            return []
        breaker = self.breaker
        breaker.allow()
        try:
            replies = await self._send(commands)
        except (RedisConnectionError, RedisTimeoutError, OSError, asyncio.CancelledError):
            # Cancelled: a caller's latency budget ran out waiting for Redis, a failure as far as it knows.
            breaker.failure()
            raise
        breaker.success()
        return replies

    async def _send(self, commands: list[tuple]) -> list[Any]:
        conn = self.conn
        if conn is None:  # redis-py's pipeline: a cluster (one round trip per node), TLS, a unix socket
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        packed = b"".join([pack_command(c) for c in commands])
        try:
            replies = await conn.execute(packed, len(commands))
        except ConnectionLost:
            # The connection broke before or while this was sent (a restart, an idle timeout): once more on a
            # fresh one. Safe to repeat: reads, and newer-wins writes with equal times replacing. A caller that
            # gives up (its latency budget) just stops waiting: the replies are read and dropped, nothing desyncs.
            replies = await conn.execute(packed, len(commands))
        return [_error(r) if isinstance(r, ReplyError) else r for r in replies]


class RowsRead:
    """One `RedisOnlineStore.read` of given views, split in two: ``commands`` (one ``HMGET`` per key of an
    entity the views cover) and `decode`, which turns their replies into rows in key order."""

    __slots__ = ("clock", "codecs", "commands", "stats")

    def __init__(self, commands: list[tuple], codecs: list[list[ViewCodec] | None], clock: Callable[[], float],
                 stats: StoreStats) -> None:
        self.commands = commands
        self.codecs = codecs
        self.clock = clock
        self.stats = stats

    def decode(self, replies: Sequence[Any]) -> list[Row | None]:
        hmget_replies = iter(replies)
        now = self.clock()
        stats = self.stats
        out: list[Row | None] = []
        for codecs in self.codecs:
            if codecs is None:
                out.append(None)
                continue
            row: Row | None = None
            for codec, blob in zip(codecs, next(hmget_replies), strict=True):
                if blob is not None:
                    values = codec.decode(blob, now, stats)
                    if values is not None:
                        if row is None:
                            row = {}
                        row[codec.name] = values
            out.append(row)
        return out


def _error(reply: ReplyError) -> ResponseError:
    """A hiredis error reply as the redis-py exception callers test for (`NoScriptError` for NOSCRIPT)."""
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class OfferFeatureCache:
    """Offer (or product) rows held in the serving process: `get` never does I/O.

    `start` subscribes to the store's change channel, then loads every row of ``entity``. Change messages
    re-read just the keys they name; a message whose version is not the next one expected (one was
    missed) or that names no keys triggers a full reload, and so does a version key that moved without a
    message, checked every ``check_every`` seconds.
    """

    def __init__(
        self,
        store: RedisOnlineStore,
        entity: str = "offer",
        views: Sequence[FeatureView] | None = None,
        check_every: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.entity = entity
        self.views = [v for v in views if v.entity == entity] if views is not None else None
        self.check_every = check_every
        self.version = -1  # the store version the cached rows reflect
        self.reloads = 0
        self.updates = 0
        self.clock = clock
        self._rows: dict[str, Row] = {}
        self._fresh_until: dict[str, float] = {}  # per row: until when every value in it is within its ttl
        self._ttl: dict[str, float] = {}
        self._codecs: dict[str, ViewCodec] = {}  # the views held, to decode the values change messages carry
        for view in self.views or ():
            self._codecs[view.name] = store.register(view)
            if view.ttl_seconds is not None:
                self._ttl[view.name] = view.ttl_seconds
        self._pubsub: PubSub | None = None
        self._subscribed = False
        self._task: asyncio.Task[None] | None = None

    def get(self, key: str) -> Row | None:
        row = self._rows.get(key)
        if row is None or not self._ttl:
            return row
        # Values were fresh when loaded; one may have aged past its ttl while cached since.
        now = self.clock()
        if now <= self._fresh_until.get(key, -INF):  # the common case, one comparison
            return row
        ttl = self._ttl
        if all(now - vv.ts <= ttl.get(name, now) for name, vv in row.items()):
            return row
        fresh = {name: vv for name, vv in row.items() if name not in ttl or now - vv.ts <= ttl[name]}
        return fresh or None

    def _until(self, row: Row) -> float:
        ttl = self._ttl
        return min((vv.ts + ttl[name] for name, vv in row.items() if name in ttl), default=INF)

    def __len__(self) -> int:
        return len(self._rows)

    async def start(self) -> None:
        """Subscribe and load; with Redis unreachable the server still starts (the page never fails on Redis):
        until it answers, decisions read no cached rows (the offer views' defaults) and `_run` keeps trying.
        It was a start-up traceback ("Application startup failed")."""
        self._pubsub = self.store.client.pubsub()
        try:
            await self._subscribe_and_load()
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            log.warning("%s feature cache: Redis unreachable at start (%s); the %s views serve their defaults "
                        "until it answers", self.entity, exc, self.entity)
        self._task = asyncio.create_task(self._run(), name=f"kassa-{self.entity}-feature-cache")

    async def _subscribe_and_load(self) -> None:
        assert self._pubsub is not None
        await self._pubsub.subscribe(self.store.channel)  # before loading, so no change falls in between
        await self.reload()
        self._subscribed = True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
            self._pubsub = None

    async def reload(self) -> int:
        """Load every row of the entity; returns the rows held."""
        # The version is read first: a write that lands during the scan bumps it past this one, so its
        # message (or the next version check) is applied after the reload, never lost under it.
        version = await self.store.version(self.entity)
        keys = [key async for key in self.store.scan_keys(self.entity)]
        rows: dict[str, Row] = {}
        for chunk in _chunks(dict.fromkeys(keys), 500):
            for key, row in zip(chunk, await self.store.read([(self.entity, k) for k in chunk], self.views),
                                strict=True):
                if row is not None:
                    rows[key] = row
        self._rows = rows
        self._fresh_until = {key: self._until(row) for key, row in rows.items()}
        self.version = version
        self.reloads += 1
        return len(rows)

    async def _apply(self, keys: list[str]) -> None:
        rows = await self.store.read([(self.entity, k) for k in keys], self.views)
        for key, row in zip(keys, rows, strict=True):
            if row is None:
                self._rows.pop(key, None)
                self._fresh_until.pop(key, None)
            else:
                self._rows[key] = row
                self._fresh_until[key] = self._until(row)
        self.updates += 1

    def _take(self, keys: list[str], view: str, blobs: list[bytes]) -> list[str]:
        """Apply the values a change message carries, newer-wins per key as the write script decides; returns
        the keys to read instead (a view this cache does not hold, values expired or of another schema)."""
        codec = self._codecs.get(view) if self.views is not None else self.store._codecs.by_name(view)
        if codec is None:
            return [] if self.views is not None else keys
        now = self.clock()
        stats = self.store.stats
        reread = []
        for key, blob in zip(keys, blobs, strict=True):
            values = codec.decode(blob, now, stats)
            if values is None:
                reread.append(key)
                continue
            row = self._rows.get(key)
            held = row.get(view) if row is not None else None
            if held is None or held.ts <= values.ts:
                row = self._rows[key] = {**row, view: values} if row is not None else {view: values}
                self._fresh_until[key] = self._until(row)
        return reread

    async def _on_message(self, data: bytes) -> None:
        entity, version_text, blob = data.split(b"|", 2)
        if entity.decode() != self.entity:
            return
        version = int(version_text)
        if version <= self.version:  # already covered by a reload that read the version after it
            return
        if version != self.version + 1 or not blob:
            await self.reload()
            return
        change = _decode_change(blob)
        if change and isinstance(change[0], list):  # with the values written
            reread = self._take(*change)
            if reread:
                await self._apply(reread)
            else:
                self.updates += 1
        else:
            await self._apply(change)
        self.version = version

    async def _run(self) -> None:
        assert self._pubsub is not None
        loop = asyncio.get_running_loop()
        next_check = loop.time() + self.check_every
        failures = 0
        while True:
            try:
                if not self._subscribed:  # Redis was unreachable when the server started
                    await self._subscribe_and_load()
                    log.info("%s feature cache: Redis answers; %d rows loaded", self.entity, len(self._rows))
                    failures = 0
                elif failures:
                    await self.reload()  # messages may have been lost with the connection
                    failures = 0
                message = await self._pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=max(0.0, next_check - loop.time())
                )
                if message is not None and message.get("type") == "message":
                    await self._on_message(message["data"])
                if loop.time() >= next_check:
                    next_check = loop.time() + self.check_every
                    if await self.store.version(self.entity) != self.version:
                        await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                log.warning("%s feature cache: refresh failed (attempt %d); serving cached rows",
                            self.entity, failures, exc_info=failures == 1)
                await asyncio.sleep(min(self.check_every, 0.1 * 2 ** min(failures, 6)))
