"""Offers and placements: GET|PUT|DELETE /v1/offers[/{id}], GET|PUT /v1/placements[/{id}] (admin key)."""

from __future__ import annotations

import asyncio

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from kassa import errors, schemas
from kassa.api.common import authorize, decode, json_response, no_nul, read_body
from kassa.app import Kassa
from kassa.catalog.store import Catalog, InvalidField
from kassa.features.definitions import FeatureRepo


def _kassa(request: Request) -> Kassa:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "admin", kassa.settings.auth)
    return kassa


async def list_offers(request: Request) -> Response:
    kassa = _kassa(request)
    offers = list(kassa.catalog.snapshot.offers.values())
    return json_response({"offers": offers, "count": len(offers)})


async def get_offer(request: Request) -> Response:
    kassa = _kassa(request)
    offer_id = request.path_params["offer_id"]
    offer = kassa.catalog.snapshot.offers.get(offer_id)
    if offer is None:
        raise errors.NotFound(f"unknown offer {offer_id!r}", "offer_id")
    return json_response(offer)


async def put_offer(request: Request) -> Response:
    kassa = _kassa(request)
    offer_id = no_nul(request.path_params["offer_id"], "offer_id")
    body = await read_body(request, kassa.settings.server.max_body_bytes)
    offer = decode(body, schemas.Offer)
    if offer.id != offer_id:
        raise errors.Invalid(f"body id {offer.id!r} does not match the path id {offer_id!r}", "id")
    created = await asyncio.to_thread(store_offer, kassa.catalog, offer)  # SQL: PostgreSQL may be slow or away
    return json_response(offer, 201 if created else 200)


def store_offer(catalog: Catalog, offer: schemas.Offer) -> bool:
    """Write an offer (True when created); what the catalog refuses (a country code that is not two letters) is
    a 422 naming the field. Shared by the API and the dashboard's editor."""
    try:
        return catalog.put_offer(offer)
    except InvalidField as exc:
        raise errors.Invalid(str(exc), exc.field) from None


async def delete_offer(request: Request) -> Response:
    kassa = _kassa(request)
    offer_id = no_nul(request.path_params["offer_id"], "offer_id")
    users = [p.placement.id for p in kassa.catalog.snapshot.placements.values()
             if offer_id in (p.placement.offers or ())]
    if users:
        raise errors.Conflict(f"offer {offer_id!r} is listed by placement(s) {users}; remove it there first",
                              "offer_id")
    if not await asyncio.to_thread(kassa.catalog.delete_offer, offer_id):
        raise errors.NotFound(f"unknown offer {offer_id!r}", "offer_id")
    return Response(status_code=204)


async def list_placements(request: Request) -> Response:
    kassa = _kassa(request)
    placements = [v.placement for v in kassa.catalog.snapshot.placements.values()]
    return json_response({"placements": placements, "count": len(placements)})


async def get_placement(request: Request) -> Response:
    kassa = _kassa(request)
    placement_id = request.path_params["placement_id"]
    view = kassa.catalog.snapshot.placements.get(placement_id)
    if view is None:
        raise errors.NotFound(f"unknown placement {placement_id!r}", "placement_id")
    model = kassa.models.get(placement_id)
    return json_response({
        "placement": view.placement, "eligible_offers": len(view.static_offers),
        "model_version": model.version if model else None,
    })


def store_placement(catalog: Catalog, placement: schemas.Placement, repo: FeatureRepo | None = None) -> bool:
    """Write a placement (True when created); what the catalog refuses is a 422 naming the field, and so is a
    feature view or ``view.field`` that ``repo`` does not define. Shared by the API and the dashboard's editor,
    which let `InvalidField` (a bad time zone) escape as a 500."""
    problem = repo.placement_problem(placement.features, placement.context_features) if repo is not None else None
    if problem is not None:
        raise errors.Invalid(*problem)
    try:
        return catalog.put_placement(placement)
    except KeyError as exc:
        raise errors.Invalid(f"unknown offer {exc.args[0]!r}", "offers") from None
    except InvalidField as exc:
        raise errors.Invalid(str(exc), exc.field) from None


async def put_placement(request: Request) -> Response:
    kassa = _kassa(request)
    placement_id = no_nul(request.path_params["placement_id"], "placement_id")
    body = await read_body(request, kassa.settings.server.max_body_bytes)
    placement = decode(body, schemas.Placement)
    if placement.id != placement_id:
        raise errors.Invalid(f"body id {placement.id!r} does not match the path id {placement_id!r}", "id")
    created = await asyncio.to_thread(store_placement, kassa.catalog, placement, kassa.repo)
    return json_response(msgspec.to_builtins(placement), 201 if created else 200)
