"""`kassa demo`: a small headless run end to end over real HTTP, and the honesty of its controls."""

from __future__ import annotations

import json
import logging
import random
import signal
import socket
from pathlib import Path

import msgspec
import pytest

from kassa import schemas
from kassa.demo.run import run_demo
from kassa.demo.simulator import SLICES, World, decision_request, order_event, outcome_events
from kassa.demo.store import PLACEMENTS, POLICY, SLOTS, STATIC, DemoStore
from kassa.learn.cli import context
from tests.signals import kassa_env, stop_when


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def world() -> World:
    return World(DemoStore.build(5), 5)


@pytest.fixture(scope="module")
def best_order(world: World) -> list[str]:
    return world.best_static_order()


def test_small_headless_run_reports_sane_numbers(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture, best_order: list[str]) -> None:
    caplog.set_level(logging.INFO)  # as `kassa` runs: the root logger at INFO
    n = 1_500
    result = run_demo(headless=True, checkouts=n, seed=5, json_out=True, port=free_port(),
                      data_dir=str(tmp_path / "demo"), keep_serving=False)

    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # --json: the last stdout line
    assert printed == result
    for key in ("checkouts", "policy_reward_rate", "random_reward_rate", "best_static_reward_rate",
                "policy_reward_rate_overall", "random_reward_rate_overall", "best_static_reward_rate_overall",
                "lift_vs_random", "lift_vs_static", "p50_ms", "p99_ms", "client_p50_ms", "client_p99_ms",
                "decisions_per_s", "seconds", "model_version", "seed"):
        assert key in result, key
    assert result["checkouts"] == n and result["seed"] == 5 and result["policy"] == "squarecb"
    assert sum(result["slice_checkouts"].values()) == n  # fewer than 5,000: the window is the whole run
    assert all(result["slice_checkouts"][s] > 0 for s in SLICES)
    for key in ("policy_reward_rate", "random_reward_rate", "best_static_reward_rate",
                "policy_expected_rate", "random_expected_rate", "best_static_expected_rate"):
        assert 0.0 <= result[key] <= SLOTS, key
    assert result["p99_ms"] >= result["p50_ms"] > 0
    assert result["client_p99_ms"] >= result["client_p50_ms"] > 0
    assert result["decisions_per_s"] > 0 and result["seconds"] > 0
    # The placement's production version at the end (it was the last decision's: older, or "baseline")
    production = context(None, str(tmp_path / "demo")).registry.serving()[POLICY].production
    assert production is not None and result["model_version"] == production.version
    assert result["learned_examples"] > 0  # rewards were joined within the wait and learned
    # Creating the demo's fresh database printed five alembic lines before anything else (a first impression)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("alembic")]

    # The run's catalog gives the static control the ground truth's best order.
    catalog = msgspec.json.decode((tmp_path / "demo" / "demo-catalog.json").read_bytes(),
                                  type=schemas.CatalogFile)
    static = next(p for p in catalog.placements if p.id == STATIC)
    assert static.offers == result["static_order"] == best_order


def test_static_control_lists_offers_in_the_ground_truths_best_order(world: World, best_order: list[str]) -> None:
    order = best_order
    placements = {p.id: p for p in world.store.placements(order)}
    assert set(placements) == set(PLACEMENTS)
    static = placements[STATIC]
    assert static.offers == order
    assert (static.policy, static.baseline, static.exploration) == ("baseline", "listed", 0.0)
    # Same candidate sources for every slice: listed offers plus the same product retrieval.
    for p in placements.values():
        assert sorted(p.offers or ()) == sorted(world.store.offer_ids)
        assert p.retrieval == placements[POLICY].retrieval and p.slots == SLOTS

    # Best on fresh shoppers too: no single move of one offer, and no simpler ranking, earns more.
    ids = world.store.offer_ids
    p, ok = world.static_matrices(world.checkouts(4_000, stream="test-holdout"))
    idx = [ids.index(o) for o in order]
    best = world.static_value(idx, p, ok)
    tolerance = 0.01 * best  # a holdout sample may disagree on near-ties
    for j in range(len(idx)):
        for k in range(len(idx)):
            moved = idx.copy()
            moved.insert(k, moved.pop(j))
            assert world.static_value(moved, p, ok) <= best + tolerance
    by_value = sorted(range(len(ids)), key=lambda j: -world.offers[ids[j]].value)
    assert world.static_value(by_value, p, ok) < best


