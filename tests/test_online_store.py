"""Tests for the online-store backends: the embedded `InMemoryOnlineStore` and `RedisOnlineStore`.

Redis tests talk to a real server (`tests.services` finds or starts one; a cluster test starts a one-node
Redis Cluster). Behaviour both backends share is parametrized over both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from kassa.features.definitions import FeatureView, Field
from kassa.features.online.base import ViewValues, WriteItem
from kassa.features.online.memory import InMemoryOnlineStore
from kassa.features.online.redis import OfferFeatureCache, RedisOnlineStore, row_key, version_key
from tests.services import ensure_redis_cluster

pytestmark = pytest.mark.anyio

NOW = time.time()
HOUR = 3600.0

ALL_TYPES = FeatureView(
    name="customer_all", kind="push", entity="customer", ttl="30d",
    fields=[
        Field("n", "int"), Field("x", "float"), Field("s", "str"), Field("b", "bool"),
        Field("tags", "list[str]"), Field("xs", "list[float]"), Field("ns", "list[int]"),
        Field("with_default", "int", default=7), Field("nothing", "str"),
    ],
)
PROFILE = FeatureView(name="customer_profile", kind="push", entity="customer", ttl="1h",
                      fields=[Field("orders", "int"), Field("spend", "float")])
FOREVER = FeatureView(name="customer_flags", kind="push", entity="customer", fields=[Field("vip", "bool")])
WEEK = FeatureView(name="customer_week", kind="push", entity="customer", ttl="7d", fields=[Field("n", "int")])
SESSION = FeatureView(name="session_ctx", kind="push", entity="session", ttl="1h", fields=[Field("pages", "int")])
OFFER = FeatureView(name="offer_stats", kind="push", entity="offer", ttl="1d",
                    fields=[Field("ctr", "float"), Field("title", "str")])

Store = InMemoryOnlineStore | RedisOnlineStore


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"  # redis.asyncio runs on asyncio only


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Store:
    if request.param == "memory":
        return InMemoryOnlineStore()
    return request.getfixturevalue("redis_store")


async def _poll(check: Callable[[], Awaitable[bool] | bool], timeout: float) -> float:
    """Seconds until ``check`` holds; fails after ``timeout``."""
    t0 = time.monotonic()
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


# -- shared behaviour


async def test_round_trip_every_dtype(store: Store) -> None:
    values = {"n": -12345678901, "x": 2.5, "s": "héllo ✓", "b": True, "tags": ["a", "b"], "xs": [0.5, 1],
              "ns": [1, -2, 3]}
    await store.write(ALL_TYPES, "c-1", values, NOW)
    expected = {**values, "xs": [0.5, 1.0], "with_default": 7, "nothing": None}
    for rows in (await store.read([("customer", "c-1")], [ALL_TYPES]), await store.read([("customer", "c-1")])):
        assert rows == [{"customer_all": ViewValues(NOW, expected)}]
        got = rows[0]["customer_all"].values  # type: ignore[index]
        assert type(got["n"]) is int and type(got["x"]) is float and type(got["b"]) is bool
        assert all(type(v) is float for v in got["xs"])


async def test_values_are_validated_before_writing(store: Store) -> None:
    for bad, field in (({"n": True}, "n"), ({"x": "1.0"}, "x"), ({"tags": ["a", 1]}, "tags"),
                       ({"ns": [1.5]}, "ns")):
        with pytest.raises(ValueError, match=f"field '{field}'"):
            await store.write(ALL_TYPES, "c-1", bad, NOW)
    with pytest.raises(ValueError, match="unknown field"):
        await store.write(ALL_TYPES, "c-1", {"typo": 1}, NOW)
    long_list = FeatureView(name="short", kind="push", entity="customer",
                            fields=[Field("xs", "list[int]", max_length=2)])
    with pytest.raises(ValueError, match="max_length"):
        await store.write(long_list, "c-1", {"xs": [1, 2, 3]}, NOW)
    assert await store.read([("customer", "c-1")], [ALL_TYPES, long_list]) == [None]


async def test_view_ttl_is_checked_on_read(store: Store) -> None:
    await store.write(PROFILE, "c-1", {"orders": 3, "spend": 10.0}, NOW)
    await store.write(FOREVER, "c-1", {"vip": True}, NOW)
    views = [PROFILE, FOREVER]
    store.clock = lambda: NOW + HOUR - 1
    assert set((await store.read([("customer", "c-1")], views))[0] or {}) == {"customer_profile", "customer_flags"}
    store.clock = lambda: NOW + HOUR + 1  # past the profile's ttl; the flags view has none
    (row,) = await store.read([("customer", "c-1")], views)
    assert row == {"customer_flags": ViewValues(NOW, {"vip": True})}
    assert store.stats.expired == 1
    (row,) = await store.read([("customer", "c-1")])
    assert row is not None and set(row) == {"customer_flags"}
    store.clock = lambda: NOW + 10 * HOUR
    assert await store.read([("customer", "c-1")], [PROFILE]) == [None]


async def test_missing_rows_and_views(store: Store) -> None:
    await store.write(PROFILE, "c-1", {"orders": 1, "spend": 2.0}, NOW)
    keys = [("customer", "nobody"), ("customer", "c-1"), ("session", "s-1"), ("offer", "o-1")]
    rows = await store.read(keys, [PROFILE, FOREVER, SESSION])
    assert rows[0] is None
    assert rows[1] == {"customer_profile": ViewValues(NOW, {"orders": 1, "spend": 2.0})}  # no customer_flags
    assert rows[2] is None  # a session view was asked for, none stored
    assert rows[3] is None  # no view of this entity was asked for
    assert await store.read([("customer", "c-1")], [FOREVER]) == [None]
    assert await store.read([("customer", "nobody")]) == [None]
    assert await store.read([]) == []


async def test_newer_values_win(store: Store) -> None:
    async def orders() -> int:
        (row,) = await store.read([("customer", "c-1")], [FOREVER, WEEK])
        assert row is not None
        return int(row["customer_week"].values["n"])

    await store.write(WEEK, "c-1", {"n": 1}, NOW)
    await store.write(WEEK, "c-1", {"n": 2}, NOW - 60)  # older: ignored
    assert await orders() == 1
    assert store.stats.older_ignored == 1
    await store.write(WEEK, "c-1", {"n": 3}, NOW)  # same event time: replaces (a re-materialization)
    assert await orders() == 3
    await store.write(WEEK, "c-1", {"n": 4}, NOW + 1)
    assert await orders() == 4
    written = await store.write_many(WEEK, [WriteItem("c-1", {"n": 5}, NOW - 1), WriteItem("c-2", {"n": 6}, NOW)])
    assert written == 1
    assert await orders() == 4


async def test_write_many_delete_and_a_decision_read(store: Store) -> None:
    n = 2_500  # more than one Redis pipeline chunk
    assert await store.write_many(PROFILE, (WriteItem(f"c-{i}", {"orders": i, "spend": i / 2}, NOW)
                                            for i in range(n))) == n
    await store.write(SESSION, "s-1", {"pages": 4}, NOW)
    keys = [("customer", f"c-{i}") for i in range(0, n, 97)] + [("session", "s-1")]
    rows = await store.read(keys, [PROFILE, SESSION])
    assert [r["customer_profile"].values["orders"] for r in rows[:-1]] == list(range(0, n, 97))  # type: ignore[index]
    assert rows[-1] == {"session_ctx": ViewValues(NOW, {"pages": 4})}
    await store.delete("customer", "c-0")
    await store.delete("customer", "never-written")
    assert await store.read([("customer", "c-0"), ("customer", "c-1")], [PROFILE]) == [
        None, {"customer_profile": ViewValues(NOW, {"orders": 1, "spend": 0.5})}]


async def test_values_of_another_schema_are_ignored(store: Store) -> None:
    await store.write(PROFILE, "c-1", {"orders": 3, "spend": 10.0}, NOW)
    redefined = FeatureView(name="customer_profile", kind="push", entity="customer", ttl="1h",
                            fields=[Field("orders", "float"), Field("spend", "float")])
    assert redefined.schema_hash() != PROFILE.schema_hash()
    assert await store.read([("customer", "c-1")], [redefined]) == [None]
    assert store.stats.stale_schema == 1
    assert await store.read([("customer", "c-1")]) == [None]  # the store now decodes with the new definition
    assert store.stats.stale_schema == 2
    await store.write(redefined, "c-1", {"orders": 1.5}, NOW)
    assert await store.read([("customer", "c-1")], [redefined]) == [
        {"customer_profile": ViewValues(NOW, {"orders": 1.5, "spend": None})}]


# -- Redis specifics


async def test_redis_hash_expires_with_its_longest_lived_view(redis_store: RedisOnlineStore) -> None:
    client = redis_store.client
    key = redis_store.row_key("customer", "c-1")
    now = time.time()
    await redis_store.write(PROFILE, "c-1", {"orders": 1}, now - 1800)
    assert 1790 <= await client.ttl(key) <= 1800  # event time + the view's ttl
    await redis_store.write(PROFILE, "c-1", {"orders": 2}, now)
    assert 3590 <= await client.ttl(key) <= 3600  # refreshed by the newer write
    await redis_store.write(WEEK, "c-1", {"n": 1}, now)
    assert 7 * 86400 - 10 <= await client.ttl(key) <= 7 * 86400
    await redis_store.write(PROFILE, "c-1", {"orders": 3}, now + 1)
    assert await client.ttl(key) > 86400  # a shorter-lived view never shortens the row's expiry
    await redis_store.write(FOREVER, "c-1", {"vip": True}, now)
    assert await client.ttl(key) == -1  # a view without ttl keeps the row
    await redis_store.write(WEEK, "c-1", {"n": 2}, now + 2)
    assert await client.ttl(key) == -1
    # A row whose only value is already past its ttl is not kept at all.
    await redis_store.write(PROFILE, "c-old", {"orders": 1}, now - 2 * HOUR)
    assert await client.exists(redis_store.row_key("customer", "c-old")) == 0


async def test_redis_layout_is_one_hash_per_row_with_msgpack_values(redis_store: RedisOnlineStore) -> None:
    await redis_store.write(PROFILE, "c-1", {"orders": 2, "spend": 3.5}, NOW)
    await redis_store.write(FOREVER, "c-1", {"vip": False}, NOW)
    raw: dict[Any, Any] = await redis_store.client.hgetall(f"{redis_store.prefix}:customer:{{c-1}}")
    assert set(raw) == {b"customer_profile", b"customer_flags"}
    assert msgspec.msgpack.decode(raw[b"customer_profile"]) == [NOW, PROFILE.schema_hash(), [2, 3.5]]


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XModem), the checksum Redis Cluster maps keys to slots with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _slot(key: str) -> int:
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return _crc16(raw) % 16384


def test_row_key_puts_the_entity_key_in_a_hash_tag() -> None:
    assert _crc16(b"123456789") == 0x31C3  # the check value from the Redis Cluster specification
    assert row_key("customer", "c-123") == "kassa:customer:{c-123}"
    assert row_key("customer", "c-123", prefix="shop1") == "shop1:customer:{c-123}"
    assert RedisOnlineStore(prefix="p").row_key("offer", "o:1") == "p:offer:{o:1}"
    slots = {_slot(row_key("customer", "c-123", prefix=p)) for p in ("kassa", "other", "x:y")}
    slots.add(_slot("anything-else-about:{c-123}:later"))
    assert slots == {_slot("c-123")}
    assert len({_slot(row_key("customer", f"c-{i}")) for i in range(100)}) > 90  # and rows still spread


async def test_cluster_mode_against_a_one_node_cluster() -> None:
    url = ensure_redis_cluster()
    plain = aioredis.Redis.from_url(url)
    store = RedisOnlineStore(url, prefix=f"kassa-test-cluster-{time.monotonic_ns()}", cluster=True)
    try:
        for key in ("c-1", "c-123", "x}y", "ü"):
            assert await plain.execute_command("CLUSTER", "KEYSLOT", row_key("customer", key)) == \
                _slot(row_key("customer", key))
        assert await store.write_many(PROFILE, (WriteItem(f"c-{i}", {"orders": i}, NOW) for i in range(1_500))) \
            == 1_500
        await store.write(SESSION, "s-1", {"pages": 2}, NOW)
        rows = await store.read([("customer", "c-7"), ("session", "s-1"), ("customer", "none")], [PROFILE, SESSION])
        assert rows == [{"customer_profile": ViewValues(NOW, {"orders": 7, "spend": None})},
                        {"session_ctx": ViewValues(NOW, {"pages": 2})}, None]
        assert (await store.read([("customer", "c-8")]))[0] is not None
        await store.delete("customer", "c-7")
        assert await store.read([("customer", "c-7")], [PROFILE]) == [None]
    finally:
        await store.clear()
        await store.close()
        await plain.aclose()


class _RoundTripCounter:
    """A TCP proxy in front of Redis counting request phases: client bytes that follow server bytes (or
    open the connection). Pipelined commands are one phase however many there are; a command that waits
    for the previous reply starts a new one. Ordering, not timing, so the count is exact."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.phases = 0
        self._last = "server"
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        for task in (self._pump(reader, up_writer, "client"), self._pump(up_reader, writer, "server")):
            t = asyncio.create_task(task)
            self._tasks.add(t)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: str) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if side == "client" and self._last == "server":
                    self.phases += 1
                self._last = side
                writer.write(data)
                await writer.drain()
        writer.close()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def counted_store(redis_store: RedisOnlineStore) -> AsyncIterator[tuple[RedisOnlineStore, _RoundTripCounter]]:
    kwargs = redis_store.client.connection_pool.connection_kwargs  # type: ignore[union-attr]
    counter = _RoundTripCounter(kwargs["host"], kwargs["port"])
    port = await counter.start()
    store = RedisOnlineStore(f"redis://127.0.0.1:{port}/{kwargs.get('db', 0)}", prefix=redis_store.prefix)
    try:
        yield store, counter
    finally:
        await store.close()
        await counter.close()


