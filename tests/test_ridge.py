"""``regression: ridge`` (`kassa.learn.online.ridge`): the online learner's snapshot is the exact least-squares
fit of what it learned, the same model in the VW file and in the served sidecar, and a restart continues it."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import numpy as np
import pytest

from kassa import schemas
from kassa.learn.online.learner import OnlineLearner
from kassa.learn.online.ridge import SUFFIX
from kassa.learn.serving.linear import LinearModel
from kassa.learn.serving.sidecar import read_sidecar, sidecar_path
from kassa.learn.serving.vw import VWModel
from tests.test_linear import N_OFFERS, action, context, max_difference


def _stream(n: int, seed: int = 4) -> list[tuple[str, str, float]]:
    """Examples whose reward depends on the offer and the country, with noise."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shared, i = context(rng), rng.randrange(N_OFFERS)
        p = 0.1 + 0.6 * (i % 5 == 0) + 0.2 * ("country=A" in shared and i % 2 == 0)
        out.append((shared, action(i), float(rng.random() < p)))
    return out


def _objective(model: LinearModel, examples: list[tuple[str, str, float]], lam: float) -> float:
    """Squared error of the served model on the learned labels (costs: -reward), plus lam x |w|^2."""
    pred = np.array([model.scores(s, [a])[0] for s, a, _ in examples], dtype=np.float64)
    y = np.array([-r for _, _, r in examples])
    return float(((pred - y) ** 2).sum() + lam * np.square(model.w.astype(np.float64)).sum())


def _learned(tmp: Path, regression: str, examples: list[tuple[str, str, float]]) -> tuple[OnlineLearner, Path]:
    learner = OnlineLearner(schemas.Placement(id="p", regression=regression), tmp)  # type: ignore[arg-type]
    for shared, act, r in examples:
        learner.learn(shared, act, r, 0.1)
    return learner, learner.snapshot()[0]


def test_a_ridge_snapshot_is_the_exact_fit_and_vw_serves_the_same_model(tmp_path: Path) -> None:
    examples = _stream(1500)
    _, online = _learned(tmp_path / "online", "online", examples)
    learner, exact = _learned(tmp_path / "ridge", "ridge", examples)
    served, vw = LinearModel.open(exact, "r"), VWModel(exact, "r")
    assert max_difference(served, vw, trials=40) < 2e-5  # the weights went into VW's file, not only the sidecar
    assert read_sidecar(sidecar_path(exact))[0].counter == 1500
    # Optimal along its own direction (w . gradient = 0): predictions from the scorer, |w| from the sidecar.
    pred = np.array([served.scores(s, [a])[0] for s, a, _ in examples], dtype=np.float64)
    y = np.array([-r for _, _, r in examples])
    w2 = float(np.square(served.w.astype(np.float64)).sum())
    assert abs(float(pred @ (pred - y)) + w2) < 1e-3 * float(y @ y)
    # ... so no other weights fit the same examples better, VW's online pass included
    assert _objective(served, examples, 1.0) < _objective(LinearModel.open(online, "o"), examples, 1.0)
    assert learner.ridge is not None and exact.with_suffix(SUFFIX).exists()
    meta = msgspec.json.decode(exact.with_suffix(".json").read_bytes())
    assert meta["regression"] == "ridge" and meta["ridge_exact"] is True and meta["ridge_terms"] > N_OFFERS


def test_a_restarted_ridge_learner_continues_the_same_fit(tmp_path: Path) -> None:
    examples = _stream(1200, seed=9)
    _, whole = _learned(tmp_path / "whole", "ridge", examples)
    first, _ = _learned(tmp_path / "parts", "ridge", examples[:700])
    del first
    again = OnlineLearner(schemas.Placement(id="p", regression="ridge"), tmp_path / "parts")
    assert again.ridge is not None and again.ridge.n == 700
    for shared, act, r in examples[700:]:
        again.learn(shared, act, r, 0.1)
    parts = again.snapshot()[0]
    rng = random.Random(2)
    for _ in range(20):
        shared, lines = context(rng), [action(i) for i in range(N_OFFERS)]
        np.testing.assert_allclose(LinearModel.open(parts, "a").scores(shared, lines),
                                   LinearModel.open(whole, "b").scores(shared, lines), atol=1e-5)


def test_until_warm_the_online_weights_serve(tmp_path: Path) -> None:
    learner, path = _learned(tmp_path, "ridge", _stream(10))
    meta = msgspec.json.decode(path.with_suffix(".json").read_bytes())
    assert meta["ridge_exact"] is False and learner.ridge is not None and learner.ridge.n == 10


def test_an_unknown_regression_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="regression"):
        msgspec.convert({"id": "p", "regression": "lasso"}, schemas.Placement)


def test_with_a_half_life_older_examples_weigh_less(tmp_path: Path) -> None:
    examples = _stream(1300, seed=6)
    learner = OnlineLearner(schemas.Placement(id="p", regression="ridge", ridge_half_life=300), tmp_path)
    for shared, act, r in examples:
        learner.learn(shared, act, r, 0.1)
    served = LinearModel.open(learner.snapshot()[0], "h")
    pred = np.array([served.scores(s, [a])[0] for s, a, _ in examples], dtype=np.float64)
    y = np.array([-r for _, _, r in examples])
    age = 0.5 ** (np.arange(len(examples) - 1, -1, -1) / 300.0)  # the newest weighs 1
    w2 = float(np.square(served.w.astype(np.float64)).sum())
    # the weighted fit's optimality along its own direction; the unweighted condition does not hold
    assert abs(float((age * pred) @ (pred - y)) + w2) < 1e-3 * float(age @ (y * y))
    assert abs(float(pred @ (pred - y)) + w2) > 1e-2 * float(y @ y)


def test_a_feature_repeated_in_a_line_counts_as_its_sum(tmp_path: Path) -> None:
    # VW adds a repeated feature's values on one weight; the normal equations must see x = 2, not two x = 1 terms
    examples = [(s, a.replace(" |o id=", " |o dup dup id="), r) for s, a, r in _stream(800, seed=3)]
    learner = OnlineLearner(schemas.Placement(id="p", regression="ridge"), tmp_path)
    for shared, act, r in examples:
        learner.learn(shared, act, r, 0.1)
    served = LinearModel.open(learner.snapshot()[0], "d")
    pred = np.array([served.scores(s, [a])[0] for s, a, _ in examples], dtype=np.float64)
    y = np.array([-r for _, _, r in examples])
    w2 = float(np.square(served.w.astype(np.float64)).sum())
    assert abs(float(pred @ (pred - y)) + w2) < 1e-3 * float(y @ y)


@pytest.mark.parametrize("content", [b"not a numpy file", b"PK\x03\x04 truncated zip"])
def test_an_unreadable_ridge_state_starts_the_fit_again(tmp_path: Path, content: bytes,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    _, path = _learned(tmp_path, "ridge", _stream(300))
    path.with_suffix(SUFFIX).write_bytes(content)
    again = OnlineLearner(schemas.Placement(id="p", regression="ridge"), tmp_path)
    assert again.ridge is not None and again.ridge.n == 0 and again.learned == 300
    assert "ridge state" in caplog.text and "unreadable" in caplog.text
