"""The numpy serving copy of a VW model (`kassa.learn.serving`) gives VW's own probabilities."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import vowpalwabbit

from kassa import schemas
from kassa.db import make_engine
from kassa.learn.online.learner import OnlineLearner, vw_args
from kassa.learn.registry import ModelRegistry
from kassa.learn.serving.hashing import hashing
from kassa.learn.serving.linear import LinearModel
from kassa.learn.serving.loader import load_serving
from kassa.learn.serving.sidecar import (
    SidecarError,
    UnsupportedModel,
    export,
    export_live,
    read_sidecar,
    sidecar_path,
    spec_from_args,
)
from kassa.learn.serving.vw import VWModel

LT = vowpalwabbit.LabelType.CONTEXTUAL_BANDIT
N_OFFERS = 30


def context(rng: random.Random) -> str:
    toks = [f"country={rng.choice('ABCD')}", f"device={rng.choice(['m', 'd'])}", f"basket:{rng.random() * 300:.4g}",
            "7", f"items:{rng.randint(1, 9)}"]  # "7": VW hashes all-digit names as numbers
    return "shared |c " + " ".join(toks) + f" |d repeat={rng.random() < 0.3}"


def action(i: int) -> str:
    return f" |o id=o{i} kind=k{i % 3} 42 |f price:{(i % 7) * 1.5 + 0.5:.3g} |g pop={i % 2}"


def train(args: str, path: Path, n: int = 2000, seed: int = 3) -> tuple[vowpalwabbit.Workspace, int]:
    ws = vowpalwabbit.Workspace(f"--cb_explore_adf {args} --quiet", enable_logging=False)
    rng = random.Random(seed)
    for _ in range(n):
        i = rng.randrange(N_OFFERS)
        cost = -float(rng.random() < 0.05 + 0.03 * (i % 5))
        ex = ws.parse([context(rng), f"0:{cost}:0.1" + action(i)], LT)
        ws.learn(ex)
        ws.finish_example(ex)
    ws.save(str(path))
    return ws, n


def max_difference(a: LinearModel, b: VWModel, trials: int = 150, seed: int = 7) -> float:
    rng = random.Random(seed)
    worst = 0.0
    for _ in range(trials):
        cands = rng.sample(range(N_OFFERS), rng.randint(1, N_OFFERS))
        shared, lines = context(rng), [action(i) for i in cands]
        pa, pb = np.array(a.pmf(shared, lines)), np.array(b.pmf(shared, lines))
        assert pa.shape == pb.shape
        assert abs(pa.sum() - 1.0) < 1e-6
        worst = max(worst, float(np.abs(pa - pb).max()))
    return worst


@pytest.mark.parametrize("args", [
    "--squarecb -q co -b 20",
    "--squarecb --gamma_scale 1000 -q co -b 18",
    "--epsilon 0.2 -q co -b 18",
    "--softmax --lambda 2 -q co -b 20",
    "--squarecb -q co -l 5 -b 18",  # overshooting weights: scores outside the label range are not clipped
    "--squarecb -q oc -q cg -b 18",  # action namespace first; two interactions
    "--squarecb -q cd -q og -b 18",  # shared x shared and action x action
    "--squarecb -q co -q dg -b 18",  # two shared x action crosses
    "--squarecb -q co -q dg --ignore_linear d -b 18",  # Kassa's ``-q co -q bk --ignore_linear b``
    "--squarecb --noconstant -q co -b 16",
])
def test_probabilities_equal_vw(tmp_path: Path, args: str) -> None:
    path = tmp_path / "m.vw"
    ws, n = train(args, path)
    ws.finish()
    export(path)
    linear, vw = LinearModel.open(path, "v1"), VWModel(path, "v1")
    assert linear.spec.counter == (n if "squarecb" in args else 0)
    assert max_difference(linear, vw) < 2e-6


def test_untrained_model_ties_break_like_vw(tmp_path: Path) -> None:
    for args in ("--squarecb -q co", "--epsilon 0.1 -q co", "--softmax -q co"):
        path = tmp_path / "fresh.vw"
        ws = vowpalwabbit.Workspace(f"--cb_explore_adf {args} --quiet", enable_logging=False)
        ws.save(str(path))
        ws.finish()
        export(path)
        assert max_difference(LinearModel.open(path, "f"), VWModel(path, "f"), trials=20) < 1e-6


def test_learner_snapshot_writes_the_same_sidecar_as_a_file_export(tmp_path: Path) -> None:
    placement = schemas.Placement(id="p")
    learner = OnlineLearner(placement, tmp_path / "online")
    rng = random.Random(1)
    for _ in range(500):
        learner.learn(context(rng), action(rng.randrange(N_OFFERS)), float(rng.random() < 0.2), 0.1)
    path, _ = learner.snapshot()
    live = read_sidecar(sidecar_path(path))
    exported = read_sidecar(export(path, tmp_path / "again.lin"))
    assert live[0] == exported[0] and live[0].counter == 500
    assert np.array_equal(live[1], exported[1]) and np.array_equal(live[2], exported[2])
    # A learner restarted from that snapshot continues VW's counter, so its next sidecar is right too.
    again = OnlineLearner(placement, tmp_path / "online")
    assert again.counter == 500
    again.learn(context(rng), action(1), 1.0, 0.5)
    path2, _ = again.snapshot()
    assert read_sidecar(sidecar_path(path2))[0].counter == 501
    assert max_difference(LinearModel.open(path2, "x"), VWModel(path2, "x"), trials=30) < 2e-6


def test_models_of_different_widths_hash_apart(tmp_path: Path) -> None:
    # VW masks feature hashes to the table's bits before crossing them: one hashing per width.
    for bits in (16, 20, 18):
        path = tmp_path / f"b{bits}.vw"
        train(f"--squarecb -q co -b {bits}", path, n=800)[0].finish()
        export(path)
        assert max_difference(LinearModel.open(path, "b"), VWModel(path, "b"), trials=30) < 2e-6


def test_corrupt_or_foreign_sidecar_is_rebuilt_from_the_artifact(tmp_path: Path) -> None:
    a, b = tmp_path / "a.vw", tmp_path / "b.vw"
    train("--squarecb -q co", a, n=300, seed=1)[0].finish()
    train("--squarecb -q co", b, n=300, seed=2)[0].finish()
    export(a)
    export(b)
    from kassa.learn.registry import sha256_file

    sha_a = sha256_file(a)
    data = bytearray(sidecar_path(a).read_bytes())
    data[-3] ^= 0xFF
    sidecar_path(a).write_bytes(bytes(data))
    with pytest.raises(SidecarError, match="checksum"):
        read_sidecar(sidecar_path(a))
    model = load_serving(a, "a", source_sha256=sha_a)
    assert isinstance(model, LinearModel)
    read_sidecar(sidecar_path(a), sha_a)  # rebuilt and valid again

    sidecar_path(a).write_bytes(sidecar_path(b).read_bytes())  # b's weights next to a
    with pytest.raises(SidecarError, match="another artifact"):
        read_sidecar(sidecar_path(a), sha_a)
    model = load_serving(a, "a", source_sha256=sha_a)
    assert isinstance(model, LinearModel)
    assert max_difference(model, VWModel(a, "a"), trials=20) < 2e-6

    sidecar_path(a).write_bytes(b"not a model")
    with pytest.raises(SidecarError, match="not a Kassa linear model"):
        read_sidecar(sidecar_path(a))
    sidecar_path(a).unlink()
    assert isinstance(load_serving(a, "a", source_sha256=sha_a), LinearModel)


def test_settings_the_scorer_does_not_cover_are_served_by_vw(tmp_path: Path) -> None:
    path = tmp_path / "elim.vw"
    train("--squarecb --elim -q co", path, n=300)[0].finish()
    with pytest.raises(UnsupportedModel, match="elim"):
        export(path)
    model = load_serving(path, "elim")
    assert isinstance(model, VWModel)
    rng = random.Random(2)
    assert len(model.pmf(context(rng), [action(1), action(2)])) == 2


def test_spec_from_args() -> None:
    spec = spec_from_args("--bit_precision 20 --cb_adf --cb_explore_adf --cb_type mtr --csoaa_ldf multiline "
                          "--csoaa_rank --gamma_scale 10 --learning_rate 0.5 --quadratic co --squarecb", 42)
    assert (spec.bits, spec.quadratic, spec.policy, spec.counter, spec.gamma_scale) == (20, (("c", "o"),),
                                                                                         "squarecb", 42, 10.0)
    assert spec_from_args("--cb_explore_adf --epsilon 0.3 -b 18", None).policy == "epsilon"
    with pytest.raises(UnsupportedModel, match="cubic"):
        spec_from_args("--cb_explore_adf --squarecb --cubic abc", 1)
    with pytest.raises(UnsupportedModel, match="two different namespaces"):
        spec_from_args("--cb_explore_adf --squarecb --quadratic cc", 1)
    with pytest.raises(UnsupportedModel, match="counter"):
        spec_from_args("--cb_explore_adf --squarecb --quadratic co", None)
    with pytest.raises(UnsupportedModel, match="hash"):
        spec_from_args("--cb_explore_adf --squarecb --hash all", 1)


def test_registry_stores_and_prunes_the_sidecar(tmp_path: Path) -> None:
    placement = schemas.Placement(id="p")
    registry = ModelRegistry(make_engine(tmp_path / "kassa.db"), tmp_path / "models")
    path = tmp_path / "batch.vw"
    train(vw_args(placement), path, n=200)[0].finish()  # no sidecar yet: the registry exports one
    mv = registry.register("p", path, schema_hash="s", learner_args=vw_args(placement), source="online")
    stored = registry.path(mv)
    spec, _, _ = read_sidecar(sidecar_path(stored), mv.sha256)
    assert spec.counter == 200
    for _ in range(3):
        registry.register("p", path, schema_hash="s", learner_args="", source="online")
    assert registry.prune("p", keep=1) == 3
    assert not stored.exists() and not sidecar_path(stored).exists()


def test_swap_loads_without_vw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a registered version for serving reads its sidecar only: VW is never asked to load it."""
    placement = schemas.Placement(id="p")
    registry = ModelRegistry(make_engine(tmp_path / "kassa.db"), tmp_path / "models")
    path = tmp_path / "m.vw"
    train(vw_args(placement), path, n=200)[0].finish()
    mv = registry.register("p", path, schema_hash="s", learner_args="", source="batch")

    hashing(20)  # the process's one hashing workspace for this width exists from the first model on

    def no_vw(*_a: object, **_k: object) -> None:
        raise AssertionError("VW loaded a model during a swap")

    monkeypatch.setattr(vowpalwabbit, "Workspace", no_vw)
    model = load_serving(registry.verify(mv, "s"), mv.version, {}, mv.sha256)
    assert isinstance(model, LinearModel) and model.version == mv.version


