"""`kassa evaluate --slate`: the pseudo-inverse estimate of the whole slate, from a data dir a live server wrote."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kassa.cli import app
from tests.conftest import CATALOG, decision_body, order

runner = CliRunner()
PLACEMENT = "order_confirmation"
# The simulated buyer: P(accept) = the offer's appeal x the slot's examination (position bias); a slate's
# reward (accepts over its slots) is additive over (slot, offer), as the pseudo-inverse estimator assumes.
APPEAL = {"warranty": 0.55, "partner-us": 0.05, "discount": 0.3, "no-beauty": 0.1, "serum-upsell": 0.2}
EXAMINATION = (1.0, 0.7, 0.5)


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _log(client, kassa, clock, n: int, seed: int) -> str:
    rng = random.Random(seed)
    for i in range(n):
        d = client.post("/v1/decisions", json=decision_body(customer=f"c{i}", order=order())).json()
        did = d["decision_id"]
        events = [{"event_id": f"e{i}-{j}", "type": "accept", "decision_id": did, "offer_id": o["offer_id"]}
                  for j, o in enumerate(d["offers"]) if rng.random() < APPEAL[o["offer_id"]] * EXAMINATION[j]]
        if events:
            client.post("/v1/events", json={"events": events})
        clock.advance(1)
    clock.advance(120)
    kassa.decision_log.flush()
    return str(kassa.settings.data_path)


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    """The test catalog with order_confirmation logging uniformly (`policy: uniform`): 3 random slots."""
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG.replace("  - id: order_confirmation\n    slots: 3\n",
                                    "  - id: order_confirmation\n    slots: 3\n    policy: uniform\n", 1))
    return path


def test_slate_estimate_covers_the_simulators_truth(client, kassa, clock):
    data_dir = _log(client, kassa, clock, 2400, seed=3)
    trained = _json(runner.invoke(app, ["train", "--placement", PLACEMENT, "--holdout", "0.5", "--data-dir",
                                        data_dir, "--json"]))
    version = trained["version"]
    result = _json(runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--candidate", version,
                                       "--baseline", "none", "--slate", "--data-dir", data_dir, "--json"]))
    rows = result["rows"]
    assert result["slots"] == 3 and rows > 1000 and sum(result["left_out"].values()) == 0
    pi = result["evaluation"]["policies"][version]["estimates"]["pseudo_inverse"]
    logged = result["evaluation"]["policies"]["logged"]["estimates"]["on_policy"]

    # The truth: the candidate's own slate on each held-out row, valued with the simulator's probabilities.
    from kassa.learn.offline.dataset import load_logged
    from kassa.learn.offline.evaluate import slates, uniform_slate_rows

    snap = kassa.catalog.snapshot
    registry = kassa.model_registry
    mv = registry.get(version)
    data = load_logged(Path(data_dir), snap.placements[PLACEMENT].placement, lambda o: o, mv.train_until, None)
    found = uniform_slate_rows(data, 3)
    assert len(found.rows) == rows
    target = slates(registry.path(mv), data, snap, found.rows, 3, workers=1)
    truth = float(np.mean([sum(APPEAL[data.candidates[i][k]] * e for k, e in zip(t, EXAMINATION, strict=True))
                           for i, t in zip(found.rows, target, strict=True)]))
    uniform_value = float(np.mean(list(APPEAL.values()))) * sum(EXAMINATION)
    assert pi["ci_low"] <= truth <= pi["ci_high"], (pi, truth)
    # Beside PI, the per-slot DR estimate (each slot's own reward, a cross-fitted model of it by offer): it
    # covers the truth too, with a narrower interval (about half as wide here).
    slot = result["evaluation"]["policies"][version]["estimates"]["slot_dr"]
    assert slot["ci_low"] <= truth <= slot["ci_high"], (slot, truth)
    assert slot["ci_high"] - slot["ci_low"] < 0.7 * (pi["ci_high"] - pi["ci_low"]), (slot, pi)
    # ~1,200 rows of 5 candidates: the interval is wide (half-width ~0.17 on a truth of 0.72) but informative.
    assert pi["ci_high"] - pi["ci_low"] < 0.5 * truth, pi
    # The logged policy's mean slate reward is the uniform logger's value; the candidate learned to do better.
    assert logged["ci_low"] <= uniform_value <= logged["ci_high"], (logged, uniform_value)
    assert truth > uniform_value * 1.2
    assert pi["ess"] >= 100 and "below the minimum" not in result["gate"]["reason"]
    shown = registry.get(version).metrics["slate_evaluation"]
    assert shown["estimator"] == "pseudo_inverse" and shown["rows"] == rows
    assert shown["candidate_slot_estimate"]["name"] == "slot_dr" and shown["candidate_slot_estimate"]["n"] == rows
    # The min-ESS rule of the top-slot evaluation: below it, the estimate is flagged as no basis for promotion.
    small = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--candidate", version, "--baseline", "none",
                                "--slate", "--min-ess", "5000", "--data-dir", data_dir, "--json"])
    assert "sample too small" in " ".join(small.output.split())
    assert "below the minimum 5000" in _json(small)["gate"]["reason"]
    # Against another version the gate compares the two PI estimates (the same data trained twice: no better).
    again = _json(runner.invoke(app, ["train", "--placement", PLACEMENT, "--holdout", "0.5", "--data-dir",
                                      data_dir, "--json"]))["version"]
    gated = _json(runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--candidate", again, "--baseline",
                                      version, "--slate", "--data-dir", data_dir, "--json"]))
    assert {again, version, "logged"} == set(gated["evaluation"]["policies"])
    assert gated["gate"]["passed"] is False and "candidate lower bound" in gated["gate"]["reason"]


def test_slate_refused_without_uniform_logging(tmp_path, settings, clock):
    """The standard catalog logs order_confirmation with the baseline's epsilon-greedy ranking, not uniformly:
    PI has nothing to stand on and the command says so."""
    from starlette.testclient import TestClient

    from kassa.api.app import create_app
    from kassa.app import Kassa
    from tests.conftest import PUB

    (tmp_path / "catalog.yaml").write_text(CATALOG)
    kassa = Kassa(settings, clock=clock, seed=7)
    with TestClient(create_app(kassa), headers={"Authorization": f"Bearer {PUB}"}) as client:
        data_dir = _log(client, kassa, clock, 300, seed=4)
    version = _json(runner.invoke(app, ["train", "--placement", PLACEMENT, "--holdout", "0.5", "--data-dir",
                                        data_dir, "--json"]))["version"]
    refused = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--candidate", version, "--baseline", "none",
                                  "--slate", "--data-dir", data_dir])
    text = " ".join(refused.output.split())
    assert refused.exit_code == 1, text
    assert "no slate to evaluate" in text and "not uniform" in text and "policy: uniform" in text
    both = runner.invoke(app, ["evaluate", "--placement", PLACEMENT, "--candidate", version, "--slate", "--promote",
                               "--data-dir", data_dir])
    assert both.exit_code != 0 and "--promote applies to the top-slot evaluation" in " ".join(both.output.split())


def test_slate_with_one_qualifying_decision_says_an_interval_needs_two(client, kassa, clock):
    """Two closed decisions pass the command's own check, but PI reads only the uniformly logged ones: one of
    them was an OPEInputError traceback ("need at least 2 logged rows")."""
    from kassa.learn.offline.dataset import load_logged
    from kassa.learn.offline.evaluate import NoUniformRows, evaluate_slates

    data_dir = _log(client, kassa, clock, 100, seed=5)  # the last 60 s still open: ~40 closed
    version = _json(runner.invoke(app, ["train", "--placement", PLACEMENT, "--holdout", "0.5", "--data-dir",
                                        data_dir, "--json"]))["version"]
    snap, registry = kassa.catalog.snapshot, kassa.model_registry
    mv = registry.get(version)
    data = load_logged(Path(data_dir), snap.placements[PLACEMENT].placement, lambda o: o, mv.train_until, None)
    assert len(data) >= 2
    data.fallback[1:] = [True] * (len(data) - 1)  # a fallback answer is left out: one uniform slate is left
    with pytest.raises(NoUniformRows, match=r"only 1 of the \d+ decisions .* an interval needs at least 2"):
        evaluate_slates(data, snap, (version, registry.path(mv)), None, 3, workers=1)