async def test_reading_many_rows_is_one_round_trip(counted_store: tuple[RedisOnlineStore, _RoundTripCounter],
                                                   redis_store: RedisOnlineStore) -> None:
    store, counter = counted_store
    await redis_store.write_many(PROFILE, (WriteItem(f"c-{i}", {"orders": i}, NOW) for i in range(200)))
    await redis_store.write(SESSION, "s-1", {"pages": 1}, NOW)
    await store.read([("customer", "c-0")], [PROFILE])  # connect first: the handshake has round trips of its own
    keys = [("customer", f"c-{i}") for i in range(200)] + [("session", "s-1"), ("customer", "missing")]

    before = counter.phases
    rows = await store.read(keys, [PROFILE, FOREVER, SESSION])
    assert counter.phases - before == 1
    assert sum(r is not None for r in rows) == 201

    before = counter.phases
    assert len(await store.read(keys)) == 202  # HGETALL per key, still one round trip
    assert counter.phases - before == 1

    before = counter.phases  # the counter does see separate round trips
    for key in keys[:5]:
        await store.read([key], [PROFILE])
    assert counter.phases - before == 5


async def test_a_cancelled_read_does_not_desync_the_connection(redis_store: RedisOnlineStore) -> None:
    await redis_store.write_many(PROFILE, (WriteItem(f"c-{i}", {"orders": i}, NOW) for i in range(300)))
    keys = [("customer", f"c-{i}") for i in range(300)]
    redis_store.breaker.failures = 10  # each cut read counts against the breaker; here only the stream matters
    for delay in (0.0, 0.0001, 0.0003, 0.001):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(redis_store.read(keys, [PROFILE]), delay)
    for i in (5, 17, 299):
        (row,) = await redis_store.read([("customer", f"c-{i}")], [PROFILE])
        assert row is not None and row["customer_profile"].values["orders"] == i


