"""The Python client (`kassa.client`) against a live `kassa serve`: typed calls, problem errors as exceptions,
retries that keep the decision's request_id (a lost answer returns the decision already made), timeouts."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from kassa import schemas
from kassa.client import (
    NO_RETRY,
    AsyncKassaClient,
    KassaClient,
    KassaTimeout,
    ProblemError,
    Retry,
    TransportError,
)
from tests.conftest import ADMIN, CATALOG, FEATURES, PUB, SECRET, decision_body
from tests.live_server import LiveKassa, free_port

FAST_RETRY = Retry(attempts=3, backoff=0.01, max_backoff=0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveKassa]:
    folder = tmp_path_factory.mktemp("client")
    (folder / "catalog.yaml").write_text(CATALOG)
    (folder / "features.yaml").write_text(FEATURES)
    with LiveKassa(folder, folder / "catalog.yaml", {"publishable": PUB, "secret": SECRET, "admin": ADMIN},
                   features=folder / "features.yaml") as live:
        yield live


class Flaky(httpx.BaseTransport):
    """Forwards to the real server, but spoils the first ``fail`` attempts: the answer is lost after the
    server acted (``lose``), or a 503 comes back without reaching it. Records every request body."""

    def __init__(self, fail: int, how: str) -> None:
        self.inner = httpx.HTTPTransport()
        self.fail = fail
        self.how = how
        self.bodies: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(msgspec.json.decode(request.read()))
        if len(self.bodies) <= self.fail and self.how == "503":
            return httpx.Response(503, json={"type": "x", "title": "Unavailable", "status": 503, "detail": "busy"},
                                  headers={"Retry-After": "0"})
        response = self.inner.handle_request(request)
        response.read()
        self.answers.append(msgspec.json.decode(response.content))
        if len(self.bodies) <= self.fail:
            raise httpx.ReadError("connection reset after the server answered")
        return response


def test_a_decision_comes_back_typed_with_a_generated_request_id(server: LiveKassa) -> None:
    with KassaClient(server.url, PUB) as kassa:
        decision = kassa.decide(decision_body())
        typed = kassa.decide(msgspec.convert(decision_body(customer="c-2"), schemas.DecisionRequest))
    assert isinstance(decision, schemas.DecisionResponse) and isinstance(typed, schemas.DecisionResponse)
    assert decision.placement == "order_confirmation" and decision.offers
    assert isinstance(decision.offers[0], schemas.OfferOut) and decision.offers[0].rank == 1
    assert decision.decision_id != typed.decision_id


def test_a_retry_after_a_lost_answer_returns_the_decision_already_made(server: LiveKassa) -> None:
    flaky = Flaky(fail=1, how="lose")
    with KassaClient(server.url, PUB, retry=FAST_RETRY, http=httpx.Client(transport=flaky)) as kassa:
        decision = kassa.decide(decision_body(customer="c-lost"))
    assert len(flaky.bodies) == 2
    request_ids = {body["request_id"] for body in flaky.bodies}
    assert len(request_ids) == 1 and None not in request_ids  # the same idempotency key on both attempts
    assert decision.decision_id == flaky.answers[0]["decision_id"]  # not a second decision


def test_503_is_retried_and_a_given_request_id_is_kept(server: LiveKassa) -> None:
    flaky = Flaky(fail=2, how="503")
    with KassaClient(server.url, PUB, retry=FAST_RETRY, http=httpx.Client(transport=flaky)) as kassa:
        decision = kassa.decide(decision_body(request_id="checkout-77"))
    assert [b["request_id"] for b in flaky.bodies] == ["checkout-77"] * 3
    assert decision.decision_id == flaky.answers[0]["decision_id"]


def test_problem_answers_raise_with_type_title_status_detail_and_field(server: LiveKassa) -> None:
    with KassaClient(server.url, PUB, retry=FAST_RETRY) as kassa:
        with pytest.raises(ProblemError) as unknown:
            kassa.decide(decision_body(placement="nope"))
        with pytest.raises(ProblemError) as invalid:
            kassa.decide({**decision_body(), "limit": 0})
        with pytest.raises(ProblemError) as forbidden:
            kassa.get_decision("0" * 24)  # a publishable key may not read decisions
    assert (unknown.value.status, unknown.value.field, unknown.value.title) == (404, "placement", "Not found")
    assert unknown.value.type.endswith("/not-found") and "nope" in unknown.value.detail
    assert (invalid.value.status, invalid.value.field) == (422, "limit")
    assert forbidden.value.status == 403 and "secret" in forbidden.value.detail
    with KassaClient(server.url, "wrong-key") as kassa, pytest.raises(ProblemError) as unauthorized:
        kassa.decide(decision_body())
    assert (unauthorized.value.status, unauthorized.value.field) == (401, "Authorization")


def test_events_features_decisions_and_offers_round_trip(server: LiveKassa) -> None:
    with KassaClient(server.url, PUB) as browser_side, KassaClient(server.url, SECRET) as backend:
        decision = browser_side.decide(decision_body(customer="c-rt"))
        shown = decision.offers[0].offer_id
        ack = browser_side.send_events([
            {"event_id": f"imp-{decision.decision_id}", "type": "impression", "decision_id": decision.decision_id,
             "offer_id": shown},
            schemas.Event(event_id=f"acc-{decision.decision_id}", type="accept", decision_id=decision.decision_id,
                          offer_id=shown),
        ])
        assert (ack.accepted, ack.duplicates) == (2, 0)
        again = browser_side.send_events([{"event_id": f"imp-{decision.decision_id}", "type": "impression",
                                           "decision_id": decision.decision_id, "offer_id": shown}])
        assert (again.accepted, again.duplicates) == (0, 1)
        assert backend.put_feature("customer_signals", "c-rt", {"segment": "gold"}).written == 1
        assert backend.get_feature("customer_signals", "c-rt")["values"]["segment"] == "gold"
        assert backend.push_features("customer_signals", [{"key": "c-9", "values": {"vip": True}}]).written == 1
        logged = backend.get_decision(decision.decision_id)
        assert logged["decision_id"] == decision.decision_id and logged["chosen"][0] == shown
    with KassaClient(server.url, ADMIN) as admin:
        offer = admin.put_offer({"id": "sdk-offer", "kind": "discount", "title": "SDK", "value": 1.0,
                                 "prices": {"EUR": 5.0}, "disclosure": "Sponsored"})
        assert isinstance(offer, schemas.Offer) and offer.prices == {"EUR": 5.0}
        assert admin.get_offer("sdk-offer").disclosure == "Sponsored"
        assert "sdk-offer" in {o.id for o in admin.list_offers()}
        admin.delete_offer("sdk-offer")
        with pytest.raises(ProblemError) as gone:
            admin.get_offer("sdk-offer")
        assert gone.value.status == 404
        assert admin.ready()


def test_the_async_client_makes_the_same_calls(server: LiveKassa) -> None:
    async def run() -> tuple[schemas.DecisionResponse, schemas.DecisionResponse, schemas.EventAck, int]:
        async with AsyncKassaClient(server.url, PUB) as kassa:
            first = await kassa.decide(decision_body(request_id="async-1"))
            repeat = await kassa.decide(decision_body(request_id="async-1"))
            ack = await kassa.send_events([{"event_id": "async-imp", "type": "impression",
                                            "decision_id": first.decision_id, "offer_id": first.offers[0].offer_id}])
            try:
                await kassa.decide(decision_body(request_id="async-1", limit=1))  # same key, other request
            except ProblemError as exc:
                return first, repeat, ack, exc.status
            return first, repeat, ack, 0

    first, repeat, ack, conflict = asyncio.run(run())
    assert repeat.decision_id == first.decision_id
    assert ack.accepted == 1 and conflict == 409


def test_the_async_client_retries_a_503_with_the_same_request_id(server: LiveKassa) -> None:
    calls: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        calls.append(msgspec.json.decode(request.content)["request_id"])
        if len(calls) == 1:
            return httpx.Response(503, json={"type": "x", "title": "Unavailable", "status": 503, "detail": "busy"})
        async with httpx.AsyncClient() as real:
            return await real.post(str(request.url), content=request.content, headers=request.headers)

    async def run() -> schemas.DecisionResponse:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        async with AsyncKassaClient(server.url, PUB, retry=FAST_RETRY, http=http) as kassa:
            decision = await kassa.decide(decision_body())
        await http.aclose()
        return decision

    assert asyncio.run(run()).offers and len(calls) == 2 and calls[0] == calls[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1])
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_a_silent_server_times_out_per_attempt_within_the_deadline(silent_port: int) -> None:
    with KassaClient(f"http://127.0.0.1:{silent_port}", PUB, timeout=0.2, retry=FAST_RETRY) as kassa:
        t0 = time.monotonic()
        with pytest.raises(KassaTimeout, match="after 3 attempts"):
            kassa.decide(decision_body())
        assert time.monotonic() - t0 < 2.0
    with KassaClient(f"http://127.0.0.1:{silent_port}", PUB, timeout=5.0, deadline=0.3, retry=FAST_RETRY) as kassa:
        t0 = time.monotonic()
        with pytest.raises(KassaTimeout):
            kassa.decide(decision_body())
        assert time.monotonic() - t0 < 1.5  # the call's deadline bounds the attempt's longer timeout


def test_a_refused_connection_is_a_transport_error_not_a_problem() -> None:
    with (KassaClient(f"http://127.0.0.1:{free_port()}", PUB, retry=NO_RETRY) as kassa,
          pytest.raises(TransportError, match="after 1 attempt") as refused):
        kassa.decide(decision_body())
    assert not isinstance(refused.value, KassaTimeout | ProblemError)


def test_the_client_imports_nothing_of_kassa_but_the_wire_types() -> None:
    import ast

    source = Path(__file__).parent.parent / "src" / "kassa" / "client.py"
    imported = {alias.name if isinstance(node, ast.Import) else f"{node.module}.{alias.name}"
                for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.Import | ast.ImportFrom)
                for alias in node.names}
    assert {name for name in imported if name.startswith("kassa")} == {"kassa.schemas"}
