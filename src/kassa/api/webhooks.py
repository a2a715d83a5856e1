"""POST /v1/webhooks/{platform}: signed commerce-platform webhooks (authenticated by signature, not API key)."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from kassa import errors, schemas
from kassa.api.common import json_response, read_body
from kassa.app import Kassa
from kassa.integrations.base import MalformedBody, PayloadError, ReplayError, SignatureError
from kassa.integrations.config import UnknownPlatform
from kassa.integrations.webhooks import NotConfigured, WebhookReceiver

_IGNORED = msgspec.json.encode(schemas.WebhookAck(accepted=0, duplicates=0, ignored=1))


def _receiver(request: Request, kassa: Kassa) -> WebhookReceiver:
    receiver: WebhookReceiver | None = getattr(request.app.state, "webhook_receiver", None)
    if receiver is None:
        receiver = WebhookReceiver(kassa.settings.integrations, lambda: kassa.catalog.snapshot, kassa.clock)
        request.app.state.webhook_receiver = receiver
    return receiver


async def post_webhook(request: Request) -> Response:
    kassa: Kassa = request.app.state.kassa
    platform: str = request.path_params["platform"]
    receiver = _receiver(request, kassa)
    try:
        connector_limit = receiver.max_body_bytes(platform)
        body = await read_body(request, connector_limit)
        # Starlette's header names are already lower-case, as Connector.verify expects.
        result = await receiver.receive_async(platform, request.headers, body)
    except UnknownPlatform as exc:
        raise errors.NotFound(str(exc), "platform") from None
    except NotConfigured as exc:
        raise errors.NotFound(str(exc), "platform") from None
    except SignatureError as exc:
        raise errors.InvalidSignature(str(exc), "signature") from None
    except ReplayError as exc:
        raise errors.Conflict(str(exc), "timestamp") from None
    except MalformedBody as exc:
        raise errors.BadRequest(str(exc)) from None
    except PayloadError as exc:
        raise errors.Invalid(str(exc), exc.field) from None
    if result.event is None:
        return Response(_IGNORED, media_type="application/json")
    ack = await kassa.events.ingest(schemas.EventBatch([result.event]), bound_times=False)
    if ack.duplicates:
        kassa.metrics.duplicates.inc(ack.duplicates)
    if result.lines_dropped:
        return json_response(schemas.WebhookAck(ack.accepted, ack.duplicates, ack.unknown_decisions,
                                                ack.unmatched_refunds, lines_dropped=result.lines_dropped))
    return json_response(ack)


async def webhook_challenge(request: Request) -> Response:
    """GET /v1/webhooks/{platform}?challenge=…: Adobe I/O Events checks a new webhook URL by asking it to
    echo the challenge. Only platforms that use this handshake answer; it writes nothing."""
    kassa: Kassa = request.app.state.kassa
    platform: str = request.path_params["platform"]
    receiver = _receiver(request, kassa)
    try:
        supported = receiver.challenge_supported(platform)
    except UnknownPlatform as exc:
        raise errors.NotFound(str(exc), "platform") from None
    if not supported:
        raise errors.NotFound(f"{platform} webhooks are POSTed; there is nothing to GET", "platform")
    challenge = request.query_params.get("challenge")
    if not challenge or len(challenge) > 512:
        raise errors.BadRequest("send ?challenge=<value> (at most 512 characters)", "challenge")
    return json_response({"challenge": challenge})
