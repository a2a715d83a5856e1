"""Rollout safety under continuous learning (issue 17), end to end on a test clock with the real learner
auto-publishing: guardrails fire at any traffic and reward wait, an A/A canary is left alone, a manual
rollback sticks (twice), a latency breach is rolled back within seconds, and all of it is in /metrics.

The scenarios are `bench/rollout.py`'s, so the benchmark's numbers and these assertions come from one
driver."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import rollout  # bench/rollout.py


@pytest.mark.parametrize(("rate", "wait"), rollout.REWARD_RUNS)
def test_bad_canary_is_rolled_back_at_any_traffic_and_reward_wait(tmp_path, rate, wait):
    r = asyncio.run(rollout.canary_run(tmp_path, rate, wait, bad=True))
    assert r["rolled_back"], r
    assert r["reason"].startswith("reward rate") and "mSPRT" in r["reason"]
    # Its 200 rewards per arm need 200 / (rate / 2) s of decisions, then the reward wait; checked every second.
    assert r["seconds"] <= wait + 2 * 200 / (rate / 2) + 2.0, r
    if wait >= 30:  # the learner kept publishing production snapshots during the comparison
        assert r["production_versions_during"] >= 2, r


@pytest.mark.parametrize(("rate", "wait"), rollout.REWARD_RUNS)
def test_a_copy_of_production_as_canary_is_not_rolled_back(tmp_path, rate, wait):
    r = asyncio.run(rollout.canary_run(tmp_path, rate, wait, bad=False, horizon=wait + 30.0))
    assert not r["rolled_back"], r


def test_manual_rollback_sticks_and_a_second_never_restores_the_bad_lineage(tmp_path):
    r = asyncio.run(rollout.manual_rollback_run(tmp_path))
    assert r["rolled_back_from"] != r["bad"]  # the learner had published on top of the bad model
    assert r["restored"] not in (r["bad"], r["rolled_back_from"])
    assert r["not_descended_from_restored"] == [], r  # 60 s: only the restored version and its descendants
    assert len(r["served_after_rollback"]) >= 3  # ...while the learner kept publishing
    assert r["accept_rate_bad"] < 0.6 * r["accept_rate_before"], r  # the bad model was bad
    assert r["accept_rate_after"] >= 0.8 * r["accept_rate_before"], r  # and the restored level is back
    assert r["bad_lineage_after_second"] == [], r
    assert r["rollback_sticks"]


def test_a_canary_ten_times_slower_is_rolled_back_within_five_seconds(tmp_path):
    r = asyncio.run(rollout.latency_run(tmp_path, rate=200.0))
    assert r["rolled_back"] and r["reason"].startswith("P99 latency"), r
    assert r["seconds"] <= 5.0, r


def test_guardrail_checks_rollbacks_restarts_and_shadow_drops_are_in_metrics(tmp_path):
    async def scenario() -> bytes:
        sim = rollout.Sim(tmp_path, 200.0, 1.0)
        try:
            sim.force(sim.train("good", "prod"))
            await sim.run(12.0)  # a learner snapshot serves: a rollback has something to restore
            sim.canary(sim.train("bad", "canary"))
            await sim.run(20.0, stop=lambda: sim.serving()[1] is None)
            sim.registry.rollback(rollout.PLACEMENT, "by hand", actor="test")
            sim.kassa.learning.poll()
            await sim.run(11.0)  # the learner restarts from the restored version at its next snapshot
            sim.kassa.shadow.max_queue = 0
            shadow = sim.train("good", "shadow")
            sim.registry.promote(shadow, "shadow")
            sim.kassa.learning.poll()
            await sim.run(0.2)
            return sim.kassa.metrics.render()
        finally:
            sim.close()

    text = asyncio.run(scenario()).decode()
    assert 'kassa_guardrail_evaluations_total{outcome="pass",placement="checkout"}' in text
    assert 'kassa_guardrail_evaluations_total{outcome="reward",placement="checkout"} 1.0' in text
    assert 'kassa_rollbacks_total{placement="checkout",reason="reward"} 1.0' in text
    assert 'kassa_rollbacks_total{placement="checkout",reason="manual"} 1.0' in text
    assert 'kassa_learner_restarts_total{placement="checkout"}' in text
    assert 'kassa_shadow_dropped_total{placement="checkout"}' in text


class _Records:
    """A `LearnerInput` handing over decision records captured from a serving engine, once."""

    def __init__(self, decisions: list) -> None:  # type: ignore[type-arg]
        self.decisions = decisions

    async def poll(self, limit: int = 5000):  # type: ignore[no-untyped-def]
        from kassa.learn.online.inputs import LearnerBatch

        batch, self.decisions = LearnerBatch(decisions=self.decisions), []
        return batch

    async def commit(self) -> None:
        return None

    @property
    def caught_up_to(self) -> float:
        return float("inf")  # everything there is was handed over at once

    async def close(self) -> None:
        return None


def test_a_learner_in_another_process_gets_the_canary_latencies_from_the_decision_records(tmp_path):
    """With the learner apart (`kassa learn`), the guardrails run there: each record of a decision made while a
    canary serves carries the version meant to serve, its latency and whether the model failed."""
    from kassa.roles.learner import LearnerRole

    async def scenario() -> None:
        sim = rollout.Sim(tmp_path, 200.0, 1.0)
        records: list = []  # type: ignore[type-arg]
        register = sim.kassa.joiner.register

        def capture(pending):  # type: ignore[no-untyped-def]
            records.append(pending)
            register(pending)

        role = None
        try:
            sim.force(sim.train("good", "prod"))
            canary = sim.train("bad", "canary")
            sim.canary(canary)
            sim.kassa.joiner.register = capture  # type: ignore[method-assign]
            await sim.run(2.0)
            served = [p.served for p in records]
            assert served and all(s is not None for s in served)
            by_canary = [s for s in served if s is not None and s[0] == canary]
            assert 0 < len(by_canary) < len(served)  # a 50 % canary: both arms served
            assert all(s is not None and s[1] > 0 and s[2] is False for s in served)

            role = LearnerRole(sim.kassa.settings, source=_Records(records), clock=sim.clock)
            role.input = role._source
            await role.loop.poll_async()  # the serving set: the comparison opens, as in the learner's loop
            await role.round()
            comp = role.loop.guard.comparison(rollout.PLACEMENT)
            assert comp is not None and comp.canary == canary
            assert len(comp.canary_arm.latencies) == len(by_canary)
            assert len(comp.production_arm.latencies) == len(served) - len(by_canary)
        finally:
            if role is not None:
                role.kassa.decision_log.close()
                role.kassa.event_log.close()
            sim.close()

    asyncio.run(scenario())
