"""`kassa evaluate --shadow`: how a shadow version would have done, from the shadow log a live server wrote."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kassa.cli import app
from kassa.events.decision_log import read_decisions
from kassa.learn.online.learner import OnlineLearner
from kassa.learn.rollout import promote_version
from tests.conftest import CATALOG, decision_body, order

runner = CliRunner()
PLACEMENT = "order_confirmation"
# The simulated buyer accepts the offer shown first with its appeal (the other slots are never accepted), so a
# policy's true top-slot value on a decision is sum over candidates of P(first) x appeal.
APPEAL = {"warranty": 0.6, "partner-us": 0.02, "discount": 0.35, "no-beauty": 0.25, "serum-upsell": 0.3}


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _stop_the_learning_task(client, kassa) -> None:
    """The test drives the loop (model polls, shadow drains) by hand; the app's task would also learn online and
    publish snapshots that replace the production model under test."""
    async def cancel() -> None:
        for task in kassa._tasks:
            if task.get_name() == "kassa-learning":
                task.cancel()

    client.portal.call(cancel)


def _model_preferring(kassa, tmp_path: Path, name: str, prefer: str) -> Path:
    """A VW model that learned, on the placement's own offer lines, that only ``prefer`` is ever accepted."""
    snap = kassa.catalog.snapshot
    placement = snap.placements[PLACEMENT].placement
    learner = OnlineLearner(placement, tmp_path / f"learner-{name}")
    rng = random.Random(0)
    offers = sorted(APPEAL)
    for _ in range(400):
        offer = rng.choice(offers)
        learner.learn("shared |c country=US", snap.action_lines[offer], float(offer == prefer), 1 / len(offers))
    path, _ = learner.snapshot()
    return path


def _register(kassa, path: Path, stage: str) -> str:
    return kassa.model_registry.register(
        PLACEMENT, path, schema_hash=kassa.schema_hash(PLACEMENT), learner_args="--cb_explore_adf", source="batch",
        stage=stage, metrics={"learned": 400, "rewarded_decisions": 400}).version  # type: ignore[arg-type]


def _traffic(client, kassa, clock, n: int, seed: int) -> str:
    """``n`` decisions, the first offer accepted with its appeal; every reward window closed, both logs flushed."""
    rng = random.Random(seed)
    for i in range(n):
        d = client.post("/v1/decisions", json=decision_body(customer=f"c{i}", order=order())).json()
        top = d["offers"][0]["offer_id"]
        if rng.random() < APPEAL[top]:
            client.post("/v1/events", json={"events": [{"event_id": f"e{i}", "type": "accept",
                                                        "decision_id": d["decision_id"], "offer_id": top}]})
        clock.advance(1)
        if i % 200 == 0:
            kassa.shadow.drain(1000)
    kassa.shadow.drain(100_000)
    clock.advance(120)
    kassa.decision_log.flush()
    kassa.shadow_log.flush()
    return str(kassa.settings.data_path)


def _truth(data_dir: str, version: str) -> float:
    """The shadow's true top-slot value on what it scored: its own logged distribution times the appeal."""
    rows = read_decisions(Path(data_dir) / "shadow", PLACEMENT).to_pylist()
    values = [sum(p * APPEAL[c] for c, p in zip(r["candidates"], r["probabilities"], strict=True))
              for r in rows if r["model_version"] == version]
    return sum(values) / len(values)


def test_a_shadow_of_the_production_model_agrees_and_estimates_the_served_mean(client, kassa, clock, tmp_path):
    _stop_the_learning_task(client, kassa)
    path = _model_preferring(kassa, tmp_path, "good", "warranty")
    production = _register(kassa, path, "candidate")
    promote_version(kassa.model_registry, production, "production", force=True)
    twin = _register(kassa, path, "shadow")  # the same weights under another version
    kassa.learning.poll()
    data_dir = _traffic(client, kassa, clock, 400, seed=1)
    # Up to now (the wall clock, behind the test's clock): the last minute's reward windows are still open.
    still_open = _json(runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--data-dir", data_dir,
                                           "--json"]))
    assert still_open["rows"] == 340 and still_open["pending"] == 60
    assert still_open["versions"][0]["scored"] == 400 and still_open["versions"][0]["open"] == 60
    until = str(clock())
    result = _json(runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--until", until,
                                       "--data-dir", data_dir, "--json"]))
    assert result["shadow"] is True and result["rows"] == 400 and result["pending"] == 0
    (v,) = result["versions"]
    assert v["version"] == twin and v["scored"] == 400 and v["evaluated"] == 400
    assert v["open"] == v["missed"] == v["outside"] == 0
    assert v["greedy_agreement"] == 1.0  # the same distribution: the same favourite on every decision
    assert v["agreement"] > 0.8  # what each showed first: both sample, so exploration alone can differ
    # Its probability of each served offer is the served one: every weight is 1, IPS is the served mean.
    served = v["served"]
    policy = v["evaluation"]["policies"][twin]
    assert policy["weights"]["mean"] == pytest.approx(1.0) and policy["weights"]["max"] == pytest.approx(1.0)
    for est in ("ips", "snips"):
        assert policy["estimates"][est]["value"] == pytest.approx(served["value"], abs=1e-9), est
    # DR's model term is the expectation over the distribution, its correction the sampled offer's: close.
    assert policy["estimates"]["dr"]["value"] == pytest.approx(served["value"], abs=0.01)
    assert v["estimate"]["name"] == "snips" and v["too_small"] is False
    assert v["estimate"]["ess"] == pytest.approx(400)
    # Read-only: nothing is recorded on the shadow version (the promotion gate reads `kassa evaluate --candidate`).
    assert "evaluation" not in kassa.model_registry.get(twin).metrics
    # The minimum-ESS honesty of `kassa evaluate`.
    small = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--min-ess", "1000",
                                "--until", until, "--data-dir", data_dir, "--json"])
    assert "sample too small" in " ".join(small.output.split())
    assert _json(small)["versions"][0]["too_small"] is True
    # A window of one second: its decision scored, its reward window still open where the window ends.
    first = min(r["ts"] for r in read_decisions(Path(data_dir) / "shadow", PLACEMENT).to_pylist())
    early = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--since", str(first),
                                "--until", str(first + 1), "--data-dir", data_dir])
    assert early.exit_code == 1 and "too few closed decisions" in " ".join(early.output.split()), early.output
    table = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--data-dir", data_dir])
    assert table.exit_code == 0 and twin in table.output and "favourite" in table.output


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    """The test catalog with the baseline exploring half the time, so a shadow unlike it still has overlap."""
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG.replace("  - id: order_confirmation\n    slots: 3\n",
                                    "  - id: order_confirmation\n    slots: 3\n    exploration: 0.5\n", 1))
    return path


