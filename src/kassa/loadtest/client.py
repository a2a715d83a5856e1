"""A minimal asyncio HTTP/1.1 keep-alive client for load generation.

Owns :class:`ConnectionPool`: a set of persistent connections to one ``host:port``, each carrying
one request at a time (no pipelining), with a FIFO of requests waiting for a free connection.
Built on ``asyncio.Protocol`` rather than an HTTP library because the client's CPU per request
must stay in the tens of microseconds: on a small machine the generator shares cores with the
server, and every microsecond it spends shows up as server latency. The request head is
pre-encoded once per (method, path, headers) and responses are parsed with a few ``bytes.find``
calls (status line, ``Content-Length``, ``chunked``, ``Connection: close``).

Two ways to send:

* ``await pool.request(method, path, body, headers)`` returns ``(status, body)``;
* ``pool.send(data, callback, timeout)`` is the callback form the open-loop runner uses: no task
  or future per request, ``callback(status, body, exc)`` runs inside ``data_received``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import cast

Callback = Callable[[int, bytes, BaseException | None], None]

_MAX_HEAD = 64 * 1024
_PREFIX_CACHE_MAX = 1024


class ProtocolError(ConnectionError):
    """The server sent something that is not an HTTP/1.1 response we can parse."""


class RequestTimeout(TimeoutError):
    """No complete response within the request's timeout."""


class _Pending:
    __slots__ = ("callback", "data", "deadline", "retried")

    def __init__(self, data: bytes, callback: Callback, deadline: float) -> None:
        self.data = data
        self.callback = callback
        self.deadline = deadline
        self.retried = False


# Parser states.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _UNTIL_CLOSE = range(6)