# -- the offer-feature cache


async def test_offer_cache_picks_up_a_write_from_another_process_within_a_second(
    redis_store: RedisOnlineStore, redis_url: str
) -> None:
    await redis_store.write(OFFER, "o-1", {"ctr": 0.1, "title": "Warranty"}, NOW)
    cache = OfferFeatureCache(redis_store, views=[OFFER], check_every=60.0)  # only pub/sub can refresh it
    writer = RedisOnlineStore(redis_url, prefix=redis_store.prefix)
    await cache.start()
    try:
        assert cache.get("o-1") == {"offer_stats": ViewValues(NOW, {"ctr": 0.1, "title": "Warranty"})}
        assert cache.get("o-2") is None
        await writer.write(OFFER, "o-2", {"ctr": 0.2, "title": "Magazine"}, NOW)
        assert await _poll(lambda: cache.get("o-2") is not None, timeout=1.0) < 1.0
        await writer.write(OFFER, "o-1", {"ctr": 0.3, "title": "Warranty"}, NOW + 1)
        await _poll(lambda: (cache.get("o-1") or {})["offer_stats"].values["ctr"] == 0.3, timeout=1.0)
        await writer.delete("offer", "o-2")
        await _poll(lambda: cache.get("o-2") is None, timeout=1.0)
        await writer.write_many(OFFER, (WriteItem(f"bulk-{i}", {"ctr": i / 100}, NOW) for i in range(1_200)))
        await _poll(lambda: cache.get("bulk-1199") is not None, timeout=1.0)
        assert len(cache) == 1_201
        assert cache.reloads == 1  # all of it arrived as change messages
        assert cache.version == await redis_store.version("offer")
    finally:
        await cache.close()
        await writer.close()


