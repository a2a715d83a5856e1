"""`PipelinedConnection`: one Redis connection that every coroutine of a process pipelines on (the shared
state, ``kassa.state.redis``, and the Redis online store's reads and writes, ``kassa.features.online.redis``).

Why not redis-py's asyncio pool: measured with cProfile on this machine, a decision's two round trips through
it (pool checkout and release, its observability hooks, one ``read_response`` per reply) cost ~200 µs of CPU
each, and a round trip cancelled by the latency budget had to close its connection (its unread reply would
desync the next user). Here a batch of commands is packed by hiredis and written at once; the connection's
protocol parses replies with ``hiredis.Reader`` as they arrive (in the transport's callback, no reader task
between the socket and the caller) and hands each batch its replies in order (FIFO: Redis answers one
connection in order). A caller that gives up (timeout) just stops waiting: its replies are still read and
dropped, so nothing desyncs and nothing reconnects. Concurrent callers share the connection, so their
commands travel together (natural pipelining).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis


class ConnectionLost(ConnectionError):
    pass


def speaks(url: str) -> bool:
    """Whether this connection can reach ``url``: plain TCP ``redis://`` (no TLS, no unix socket)."""
    return urlsplit(url).scheme in ("redis", "")


def address(url: str) -> tuple[str, int, int, str | None]:
    """Which server and database ``url`` reaches (as whom): two equal addresses are one Redis."""
    parts = urlsplit(url)
    return (parts.hostname or "127.0.0.1", parts.port or 6379, int(parts.path.strip("/") or 0),
            unquote(parts.username) if parts.username else None)


class PipelinedConnection:
    def __init__(self, url: str, connect_timeout: float = 0.25) -> None:
        if not speaks(url):
            raise ValueError(f"state.redis_url must be redis://host:port/db, not {url!r}")
        self.host, self.port, self.db, self.username = address(url)
        parts = urlsplit(url)
        self.password = unquote(parts.password) if parts.password else None
        self.connect_timeout = connect_timeout
        self._writer: asyncio.Transport | None = None
        self._protocol: _Replies | None = None
        self._waiting: deque[tuple[asyncio.Future, int, list[Any]]] = deque()
        self._connecting: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the connection lives on

    @property
    def address(self) -> tuple[str, int, int, str | None]:
        """Which server and database this connection reaches (as whom): two equal addresses are one Redis."""
        return self.host, self.port, self.db, self.username

    def send(self, packed: bytes, n: int) -> asyncio.Future | None:
        """Write now (before the caller's next await) and return the future of the replies; None when not
        connected (then use `execute`)."""
        loop = asyncio.get_running_loop()
        if self._writer is None or self._writer.is_closing() or self._loop is not loop:
            return None
        fut: asyncio.Future = loop.create_future()
        self._waiting.append((fut, n, []))
        self._writer.write(packed)
        return fut

    async def call(self, packed: bytes, n: int, timeout: float) -> list[Any]:
        """`execute` within ``timeout`` seconds (else `TimeoutError`), connected or not. Connected, the wait is a
        timer on the replies' future: no task per call, as `asyncio.wait_for` of a coroutine would create."""
        fut = self.send(packed, n)
        if fut is None:
            return await asyncio.wait_for(self.execute(packed, n), timeout)
        timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()

    async def execute(self, packed: bytes, n: int) -> list[Any]:
        """Send ``n`` packed commands; their ``n`` replies (error replies as `hiredis.ReplyError` values)."""
        loop = asyncio.get_running_loop()
        if self._writer is None or self._writer.is_closing() or self._loop is not loop:
            await self._connect()
        assert self._writer is not None
        fut: asyncio.Future = loop.create_future()
        self._waiting.append((fut, n, []))
        self._writer.write(packed)
        return await fut

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use, or a new event loop (a CLI command's second `asyncio.run`): what belonged to the
            # old loop cannot be used from this one.
            self._writer, self._protocol, self._connecting, self._loop = None, None, None, loop
            self._waiting = deque()
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return
            writer, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: _Replies(self), self.host, self.port), self.connect_timeout)
            hello: list[tuple] = []
            if self.password is not None:
                hello.append(("AUTH", self.password) if self.username is None
                             else ("AUTH", self.username, self.password))
            if self.db:
                hello.append(("SELECT", self.db))
            self._writer = writer
            self._protocol = protocol
            if hello:
                replies = await asyncio.wait_for(
                    self.execute(b"".join(hiredis.pack_command(c) for c in hello), len(hello)), self.connect_timeout)
                for r in replies:
                    if isinstance(r, Exception):
                        writer.close()
                        raise ConnectionLost(f"Redis refused the connection setup: {r}")

    async def close(self) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None and self._loop is asyncio.get_running_loop():
            protocol.close()
            await protocol.closed  # its waiting calls failed with ConnectionLost("closed")


class _Replies(asyncio.Protocol):
    """Reads the connection's replies in the transport's callback and hands each batch its replies there: a
    waiting caller resumes in the event loop's next iteration, not one later behind a reader task's wake-up
    (under load every iteration runs other requests' work first; ADR 0011)."""

    def __init__(self, conn: PipelinedConnection) -> None:
        self.conn = conn
        self.waiting = conn._waiting
        self.parser = hiredis.Reader()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()
        self.error: BaseException = ConnectionLost("Redis closed the connection")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's TCPTransport is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        parser, waiting = self.parser, self.waiting
        try:
            parser.feed(data)
            while True:
                reply = parser.gets()
                if reply is False:
                    break
                fut, n, replies = waiting[0]
                replies.append(reply)
                if len(replies) == n:
                    waiting.popleft()
                    if not fut.done():  # a caller that timed out is gone; its replies are dropped
                        fut.set_result(replies)
        except (hiredis.ProtocolError, IndexError) as exc:  # IndexError: a reply nobody asked for
            self.close(ConnectionLost(str(exc)))

    def close(self, error: BaseException | None = None) -> None:
        """Close the transport; its waiting calls fail with ``error`` (default: closed by us)."""
        if self.transport is not None and not self.transport.is_closing():
            self.error = error if error is not None else ConnectionLost("closed")
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionLost(str(exc)) if exc is not None else self.error
        conn = self.conn
        if conn._writer is self.transport:
            conn._writer = None
        waiting = self.waiting
        while waiting:
            fut, _, _ = waiting.popleft()
            if not fut.done():
                fut.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():  # its replies will be read and dropped
        fut.set_exception(TimeoutError("no reply from Redis in time"))