class _Conn(asyncio.Protocol):
    """One keep-alive connection; parses the response of the single request in flight."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.current: _Pending | None = None
        self.served = 0  # responses completed on this connection (a reused one may be stale)
        self.buf = b""
        self.state = _HEAD
        self.status = 0
        self.remaining = 0
        self.chunks: list[bytes] = []
        self.close_after = False
        self.got_bytes = False
        self.closed = False

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not an isinstance.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pending, self.current = self.current, None
        if pending is not None and self.state == _UNTIL_CLOSE and self.status:
            # A body delimited by the connection close is complete now.
            self._deliver(pending, self.status, self.buf, None)
            pending = None
        self.pool._lost(self, pending, exc)

    def data_received(self, data: bytes) -> None:
        if self.current is None:
            return  # unsolicited bytes (or the tail of a timed-out response): drop
        self.got_bytes = True
        # ``b"" + data`` does not copy in CPython, so the common one-segment response is free.
        buf = self.buf + data
        while True:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        self._fail(ProtocolError("response head too large"))
                        return
                    break
                head = buf[:end]
                buf = buf[end + 4 :]
                if head[:7] != b"HTTP/1." or len(head) < 12:
                    self._fail(ProtocolError(f"bad status line: {head[:40]!r}"))
                    return
                try:
                    status = int(head[9:12])
                except ValueError:
                    self._fail(ProtocolError(f"bad status line: {head[:40]!r}"))
                    return
                if status < 200:
                    continue  # 1xx interim response: the real one follows
                self.status = status
                lower = head.lower()
                self.close_after = b"\r\nconnection: close" in lower or head[7:8] == b"0"
                if status in (204, 304) or (self.current is not None and self.current.data.startswith(b"HEAD ")):
                    self.buf = buf
                    self._complete(b"")
                    return
                i = lower.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = lower.find(b"\r\n", i + 17)
                    try:
                        self.remaining = int(lower[i + 17 : j if j >= 0 else len(lower)])
                    except ValueError:
                        self._fail(ProtocolError("bad Content-Length"))
                        return
                    self.state = _BODY
                elif b"\r\ntransfer-encoding:" in lower and b"chunked" in lower:
                    self.chunks = []
                    self.state = _CHUNK_SIZE
                else:
                    self.state = _UNTIL_CLOSE
            elif state == _BODY:
                if len(buf) < self.remaining:
                    break
                n = self.remaining
                body = buf[:n] if len(buf) != n else buf
                self.buf = b""
                self._complete(body)
                return
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                try:
                    size = int(buf[:eol].split(b";", 1)[0], 16)
                except ValueError:
                    self._fail(ProtocolError("bad chunk size"))
                    return
                buf = buf[eol + 2 :]
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size
                    self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if len(buf) < self.remaining + 2:
                    break
                self.chunks.append(buf[: self.remaining])
                buf = buf[self.remaining + 2 :]
                self.state = _CHUNK_SIZE
            elif state == _TRAILER:
                # Trailers (rare) end with an empty line; without trailers that is just b"\r\n".
                end = 0 if buf.startswith(b"\r\n") else buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                body = b"".join(self.chunks)
                self.chunks = []
                self.buf = b""
                self._complete(body)
                return
            else:  # _UNTIL_CLOSE: keep everything until connection_lost
                break
        self.buf = buf

    # ------------------------------------------------------------------ request lifecycle
    def start(self, pending: _Pending) -> None:
        self.current = pending
        self.state = _HEAD
        self.buf = b""
        self.got_bytes = False
        assert self.transport is not None
        self.transport.write(pending.data)

    def _complete(self, body: bytes) -> None:
        pending, self.current = self.current, None
        self.state = _HEAD
        self.served += 1
        if pending is not None:
            # Deliver before writing the next queued request, so its timestamp excludes that write.
            self._deliver(pending, self.status, body, None)
        if self.close_after:
            self.abort()
        else:
            self.pool._release(self)

    def _fail(self, exc: BaseException) -> None:
        pending, self.current = self.current, None
        self.abort()
        if pending is not None:
            self._deliver(pending, 0, b"", exc)

    @staticmethod
    def _deliver(pending: _Pending, status: int, body: bytes, exc: BaseException | None) -> None:
        try:
            pending.callback(status, body, exc)
        except Exception as cb_exc:  # a broken callback must not break the connection's parser
            loop = asyncio.get_running_loop()
            loop.call_exception_handler({"message": "loadtest response callback failed", "exception": cb_exc})

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()


class ConnectionPool:
    """Persistent HTTP/1.1 connections to one server, ``size`` of them, growing to ``max_size``.

    Requests beyond the free connections wait in one FIFO (client-side queueing; the open-loop
    runner still times them from their intended send time). A connection that closes is replaced
    in the background. A request whose connection dies before a single response byte arrived on a
    *reused* connection is retried once (the usual stale keep-alive race); anything else fails
    with ``ConnectionError``.
    """

    def __init__(
        self,
        host: str,
        port: int,
        size: int = 16,
        *,
        max_size: int | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.size = size
        self.max_size = max(size, max_size or size)
        self.connect_timeout = connect_timeout
        self._idle: list[_Conn] = []
        self._conns: set[_Conn] = set()
        self._connecting = 0
        self._queue: deque[_Pending] = deque()
        self._prefixes: dict[tuple[str, str, bytes], bytes] = {}
        self._host_header = f"Host: {host}:{port}\r\n".encode()
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[None]] = set()
        self.connect_errors = 0
        self.last_connect_error: BaseException | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> ConnectionPool:
        """Open ``size`` connections (raises if none can be opened) and start the timeout sweeper."""
        results = await asyncio.gather(*(self._connect() for _ in range(self.size)), return_exceptions=True)
        if not self._conns:
            err = next((r for r in results if isinstance(r, BaseException)), None)
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}: {err!r}")
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        return self

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._bg):
            task.cancel()
        self.cancel_all(ConnectionError("pool closed"))
        for conn in list(self._conns):
            conn.abort()
        self._conns.clear()
        self._idle.clear()

    async def __aenter__(self) -> ConnectionPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def busy(self) -> int:
        return len(self._conns) - len(self._idle)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ requests
    def build(self, method: str, path: str, body: bytes = b"", headers: bytes = b"") -> bytes:
        """Encode one request. ``headers`` is a pre-encoded block of ``Name: value\\r\\n`` lines."""
        key = (method, path, headers)
        prefix = self._prefixes.get(key)
        if prefix is None:
            if len(self._prefixes) >= _PREFIX_CACHE_MAX:
                self._prefixes.clear()  # paths that vary per request: don't grow without bound
            prefix = b"".join(
                (f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header, headers, b"Content-Length: ")
            )
            self._prefixes[key] = prefix
        return b"%b%d\r\n\r\n%b" % (prefix, len(body), body)

    def send(self, data: bytes, callback: Callback, timeout: float | None = None) -> None:
        """Send pre-encoded request bytes; ``callback(status, body, exc)`` runs on completion.

        ``exc`` is ``None`` for any complete response (including 4xx/5xx), a ``RequestTimeout``
        after ``timeout`` seconds, or a ``ConnectionError``.
        """
        pending = _Pending(data, callback, time.perf_counter() + timeout if timeout else float("inf"))
        if self._closed:
            callback(0, b"", ConnectionError("pool closed"))
            return
        idle = self._idle
        if idle:
            idle.pop().start(pending)
            return
        self._queue.append(pending)
        if self._want_more():
            self._spawn_connect()

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: bytes = b"",
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """Send one request and return ``(status, body)``; raises on timeout or connection error."""
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

        def done(status: int, resp: bytes, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result((status, resp))

        self.send(self.build(method, path, body, headers), done, timeout)
        return await fut

    def cancel_all(self, exc: BaseException) -> int:
        """Fail every queued and in-flight request with ``exc``; returns how many."""
        n = 0
        while self._queue:
            pending = self._queue.popleft()
            _Conn._deliver(pending, 0, b"", exc)
            n += 1
        for conn in list(self._conns):
            if conn.current is not None:
                conn._fail(exc)
                n += 1
        return n

    # ------------------------------------------------------------------ connection management
    async def _connect(self) -> None:
        self._connecting += 1
        try:
            loop = asyncio.get_running_loop()
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self), self.host, self.port),
                self.connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            self.connect_errors += 1
            self.last_connect_error = exc
            raise
        finally:
            self._connecting -= 1
        if self._closed:
            proto.abort()
            return
        self._conns.add(proto)
        self._release(proto)

    def _spawn_connect(self, delay: float = 0.0) -> None:
        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            try:
                await self._connect()
            except (TimeoutError, OSError):
                # Keep trying while requests wait; the sweeper fails them at their deadline.
                if not self._closed and self._want_more():
                    self._spawn_connect(min(1.0, max(0.05, delay * 2)))

        task = asyncio.get_running_loop().create_task(run())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _want_more(self) -> bool:
        have = len(self._conns) + self._connecting
        return have < self.size or (bool(self._queue) and have < self.max_size)

    def _release(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if self._queue:
            conn.start(self._queue.popleft())
        else:
            self._idle.append(conn)

    def _lost(self, conn: _Conn, pending: _Pending | None, exc: Exception | None) -> None:
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if pending is not None:
            if not conn.got_bytes and conn.served > 0 and not pending.retried and not self._closed:
                pending.retried = True
                self._queue.appendleft(pending)
            else:
                err = ConnectionError(f"connection lost: {exc!r}" if exc else "connection closed by server")
                _Conn._deliver(pending, 0, b"", err)
        if not self._closed and self._want_more():
            self._spawn_connect()

    async def _sweep(self) -> None:
        """Fail requests past their deadline, every 100 ms (cheaper than one timer per request)."""
        while True:
            await asyncio.sleep(0.1)
            now = time.perf_counter()
            queue = self._queue
            if queue:
                expired = [p for p in queue if p.deadline <= now]
                if expired:
                    self._queue = deque(p for p in queue if p.deadline > now)
                    why = "request timed out while queued"
                    if not self._conns and self.last_connect_error is not None:  # the server is down, not slow
                        why += (f" (no connection to {self.host}:{self.port} could be opened: "
                                f"{self.last_connect_error!r})")
                    for p in expired:
                        _Conn._deliver(p, 0, b"", RequestTimeout(why))
            for conn in list(self._conns):
                cur = conn.current
                if cur is not None and cur.deadline <= now:
                    # The late response would arrive on this connection: it cannot be reused.
                    conn._fail(RequestTimeout("request timed out"))