async def test_offer_cache_takes_written_values_from_the_message_newer_wins(
    redis_store: RedisOnlineStore, redis_url: str
) -> None:
    """A change message carries the values written: the cache applies them without reading the keys back, and
    keeps the newer of two values as the store does (a late write with an older event time loses in both)."""
    reads: list[list[str]] = []

    class Counting(OfferFeatureCache):
        async def _apply(self, keys: list[str]) -> None:
            reads.append(keys)
            await super()._apply(keys)

    cache = Counting(redis_store, views=[OFFER], check_every=60.0)
    writer = RedisOnlineStore(redis_url, prefix=redis_store.prefix)
    await cache.start()
    try:
        await writer.write(OFFER, "o-1", {"ctr": 0.5, "title": "New"}, NOW + 5)
        await _poll(lambda: cache.get("o-1") is not None, timeout=1.0)
        await writer.write_many(OFFER, [WriteItem("o-1", {"ctr": 0.1, "title": "Old"}, NOW + 1),
                                        WriteItem("o-2", {"ctr": 0.2, "title": "Two"}, NOW)])
        await _poll(lambda: cache.get("o-2") is not None, timeout=1.0)
        assert cache.get("o-1") == {"offer_stats": ViewValues(NOW + 5, {"ctr": 0.5, "title": "New"})}
        assert (await redis_store.read([("offer", "o-1")], [OFFER]))[0] == cache.get("o-1")
        assert reads == [] and cache.updates == 2 and cache.version == await redis_store.version("offer")
        await writer.delete("offer", "o-2")  # no values to carry: read back
        await _poll(lambda: cache.get("o-2") is None, timeout=1.0)
        assert reads == [["o-2"]]
    finally:
        await cache.close()
        await writer.close()