def test_shoppers_are_deterministic_and_the_truth_depends_on_context(world: World) -> None:
    a, b = world.checkouts(2_000), world.checkouts(2_000)
    assert [(c.customer_id, c.total, c.slice, c.draws) for c in a] == [(c.customer_id, c.total, c.slice, c.draws)
                                                                      for c in b]
    shares = {s: sum(c.slice == s for c in a) / len(a) for s in SLICES}
    assert 0.75 < shares["policy"] < 0.85 and 0.07 < shares["random"] < 0.13
    assert any(c.prior_orders >= 2 for c in a)  # repeat buyers exist
    assert all(1 <= len(c.items) <= 4 for c in a)

    def mean_p(offer: str, who: list) -> float:
        return sum(world.p_accept(c, offer) for c in who) / len(who)

    skincare = [c for c in a if "skincare" in c.categories]
    others = [c for c in a if not c.categories & {"skincare", "makeup"}]
    assert mean_p("sub-serum", skincare) > 5 * mean_p("sub-serum", others)
    mobile = [c for c in a if c.device == "mobile"]
    desktop = [c for c in a if c.device == "desktop"]
    assert mean_p("partner-app", mobile) > 5 * mean_p("partner-app", desktop)
    assert all(0.0 <= world.p_accept(c, o) <= 1.0 for c in a[:200] for o in world.offers)


def test_wire_payloads_validate_against_the_schemas(world: World) -> None:
    c = next(c for c in world.checkouts(100) if c.customer_id is not None)
    req = decision_request(c, POLICY)
    assert req.order is not None and req.order.total == c.total and req.customer is not None
    events = [order_event(c), *outcome_events("d1", ["sub-serum", "partner-app"], [True, False])]
    batch = msgspec.convert({"events": events}, schemas.EventBatch)
    assert [e.type for e in batch.events] == ["order", "impression", "accept", "impression"]
    assert len({e.event_id for e in batch.events}) == len(batch.events)


@pytest.mark.parametrize(("port", "data_dir", "message"), [
    (70_000, None, "cannot serve the demo on 127.0.0.1:70000 (ports are 0-65535)"),  # was OverflowError
    (0, "file", "as the demo's --data-dir"),  # was FileExistsError
])
def test_a_bad_port_or_data_dir_is_one_line_before_anything_runs(tmp_path: Path, port: int, data_dir: str | None,
                                                                 message: str) -> None:

    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(SystemExit) as exc:
        run_demo(headless=True, checkouts=10, seed=1, json_out=False, port=port,
                 data_dir=str(taken) if data_dir else None, keep_serving=False)
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1


def test_another_learning_policy_serves_the_policy_slice_and_a_non_learning_one_is_refused(
        tmp_path: Path) -> None:
    result = run_demo(headless=True, checkouts=600, seed=3, json_out=False, port=free_port(),
                      data_dir=str(tmp_path / "demo"), keep_serving=False, policy="ucb")
    catalog = msgspec.json.decode((tmp_path / "demo" / "demo-catalog.json").read_bytes(), type=schemas.CatalogFile)
    assert next(p for p in catalog.placements if p.id == POLICY).policy == "ucb" and result["policy"] == "ucb"
    assert result["learned_examples"] > 0
    for bad in ("uniform", "nope"):
        with pytest.raises(SystemExit, match="the demo's policy slice needs a learning policy "
                                             r"\(squarecb, epsilon, softmax, ucb\)"):
            run_demo(headless=True, checkouts=10, seed=1, json_out=False, port=free_port(), data_dir=None,
                     keep_serving=False, policy=bad)


