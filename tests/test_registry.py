"""Model registry: stage rules, refused artifacts, continuous registration, canary guardrails, shadow
logging, the promotion gate, batch retraining and the models HTTP API."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

from kassa import schemas
from kassa.catalog import Catalog, SqlCatalogStore
from kassa.config import CanarySettings
from kassa.db import make_engine
from kassa.events.decision_log import read_decisions
from kassa.learn.canary import CanaryGuard
from kassa.learn.offline import ope
from kassa.learn.offline.dataset import LoggedDecisions
from kassa.learn.offline.evaluate import evaluate_models
from kassa.learn.offline.train import train_placement
from kassa.learn.online.learner import OnlineLearner
from kassa.learn.registry import STAGES, ModelRegistry, StageError, StaleFence, feature_schema_hash
from kassa.learn.rollout import gate_status, promote_version
from kassa.learn.serving.store import ModelStore, in_canary
from kassa.learn.sync import ModelSync
from tests.conftest import ADMIN, decision_body, order

PLACEMENT = schemas.Placement(id="p", slots=1, offers=["a", "b", "c", "d"], policy="epsilon", exploration=0.0,
                              min_learned_decisions=0)


def _model_file(tmp_path: Path, name: str, prefer: str | None = None, seed: int = 0,
                placement: schemas.Placement = PLACEMENT) -> Path:
    """A tiny trained VW model; with ``prefer`` it learned that only that offer is accepted."""
    learner = OnlineLearner(placement, tmp_path / f"learner-{name}")
    rng = random.Random(seed)
    for _ in range(300):
        offer = rng.choice("abcd")
        reward = 1.0 if offer == prefer else 0.0
        learner.learn("shared |c country=US", f" |o id={offer}", reward, 0.25)
    path, _ = learner.snapshot()
    return path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(make_engine(tmp_path / "kassa.db"), tmp_path / "models")


def _register(registry: ModelRegistry, tmp_path: Path, name: str, prefer: str | None = None, **kw):
    return registry.register("p", _model_file(tmp_path, name, prefer), schema_hash=kw.pop("schema_hash", "s1"),
                             learner_args="--cb_explore_adf", source=kw.pop("source", "batch"), **kw)


def check_a_stale_lease_epoch_is_refused(registry: ModelRegistry, tmp_path: Path) -> None:
    """A learner paused past its lease between its lease check and its registration: its successor took the
    placement over (the next epoch), so the paused one's snapshot must not land (also run on PostgreSQL)."""
    online = {"source": "online", "stage": "production", "actor": "learner", "auto": True}
    paused = registry.take_fence("p")
    assert _register(registry, tmp_path, "1", fence=paused, **online).stage == "production"
    successor = registry.take_fence("p")
    assert (paused, successor) == (1, 2)
    with pytest.raises(StaleFence, match=r"^the registry refused a snapshot of p with lease epoch 1: another learner "
                                         r"took the placement over since \(epoch 2\)$") as refused:
        _register(registry, tmp_path, "2", fence=paused, **online)
    assert refused.value.placement == "p"
    assert [mv.version for mv in registry.versions("p")] == ["p@1"]  # no version, no stage move, no file
    assert registry.serving()["p"].production.version == "p@1"  # type: ignore[union-attr]
    assert len(list((registry.artifacts / "p").glob("*.vw"))) == 1
    assert _register(registry, tmp_path, "3", fence=successor, **online).version == "p@2"
    assert registry.take_fence("q") == 1  # epochs are per placement
    assert _register(registry, tmp_path, "4").version == "p@3"  # no fence (kassa train, the API): not checked


def test_a_snapshot_carrying_a_stale_lease_epoch_is_refused_on_sqlite(registry, tmp_path):
    check_a_stale_lease_epoch_is_refused(registry, tmp_path)


