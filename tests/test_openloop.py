"""The open-loop runner against a tiny raw-asyncio HTTP/1.1 server started inside the test.

Checks the property the decision-latency benchmark depends on: latency is timed from each
request's *intended* send time, so a stall on the server shows up in the stalled request and in
every request queued behind it, and the generator keeps sending on schedule meanwhile.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kassa.loadtest import ConnectionPool, arrival_offsets, run_open_loop
from kassa.loadtest.client import RequestTimeout

RATE = 200.0  # requests/s: one every 5 ms
DURATION = 1.0
STALL_EVERY = 20
STALL_S = 0.030
FAIL_EVERY, FAIL_AT = 50, 7  # request i with i % 50 == 7 gets a 500
CHUNKED_EVERY, CHUNKED_AT = 10, 3  # ...and i % 10 == 3 a chunked body


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer keep-alive requests one at a time; what to do depends on the index in the path."""
    try:
        while True:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            request_line, *header_lines = head.split("\r\n")
            path = request_line.split(" ")[1]
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            kind, index = path.strip("/").split("/")
            i = int(index)
            body = f"ok {i}".encode()
            if kind == "r":
                if i % STALL_EVERY == 0:
                    await asyncio.sleep(STALL_S)  # stalls this connection, like a slow handler
                if i % FAIL_EVERY == FAIL_AT:
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\nboom")
                elif i % CHUNKED_EVERY == CHUNKED_AT:
                    half = len(body) // 2
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (half, body[:half], len(body) - half, body[half:])
                    )
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            elif kind == "e":
                if i == 3:
                    await asyncio.sleep(1.0)  # never answers within the client's timeout
                elif i == 5:
                    return  # drops the connection without a response
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def test_latency_is_timed_from_intended_send_time() -> None:
    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        bodies: dict[int, bytes] = {}

        def on_response(i: int, status: int, body: bytes) -> None:
            bodies[i] = body

        # One connection, so requests behind a stalled one queue on it (the server does not pipeline).
        async with ConnectionPool("127.0.0.1", port, size=1) as pool:
            result = await run_open_loop(
                lambda i: ("POST", f"/r/{i}", b'{"x": 1}'),
                RATE,
                DURATION,
                pool,
                on_response=on_response,
                headers=b"Content-Type: application/json\r\n",
            )
        server.close()
        await server.wait_closed()

        n = int(RATE * DURATION)
        assert result.scheduled == result.sent == n
        assert result.completed == n and result.connection_errors == 0 and result.timeouts == 0
        fails = [i for i in range(n) if i % FAIL_EVERY == FAIL_AT]
        assert result.http_errors == len(fails) and result.status_counts[500] == len(fails)
        assert result.ok == n - len(fails)
        assert all(bodies[i] == (b"boom" if i in fails else f"ok {i}".encode()) for i in range(n))

        lat = result.latency
        gap = 1.0 / RATE
        slack = 0.001  # the generator may send up to half a millisecond early
        for i in range(0, n, STALL_EVERY):
            assert lat[i] >= STALL_S, (i, lat[i])
            # Queued behind the stall: done no earlier than the stalled request, although each
            # was handed to the pool on time, `gap` later.
            for k in (1, 2):
                assert lat[i + k] >= STALL_S - k * gap - slack, (i, k, lat[i + k])
        # A closed-loop client would see one slow request per stall; open loop sees the backlog.
        slow = int((lat >= STALL_S - 2 * gap - slack).sum())
        assert slow >= 3 * len(range(0, n, STALL_EVERY))
        assert result.latency_ms["p99"] >= STALL_S * 1e3 - 2 * gap * 1e3
        assert result.max_outstanding >= 3  # kept sending while the connection was stalled

    asyncio.run(main())


def test_timeouts_and_connection_errors_are_counted_separately() -> None:
    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with ConnectionPool("127.0.0.1", port, size=2) as pool:
            result = await run_open_loop(
                lambda i: ("GET", f"/e/{i}", b""), 20.0, 0.5, pool, timeout=0.2, drain_timeout=1.0
            )
            # The pool replaced the dead connections and still works.
            assert await pool.request("GET", "/e/9", timeout=1.0) == (200, b"ok 9")
        server.close()
        await server.wait_closed()

        assert result.sent == 10
        assert result.timeouts == 1 and result.status[3] < 0
        assert result.connection_errors == 1 and result.status[5] < 0
        assert result.ok == 8 and result.http_errors == 0

    asyncio.run(main())


def test_poisson_schedule_is_seeded_and_has_the_right_rate() -> None:
    a = arrival_offsets(1000.0, 10.0, "poisson", seed=1)
    b = arrival_offsets(1000.0, 10.0, "poisson", seed=1)
    assert np.array_equal(a, b)
    assert abs(len(a) - 10_000) < 5 * np.sqrt(10_000)
    assert a[0] == 0.0 and a[-1] < 10.0 and np.all(np.diff(a) >= 0)
    assert len(arrival_offsets(200.0, 1.0)) == 200


def test_a_request_queued_while_no_connection_opens_says_why_it_timed_out() -> None:
    # A server that went away: every request timed out "while queued", and the report's first error said no
    # more, while the pool's reconnects were being refused.
    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with ConnectionPool("127.0.0.1", port, size=1) as pool:
            server.close()
            await server.wait_closed()
            for writer in accepted:
                writer.close()
            await asyncio.sleep(0.1)
            with pytest.raises(RequestTimeout, match=r"while queued \(no connection to 127.0.0.1:\d+ could be "
                                                     r"opened: ConnectionRefusedError"):
                await pool.request("GET", "/x", timeout=0.5)

    asyncio.run(main())