def test_live_export_refuses_what_it_cannot_serve(tmp_path: Path) -> None:
    path = tmp_path / "x.vw"
    ws, n = train("--squarecb --elim -q co", path, n=50)
    with pytest.raises(UnsupportedModel):
        export_live(ws, n, path)
    ws.finish()


def test_action_tables_grow_and_reset_without_changing_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Action lines of different widths, more than the tables' first capacity, and a reset when the
    process has seen too many distinct lines: the probabilities stay VW's."""
    import kassa.learn.serving.hashing as hashing_module

    path = tmp_path / "m.vw"
    train("--squarecb -q co -b 18", path, n=600)[0].finish()
    export(path)
    model, vw = LinearModel.open(path, "m"), VWModel(path, "m")
    rng = random.Random(5)
    lines = [f" |o id=w{i} " + " ".join(f"t{j}=x{i % (j + 2)}" for j in range(i % 9)) + f" |f p:{i % 7 + 1}"
             for i in range(150)]
    hashing_ = model._hashing
    monkeypatch.setattr(hashing_module, "_MAX_CACHED", len(hashing_.action_ids) + 100)
    for trial in range(60):
        shared = context(rng)
        cands = rng.sample(lines, rng.randint(1, 40))
        a, b = np.array(model.pmf(shared, cands)), np.array(vw.pmf(shared, cands))
        assert np.abs(a - b).max() < 2e-6, trial
    assert hashing_.generation >= 1  # the tables started afresh at least once on the way