def test_lift_intervals_cover_the_ratio_and_narrow_with_more_checkouts() -> None:
    from kassa.demo.stats import ratio_interval

    rng = random.Random(3)
    small_p = [int(rng.random() < 0.30) for _ in range(400)]
    small_s = [int(rng.random() < 0.20) for _ in range(400)]
    big_p = [int(rng.random() < 0.30) for _ in range(40_000)]
    big_s = [int(rng.random() < 0.20) for _ in range(40_000)]
    small, big = ratio_interval(small_p, small_s), ratio_interval(big_p, big_s)
    assert small is not None and big is not None
    point = (sum(small_p) / 400) / (sum(small_s) / 400)
    assert small[0] < point < small[1]
    assert big[0] < 1.5 < big[1]  # the true ratio 0.30 / 0.20
    assert big[1] - big[0] < (small[1] - small[0]) / 5  # 100x the data: ~10x narrower
    assert ratio_interval([0, 0, 0], [1, 0, 1]) is None  # no accept: no log ratio
    assert ratio_interval([1], [1, 0]) is None


def test_a_run_no_longer_than_its_window_says_the_cold_start_is_in_it() -> None:
    from kassa.demo.stats import Scoreboard
    from kassa.demo.view import COLD_START_NOTE, summary_table

    world = World(DemoStore.build(5), 5)
    rendered = {}
    for n, last in ((600, 5_000), (600, 300)):
        plan = world.checkouts(n, run_id="t-")
        board = Scoreboard(plan)
        for i, c in enumerate(plan):
            board.record(c, accepts=int(i % 3 == 0), expected=0.3, server_ms=1.0, client_ms=2.0, explored=False,
                         model_version="m", fallback=False)
        result = board.result(seed=5, last=last)
        table = summary_table({**result, "model_version": "m"})
        rendered[last] = str(table.caption)
        assert result["window_is_whole_run"] is (last >= n)
        lo, hi = result["lift_vs_static_95"]
        assert lo < result["lift_vs_static"] < hi
    assert COLD_START_NOTE in rendered[5_000] and "95 %" in rendered[5_000]
    assert COLD_START_NOTE not in rendered[300]


def _running(folder: Path) -> bool:
    """The shoppers are checking out: the decision log has flushed a file (every 0.5 s)."""
    return any(folder.glob("**/decisions/**/*.parquet"))


def test_headless_demo_stopped_with_ctrl_c_exits_130_with_the_summary_so_far(tmp_path: Path) -> None:
    # It exited 0, as a finished run does, so a script could not tell; and its summary compared the plan's last
    # 5,000 checkouts, which a stopped run never reached ("-" in every row).
    n = 20_000
    stopped = stop_when(["demo", "--headless", "--checkouts", str(n), "--json", "--exit", "--port", str(free_port()),
                         "--data-dir", str(tmp_path / "d")], lambda: _running(tmp_path / "d"))
    assert stopped.returncode == 130 and "Traceback" not in stopped.err, stopped.err
    assert "interrupted: summarising the checkouts done so far" in stopped.err
    result = json.loads(stopped.out.strip().splitlines()[-1])  # --json: still the last line, flushed
    assert result["interrupted"] is True and 0 < result["checkouts"] < n, result
    assert 0 < sum(result["slice_checkouts"].values()) <= result["last_window"] < n, result
    assert result["policy_reward_rate"] is not None


def test_demo_stopped_with_sigterm_exits_143_and_removes_its_temporary_folder(tmp_path: Path) -> None:
    # SIGTERM killed it outright (status -15): the temporary data folder (its databases, logs and models) stayed.
    stopped = stop_when(["demo", "--headless", "--checkouts", "20000", "--exit", "--port", str(free_port())],
                        lambda: _running(tmp_path), signal.SIGTERM, env=kassa_env(TMPDIR=str(tmp_path)))
    assert stopped.returncode == 143 and "Traceback" not in stopped.err, stopped.err
    assert not list(tmp_path.glob("kassa-demo-*"))