async def test_offer_cache_heals_a_missed_message_with_the_version_check(redis_store: RedisOnlineStore) -> None:
    cache = OfferFeatureCache(redis_store, views=[OFFER], check_every=0.2)
    await cache.start()
    try:
        # A writer whose message never arrives: the row and the version change, nothing is published.
        blob = redis_store.register(OFFER).encode({"ctr": 0.5, "title": "Quiet"}, NOW)
        await redis_store.client.hset(redis_store.row_key("offer", "o-9"), "offer_stats", blob)
        await redis_store.client.incr(version_key("offer", redis_store.prefix))
        await _poll(lambda: cache.get("o-9") is not None, timeout=2.0)
        assert cache.reloads >= 2
    finally:
        await cache.close()


async def test_offer_cache_drops_values_that_age_past_their_ttl(redis_store: RedisOnlineStore) -> None:
    await redis_store.write(OFFER, "o-1", {"ctr": 0.1}, NOW)
    cache = OfferFeatureCache(redis_store, views=[OFFER], check_every=60.0)
    await cache.start()
    try:
        assert cache.get("o-1") is not None
        cache.clock = lambda: NOW + 86400 + 1
        assert cache.get("o-1") is None
    finally:
        await cache.close()


# -- the embedded store: snapshots and the older dict API