def test_a_shadow_preferring_a_bad_offer_estimates_lower_and_covers_its_truth(client, kassa, clock, tmp_path):
    _stop_the_learning_task(client, kassa)
    bad = _register(kassa, _model_preferring(kassa, tmp_path, "bad", "partner-us"), "shadow")
    kassa.learning.poll()
    data_dir = _traffic(client, kassa, clock, 1500, seed=2)
    result = _json(runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--since", "0",
                                       "--until", str(clock()), "--data-dir", data_dir, "--json"]))
    (v,) = result["versions"]
    assert v["version"] == bad and v["evaluated"] == 1500
    truth = _truth(data_dir, bad)
    served = v["served"]
    assert truth < 0.1 < served["ci_low"]  # the bad offer's appeal is 0.02; the baseline serves better
    assert v["agreement"] < 0.5
    for name in ("ips", "snips", "dr"):
        est = v["evaluation"]["policies"][bad]["estimates"][name]
        assert est["ci_low"] <= truth <= est["ci_high"], (name, est, truth)
        assert est["ci_high"] < served["ci_low"], (name, est, served)
    assert v["estimate"]["ess"] >= 100 and v["too_small"] is False


def test_no_shadow_log_says_how_to_put_a_model_in_shadow(client, kassa, clock):
    data_dir = _traffic(client, kassa, clock, 5, seed=3)
    result = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--data-dir", data_dir])
    text = " ".join(result.output.split())
    assert result.exit_code == 1, text
    assert "no shadow decisions for order_confirmation" in text and "kassa models promote VERSION --to shadow" in text
    assert "in the window from the first logged decision to now" in text  # was "the window the start .. now"
    assert "Traceback" not in text
    unknown = runner.invoke(app, ["evaluate", "--placement", "nope", "--shadow", "--data-dir", data_dir])
    assert unknown.exit_code == 2 and "unknown placement 'nope'" in " ".join(unknown.output.split())
    both = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--shadow", "--candidate", "x@1",
                               "--data-dir", data_dir])
    assert both.exit_code == 2 and "--candidate does not apply to --shadow" in " ".join(both.output.split())
    neither = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--data-dir", data_dir])
    assert neither.exit_code == 2 and "or --shadow" in " ".join(neither.output.split())


def test_each_shadow_version_counts_what_it_scored_missed_and_was_not_there_for():
    """Two versions in shadow one after the other over ten closed served decisions: the first dropped one while
    it was in shadow; a shadow row whose served decision is not closed counts as open."""
    import pyarrow as pa

    from kassa.learn.offline.dataset import LoggedDecisions
    from kassa.learn.offline.shadow_eval import evaluate_shadow

    data = LoggedDecisions(PLACEMENT)
    for i in range(10):
        data.decision_ids.append(f"d{i}")
        data.ts.append(float(i))
        data.candidates.append(["a", "b"])
        data.probabilities.append([0.5, 0.5])
        data.chosen.append(["a" if i % 2 else "b"])
        data.chosen_probabilities.append([0.5])
        data.rewards.append([float(i % 2)])
    rows = [{"decision_id": f"d{i}", "ts": float(i), "model_version": "p@1", "candidates": ["a", "b"],
             "probabilities": [1.0, 0.0], "chosen": ["a"]} for i in (2, 3, 5, 6)]
    rows.append({"decision_id": "d10", "ts": 10.0, "model_version": "p@2", "candidates": ["a", "b"],
                 "probabilities": [0.0, 1.0], "chosen": ["b"]})
    rows += [{"decision_id": f"d{i}", "ts": float(i), "model_version": "p@2", "candidates": ["a", "b"],
              "probabilities": [0.0, 1.0], "chosen": ["b"]} for i in (7, 8, 9)]
    first, second = evaluate_shadow(data, pa.Table.from_pylist(rows))
    assert (first.version, first.scored, first.evaluated, first.open, first.missed, first.outside) == \
        ("p@1", 4, 4, 0, 1, 5)
    assert (second.version, second.scored, second.evaluated, second.open, second.missed, second.outside) == \
        ("p@2", 4, 3, 1, 0, 7)
    # p@1 always shows "a" (rewarded on odd rows): of its rows d3 and d5 showed "a", both rewarded.
    assert first.agreement == 0.5 and first.evaluation is not None
    assert first.evaluation.estimate("p@1", "snips").value == pytest.approx(1.0)
    assert second.evaluation is not None and second.evaluation.estimate("p@2", "snips").value == pytest.approx(0.0)