def test_the_online_learner_learns_exactly_what_pyvw_parse_and_learn_would(tmp_path: Path) -> None:
    # OnlineLearner.learn skips pyvw's Python Example wrappers (CPU in `kassa learn`); the model must not change.
    placement = schemas.Placement(id="p")
    learner = OnlineLearner(placement, tmp_path / "online")
    reference = vowpalwabbit.Workspace(learner.args, enable_logging=False)
    rng = random.Random(3)
    for i in range(400):
        shared, act = context(rng), action(rng.randrange(N_OFFERS)) + (f" |s slot={i % 3}" if i % 3 else "")
        reward, p = float(rng.random() < 0.3), rng.uniform(0.05, 1.0)
        learner.learn(shared, act, reward, p)
        cost = -reward / learner.scale.scale  # fixed weights: the scale never changes
        # unweighted: the label carries probability 1 whatever the offer was shown with (ADR 0010)
        ex = reference.parse([shared, f"0:{cost:.6g}:1{act}"], vowpalwabbit.LabelType.CONTEXTUAL_BANDIT)
        reference.learn(ex)
        reference.finish_example(ex)
    learner.workspace.save(str(tmp_path / "fast.vw"))
    reference.save(str(tmp_path / "pyvw.vw"))
    reference.finish()
    assert (tmp_path / "fast.vw").read_bytes() == (tmp_path / "pyvw.vw").read_bytes()