async def test_memory_snapshot_and_restore(tmp_path: Path) -> None:
    store = InMemoryOnlineStore()
    await store.write(ALL_TYPES, "c-1", {"n": 1, "tags": ["x"]}, NOW)
    await store.write_many(PROFILE, (WriteItem(f"c-{i}", {"orders": i, "spend": 1.0}, NOW) for i in range(1_000)))
    await store.write(SESSION, "s-1", {"pages": 3}, NOW)
    store.put("customer", "c-2", "legacy_profile", {"orders_count": 2, "recent_categories": ["a"]}, NOW - 5)
    path = tmp_path / "online" / "store.msgpack"
    assert store.snapshot(path) == 1_001
    assert [p.name for p in path.parent.iterdir()] == ["store.msgpack"]  # no temp file left behind

    restored = InMemoryOnlineStore()
    assert restored.restore(path) == 1_001
    assert len(restored) == len(store) == 1_001
    keys = [("customer", "c-1"), ("customer", "c-2"), ("customer", "c-999"), ("session", "s-1")]
    views = [ALL_TYPES, PROFILE, SESSION]
    assert await restored.read(keys, views) == await store.read(keys, views)
    for key in ("c-1", "c-2"):
        assert restored.get_now("customer", key) == store.get_now("customer", key)
    assert restored.event_time("customer", "c-2", "legacy_profile") == NOW - 5
    assert InMemoryOnlineStore().restore(tmp_path / "missing.msgpack") == 0

    # Overwriting keeps the previous file until the new one is complete.
    await store.write(PROFILE, "c-1", {"orders": 99}, NOW + 1)
    store.snapshot(path)
    again = InMemoryOnlineStore()
    again.restore(path)
    (row,) = await again.read([("customer", "c-1")], [PROFILE])
    assert row is not None and row["customer_profile"].values["orders"] == 99


def test_memory_restore_reads_the_previous_snapshot_format(tmp_path: Path) -> None:
    path = tmp_path / "old.msgpack"
    path.write_bytes(msgspec.msgpack.encode([["customer", "c-1", {"customer_profile": {"orders_count": 3}},
                                              {"customer_profile": 123.0}]]))
    store = InMemoryOnlineStore()
    assert store.restore(path) == 1
    assert store.get_now("customer", "c-1") == {"customer_profile": {"orders_count": 3}}
    assert store.event_time("customer", "c-1", "customer_profile") == 123.0


async def test_memory_legacy_dict_api_is_unchanged() -> None:
    store = InMemoryOnlineStore(clock=lambda: 500.0)
    assert await store.get("customer", "c-1") is None
    store.put("customer", "c-1", "customer_profile", {"orders_count": 1, "recent_categories": ["a", "b"]}, 100.0)
    store.put("customer", "c-1", "customer_profile", {"orders_count": 2}, 50.0)  # put always replaces
    store.put("customer", "c-1", "other", {"x": 1.5})
    assert await store.get("customer", "c-1") == {"customer_profile": {"orders_count": 2}, "other": {"x": 1.5}}
    assert store.event_time("customer", "c-1", "customer_profile") == 50.0
    assert store.event_time("customer", "c-1", "other") == 500.0
    assert store.event_time("customer", "c-9", "other") is None
    assert len(store) == 1
    # Typed writes show up in the dict API too, and untyped values in reads without a view list.
    await store.write(PROFILE, "c-1", {"orders": 4, "spend": 1.0}, 400.0)
    assert store.get_now("customer", "c-1")["customer_profile"] == {"orders": 4, "spend": 1.0}  # type: ignore[index]
    store.clock = lambda: 400.0
    (row,) = await store.read([("customer", "c-1")])
    assert row == {"customer_profile": ViewValues(400.0, {"orders": 4, "spend": 1.0}),
                   "other": ViewValues(500.0, {"x": 1.5})}


