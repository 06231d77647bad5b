"""Schedules of the open loop, tested with numbers: counts, spacing, phases, splitting."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadgen.fanout import split_clients
from bench.loadgen.schedule import (
    Phase,
    build_schedule,
    closed_loop_phases,
    open_loop_phases,
    parse_steps,
    phase_windows,
    split_schedule,
)
from server.config import ConfigError


def test_constant_arrivals_are_evenly_spaced_from_zero() -> None:
    s = build_schedule((Phase(40, 1.5),), "constant", seed=0)
    assert len(s) == 60
    assert s.offsets_s[0] == 0.0
    assert np.allclose(np.diff(s.offsets_s), 0.025)
    assert (s.phase == 0).all()


def test_poisson_arrivals_have_the_rate_and_exponential_gaps() -> None:
    s = build_schedule((Phase(1000, 100.0),), "poisson", seed=7)
    assert abs(len(s) - 100_000) < 1_500  # about 4.7 standard deviations
    gaps = np.diff(s.offsets_s)
    assert (gaps >= 0).all() and s.offsets_s[-1] < 100.0
    assert gaps.mean() == pytest.approx(0.001, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)  # exponential: CV = 1


def test_a_seed_gives_the_same_schedule() -> None:
    a = build_schedule((Phase(200, 2.0),), "poisson", seed=3)
    b = build_schedule((Phase(200, 2.0),), "poisson", seed=3)
    c = build_schedule((Phase(200, 2.0),), "poisson", seed=4)
    assert np.array_equal(a.offsets_s, b.offsets_s)
    assert not np.array_equal(a.offsets_s[:10], c.offsets_s[:10])


def test_steps_follow_each_other_with_their_own_rates() -> None:
    phases = parse_steps("10:2, 50:1,0:1")
    assert phases == (Phase(10, 2), Phase(50, 1), Phase(0, 1))
    s = build_schedule(phases, "constant", seed=0)
    assert [int((s.phase == i).sum()) for i in range(3)] == [20, 50, 0]
    for i, (lo, hi) in enumerate(phase_windows(phases)):
        inside = s.offsets_s[s.phase == i]
        assert ((inside >= lo) & (inside < hi)).all()
    assert s.end_s == 4.0


@pytest.mark.parametrize("text", ["100", "x:1", "-1:2", "5:0", "5:nan", "5:1,"])
def test_bad_steps_name_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match="--schedule"):
        parse_steps(text)


def test_warmup_runs_first_at_the_first_rate() -> None:
    phases = open_loop_phases(None, 10.0, 1.5, "30:2,60:2")
    assert phases == (Phase(30, 1.5, warmup=True), Phase(30, 2), Phase(60, 2))
    assert open_loop_phases(100.0, 5.0, 0.0, None) == (Phase(100.0, 5.0),)
    assert closed_loop_phases(3.0, 1.0) == (Phase(0.0, 1.0, warmup=True), Phase(0.0, 3.0))
    with pytest.raises(ConfigError, match="--rate or --schedule"):
        open_loop_phases(None, 5.0, 0.0, None)
    with pytest.raises(ConfigError, match="--warmup"):
        open_loop_phases(10.0, 5.0, -1.0, None)


def test_an_oversized_schedule_is_refused_before_it_is_built() -> None:
    with pytest.raises(ConfigError, match="at most"):
        build_schedule((Phase(1e6, 3600.0),), "constant", seed=0)


def test_splitting_deals_every_request_once_and_evenly() -> None:
    s = build_schedule((Phase(100, 1.0), Phase(300, 1.0)), "poisson", seed=1)
    parts = split_schedule(s, 3)
    merged = np.sort(np.concatenate([p.offsets_s for p in parts]))
    assert np.array_equal(merged, s.offsets_s)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:  # each part holds its share of both phases
        assert (p.phase == 0).any() and (p.phase == 1).any()
    assert split_clients(10, 3) == [4, 3, 3] and sum(split_clients(64, 4)) == 64
