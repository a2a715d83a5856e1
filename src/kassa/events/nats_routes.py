"""Routed subscriptions: a NATS subscription whose messages go from nats-py's protocol parser straight to a plain
synchronous callback, without nats-py's per-message path.

nats-py hands each message to a coroutine (``Client._process_msg``) that parses its headers into a dict in Python,
builds a `Msg`, puts it on the subscription's pending queue and wakes the subscription's task, which awaits the
callback: a dict, an object, a queue put and get, a task wake-up and a coroutine per message. Kassa's two
high-volume subscriptions need none of it: `kassa.events.jetstream_log._BatchReader` (the events stream read a batch
at a time) needs the reply subject and the body, `JetStreamBus`'s publish-ack inbox the subject, the raw status
line and the body. Reading the topology bench's events took 12 µs of CPU per event through nats-py and 7.5 µs
routed (bench/stream_tail_cpu.py, load average 9-11); for publish acks see `JetStreamBus._publish`.

How: the client's private ``_process_msg`` is wrapped once per connection (nats-py is pinned at 2.16.0 in
pyproject.toml: its parser calls ``self.nc._process_msg`` per message), and a message whose subscription id has a
route goes to it. The route is keyed by the subscription id, which nats-py keeps when it resubscribes on a
reconnect (it replays ``SUB`` with the same sid), so a route survives a reconnect and a restart of the server
(tests/test_event_bus.py). nats-py still holds a callback for the subscription (`_unrouted`): its task waits on a
queue that stays empty. Every other subscription of the connection goes through nats-py unchanged.

A route runs inside nats-py's read loop: it must not block, and it must not raise, because an exception there
ends the read loop and the connection then reads nothing more; the wrapper logs and drops such a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

log = logging.getLogger("kassa.bus")

Route = Callable[[bytes, bytes, bytes, "bytes | None"], None]
"""``(subject, reply subject, body, raw headers or None)`` of one message; runs in nats-py's read loop."""


async def subscribe_routed(nc: NATS, subject: str, route: Route) -> Any:
    """Subscribe ``nc`` to ``subject`` with every message going to ``route``; the nats-py subscription."""
    sub = await nc.subscribe(subject, cb=_unrouted)
    _routes(nc)[sub._id] = route
    return sub


async def unsubscribe_routed(nc: NATS | None, sub: Any) -> None:
    """Drop ``sub``'s route (on ``nc``, its connection, when there still is one) and unsubscribe it."""
    if nc is not None:
        _routes(nc).pop(sub._id, None)
    await sub.unsubscribe()


def _routes(nc: Any) -> dict[int, Route]:
    """The routes of ``nc`` by subscription id, its ``_process_msg`` wrapped on first use."""
    routes: dict[int, Route] | None = getattr(nc, "_kassa_routes", None)
    if routes is None:
        routes = {}
        process_msg = nc._process_msg
        table = routes

        async def route_or_process(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            route = table.get(sid)
            if route is None:
                await process_msg(sid, subject, reply, data, headers)
                return
            try:
                route(subject, reply, data, headers)
            except Exception:  # never into the read loop: it would stop reading the connection
                log.exception("routed NATS message on %r dropped", subject)

        nc._process_msg = route_or_process
        nc._kassa_routes = routes
    return routes


async def _unrouted(msg: Msg) -> None:
    """The callback nats-py holds for a routed subscription; it sees no message (they go to the route)."""
