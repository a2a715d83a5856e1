"""Scale profiles: the shipped ones load and derive their rate; every kind of bad input gets a clear message."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from kassa.loadtest.cli import _apply_mix
from kassa.loadtest.profiles import ProfileError, builtin_profiles, load_profile, parse_profile
from kassa.loadtest.schedule import RAMP_START, arrival_offsets, expected_count

GOOD = {"name": "t", "traffic": {"daily_sessions": 100_000}, "mix": {"decision": 1, "impression": 1}}


def _error(data: object) -> str:
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "shop.yaml")
    return str(info.value)


def test_shipped_profiles_load_and_derive_their_peak_rate() -> None:
    names = set(builtin_profiles())
    assert {"100k-checkouts-day", "black-friday-peak", "7.5b-transactions-year"} <= names
    for name in names:
        p = load_profile(name)
        t = p.traffic
        assert t.daily_sessions is not None
        expected = t.daily_sessions * t.peak_hour_share / 3600 * t.peak_multiplier * p.mix.per_session()
        assert math.isclose(p.peak_rate(), expected)
        assert f"{p.peak_rate():,.1f} requests/s" in p.rate_derivation()
        assert p.mix.webhook == 1.0  # one signed order webhook per checkout
        assert p.slo.p99_ms > 0 and p.connections.idle >= 0
    bf = load_profile("black-friday-peak")
    assert bf.connections.idle == 10_000
    # 7.5 billion a year is more than one small node: the plan needs it to be the biggest.
    assert load_profile("7.5b-transactions-year").peak_rate() > bf.peak_rate() > load_profile(
        "100k-checkouts-day").peak_rate()


def test_an_explicit_rate_overrides_the_sessions() -> None:
    p = parse_profile({**GOOD, "traffic": {"rate": 123}}, "x")
    assert p.peak_rate() == 123 and "explicit rate" in p.rate_derivation()


def test_a_listed_mix_means_only_the_listed_types() -> None:
    p = parse_profile({**GOOD, "mix": {"noop": 1}}, "x")
    assert p.mix.fractions() == {"noop": 1.0}
    assert parse_profile({"name": "t", "traffic": {"rate": 1}}, "x").mix.fractions() == {"decision": 1.0}


def test_unknown_field_names_the_path_and_suggests() -> None:
    msg = _error({**GOOD, "mix": {"decisons": 1}})
    assert msg == "shop.yaml: mix.decisons: unknown field (did you mean `decision`?)"
    msg = _error({**GOOD, "trafic": {}})
    assert msg.startswith("shop.yaml: trafic: unknown field") and "`traffic`" in msg


def test_out_of_range_and_wrong_type_name_the_field() -> None:
    msg = _error({**GOOD, "traffic": {"daily_sessions": 100, "peak_hour_share": 1.5}})
    assert msg == "shop.yaml: traffic.peak_hour_share: expected a number <= 1.0, got 1.5"
    msg = _error({**GOOD, "slo": {"p99_ms": "fast"}})
    assert msg == "shop.yaml: slo.p99_ms: expected a number, got 'fast'"
    msg = _error({**GOOD, "schedule": "bursty"})
    assert msg == "shop.yaml: schedule: must be one of fixed, poisson, got 'bursty'"
    msg = _error({**GOOD, "payload": {"countries": ["US", "usa"]}})
    assert msg.startswith("shop.yaml: payload.countries[1]:") and msg.endswith("got 'usa'")


def test_cross_field_rules_are_explained() -> None:
    assert "give either `daily_sessions`" in _error({"name": "t", "traffic": {}})
    assert "at least one request type" in _error({**GOOD, "mix": {"decision": 0}})
    assert "min <= max" in _error({**GOOD, "payload": {"items_per_order": [5, 2]}})
    msg = _error({**GOOD, "payload": {"candidates": 3, "offer_ids": ["a"]}})
    assert "payload.candidates" in msg and "offer_ids" in msg
    assert "required field is missing" in _error({"traffic": {"rate": 1}})
    assert "a profile is a mapping" in _error(["not", "a", "mapping"])


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match=r"no such file, and not a built-in profile .*black-friday-peak"):
        load_profile(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ProfileError, match=r"bad\.yaml: not valid YAML"):
        load_profile(bad)


def test_mix_overrides_on_the_command_line() -> None:
    p = parse_profile(GOOD, "x")
    assert _apply_mix(p, ["impression=0", "noop=2"]).mix.fractions() == {"decision": 1 / 3, "noop": 2 / 3}
    for bad, why in (("impresion=1", "TYPE one of"), ("click", "TYPE=SHARE"), ("click=x", "number"),
                     ("click=-1", ">= 0")):
        with pytest.raises(ProfileError, match=why):
            _apply_mix(p, [bad])


def test_fixed_and_ramped_schedules_are_exact() -> None:
    assert np.array_equal(arrival_offsets(100, 2), np.arange(200) / 100)
    ramped = arrival_offsets(100, 10, "fixed", ramp=5)
    assert len(ramped) == math.ceil(expected_count(100, 10, 5))
    # Over the ramp the rate rises from 10 % to 100 %: the ramp holds (0.1 + 1) / 2 of a full 5 s.
    in_ramp = int((ramped < 5).sum())
    assert abs(in_ramp - 100 * 5 * (1 + RAMP_START) / 2) <= 1
    gaps = np.diff(ramped)
    assert gaps[0] > gaps[in_ramp - 2] > 0  # gaps shrink while the rate rises
    assert np.allclose(gaps[in_ramp + 1 :], 0.01)  # then a steady 100/s


def test_ramped_poisson_schedule_is_seeded_and_has_the_right_count() -> None:
    a = arrival_offsets(500, 20, "poisson", seed=3, ramp=10)
    assert np.array_equal(a, arrival_offsets(500, 20, "poisson", seed=3, ramp=10))
    n = expected_count(500, 20, 10)
    assert abs(len(a) - n) < 5 * math.sqrt(n)
    steady = int((a >= 10).sum())
    assert abs(steady - 500 * 20) < 5 * math.sqrt(500 * 20)
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0) and a[-1] < 30


def test_the_readme_quick_start_is_the_one_in_docs_loadtest() -> None:
    # The README's copy left out `ulimit -n 20000`: a server at a default limit of 1,024 open files cannot hold
    # black-friday-peak's 10,000 idle browsers, and the run FAILs on the server's limit, not its latency.
    root = Path(__file__).resolve().parents[1]

    def quick_start(path: Path) -> str:
        text = path.read_text()
        start = text.index("```sh", text.index("## Prove the latency yourself"))
        return text[start : text.index("```", start + 5)]

    assert quick_start(root / "README.md") == quick_start(root / "docs" / "loadtest.md")
    assert "ulimit -n 20000; kassa serve" in quick_start(root / "README.md")