def test_a_registration_stopped_while_copying_the_file_leaves_no_file_behind(registry, tmp_path, monkeypatch):
    # A Ctrl-C or SIGTERM of `kassa train` between the copy and its rename left `<seq>-<token>.vw.tmp`, a whole or
    # half-copied model file, in the registry's folder for good (the version itself was rolled back).
    model = _model_file(tmp_path, "1", None)
    real_replace = os.replace

    def stopped(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr("kassa.learn.registry.os.replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        registry.register("p", model, schema_hash="s1", learner_args="--cb_explore_adf", source="batch")
    assert list((registry.artifacts / "p").iterdir()) == [] and registry.versions("p") == []
    monkeypatch.setattr("kassa.learn.registry.os.replace", real_replace)
    assert _register(registry, tmp_path, "2").version == "p@1"


def test_stage_rules_keep_one_production_and_record_every_move(registry, tmp_path):
    v1 = _register(registry, tmp_path, "1")
    v2 = _register(registry, tmp_path, "2")
    assert (v1.stage, v1.version, v2.version) == ("candidate", "p@1", "p@2")
    registry.promote(v1.version, "production")
    registry.promote(v2.version, "shadow")
    with pytest.raises(StageError, match="traffic share"):
        registry.promote(v2.version, "canary")
    with pytest.raises(StageError, match="traffic share"):
        registry.promote(v2.version, "canary", share=1.5)
    registry.promote(v2.version, "canary", share=0.2)
    assert registry.get(v2.version).canary_share == 0.2
    registry.promote(v2.version, "production")
    assert registry.get(v1.version).stage == "archived"  # replaced, exactly one production
    assert [v.version for v in registry.versions("p", ["production"])] == ["p@2"]
    with pytest.raises(StageError, match="cannot move to production"):
        registry.promote(v1.version, "production")  # archived comes back only as a candidate or by rollback
    with pytest.raises(StageError, match="cannot move to canary"):
        registry.promote(v2.version, "canary", share=0.1)  # production can only be archived
    with pytest.raises(StageError, match="unknown stage"):
        registry.promote(v2.version, "live")  # type: ignore[arg-type]
    history = registry.history(version=v1.version)
    assert [(h.from_stage, h.to_stage) for h in reversed(history)] == [
        (None, "candidate"), ("candidate", "production"), ("production", "archived")]
    assert "replaced by p@2" in history[0].reason


def test_rollback_restores_the_previous_production_version(registry, tmp_path):
    v1 = _register(registry, tmp_path, "1", stage="production")
    v2 = _register(registry, tmp_path, "2", stage="production")
    restored = registry.rollback("p", "bad numbers")
    assert restored.version == v1.version and restored.stage == "production"
    assert registry.get(v2.version).stage == "archived"
    assert "rolled back: bad numbers" in registry.history(version=v2.version)[0].reason
    with pytest.raises(StageError, match="no earlier production version"):
        registry.rollback("p")  # never back to v2: it was rolled back (issue 17: no ping-pong)
    assert registry.get(v1.version).stage == "production"


def test_rollback_undoes_the_release_not_the_learners_last_snapshot(registry, tmp_path):
    good = _register(registry, tmp_path, "good", stage="production")
    bad = _register(registry, tmp_path, "bad", parent=good.version)
    promote_version(registry, bad.version, "production", force=True)  # a bad model forced by hand
    snap = _register(registry, tmp_path, "snap", stage="production", parent=bad.version, source="online",
                     actor="learner", auto=True)  # the learner's snapshot on top of it
    assert snap.stage == "production"
    restored = registry.rollback("p", "conversion dropped")
    assert restored.version == good.version  # not the forced bad model under the snapshot
    assert registry.rolled_back_ancestor(snap.version) == snap.version
    assert registry.rolled_back_ancestor(bad.version) == bad.version
    # The learner's next snapshot descends from the bad lineage: it stays a candidate.
    late = _register(registry, tmp_path, "late", stage="production", parent=snap.version, source="online",
                     actor="learner", auto=True)
    assert late.stage == "candidate" and registry.get(good.version).stage == "production"
    child = _register(registry, tmp_path, "child", stage="production", parent=good.version, source="online",
                      actor="learner", auto=True)
    assert child.stage == "production"
    # A second rollback never restores the bad model or a descendant of it: nothing before `good` is clean,
    # so it undoes the child snapshot alone.
    assert registry.rollback("p").version == good.version
    # Promoted by hand, a rolled-back version and its descendants may auto-publish again.
    registry.promote(late.version, "production", reason="checked by hand")
    again = _register(registry, tmp_path, "again", stage="production", parent=late.version, source="online",
                      actor="learner", auto=True)
    assert again.stage == "production"


def test_consecutive_rollbacks_walk_back_past_the_bad_lineage(registry, tmp_path):
    v1 = _register(registry, tmp_path, "1", stage="production")
    v2 = _register(registry, tmp_path, "2", parent=v1.version, stage="production", actor="learner", auto=True)
    bad = _register(registry, tmp_path, "bad")
    promote_version(registry, bad.version, "production", force=True)
    registry.rollback("p", "first")  # the forced release is undone: v2 serves
    assert registry.get(v2.version).stage == "production"
    registry.rollback("p", "second")  # v2's release (a restore) is undone: v1, never `bad`
    assert registry.get(v1.version).stage == "production"
    assert registry.get(bad.version).stage == "archived"


def test_rollback_without_an_earlier_version_is_refused(registry, tmp_path):
    with pytest.raises(StageError, match="no production model"):
        registry.rollback("p")
    _register(registry, tmp_path, "1", stage="production")
    with pytest.raises(StageError, match="no earlier production version"):
        registry.rollback("p")


def test_unknown_version_is_not_found(registry):
    from kassa.errors import NotFound

    with pytest.raises(NotFound, match="unknown model version"):
        registry.get("p@99")


def _sync(registry: ModelRegistry, schema: str = "s1") -> tuple[ModelStore, ModelSync]:
    store = ModelStore()
    return store, ModelSync(registry, store, lambda _p: schema)


def test_corrupt_artifact_is_refused_and_the_previous_version_keeps_serving(registry, tmp_path):
    _register(registry, tmp_path, "1", stage="production")
    store, sync = _sync(registry)
    assert sync.sync() == ["p"] and store.get("p").version == "p@1"
    v2 = _register(registry, tmp_path, "2")
    path = registry.path(v2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    registry.promote(v2.version, "production")
    sync.sync()
    assert store.get("p").version == "p@1"
    assert "checksum" in sync.refused["p@2"]


def test_schema_mismatched_artifact_is_refused(registry, tmp_path):
    _register(registry, tmp_path, "1", stage="production")
    store, sync = _sync(registry)
    sync.sync()
    _register(registry, tmp_path, "2", stage="production", schema_hash="other-schema")
    sync.sync()
    assert store.get("p").version == "p@1"
    assert "feature schema" in sync.refused["p@2"]


def test_canary_split_is_stable_and_close_to_its_share():
    units = [f"c-{i}" for i in range(20_000)]
    share = sum(in_canary(u, 0.1) for u in units) / len(units)
    assert share == pytest.approx(0.1, abs=0.01)
    assert [in_canary(u, 0.1) for u in units[:100]] == [in_canary(u, 0.1) for u in units[:100]]
    assert not any(in_canary(u, 0.0) for u in units[:1000])


def test_guardrail_breaches_each_rule_and_not_on_equal_versions():
    s = CanarySettings(window_decisions=2000, min_decisions=100, min_rewards=100)
    rng = random.Random(1)

    def fill(guard: CanaryGuard, version: str, rate: float, ms: float = 1.0, err: float = 0.0) -> None:
        for _ in range(1000):
            guard.served("p", version, ms * rng.uniform(0.8, 1.2), rng.random() < err)
            guard.rewarded("p", version, 1.0 if rng.random() < rate else 0.0)

    def guard() -> CanaryGuard:
        g = CanaryGuard(s)
        g.track("p", "prod", "can")
        return g

    same = guard()
    fill(same, "prod", 0.2)
    fill(same, "can", 0.2)
    assert same.check("p") is None
    worse = guard()
    fill(worse, "prod", 0.2)
    fill(worse, "can", 0.1)
    assert "reward rate" in worse.check("p").reason
    errors = guard()
    fill(errors, "prod", 0.2)
    fill(errors, "can", 0.2, err=0.05)
    assert "error rate" in errors.check("p").reason
    slow = guard()
    fill(slow, "prod", 0.2, ms=1.0)
    fill(slow, "can", 0.2, ms=10.0)
    assert "P99 latency" in slow.check("p").reason


def test_guardrail_comparison_outlives_production_snapshots_and_takes_late_rewards():
    g = CanaryGuard(CanarySettings(min_rewards=50))
    g.track("p", "p@1", "p@9")
    for i in range(60):
        g.served("p", "p@9", 1.0, False)
        g.served("p", f"p@{1 + i // 20}", 1.0, False)  # production is re-published twice meanwhile
    g.track("p", "p@2", "p@9")
    g.track("p", "p@3", "p@9")
    for i in range(60):  # rewards arrive after their (long) wait, for decisions of versions since replaced
        g.rewarded("p", f"p@{1 + i // 20}", 1.0 if i % 3 else 0.0)
        g.rewarded("p", "p@9", 0.0)
    comp = g.comparison("p")
    assert comp is not None and len(comp.production_arm.rewards) == 60 and len(comp.canary_arm.rewards) == 60
    assert g.check("p").guardrail == "reward"
    g.track("p", "p@3", None)  # the canary stops: its comparison closes
    assert g.comparison("p") is None


def test_latency_guardrail_decides_within_a_few_slow_decisions():
    g = CanaryGuard(CanarySettings())
    g.track("p", "prod", "can")
    rng = random.Random(3)
    for _ in range(100):
        g.served("p", "prod", rng.uniform(0.5, 2.0), False)
    slow = 0
    while g.check("p") is None:
        g.served("p", "can", rng.uniform(5.0, 20.0) * 10, False)
        slow += 1
    assert slow <= 5
    quick = CanaryGuard(CanarySettings())
    quick.track("p", "prod", "can")
    for _ in range(5000):  # an A/A canary is never flagged, however often it is checked
        quick.served("p", "prod", rng.uniform(0.5, 2.0), False)
        quick.served("p", "can", rng.uniform(0.5, 2.0), False)
        assert quick.check("p") is None


def test_canary_is_rolled_back_on_a_guardrail_breach(client, kassa, clock, tmp_path):
    learning = kassa.learning
    reg = kassa.model_registry
    schema = kassa.schema_hash("order_confirmation")
    for name in ("1", "2"):
        reg.register("order_confirmation", _model_file(tmp_path, name), schema_hash=schema,
                     learner_args="x", source="batch", metrics={"rewarded_decisions": 300})
    reg.promote("order_confirmation@1", "production", reason="test")
    reg.promote("order_confirmation@2", "canary", share=0.5)
    learning.poll()
    serving = kassa.models.serving("order_confirmation")
    assert serving.canary.version == "order_confirmation@2" and serving.canary_share == 0.5
    versions = set()
    for i in range(60):
        versions.add(client.post("/v1/decisions", json=decision_body(customer=f"c-{i}")).json()["model_version"])
    assert {"order_confirmation@1", "order_confirmation@2"} <= versions  # both serve, split by customer
    guard = learning.guard
    assert guard.comparison("order_confirmation").canary == "order_confirmation@2"
    rng = random.Random(2)
    for _ in range(600):  # the canary converts at half production's rate
        guard.served("order_confirmation", "order_confirmation@1", 1.0, False)
        guard.served("order_confirmation", "order_confirmation@2", 1.0, False)
        guard.rewarded("order_confirmation", "order_confirmation@1", float(rng.random() < 0.3))
        guard.rewarded("order_confirmation", "order_confirmation@2", float(rng.random() < 0.15))
    breaches = learning.enforce_guardrails()
    assert [b.version for b in breaches] == ["order_confirmation@2"]
    assert reg.get("order_confirmation@2").stage == "archived"
    event = reg.history(version="order_confirmation@2")[0]
    assert event.actor == "guardrail" and "reward rate" in event.reason
    assert kassa.models.serving("order_confirmation").canary is None


def _only_this_test_drives_learning(client, kassa) -> None:  # type: ignore[no-untyped-def]
    """Stop the app's own learning task: these tests step and poll the loop by hand, and the task (woken by the
    registry's change notification) could restart the learner between two of their asserts."""
    async def cancel() -> None:
        for task in kassa._tasks:
            if task.get_name() == "kassa-learning":
                task.cancel()

    client.portal.call(cancel)


def _accepted_decisions(client, clock, prefix: str, n: int) -> None:
    """``n`` decisions whose top offer is accepted, with their reward windows over."""
    for i in range(n):
        d = client.post("/v1/decisions", json=decision_body(customer=f"{prefix}{i}")).json()
        client.post("/v1/events", json={"events": [{"event_id": f"{prefix}{i}", "type": "accept",
                                                   "decision_id": d["decision_id"],
                                                   "offer_id": d["offers"][0]["offer_id"]}]})
    clock.advance(61)


def test_continuous_learning_registers_snapshots_as_production(client, kassa, clock):
    _accepted_decisions(client, clock, "c", 10)
    kassa.learning.step()
    kassa.learning.snapshot_due(force=True)
    prod = kassa.model_registry.versions("order_confirmation", ["production"])
    assert len(prod) == 1 and prod[0].source == "online" and prod[0].metrics["rewarded_decisions"] == 10
    assert kassa.models.get("order_confirmation").version == prod[0].version
    assert prod[0].schema_hash == kassa.schema_hash("order_confirmation")


def test_a_promoted_batch_model_is_what_the_online_learner_continues(client, kassa, clock, tmp_path):
    _only_this_test_drives_learning(client, kassa)
    learner = kassa.learning.learner("order_confirmation")
    placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
    mv = kassa.model_registry.register("order_confirmation", _model_file(tmp_path, "b", placement=placement),
                                       schema_hash=kassa.schema_hash("order_confirmation"), learner_args=learner.args,
                                       source="batch", metrics={"learned": 300, "rewarded_decisions": 300})
    promote_version(kassa.model_registry, mv.version, "production", force=True)
    kassa.learning.poll()
    assert kassa.models.get("order_confirmation").version == mv.version
    assert learner.learned != 300  # the restart waits for the learner's next snapshot (no VW load at the swap)
    before = kassa.learning.learned
    # Decisions rewarded meanwhile are learned now and again after the restart, on the promoted weights.
    _accepted_decisions(client, clock, "r", 4)
    kassa.learning.step()
    learned = kassa.learning.learned - before  # (the app's own learning task may have taken some)
    assert learned >= 4
    snap = kassa.learning.publish("order_confirmation", learner)
    assert kassa.model_registry.get(snap.version).parent == mv.version
    kassa.learning.learn_backlog(10_000)  # what was learned since the promotion, learned again on its weights
    assert learner.learned == 300 + learned and learner.rewarded_decisions == 300 + 4
    # Its own snapshot serving next (auto-published) is no reason to restart again.
    kassa.learning.poll()
    assert kassa.models.get("order_confirmation").version == snap.version
    assert not kassa.learning.restart_pending("order_confirmation")


def test_a_burst_of_swaps_restarts_the_learner_once(kassa, clock, tmp_path, monkeypatch):
    learner = kassa.learning.learner("order_confirmation")
    placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
    restarts = []
    original = learner.restart_from
    monkeypatch.setattr(learner, "restart_from", lambda path, meta=None: (restarts.append(path), original(path, meta)))
    versions = [kassa.model_registry.register(
        "order_confirmation", _model_file(tmp_path, f"m{i}", placement=placement),
        schema_hash=kassa.schema_hash("order_confirmation"), learner_args=learner.args, source="batch",
        metrics={"learned": 100 + i, "rewarded_decisions": 100 + i}) for i in range(5)]
    for mv in versions:
        promote_version(kassa.model_registry, mv.version, "production", force=True)
        kassa.learning.poll()
        assert kassa.models.get("order_confirmation").version == mv.version
    assert restarts == []
    clock.advance(kassa.settings.learn.snapshot_every_seconds + 1)
    kassa.learning.snapshot_due()
    assert restarts == [kassa.model_registry.path(versions[-1])] and learner.learned == 104
    assert kassa.models.get("order_confirmation").version == versions[-1].version  # nothing new to publish


def test_relearning_survives_a_second_promotion_and_is_bounded(kassa, clock, tmp_path, monkeypatch):
    import kassa.learn.online.loop as loop_module

    loop = kassa.learning
    learner = loop.learner("order_confirmation")
    placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
    a, b = (kassa.model_registry.register(
        "order_confirmation", _model_file(tmp_path, name, placement=placement),
        schema_hash=kassa.schema_hash("order_confirmation"), learner_args=learner.args, source="batch",
        metrics={"learned": 50, "rewarded_decisions": 50}) for name in ("a", "b"))
    example = ("shared |c country=US", " |o id=warranty", 1.0, 0.5, True)
    promote_version(kassa.model_registry, a.version, "production", force=True)
    loop.poll()
    loop._replay["order_confirmation"].extend([example] * 6)  # as `step` records what it learns meanwhile
    assert loop.catch_up("order_confirmation") and loop.learn_backlog(2) == 2  # 4 still waiting
    promote_version(kassa.model_registry, b.version, "production", force=True)
    loop.poll()
    loop._replay["order_confirmation"].extend([example] * 3)
    monkeypatch.setattr(loop_module, "_MAX_REPLAY", 5)
    assert loop.catch_up("order_confirmation")
    # The 4 never learned on b's weights plus the 3 learned since, capped at the newest 5.
    assert loop.learn_backlog(100) == 5
    assert learner.learned == 50 + 5 and learner.rewarded_decisions == 50 + 5


def test_a_rollback_before_the_learners_restart_cancels_the_restart(client, kassa, clock, tmp_path):
    _only_this_test_drives_learning(client, kassa)
    loop = kassa.learning
    learner = loop.learner("order_confirmation")
    _accepted_decisions(client, clock, "a", 6)
    loop.step()
    own = loop.publish("order_confirmation", learner)  # the learner's snapshot serves
    placement = kassa.catalog.snapshot.placements["order_confirmation"].placement
    bad = kassa.model_registry.register("order_confirmation", _model_file(tmp_path, "bad", placement=placement),
                                        schema_hash=kassa.schema_hash("order_confirmation"), learner_args=learner.args,
                                        source="batch", metrics={"learned": 9, "rewarded_decisions": 9})
    promote_version(kassa.model_registry, bad.version, "production", force=True)
    loop.poll()
    assert loop.restart_pending("order_confirmation")  # it would continue from the forced model...
    assert kassa.model_registry.rollback("order_confirmation", "bad").version == own.version
    loop.poll()
    assert not loop.restart_pending("order_confirmation")  # ...but the rollback came first: it never does
    _accepted_decisions(client, clock, "b", 3)
    loop.step()
    snap = loop.publish("order_confirmation", learner)
    assert kassa.model_registry.get(snap.version).parent == own.version
    assert kassa.models.get("order_confirmation").version == snap.version


def test_shadow_model_scores_without_changing_answers_and_is_logged(client, kassa, tmp_path):
    reg = kassa.model_registry
    mv = reg.register("order_confirmation", _model_file(tmp_path, "s"), schema_hash=kassa.schema_hash(
        "order_confirmation"), learner_args="x", source="batch", stage="shadow")
    kassa.learning.poll()
    ids = []
    for i in range(5):
        body = client.post("/v1/decisions", json=decision_body(customer=f"c{i}")).json()
        assert body["model_version"] == "baseline"  # the shadow never answers
        ids.append(body["decision_id"])
    kassa.shadow.drain(100)  # the server's learning task may have drained some already
    assert kassa.shadow.scored == 5 and kassa.shadow.dropped == 0
    kassa.shadow_log.flush()
    shadow = read_decisions(kassa.settings.data_path / "shadow", "order_confirmation").to_pylist()
    assert {r["decision_id"] for r in shadow} == set(ids)
    assert all(r["model_version"] == mv.version and sum(r["probabilities"]) == pytest.approx(1.0) for r in shadow)


# ------------------------------------------------------------------------------------------ the gate
def _synthetic_log(n: int, seed: int) -> LoggedDecisions:
    """Uniform logging over 4 offers; offer 'a' converts at 50%, the rest at 10%."""
    rng = random.Random(seed)
    data = LoggedDecisions("p")
    for i in range(n):
        offer = rng.choice("abcd")
        reward = float(rng.random() < (0.5 if offer == "a" else 0.1))
        data.decision_ids.append(str(i))
        data.ts.append(float(i))
        data.model_versions.append("uniform")
        data.customer_ids.append(None)
        data.features.append({"country": "US"})
        data.candidates.append(list("abcd"))
        data.probabilities.append([0.25] * 4)
        data.chosen.append([offer])
        data.chosen_probabilities.append([0.25])
        data.rewards.append([reward])
        data.fallback.append(False)
    return data


def test_promotion_gate_admits_a_better_candidate_and_blocks_a_worse_one(tmp_path):
    engine = make_engine(tmp_path / "kassa.db")
    catalog = Catalog(SqlCatalogStore(engine))
    for o in "abcd":
        catalog.put_offer(schemas.Offer(id=o, kind="partner", title=o))
    catalog.put_placement(PLACEMENT)
    data = _synthetic_log(4000, seed=5)
    good = _model_file(tmp_path, "good", prefer="a")
    bad = _model_file(tmp_path, "bad", prefer="c")
    snap = catalog.snapshot
    evaluation, verdict = evaluate_models(data, snap, ("good", good), ("bad", bad), "snips", workers=1)
    assert verdict is not None and verdict.passed, verdict.reason
    assert evaluation.estimate("good", "snips").value == pytest.approx(0.5, abs=0.05)
    assert evaluation.estimate(ope.UNIFORM, "ips").value == pytest.approx(0.2, abs=0.03)
    _, reverse = evaluate_models(data, snap, ("bad", bad), ("good", good), "dr", workers=1)
    assert reverse is not None and not reverse.passed and "does not beat" in reverse.reason


def test_production_promotion_needs_a_passing_evaluation_unless_forced(registry, tmp_path):
    v1 = _register(registry, tmp_path, "1")
    passed, why = gate_status(v1)
    assert not passed and "run `kassa evaluate" in why
    with pytest.raises(StageError, match="no evaluation"):
        promote_version(registry, v1.version, "production")
    registry.update_metrics(v1.version, {"evaluation": {"passed": False, "reason": "lower bound 0.1 < 0.2"}})
    with pytest.raises(StageError, match="failed the promotion gate: lower bound"):
        promote_version(registry, v1.version, "production")
    forced = promote_version(registry, v1.version, "production", force=True)
    assert forced.stage == "production" and "forced" in registry.history(version=v1.version)[0].reason
    v2 = _register(registry, tmp_path, "2")
    registry.update_metrics(v2.version, {"evaluation": {"passed": True, "reason": "lcb 0.3 beats 0.2"}})
    assert promote_version(registry, v2.version, "production").stage == "production"

    # A production version (an online snapshot, never evaluated) and an archived one: neither is a gate
    # question. Both said "failed the promotion gate" or "has no evaluation", and --force then met the stage rule.
    v3 = _register(registry, tmp_path, "3", source="online")
    registry.promote(v3.version, "production", actor="learner")
    with pytest.raises(StageError, match="p@3 is already production"):
        promote_version(registry, v3.version, "production")
    for force in (False, True):
        with pytest.raises(StageError, match="p@1 is archived; it cannot move to production \\(allowed: candidate\\)"):
            promote_version(registry, v1.version, "production", force=force)


# ------------------------------------------------------------------------------------------ train
def test_batch_retraining_learns_from_logged_decisions_and_joined_rewards(client, kassa, clock):
    rng = random.Random(4)
    for i in range(120):
        d = client.post("/v1/decisions", json=decision_body(customer=f"c{i}", limit=1, order=order())).json()
        offer = d["offers"][0]["offer_id"]
        if offer == "warranty" or rng.random() < 0.05:
            client.post("/v1/events", json={"events": [{"event_id": f"e{i}", "type": "accept",
                                                       "decision_id": d["decision_id"], "offer_id": offer}]})
    clock.advance(61)
    client.post("/v1/decisions", json=decision_body(customer="late"))  # its window is still open
    kassa.decision_log.flush()
    view = kassa.catalog.snapshot.placements["order_confirmation"]
    result = train_placement(kassa.settings.data_path, kassa.model_registry, kassa.catalog.snapshot, view.placement,
                             kassa.schema_hash("order_confirmation"))
    assert result.version is not None and result.version.stage == "candidate" and result.version.source == "batch"
    assert result.decisions == 120 and result.pending == 1
    assert result.version.rows == 120 and result.version.train_since is not None
    assert result.mean_reward > 0
    path = kassa.model_registry.verify(result.version, kassa.schema_hash("order_confirmation"))
    from kassa.learn.serving.vw import VWModel

    model = VWModel(path, "t")
    lines = kassa.catalog.snapshot.action_lines
    pmf = model.pmf("shared |c country=US", [lines["warranty"], lines["discount"]])
    assert pmf[0] > pmf[1]
    # a UCB placement's batch model carries its counts (one per shown slot learned), as the online learner's does
    import msgspec

    from kassa.learn.serving.loader import load_serving
    from kassa.learn.serving.sidecar import read_sidecar_counts, sidecar_path

    ucb = msgspec.structs.replace(view.placement, policy="ucb", ucb_alpha=0.5)
    again = train_placement(kassa.settings.data_path, kassa.model_registry, kassa.catalog.snapshot, ucb,
                            kassa.schema_hash("order_confirmation"))
    assert again.version is not None and "--epsilon 0.02" in again.version.learner_args
    path = kassa.model_registry.verify(again.version, kassa.schema_hash("order_confirmation"))
    spec, _, _, counts = read_sidecar_counts(sidecar_path(path))
    assert spec.policy == "ucb" and spec.alpha == 0.5 and counts is not None and counts[0].size > 0
    served = load_serving(path, again.version.version)
    assert served.pmf("shared |c country=US", [lines["warranty"], lines["discount"]]) != pytest.approx([0.5, 0.5])
    assert getattr(served, "n", None) is not None


def test_schema_hash_changes_with_the_placements_features(kassa):
    view = kassa.catalog.snapshot.placements["order_confirmation"]
    base = feature_schema_hash(view.placement, kassa.repo)
    import msgspec

    narrowed = msgspec.structs.replace(view.placement, features=["customer_signals"])
    assert feature_schema_hash(narrowed, kassa.repo) != base
    assert feature_schema_hash(view.placement, kassa.repo) == base


# ------------------------------------------------------------------------------------------ HTTP
def _admin() -> dict:
    return {"Authorization": f"Bearer {ADMIN}"}


def test_models_api_lists_promotes_and_rolls_back(client, kassa, tmp_path):
    reg = kassa.model_registry
    schema = kassa.schema_hash("order_confirmation")
    for name in ("1", "2"):
        reg.register("order_confirmation", _model_file(tmp_path, name), schema_hash=schema, learner_args="x",
                     source="batch")
    r = client.get("/v1/models", headers=_admin())
    assert r.status_code == 200 and {v["version"] for v in r.json()["versions"]} == {
        "order_confirmation@1", "order_confirmation@2"}
    r = client.post("/v1/models/order_confirmation@1/stage", json={"stage": "production"}, headers=_admin())
    assert r.status_code == 409 and "no evaluation" in r.json()["detail"]
    r = client.post("/v1/models/order_confirmation@1/stage", json={"stage": "production", "force": True},
                    headers=_admin())
    assert r.status_code == 200 and r.json()["stage"] == "production"
    assert kassa.models.get("order_confirmation").version == "order_confirmation@1"  # loaded at once
    client.post("/v1/models/order_confirmation@2/stage", json={"stage": "production", "force": True},
                headers=_admin())
    r = client.post("/v1/placements/order_confirmation/rollback", json={"reason": "conversion dropped"},
                    headers=_admin())
    assert r.status_code == 200 and r.json()["version"] == "order_confirmation@1"
    detail = client.get("/v1/models/order_confirmation@2", headers=_admin()).json()
    assert detail["stage"] == "archived" and "conversion dropped" in detail["history"][0]["reason"]


@pytest.mark.parametrize(("path", "body", "status", "field"), [
    ("/v1/models/order_confirmation@9/stage", {"stage": "shadow"}, 404, "version"),
    ("/v1/models/x/stage", {"stage": "live"}, 422, "stage"),
    ("/v1/models/x/stage", {"stage": "shadow", "extra": 1}, 422, None),
    # a share out of its range was 409 "Stage change refused", not the invalid field README's 422 is
    ("/v1/models/order_confirmation@1/stage", {"stage": "canary", "share": 2}, 422, "share"),
    ("/v1/models/x/stage", {"stage": "canary"}, 422, "share"),
    ("/v1/models/x/stage", {"stage": "shadow", "share": 0.5}, 422, "share"),
    ("/v1/models/x/stage", "{not json", 400, None),
    ("/v1/placements/nope/rollback", {}, 404, "placement"),  # as every unknown placement (README)
])
def test_models_api_refuses_bad_input_clearly(client, path, body, status, field):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = client.post(path, headers={**_admin(), "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    if field:
        assert r.json()["field"] == field


def test_models_api_filters_by_stage_and_refuses_an_unknown_stage(client, kassa, tmp_path):
    reg = kassa.model_registry
    reg.register("order_confirmation", _model_file(tmp_path, "1"), schema_hash=kassa.schema_hash("order_confirmation"),
                 learner_args="x", source="batch")
    r = client.get("/v1/models", params={"stage": "candidate"}, headers=_admin())
    assert [v["version"] for v in r.json()["versions"]] == ["order_confirmation@1"]
    assert client.get("/v1/models", params={"stage": "production"}, headers=_admin()).json()["versions"] == []
    # `prod` was ignored and every version listed, as if it matched
    r = client.get("/v1/models", params={"stage": "prod"}, headers=_admin())
    assert r.status_code == 422 and r.json()["field"] == "stage" and "production" in r.json()["detail"]
    spec = client.get("/openapi.json").json()["paths"]["/v1/models"]["get"]["parameters"]
    assert next(p for p in spec if p["name"] == "stage")["schema"]["enum"] == list(STAGES)


def test_models_api_reads_the_registry_off_the_serving_loop(client, kassa, tmp_path, monkeypatch):
    """Registry reads are SQL: on PostgreSQL a slow or unreachable database stalled every decision while
    GET /v1/models or /v1/models/{version} waited on the event loop (the dashboard already read it off it)."""
    import asyncio

    reg = kassa.model_registry
    reg.register("order_confirmation", _model_file(tmp_path, "1"), schema_hash=kassa.schema_hash("order_confirmation"),
                 learner_args="x", source="batch")
    on_loop: list[str] = []
    for name in ("versions", "get", "history"):
        real = getattr(reg, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop.append(_name)
            except RuntimeError:  # a worker thread: no loop runs here
                pass
            return _real(*args, **kwargs)

        monkeypatch.setattr(reg, name, spy)
    assert client.get("/v1/models", headers=_admin()).json()["versions"][0]["version"] == "order_confirmation@1"
    assert client.get("/v1/models/order_confirmation@1", headers=_admin()).status_code == 200
    assert on_loop == []


def test_models_api_needs_an_admin_key(client):
    from tests.conftest import PUB

    r = client.post("/v1/models/x/stage", json={"stage": "shadow"}, headers={"Authorization": f"Bearer {PUB}"})
    assert r.status_code == 403


def test_weights_helper_sanity():
    # The synthetic log's logged probabilities are valid propensities (used by the gate test above).
    data = _synthetic_log(100, 1)
    reward, prob, n = data.top_slot()
    assert np.all(prob == 0.25) and np.all(n == 4) and reward.shape == (100,)


def test_server_feeds_drift_monitors_and_checks_them_on_schedule(client, kassa, clock):
    for i in range(20):
        d = client.post("/v1/decisions", json=decision_body(customer=f"c{i}")).json()
        client.post("/v1/events", json={"events": [{"event_id": f"e{i}", "type": "accept",
                                                   "decision_id": d["decision_id"],
                                                   "offer_id": d["offers"][0]["offer_id"]}]})
    kassa.decision_log.flush()  # records reach the monitor from the log writer, off the request path
    monitor = kassa.drift.monitors["order_confirmation"]
    assert monitor.live.decisions == 20
    clock.advance(kassa.settings.learn.drift_check_seconds + 61)
    kassa.learning.step()
    kassa.learning.tick()
    report = kassa.drift.last_reports["order_confirmation"]
    assert report.live_n == 20
    metrics = client.get("/metrics").text
    assert 'kassa_drift_checks_total{placement="order_confirmation"} 1.0' in metrics
