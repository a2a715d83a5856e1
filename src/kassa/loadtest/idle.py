"""Idle keep-alive browsers: many open connections that each carry a request only now and then.

Owns :class:`IdleHolder`. A checkout at peak happens while thousands of other shoppers' browsers keep
a connection to the server open. Each held connection sends ``GET /healthz`` when it opens — a
connection counts as *held* only once the server has answered on it, because the kernel completes a
TCP handshake even for a server that never accepts — and then again every ``refresh_seconds`` (at a
random phase, so refreshes spread evenly instead of arriving in a herd), which keeps it inside the
server's keep-alive timeout. A connection the server closes anyway is opened again and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from typing import Any, cast

_CONNECT_CONCURRENCY = 256


class _IdleConn(asyncio.Protocol):
    def __init__(self, holder: IdleHolder) -> None:
        self.holder = holder
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.waiting = False
        self.verified = False
        self.closing = False
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.ping()

    def ping(self) -> None:
        if self.transport is None or self.closing or self.transport.is_closing():
            return
        if self.waiting:  # the previous refresh is still unanswered: count it, don't pile up
            self.holder.refresh_unanswered += 1
            return
        self.waiting = True
        self.buf = b""
        self.transport.write(self.holder.request)

    def data_received(self, data: bytes) -> None:
        if not self.waiting:
            return
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            self.buf = buf
            return
        head = buf[:end].lower()
        i = head.find(b"content-length:")
        length = 0
        if i >= 0:
            j = head.find(b"\r\n", i)
            with contextlib.suppress(ValueError):
                length = int(head[i + 15 : j if j >= 0 else len(head)])
        if len(buf) - end - 4 < length:
            self.buf = buf
            return
        self.waiting = False
        self.buf = b""
        ok = buf[9:10] == b"2"
        self.holder._answered(self, ok, buf[:12])

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if not self.answered.done():
            self.answered.set_exception(ConnectionError(f"closed before answering: {exc!r}" if exc else
                                                        "closed by the server before answering"))
        self.holder._lost(self)

    def close(self) -> None:
        self.closing = True
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.abort()


class IdleHolder:
    """Hold ``count`` verified keep-alive connections to ``host:port`` until :meth:`close`."""

    def __init__(
        self, host: str, port: int, count: int, refresh_seconds: float = 25.0, *,
        path: str = "/healthz", connect_timeout: float = 10.0, seed: int = 0,
    ) -> None:
        self.host, self.port, self.count = host, port, count
        self.refresh_seconds = refresh_seconds
        self.connect_timeout = connect_timeout
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.rng = random.Random(seed)
        self.conns: set[_IdleConn] = set()
        self.verified = 0  # currently open and answered
        self.opened = 0
        self.failed: Counter[str] = Counter()
        self.closed_by_server = 0
        self.reopened = 0
        self.refresh_sent = 0
        self.refresh_failed = 0
        self.refresh_unanswered = 0
        self.min_held: int | None = None
        self._closing = False
        self._bg: set[asyncio.Task[Any]] = set()

    @property
    def held(self) -> int:
        return self.verified

    async def open(self) -> None:
        """Open and verify every connection (failures are counted by reason, not raised)."""
        sem = asyncio.Semaphore(_CONNECT_CONCURRENCY)

        async def one() -> None:
            async with sem:
                await self._open_one()

        await asyncio.gather(*(one() for _ in range(self.count)))

    async def _open_one(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(lambda: _IdleConn(self), self.host, self.port), self.connect_timeout
            )
            conn = cast(_IdleConn, proto)
            self.conns.add(conn)
            self.opened += 1
            await asyncio.wait_for(asyncio.shield(conn.answered), self.connect_timeout)
        except TimeoutError:
            self.failed["no answer within the connect timeout"] += 1
        except OSError as exc:  # includes ConnectionError and EMFILE
            self.failed[f"{type(exc).__name__}: {exc.strerror or exc}" if exc.strerror else repr(exc)] += 1

    def _answered(self, conn: _IdleConn, ok: bool, status_line: bytes) -> None:
        if not conn.verified:
            if ok:
                conn.verified = True
                self.verified += 1
                if not conn.answered.done():
                    conn.answered.set_result(None)
                self._schedule(conn, first=True)
            else:
                self.failed[f"GET /healthz answered {status_line.decode(errors='replace')}"] += 1
                if not conn.answered.done():
                    conn.answered.set_exception(ConnectionError("healthz failed"))
                conn.close()
            return
        if not ok:
            self.refresh_failed += 1

    def _schedule(self, conn: _IdleConn, first: bool = False) -> None:
        if self.refresh_seconds <= 0 or self._closing:
            return
        delay = self.rng.uniform(0, self.refresh_seconds) if first else self.refresh_seconds
        conn.timer = asyncio.get_running_loop().call_later(delay, self._refresh, conn)

    def _refresh(self, conn: _IdleConn) -> None:
        conn.timer = None
        if self._closing:
            return
        self.refresh_sent += 1
        conn.ping()
        self._schedule(conn)  # a fixed cadence: an unanswered refresh is counted at the next one

    def _lost(self, conn: _IdleConn) -> None:
        self.conns.discard(conn)
        if conn.closing or self._closing:
            if conn.verified:
                self.verified -= 1  # our own close at the end: not a drop in what was held
            return
        if conn.verified:
            self.verified -= 1
            self._note_held()
        if conn.verified:
            self.closed_by_server += 1
            # A browser that comes back: reopen after a short random pause.
            task = asyncio.get_running_loop().create_task(self._reopen(self.rng.uniform(0.05, 1.0)))
            self._bg.add(task)
            task.add_done_callback(self._bg.discard)

    async def _reopen(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._closing:
            self.reopened += 1
            await self._open_one()

    def _note_held(self) -> None:
        if self.min_held is None or self.verified < self.min_held:
            self.min_held = self.verified

    def mark(self, reset: bool = False) -> None:
        """Sample the held count (called periodically; the minimum is reported); ``reset`` starts over."""
        if reset:
            self.min_held = None
        self._note_held()

    async def close(self) -> None:
        self._closing = True
        for task in list(self._bg):
            task.cancel()
        for conn in list(self.conns):
            conn.close()
        await asyncio.sleep(0)

    def stats(self) -> dict[str, Any]:
        return {
            "asked": self.count,
            "held": self.verified,
            "min_held": self.verified if self.min_held is None else self.min_held,
            "opened": self.opened,
            "failed": dict(self.failed),
            "closed_by_server": self.closed_by_server,
            "reopened": self.reopened,
            "refresh_sent": self.refresh_sent,
            "refresh_failed": self.refresh_failed,
            "refresh_unanswered": self.refresh_unanswered,
        }