async def test_memory_purge_expired_frees_what_reads_skip() -> None:
    store = InMemoryOnlineStore(clock=lambda: NOW)
    await store.write(PROFILE, "c-1", {"orders": 1}, NOW - 2 * HOUR)  # expired
    await store.write(PROFILE, "c-2", {"orders": 2}, NOW)
    await store.write(FOREVER, "c-1", {"vip": True}, NOW - 1_000 * HOUR)  # no ttl: kept
    store.put("customer", "c-3", "legacy", {"x": 1}, 0.0)  # untyped: no ttl known, kept
    assert len(store) == 3
    assert store.purge_expired() == 1
    assert len(store) == 3  # c-1 still has its flags
    assert await store.read([("customer", "c-1"), ("customer", "c-2")], [PROFILE]) == [
        None, {"customer_profile": ViewValues(NOW, {"orders": 2, "spend": None})}]
    assert store.purge_expired(now=NOW + 2 * HOUR) == 1
    assert len(store) == 2


def test_memory_values_are_stored_compactly() -> None:
    store = InMemoryOnlineStore()
    items = [WriteItem(f"c-{i}", {"orders": i, "spend": float(i)}, NOW) for i in range(10)]
    asyncio.run(store.write_many(PROFILE, items))
    blobs: Any = store._data["customer"]["customer_profile"]
    assert all(type(b) is bytes and len(b) < 40 for b in blobs.values())  # field names are not repeated per row


# -- the embedded store's row reader (decoded rows kept between writes; issue 13)


async def test_row_reader_serves_each_write_on_the_next_read_and_honours_the_ttl() -> None:
    t = [NOW]
    store = InMemoryOnlineStore([OFFER], clock=lambda: t[0])
    get = store.row_reader("offer")
    assert get("o-1") is None
    await store.write(OFFER, "o-1", {"ctr": 0.1, "title": "a"}, NOW)
    first = get("o-1")
    assert first == {"offer_stats": ViewValues(NOW, {"ctr": 0.1, "title": "a"})}
    assert get("o-1") is first  # nothing written since: the same decoded row
    await store.write(OFFER, "o-1", {"ctr": 0.2, "title": "a"}, NOW)  # equal event time, new values
    assert get("o-1") == {"offer_stats": ViewValues(NOW, {"ctr": 0.2, "title": "a"})}
    await store.write_many(OFFER, [WriteItem("o-1", {"ctr": 0.3, "title": "b"}, NOW + 1)])
    newest = {"offer_stats": ViewValues(NOW + 1, {"ctr": 0.3, "title": "b"})}
    assert get("o-1") == store.read_now("offer", "o-1") == newest
    t[0] = NOW + 1 + 86_400.0  # exactly at the ttl: still served, as `read` serves it
    assert get("o-1") == store.read_now("offer", "o-1") is not None
    t[0] = NOW + 1 + 86_400.0 + 1e-3
    assert get("o-1") is None and store.read_now("offer", "o-1") is None
    t[0] = NOW
    await store.delete("offer", "o-1")
    assert get("o-1") is None


async def test_row_reader_forgets_rows_on_restore_purge_and_a_changed_view(tmp_path: Path) -> None:
    t = [NOW]
    store = InMemoryOnlineStore([OFFER], clock=lambda: t[0])
    get = store.row_reader("offer")
    await store.write(OFFER, "o-1", {"ctr": 0.1}, NOW)
    assert get("o-1") is not None
    other = InMemoryOnlineStore([OFFER])
    await other.write(OFFER, "o-1", {"ctr": 0.9}, NOW + 5)
    other.snapshot(tmp_path / "s.msgpack")
    store.restore(tmp_path / "s.msgpack")
    assert get("o-1") == {"offer_stats": ViewValues(NOW + 5, {"ctr": 0.9, "title": None})}
    # A new definition of the view (another schema) decodes the stored values no more.
    changed = FeatureView(name="offer_stats", kind="push", entity="offer", ttl="1d", fields=[Field("ctr", "float")])
    store.register(changed)
    assert get("o-1") is None
    store.register(OFFER)
    assert get("o-1") is not None
    t[0] = NOW + 5 + 2 * 86_400.0
    assert store.purge_expired() == 1
    assert get("o-1") is None
