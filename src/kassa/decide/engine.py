"""`DecisionEngine`: one decision, from request to ranked offers, within the placement's budget.

Stages: request + entity features -> candidates (placement offers, product retrieval) -> eligibility
rules -> policy (learned model, or the baseline during cold start) -> slots. A stage that fails or a
budget that runs out yields the fallback ranking (by retrieval score for retrieved products, else by offer
value) with ``fallback: true``; a dependency failure never becomes an error for the page. The decision is
then logged (off the hot path) and handed to the reward joiner with the exact learner lines it was made from.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec

from kassa import errors, policies, schemas
from kassa.catalog import Catalog
from kassa.decide.policy import GreedyEpsilonPolicy, Policy, UniformPolicy, fill_slots, pmf_policy
from kassa.decide.retrieval import ProductRetriever
from kassa.decide.rules import FrequencyLedger, OrderFacts, eligible
from kassa.decide.sinks import RewardSink, ShadowRequest, ShadowSink
from kassa.decide.state import (
    DecisionState,
    DecisionWrite,
    IdempotencyCache,
    LocalDecisionState,
    fingerprint,
)
from kassa.degraded import CircuitBreaker, RateLimitedWarning
from kassa.events.decision_log import DecisionRecord, DecisionSink, decision_id_base, loggable_features
from kassa.events.join import PendingDecision
from kassa.features.definitions import FeatureRepo, FeatureView
from kassa.features.featurize import shared_line
from kassa.features.offer_features import OfferFeatureSource
from kassa.features.online.base import OnlineStore
from kassa.features.online.memory import InMemoryOnlineStore
from kassa.features.profile import CustomerProfiles
from kassa.features.request import request_features
from kassa.learn.serving.store import ModelStore

log = logging.getLogger("kassa.decide")


class DecisionEngine:
    def __init__(
        self,
        catalog: Catalog,
        store: OnlineStore,
        profiles: CustomerProfiles,
        retriever: ProductRetriever,
        ledger: FrequencyLedger,
        models: ModelStore,
        joiner: RewardSink,
        decision_log: DecisionSink | None,
        store_timezone: str = "UTC",
        idempotency: IdempotencyCache | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
        observe: Callable[[str, bool, float], None] | None = None,
        repo: FeatureRepo | None = None,
        on_default: Callable[[str], None] | None = None,
        offer_features: OfferFeatureSource | None = None,
        on_served: Callable[[str, str, float, bool], None] | None = None,
        shadow: ShadowSink | None = None,
        on_shown: Callable[[str, list[str]], None] | None = None,
        state: DecisionState | None = None,
        state_timeout: float = 0.02,
        keep_candidates: bool = True,
    ) -> None:
        # Whether a learning placement's pending decision carries every candidate's learner line: only the
        # publish guard's OPE reads them (`learn.guard.enabled`). With 50 offers they are ~9 KB of the ~10 KB a
        # decision record weighs, encoded by every worker and decoded by `kassa learn` (docs/adr/0009 addendum).
        self.keep_candidates = keep_candidates
        self.on_served = on_served
        self.on_shown = on_shown  # (placement, offer ids shown): per-offer impression metrics
        self.shadow = shadow
        self.offer_features = offer_features if offer_features else None
        self.catalog = catalog
        self.store = store
        self.profiles = profiles
        self.repo = repo or FeatureRepo()
        self.on_default = on_default
        self._views: dict[str, tuple[schemas.Placement, list[FeatureView]]] = {}
        # A remote store gets the remaining latency budget as a timeout; the in-process one needs none.
        self.remote_store = not isinstance(store, InMemoryOnlineStore)
        self.retriever = retriever
        self.ledger = ledger
        self.models = models
        self.joiner = joiner
        self.decision_log = decision_log
        self.tz = store_timezone
        self.idempotency = idempotency or IdempotencyCache()
        # Per-buyer / per-request state: the in-process objects above (embedded), or a shared backend whose
        # reads and writes are each one round trip bounded by `state_timeout` and the remaining budget.
        self.state: DecisionState = state or LocalDecisionState(self.idempotency, ledger, profiles, joiner)
        self._local_state = self.state if isinstance(self.state, LocalDecisionState) else None
        self.state_timeout = state_timeout
        self.rng = random.Random(seed)
        self._ids = random.Random(os.urandom(16))  # decision ids: unique, not reproducible by seed
        self._id_from = self._id_until = 0.0  # the second `_id_base` (`decision_id_base`) is of
        self._id_base = 0
        self.clock = clock
        self.observe = observe
        # One line per 10 s while the store is down, not a traceback per decision (issue 15: 12.9 MB in 10 s).
        self._warn_store = RateLimitedWarning(log, "online store")
        self._breaker: CircuitBreaker | None = getattr(store, "breaker", None)

    async def decide(self, req: schemas.DecisionRequest) -> schemas.DecisionResponse:
        t0 = time.perf_counter()
        now = self.clock()
        fp = 0
        customer_id = req.customer.id if req.customer is not None else None
        # Pin the model with the catalog snapshot before any await: a swap landing mid-request must not
        # change what this decision is scored with.
        snap = self.catalog.snapshot
        view = snap.placements.get(req.placement)
        serving = model = None
        views: list[FeatureView] = []
        keys: list[tuple[str, str]] = []
        if view is not None:
            placement = view.placement
            learns = policies.learns(placement.policy)
            serving = self.models.serving(placement.id) if learns else None
            if serving is not None:
                unit = customer_id if customer_id is not None else req.session_id
                model = serving.pick(unit)
            views = self._feature_views(placement)
            if views:
                if customer_id is not None:
                    keys.append(("customer", customer_id))
                if req.session_id is not None:
                    keys.append(("session", req.session_id))
        local = self._local_state
        if local is not None:  # no await: the embedded state is in process
            state = local.read(req.request_id, customer_id, now)
        else:
            # The feature rows too: a shared state on the online store's Redis reads them in its round trip.
            wanted = (keys, views) if keys and (self._breaker is None or self._breaker.available()) else None
            state = await self.state.load(req.request_id, customer_id, now, self.state_timeout, wanted)
        if req.request_id is not None:
            fp = fingerprint(req)
            cached = state.replay(fp)
            if cached is not None:
                return cached
        if view is None:
            raise errors.NotFound(f"unknown placement {req.placement!r}", "placement")
        budget = placement.latency_budget_ms / 1000.0
        fallback = state.fallback  # the shared state was unreachable: defaults, and say so

        # -- features: request-time, the buyer's profile, and the placement's online feature views
        profile = state.profile
        features = request_features(req, now, placement.timezone or self.tz, profile)
        if views:
            rows: list[Any] = [None] * len(keys)
            if state.rows is not None:  # read with the state
                rows = state.rows
            elif keys and self._breaker is not None and not self._breaker.available():
                # The store's circuit is open: fall back without an exception or a task per request.
                self._breaker.rejected += 1
                self._warn_store("circuit open; serving feature defaults (fallback)")
                fallback = True
            elif keys:
                try:
                    if self.remote_store:
                        remaining = budget - (time.perf_counter() - t0)
                        rows = await asyncio.wait_for(self.store.read(keys, views), max(remaining, 0.001))
                    else:
                        rows = await self.store.read(keys, views)
                except Exception as exc:  # an outage or a timeout degrades to the declared defaults
                    self._warn_store("read failed; serving feature defaults (fallback)", exc)
                    fallback = True
            by_entity = {entity: row for (entity, _), row in zip(keys, rows, strict=True)}
            on_default = self.on_default
            for fv in views:
                row = by_entity.get(fv.entity)
                stored = row.get(fv.name) if row else None
                if stored is None:
                    if on_default is not None:
                        on_default(fv.name)
                    for f in fv.fields:
                        if f.default is not None:
                            features[f"{fv.name}.{f.name}"] = f.default
                else:
                    values = stored.values
                    for f in fv.fields:
                        value = values.get(f.name, f.default)
                        if value is not None:
                            features[f"{fv.name}.{f.name}"] = value

        keep = placement.context_features
        if keep is not None:  # the placement's learner sees (and its log records) only these
            features = {k: v for k, v in features.items() if k in keep}

        # -- candidates (``retrieved``: offer id -> (retrieval score, its ``|r`` learner suffix))
        offers = snap.offers
        retrieved: dict[str, tuple[float, str]] | None = None
        if req.candidates is not None:
            for i, offer_id in enumerate(req.candidates):
                if offer_id not in offers:
                    raise errors.Invalid(f"unknown offer {offer_id!r}", f"candidates[{i}]")
            candidates = list(dict.fromkeys(req.candidates))
        else:
            candidates = list(view.static_offers)
            retrieval = placement.retrieval
            if retrieval is not None:
                order_keys = [i.product_id or i.sku for i in req.order.items] if req.order is not None else []
                seen = set(candidates)
                retrieved = {}
                product_offers = snap.product_offer
                limit = retrieval.max_candidates
                if retrieval.policy_candidates:
                    limit = min(limit, retrieval.policy_candidates)
                for key, r_score, r_suffix in self.retriever.retrieve_scored(
                    order_keys, customer_id, now, retrieval.co_purchase, retrieval.history,
                    retrieval.popular, limit,
                ):
                    product_offer = product_offers.get(key)
                    if product_offer is not None and product_offer not in seen:
                        seen.add(product_offer)
                        candidates.append(product_offer)
                        retrieved[product_offer] = (r_score, r_suffix)

        # -- eligibility
        facts = OrderFacts.of(req)
        ledger = state.caps
        free = snap.unconstrained
        kept = [o for o in candidates if o in free or eligible(offers[o], facts, now, customer_id, ledger) is None]

        # -- policy
        slots = req.limit or placement.slots
        shared = shared_line(features)
        lines = snap.action_lines
        offer_src = self.offer_features
        view_lines: list[str] | None = None
        if offer_src is not None:
            view_lines = []
            action_lines = offer_src.lines(kept, lines, view_lines)
        else:
            action_lines = [lines[o] for o in kept]
        signal_lines: list[str] | None = None
        if retrieved:
            get = retrieved.get
            signal_lines = [get(o, _NOT_RETRIEVED)[1] for o in kept]
            action_lines = [a + r for a, r in zip(action_lines, signal_lines, strict=True)]
        version = "baseline"
        model_failed = False
        policy: Policy
        if not kept:
            policy = UniformPolicy(0)
        elif fallback or time.perf_counter() - t0 > budget:
            fallback = True
            policy, version = _cheap(kept, offers, retrieved), "fallback"
        elif placement.policy == "uniform":  # `kassa.policies.Uniform`: random slots, no model
            policy, version = UniformPolicy(len(kept)), "uniform"
        else:
            policy = None  # type: ignore[assignment]
            if model is not None and model.meta.get("rewarded_decisions", 0) >= placement.min_learned_decisions:
                try:
                    policy = pmf_policy(model, shared, action_lines, policies.get(placement.policy).later_slots)
                    version = model.version
                except Exception:
                    log.exception("model %s failed to score; serving the fallback", model.version)
                    fallback = model_failed = True
                    policy, version = _cheap(kept, offers, retrieved), "fallback"
            if policy is None:
                policy = GreedyEpsilonPolicy(self._baseline_scores(placement, kept, offers, retrieved),
                                             placement.exploration)
        ranking = fill_slots(policy, len(kept), slots, self.rng)
        if not fallback and time.perf_counter() - t0 > budget:
            # Scoring itself ran past the budget: answer, but say so, and serve the cheap order.
            fallback = True
            version = "fallback"
            policy = _cheap(kept, offers, retrieved)  # logged as what was served
            ranking = fill_slots(policy, len(kept), slots, self.rng)

        chosen = [kept[i] for i in ranking.chosen]
        # Content for this buyer: the locale's variant and the price in the order's currency (cached per pair).
        locale = req.context.locale if req.context is not None else None
        currency = req.order.currency if req.order is not None else None
        content = snap.content
        out = [
            schemas.OfferOut(offer_id, rank + 1, round(score, 6), round(prob, 6), content(offer_id, locale, currency))
            for rank, (offer_id, score, prob) in enumerate(
                zip(chosen, ranking.scores, ranking.probabilities, strict=True))
        ]
        # the second it was made, then 64 random bits: a lookup by id reads only that date's partition
        # (`kassa.events.decision_log.decision_id_time`). The second's part is made once a second; hex() of it and the
        # random bits takes ~180 ns, formatting 96 random bits (ids before) ~245 ns, int(now) each time ~340 ns.
        if not self._id_from <= now < self._id_until:
            self._id_from = float(int(now))
            self._id_until = self._id_from + 1.0
            self._id_base = decision_id_base(now)
        decision_id = hex(self._id_base | self._ids.getrandbits(64))[3:]
        took_ms = (time.perf_counter() - t0) * 1000.0
        response = schemas.DecisionResponse(
            decision_id, placement.id, version, out, ranking.explored, fallback, round(took_ms, 3)
        )

        # -- bookkeeping: the state write (memory, or one round trip to a shared backend); the Parquet write
        # happens on the log's own thread
        # While a canary serves, guardrails compare it with production: both sides report the version that was
        # meant to serve (a failed score counts against that version, not against "fallback"); in this process
        # (`on_served`) and in the decision record, for a learner in another process.
        served = ((model.version, took_ms, model_failed)
                  if serving is not None and serving.canary is not None and model is not None else None)
        pending = None
        if chosen:
            pending = PendingDecision(
                decision_id, placement.id, now, now + placement.reward.wait_seconds, shared, chosen,
                [action_lines[i] for i in ranking.chosen], ranking.probabilities, customer_id,
                [offers[o].product_id or offers[o].sku for o in chosen], version=version,
                email_sha256=req.customer.email_sha256 if req.customer is not None else None,
                candidates=action_lines if learns and self.keep_candidates else None,
                top_index=ranking.chosen[0], served=served,
            )
        write = DecisionWrite(now, req.request_id, fp, response, customer_id, chosen, pending)
        if local is not None:
            local.write(write)
        else:
            remaining = max(budget - (time.perf_counter() - t0), 0.001)
            stored = await self.state.commit(write, min(self.state_timeout, remaining))
            if stored is None:  # not stored: answer anyway, flagged (a retry may get a new decision)
                response = msgspec.structs.replace(response, fallback=True)
            elif stored is not response:  # another process answered this request_id first
                return stored
        if serving is not None:
            if served is not None and self.on_served is not None:
                self.on_served(placement.id, *served)
            if serving.shadow is not None and self.shadow is not None and kept:
                self.shadow.submit(ShadowRequest(decision_id, now, placement.id, serving.shadow, shared,
                                                 action_lines, kept, features, customer_id, req.request_id,
                                                 len(ranking.chosen)))
        if self.decision_log is not None:
            self.decision_log.append(DecisionRecord(
                decision_id=decision_id, ts=now, placement=placement.id, model_version=version,
                request_id=req.request_id, customer_id=customer_id, features=loggable_features(features),
                candidates=kept, probabilities=_slot1_probs(policy, len(kept)), chosen=chosen,
                chosen_probabilities=ranking.probabilities, explored=ranking.explored, fallback=fallback,
                took_ms=took_ms, candidate_signals=signal_lines, candidate_offer_features=view_lines,
            ))
        if self.observe is not None:
            self.observe(placement.id, fallback, took_ms / 1000.0)
        if self.on_shown is not None and chosen:
            self.on_shown(placement.id, chosen)
        return response

    def _feature_views(self, placement: schemas.Placement) -> list[FeatureView]:
        """The buyer-side views a placement reads (its `features` list, else every customer/session
        view), resolved once per placement version."""
        cached = self._views.get(placement.id)
        if cached is not None and cached[0] is placement:
            return cached[1]
        candidates = self.repo.buyer_views(placement.features)
        self._views[placement.id] = (placement, candidates)
        return candidates

    def _baseline_scores(self, placement: schemas.Placement, kept: list[str], offers: dict,
                         retrieved: dict[str, tuple[float, str]] | None = None) -> list[float]:
        if retrieved and placement.baseline in ("value", "retrieval"):
            # Product placements: the retrieval score (issue 14: value ranked cheap accessories first and
            # lost to plain popularity); offers retrieval did not find keep value order below them.
            return _retrieval_scores(kept, offers, retrieved)
        if placement.baseline == "listed":
            n = len(kept)
            order = {o: i for i, o in enumerate(placement.offers or ())}
            return [float(n - order.get(o, n)) for o in kept]
        if placement.baseline == "popularity":
            return [self.retriever.popularity(offers[o].product_id or offers[o].sku or o) for o in kept]
        return [offers[o].value for o in kept]


_NOT_RETRIEVED = (0.0, " |r s_none")


def _by_value(kept: list[str], offers: dict[str, schemas.Offer]) -> GreedyEpsilonPolicy:
    """The fallback ranking: eligible offers by value, no exploration."""
    return GreedyEpsilonPolicy([offers[o].value for o in kept], 0.0)


def _retrieval_scores(kept: list[str], offers: dict[str, schemas.Offer],
                      retrieved: dict[str, tuple[float, str]]) -> list[float]:
    """Retrieved candidates by retrieval score, above the rest (those by value, squashed into (-1, 0))."""
    get = retrieved.get
    out = []
    for o in kept:
        hit = get(o)
        out.append(hit[0] if hit is not None else -1.0 / (1.0 + offers[o].value))
    return out


def _cheap(kept: list[str], offers: dict[str, schemas.Offer],
           retrieved: dict[str, tuple[float, str]] | None) -> GreedyEpsilonPolicy:
    """The fallback ranking, no exploration: by retrieval score when there is one, else by value."""
    if retrieved:
        return GreedyEpsilonPolicy(_retrieval_scores(kept, offers, retrieved), 0.0)
    return _by_value(kept, offers)


def _slot1_probs(policy: Policy, n: int) -> list[float]:
    return policy.slot_pmf(list(range(n))) if n else []
