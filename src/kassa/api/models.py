"""Models: GET /v1/models, GET /v1/models/{version}, POST /v1/models/{version}/stage,
POST /v1/placements/{placement_id}/rollback (admin key).

Stage changes go to the registry and are loaded into this process at once; other serving processes
pick them up on their next registry poll. Promotion to production over HTTP obeys the same gate as the
CLI: the version must carry a passing `kassa evaluate` result, unless ``force`` is set (recorded).
"""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from kassa import errors
from kassa.api.common import authorize, decode, json_response, no_nul, read_body
from kassa.app import Kassa
from kassa.learn.registry import STAGES
from kassa.learn.rollout import promote_version


class StageChange(msgspec.Struct, forbid_unknown_fields=True):
    stage: Literal["candidate", "shadow", "canary", "production", "archived"]
    share: float | None = None
    reason: str | None = None
    force: bool = False


class Rollback(msgspec.Struct, forbid_unknown_fields=True):
    reason: str | None = None


def _kassa(request: Request) -> Kassa:
    kassa: Kassa = request.app.state.kassa
    authorize(request, kassa.keys, "admin", kassa.settings.auth)
    return kassa


async def list_models(request: Request) -> Response:
    kassa = _kassa(request)
    placement = request.query_params.get("placement")
    if placement is not None:
        no_nul(placement, "placement")
    stage = request.query_params.get("stage")
    if stage is not None and stage not in STAGES:  # was ignored: `?stage=prod` listed every version
        raise errors.Invalid(f"unknown stage {stage!r}; one of {', '.join(STAGES)}", "stage")
    serving = []
    for placement_id in kassa.catalog.snapshot.placements:
        if placement is not None and placement_id != placement:
            continue
        s = kassa.models.serving(placement_id)
        learner = kassa.learning.learners.get(placement_id)
        production = s.production if s else None
        serving.append({
            "placement": placement_id,
            "serving": production.version if production else None,
            "canary": s.canary.version if s and s.canary else None,
            "canary_share": s.canary_share if s and s.canary else None,
            "shadow": s.shadow.version if s and s.shadow else None,
            "learned_examples": learner.learned if learner else (production.meta.get("learned", 0) if production
                                                                  else 0),
            "rewarded_decisions": learner.rewarded_decisions if learner else
            (production.meta.get("rewarded_decisions", 0) if production else 0),
            # the sum of the rewards learned in this lineage (raw values, every slot)
            "reward_sum": learner.reward_sum if learner else (production.meta.get("reward_sum", 0.0) if production
                                                              else 0.0),
        })
    # Registry reads are SQL (PostgreSQL may be slow or away): off the serving loop, like every other SQL here
    versions = await asyncio.to_thread(kassa.model_registry.versions, placement, [stage] if stage else None, 200)
    return json_response({"models": serving, "versions": [v.to_dict() for v in versions],
                          "refused": kassa.learning.sync.refused if kassa.learning.sync else {}})


async def get_model(request: Request) -> Response:
    kassa = _kassa(request)
    registry = kassa.model_registry
    mv = await asyncio.to_thread(registry.get, no_nul(request.path_params["version"], "version"))
    history = await asyncio.to_thread(lambda: registry.history(version=mv.version))
    return json_response({**mv.to_dict(), "history": [h.to_dict() for h in history]})


async def change_stage(request: Request) -> Response:
    kassa = _kassa(request)
    version = no_nul(request.path_params["version"], "version")
    body = decode(await read_body(request, kassa.settings.server.max_body_bytes), StageChange)
    if body.reason is not None:
        no_nul(body.reason, "reason")
    # Registry writes commit with fsync: off the event loop, like the loading that follows.
    mv = await asyncio.to_thread(promote_version, kassa.model_registry, version, body.stage,
                                 share=body.share, reason=body.reason, force=body.force, actor="api")
    await kassa.learning.poll_async()
    return json_response(mv.to_dict())


async def rollback(request: Request) -> Response:
    kassa = _kassa(request)
    body = await read_body(request, kassa.settings.server.max_body_bytes)
    reason = decode(body, Rollback).reason if body else None
    if reason is not None:
        no_nul(reason, "reason")
    placement = request.path_params["placement_id"]
    if placement not in kassa.catalog.snapshot.placements:
        raise errors.NotFound(f"unknown placement {placement!r}", "placement")
    mv = await asyncio.to_thread(kassa.model_registry.rollback, placement, reason or "rollback requested over HTTP",
                                 actor="api")
    await kassa.learning.poll_async()
    return json_response(mv.to_dict())
