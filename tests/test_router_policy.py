"""The pure parts of routing, with numbers: the cost fit and its online correction, the choice of
executor, backlogs, the crossover. No clock, no asyncio, no torch."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.routing.cost import (
    MAX_MISFIT,
    UNKNOWN_COST,
    CostFit,
    FitSums,
    OnlineCost,
    check_points,
    fit_points,
    solve,
    vet_points,
    worst_misfit,
    worst_relative_error,
)
from server.routing.policy import (
    EXPLORE_EVERY,
    Candidate,
    backlog_s,
    batch_cost_s,
    choose,
    crossover,
)

CPU = CostFit(0.1e-3, 0.1e-3)  # 0.1 ms + 0.1 ms per sample
GPU = CostFit(1.05e-3, 0.01e-3)  # 1.05 ms + 0.01 ms per sample: the lines cross at n = 10.6
SIZES = (1, 2, 4, 8, 16, 32)


def points(fit: CostFit, sizes: tuple[int, ...] = SIZES) -> list[tuple[int, float]]:
    return [(n, fit.cost_s(n)) for n in sizes]


def cand(name: str, fit: CostFit, backlog_s: float = 0.0, free: int = 2, **kw: object) -> Candidate:
    return Candidate(name, backlog_s, fit, 1024, free, **kw)  # type: ignore[arg-type]


# --- the fit ----------------------------------------------------------------------------------


def test_fit_recovers_an_exact_line() -> None:
    fit = fit_points(points(GPU))
    assert fit.fixed_s == pytest.approx(GPU.fixed_s, rel=1e-9)
    assert fit.per_sample_s == pytest.approx(GPU.per_sample_s, rel=1e-9)


def test_fit_weighs_relative_error_so_small_batches_stay_accurate() -> None:
    # A line at small sizes, then a superlinear cliff: the relative fit keeps n=1 within 25 %,
    # where an unweighted fit would let the big batches drag it far off.
    measured = [(1, 1.0e-3), (2, 1.1e-3), (4, 1.2e-3), (8, 1.4e-3), (16, 3.0e-3), (32, 8.0e-3)]
    fit = fit_points(measured)
    assert abs(fit.cost_s(1) - 1.0e-3) / 1.0e-3 < 0.25
    assert fit.per_sample_s > 0
    assert worst_relative_error(fit, measured) < 0.6


@pytest.mark.parametrize(
    ("sums", "expected"),
    [
        (FitSums(), None),
        (FitSums().add(8, 2.0, 1.0).add(8, 4.0, 1.0), CostFit(3.0, 0.0)),  # one size: flat
        (FitSums().add(1, 5.0, 1.0).add(10, 1.0, 1.0), CostFit(3.0, 0.0)),  # falling: flat mean
        (FitSums().add(10, 1.0, 1.0).add(20, 3.0, 1.0), CostFit(0.0, 0.14)),  # a < 0: origin
    ],
)
def test_solve_keeps_costs_positive_and_monotone(sums: FitSums, expected: CostFit | None) -> None:
    fit = solve(sums)
    if expected is None:
        assert fit is None
        return
    assert fit is not None
    assert fit.fixed_s == pytest.approx(expected.fixed_s)
    assert fit.per_sample_s == pytest.approx(expected.per_sample_s)


@given(
    st.lists(
        st.tuples(st.integers(1, 4096), st.floats(1e-6, 10.0, allow_nan=False)),
        min_size=1,
        max_size=12,
    )
)
def test_any_fit_is_positive_and_monotone(measured: list[tuple[int, float]]) -> None:
    fit = fit_points(measured)
    assert fit.fixed_s >= 0 and fit.per_sample_s >= 0
    assert 0 < fit.cost_s(1) <= fit.cost_s(2) <= fit.cost_s(1024)


def test_check_points_names_what_is_wrong() -> None:
    assert check_points(points(CPU)) == []
    assert check_points([]) == ["no measurements"]
    assert "only one batch size" in check_points([(4, 1e-3), (4, 2e-3)])[0]
    assert "unusable" in check_points([(1, 1e-3), (2, math.nan)])[0]
    assert check_points([(8, 4e-3), (16, 1e-3)]) == [
        "batch 16 measured at under half the time of batch 8"
    ]


# --- the sanity check: outliers, rejection ----------------------------------------------------


def test_a_clean_calibration_is_used_as_measured() -> None:
    vetted = vet_points(points(GPU))
    assert vetted.points == tuple(points(GPU)) and vetted.dropped == () and vetted.problems == ()
    assert vetted.misfit == pytest.approx(0.0, abs=1e-9) and not vetted.rejected


def test_a_clean_knee_shaped_gpu_profile_is_neither_trimmed_nor_rejected() -> None:
    # Flat until the device fills, then linear: the worst a true profile fits a line (~45%).
    knee = [(n, max(1e-4, 1e-4 * n / 128)) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    vetted = vet_points(knee)
    assert vetted.dropped == () and not vetted.rejected and vetted.misfit < 0.5


@pytest.mark.parametrize("factor", [0.2, 3.0])  # a burst that ran too fast, or too slow
def test_an_outlier_is_left_out_of_the_fit(factor: float) -> None:
    measured = points(CPU)
    measured[3] = (8, CPU.cost_s(8) * factor)
    vetted = vet_points(measured)
    assert vetted.dropped == (measured[3],)  # the bad point, not a good one it pulled away
    assert vetted.points == tuple(p for p in measured if p != measured[3])
    assert not vetted.rejected and vetted.misfit < 1e-9
    fit = fit_points(vetted.points)
    assert fit.fixed_s == pytest.approx(CPU.fixed_s) and fit.per_sample_s == pytest.approx(
        CPU.per_sample_s
    )


def test_at_most_a_quarter_of_the_points_are_left_out() -> None:
    measured = points(CPU, (1, 2, 4, 8, 16, 32, 64, 128))
    for i in (1, 3, 5):
        measured[i] = (measured[i][0], measured[i][1] * 4)
    vetted = vet_points(measured)
    assert len(vetted.dropped) == 2 and len(vetted.points) == 6


def test_a_fit_that_misses_its_points_by_too_much_is_rejected() -> None:
    # Alternating fast and slow: no line is within 2x of all of these, however trimmed.
    measured = [(n, (1e-3 if i % 2 else 10e-3)) for i, n in enumerate(SIZES)]
    vetted = vet_points(measured)
    assert vetted.rejected and vetted.misfit > MAX_MISFIT
    assert len(vetted.dropped) == 1  # it tried


def test_the_misfit_counts_too_low_as_much_as_too_high() -> None:
    fit = CostFit(1e-3, 0.0)
    assert worst_misfit(fit, [(1, 2e-3)]) == pytest.approx(1.0)  # half the measured time
    assert worst_misfit(fit, [(1, 0.5e-3)]) == pytest.approx(1.0)  # twice it
    assert worst_relative_error(fit, [(1, 100e-3)]) < 1.0  # blind to how far too low it is
    assert worst_misfit(fit, [(1, 100e-3)]) == pytest.approx(99.0)


def test_no_measurements_are_rejected_and_one_size_is_not() -> None:
    assert vet_points([]).rejected and vet_points([(1, math.nan)]).rejected
    single = vet_points([(1, 1e-3)])  # a model with max_batch_size = 1 has one size only
    assert not single.rejected and "only one batch size" in single.problems[0]


def test_two_sizes_are_never_trimmed_to_one() -> None:
    vetted = vet_points([(1, 4e-3), (2, 1e-3)])
    assert vetted.dropped == () and len(vetted.points) == 2
    assert vetted.problems == ("batch 2 measured at under half the time of batch 1",)


# --- online correction ------------------------------------------------------------------------


def test_observations_that_agree_leave_the_fit_alone() -> None:
    online = OnlineCost(points(GPU))
    for n in (32, 32, 8, 32):
        online.observe(n, GPU.cost_s(n))
    assert online.fit.cost_s(32) == pytest.approx(GPU.cost_s(32), rel=1e-6)
    assert online.observed == 4


def test_a_wrong_calibration_moves_toward_the_observed_times() -> None:
    # Calibrated 10x too cheap; the device really costs 10 ms + 0.1 ms per sample.
    actual = CostFit(10e-3, 0.1e-3)
    online = OnlineCost(points(GPU))
    errors = []
    for i in range(60):
        n = 32 if i % 3 else 8  # a deep queue: mostly full batches
        online.observe(n, actual.cost_s(n))
        errors.append(abs(online.fit.cost_s(32) - actual.cost_s(32)) / actual.cost_s(32))
    assert errors[0] < 0.6  # from 90 % off: the first observation already pulls it hard
    assert errors[2] < 0.05
    assert errors[-1] < 0.01
    assert online.calibrated == fit_points(points(GPU))  # what /v1/models shows as calibrated


def test_one_size_observed_for_ever_keeps_the_calibrated_slope_known() -> None:
    online = OnlineCost(points(CPU))
    for _ in range(500):
        online.observe(32, CPU.cost_s(32) * 2)  # twice as slow, always at 32
    assert online.fit.cost_s(32) == pytest.approx(2 * CPU.cost_s(32), rel=0.05)
    # The prior, never observed against at small sizes, still speaks for them.
    assert online.fit.cost_s(1) == pytest.approx(CPU.cost_s(1), rel=0.2)
    assert online.fit.per_sample_s > 0


def test_without_a_calibration_the_cost_is_unknown_until_observed() -> None:
    online = OnlineCost([])
    assert online.calibrated == online.fit == UNKNOWN_COST
    online.observe(8, 2e-3)
    assert online.fit.cost_s(8) == pytest.approx(2e-3)
    online.observe(32, 5e-3)
    assert online.fit.cost_s(32) == pytest.approx(5e-3, rel=0.05)


def test_bad_observations_are_ignored() -> None:
    online = OnlineCost(points(CPU))
    before = online.fit
    for n, s in ((0, 1.0), (4, -1.0), (4, math.inf), (4, math.nan)):
        online.observe(n, s)
    assert online.fit == before and online.observed == 0


# --- the choice -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("samples", "expected"), [(1, "cpu"), (9, "cpu"), (11, "cuda:0"), (32, "cuda:0")]
)
def test_idle_executors_split_at_the_measured_crossover(samples: int, expected: str) -> None:
    candidates = [cand("cpu", CPU), cand("cuda:0", GPU)]
    assert candidates[choose(samples, candidates)].name == expected


def test_the_crossover_follows_the_costs_not_a_fixed_depth() -> None:
    assert crossover(CPU, GPU, 32) == 11
    assert crossover(CPU, CostFit(0.5e-3, 0.01e-3), 32) == 5
    assert crossover(CPU, CostFit(5e-3, 0.01e-3), 32) is None  # CPU still cheaper at 32
    assert crossover(CPU, CostFit(0.05e-3, 0.01e-3), 32) == 1  # GPU cheaper everywhere


def test_backlog_can_make_the_slower_device_finish_first() -> None:
    # 32 samples: CPU 3.3 ms, GPU 1.37 ms. With 2.5 ms of work queued on the GPU, the CPU wins.
    busy_gpu = [cand("cpu", CPU), cand("cuda:0", GPU, backlog_s=2.5e-3, free=0)]
    assert busy_gpu[choose(32, busy_gpu)].name == "cpu"
    # ... and with 1.5 ms queued the GPU still finishes first, even without a free slot.
    less = [cand("cpu", CPU), cand("cuda:0", GPU, backlog_s=1.5e-3, free=0)]
    assert less[choose(32, less)].name == "cuda:0"


def test_a_busy_cpu_sends_even_a_single_sample_to_the_gpu() -> None:
    candidates = [cand("cpu", CPU, backlog_s=3e-3), cand("cuda:0", GPU)]
    assert candidates[choose(1, candidates)].name == "cuda:0"


def test_ties_go_to_a_free_slot_then_to_the_first_listed() -> None:
    same = CostFit(1e-3, 0.0)
    assert choose(4, [cand("cpu", same, free=0), cand("cuda:0", same)]) == 1
    assert choose(4, [cand("cpu", same), cand("cuda:0", same)]) == 0
    with pytest.raises(ValueError):
        choose(1, [])


def test_an_idle_neglected_executor_within_reach_gets_a_batch_now_and_then() -> None:
    near = [cand("cpu", CPU), cand("cuda:0", CostFit(0.3e-3, 0.01e-3), idle=True)]
    assert choose(1, near) == 0  # 0.2 ms against 0.31 ms
    neglected = [near[0], cand("cuda:0", near[1].fit, idle=True, batches_since_used=EXPLORE_EVERY)]
    assert choose(1, neglected) == 1
    far = [near[0], cand("cuda:0", GPU, idle=True, batches_since_used=EXPLORE_EVERY)]
    assert choose(1, far) == 0  # 1.06 ms is over 3x the best: not worth a look
    busy = [near[0], cand("cuda:0", near[1].fit, batches_since_used=EXPLORE_EVERY)]
    assert choose(1, busy) == 0  # only an idle one is explored


def test_a_batch_over_the_cap_costs_its_chunks() -> None:
    fit = CostFit(1e-3, 0.1e-3)
    assert batch_cost_s(fit, 16, cap=32) == pytest.approx(2.6e-3)
    assert batch_cost_s(fit, 32, cap=16) == pytest.approx(2 * 2.6e-3)
    assert batch_cost_s(fit, 20, cap=8) == pytest.approx(2 * 1.8e-3 + 1.4e-3)


@pytest.mark.parametrize(
    ("now", "lanes", "running", "waiting", "expected"),
    [
        (10.0, 1, [], [], 0.0),
        (10.0, 1, [(9.0, 3.0)], [], 2.0),  # started 1 s ago, 3 s expected: 2 s left
        (10.0, 1, [(9.0, 3.0)], [1.0, 1.0], 4.0),
        (10.0, 2, [(9.0, 3.0)], [], 0.0),  # a lane is free
        (10.0, 2, [(9.0, 3.0), (10.0, 1.0)], [5.0], 2.0),  # 5 s goes behind the 1 s one
        (10.0, 1, [(0.0, 3.0)], [], 0.0),  # over its estimate: taken to finish now
    ],
)
def test_backlog_is_when_the_earliest_lane_frees(
    now: float,
    lanes: int,
    running: list[tuple[float, float]],
    waiting: list[float],
    expected: float,
) -> None:
    assert backlog_s(now, lanes, running, waiting) == pytest.approx(expected)
