"""The cost by padded length, with numbers: the three-term fit `a + b*n*L + c*n*L^2` (exact
recovery, non-negativity, fixed shapes unchanged, monotone whatever it is fed), its online
correction learning c, the crossover at a length, and the batch-time estimate per token.
No clock, no asyncio, no torch."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.batching.estimate import BatchTime
from server.routing.cost import (
    CostFit,
    FitSums,
    OnlineCost,
    check_points,
    fit_points,
    solve,
    vet_points,
    worst_misfit,
)
from server.routing.policy import Candidate, batch_cost_s, choose, crossover

# An encoder-like model: 2 ms a batch, 3 us a token, 0.05 us a token per unit of length.
ENCODER = CostFit(2e-3, 3e-6, 5e-8)
PLAN = [(1, 8), (32, 8), (1, 64), (32, 64), (1, 512), (4, 512)]  # what a calibration times


def timed(fit: CostFit, plan: list[tuple[int, int]] = PLAN) -> list[tuple[int, int, float]]:
    return [(n, length, fit.cost_s(n, length)) for n, length in plan]


# --- the fit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "truth",
    [ENCODER, CostFit(0.0, 3e-6, 5e-8), CostFit(2e-3, 0.0, 5e-8), CostFit(2e-3, 3e-6, 0.0)],
)
def test_three_terms_are_recovered_from_exact_points(truth: CostFit) -> None:
    fit = fit_points(timed(truth))
    assert fit.fixed_s == pytest.approx(truth.fixed_s, rel=1e-6, abs=1e-12)
    assert fit.per_sample_s == pytest.approx(truth.per_sample_s, rel=1e-6, abs=1e-15)
    assert fit.quadratic_s == pytest.approx(truth.quadratic_s, rel=1e-6, abs=1e-17)
    assert worst_misfit(fit, timed(truth)) < 1e-6


def test_a_term_the_points_pull_below_zero_is_held_at_zero() -> None:
    # Cheaper per token the longer the batch: a negative c would fit best; the fit keeps
    # c = 0 and refits a and b (non-negative least squares, not a clipped answer).
    measured = [(n, length, 1e-3 + 4e-6 * n * length - 2e-9 * n * length**2) for n, length in PLAN]
    fit = fit_points(measured)
    assert fit.quadratic_s == 0.0 and fit.fixed_s >= 0.0 and fit.per_sample_s > 0.0
    free = solve(FitSums().add(1, 1.0, 1.0, 8).add(1, 2.0, 1.0, 16).add(2, 0.5, 1.0, 32))
    assert free is not None and min(free.fixed_s, free.per_sample_s, free.quadratic_s) >= 0.0


def test_fixed_shapes_fit_a_line_exactly_as_before() -> None:
    # Pairs, and triples at length 1, are the same points: the same line, c = 0.
    pairs = [(n, 1e-3 + 2e-4 * n) for n in (1, 2, 4, 8, 16, 32)]
    triples = [(n, 1, y) for n, y in pairs]
    assert fit_points(pairs) == fit_points(triples)
    assert fit_points(pairs).quadratic_s == 0.0
    assert fit_points(pairs).cost_s(8) == pytest.approx(1e-3 + 2e-4 * 8)


def test_at_one_length_the_fit_is_a_line_in_tokens() -> None:
    # One length only: c cannot be told from b; the fit is exact there, with c = 0.
    at_64 = timed(ENCODER, [(1, 64), (8, 64), (32, 64)])
    fit = fit_points(at_64)
    assert fit.quadratic_s == 0.0
    for n, length, y in at_64:
        assert fit.cost_s(n, length) == pytest.approx(y, rel=1e-9)


@given(
    st.lists(
        st.tuples(
            st.integers(1, 64),
            st.integers(1, 1024),
            st.floats(1e-6, 10.0, allow_nan=False),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_any_fit_is_positive_and_never_cheaper_for_more_or_longer(
    measured: list[tuple[int, int, float]],
) -> None:
    fit = fit_points(measured)
    assert min(fit.fixed_s, fit.per_sample_s, fit.quadratic_s) >= 0.0
    for length in (1, 8, 100, 1024):
        costs = [fit.cost_s(n, length) for n in (1, 2, 32, 1024)]
        assert costs[0] > 0 and costs == sorted(costs)
    for n in (1, 32):
        costs = [fit.cost_s(n, length) for length in (1, 8, 100, 1024)]
        assert costs == sorted(costs)


def test_the_check_compares_within_a_length_and_across_lengths() -> None:
    assert check_points(timed(ENCODER)) == []
    slower = [(1, 8, 1e-3), (32, 8, 0.4e-3), (1, 64, 2e-3), (1, 512, 0.5e-3)]
    assert check_points(slower) == [
        "batch 32 measured at under half the time of batch 1 at length 8",
        "length 512 measured at under half the time of length 64 (batch 1)",
    ]


def test_an_outlier_at_one_length_is_left_out() -> None:
    measured = timed(ENCODER, [(n, length) for length in (8, 64, 512) for n in (1, 2, 4)])
    bad = (2, 64, ENCODER.cost_s(2, 64) * 5)
    measured[4] = bad
    vetted = vet_points(measured)
    assert vetted.dropped == (bad,) and not vetted.rejected and vetted.misfit < 1e-6


# --- online correction ------------------------------------------------------------------------


def test_observed_batches_teach_the_quadratic_term() -> None:
    # Calibrated as if attention cost nothing; the device really pays c as well.
    online = OnlineCost(timed(CostFit(2e-3, 3e-6)))
    assert online.calibrated.quadratic_s == 0.0
    for i in range(90):
        n, length = (32, 16) if i % 3 == 0 else (8, 256) if i % 3 == 1 else (2, 512)
        online.observe(n, ENCODER.cost_s(n, length), length)
    assert online.fit.quadratic_s > 0.0
    for n, length in ((32, 16), (8, 256), (2, 512), (4, 384)):
        assert online.fit.cost_s(n, length) == pytest.approx(ENCODER.cost_s(n, length), rel=0.05)
    assert online.observed == 90


def test_without_a_calibration_lengths_are_learned_from_observations_alone() -> None:
    online = OnlineCost([])
    for n, length in [(1, 8), (32, 8), (1, 512), (4, 512), (8, 64), (16, 128)] * 5:
        online.observe(n, ENCODER.cost_s(n, length), length)
    assert online.fit.cost_s(4, 300) == pytest.approx(ENCODER.cost_s(4, 300), rel=0.05)


def test_a_length_below_one_is_no_observation() -> None:
    online = OnlineCost(timed(ENCODER))
    before = online.fit
    online.observe(4, 1.0, 0)
    assert online.fit == before and online.observed == 0


# --- routing at a length ----------------------------------------------------------------------


CPU = CostFit(0.1e-3, 2e-6, 2e-8)  # cheap to start, dear per token
GPU = CostFit(1.0e-3, 0.1e-6, 1e-9)  # dear to start, cheap per token


def test_the_crossover_moves_with_the_length() -> None:
    # Per sample at L: CPU 2e-6 L + 2e-8 L^2, GPU 1e-7 L + 1e-9 L^2; the GPU's 0.9 ms more
    # per batch is won back after fewer samples the longer they are.
    assert crossover(CPU, GPU, 32, length=8) is None  # 17 us a sample: never within 32
    assert crossover(CPU, GPU, 32, length=64) == 5  # 199 us a sample more: from 5 on
    assert crossover(CPU, GPU, 32, length=512) == 1
    assert crossover(CPU, GPU, 32) is None  # at length 1: a fixed shape, as before
    gap = GPU.fixed_s - CPU.fixed_s
    per_sample = CPU.at_length(64).per_sample_s - GPU.at_length(64).per_sample_s
    assert math.floor(gap / per_sample) + 1 == 5


def test_a_batch_goes_where_its_length_makes_it_cheaper() -> None:
    candidates = [Candidate("cpu", 0.0, CPU, 32, 2), Candidate("cuda:0", 0.0, GPU, 32, 2)]
    assert candidates[choose(8, candidates, length=8)].name == "cpu"
    assert candidates[choose(8, candidates, length=256)].name == "cuda:0"
    # Over the cap, each chunk is padded to the batch's length.
    assert batch_cost_s(GPU, 40, cap=32, length=100) == pytest.approx(
        GPU.cost_s(32, 100) + GPU.cost_s(8, 100)
    )


# --- the batch-time estimate, per token ------------------------------------------------------


def test_a_calibrated_estimate_is_at_the_batch_length() -> None:
    est = BatchTime(ENCODER.cost_s)
    assert est.batch_s(0.0, 8, 256) == pytest.approx(ENCODER.cost_s(8, 256))
    assert est.batch_s(0.0, 8, 16) == pytest.approx(ENCODER.cost_s(8, 16))
    # Long batches that run twice as slow as calibrated raise the estimate at every length
    # by that factor (less the little its evidence ages between batches): what is learned is
    # the machine, not the mix of lengths.
    for i in range(30):
        took = 2 * ENCODER.cost_s(8, 512)
        est.record(now=1.0 + i * 0.1, dispatched_at=1.0 + i * 0.1 - took, samples=8, length=512)
    assert est.batch_s(3.9, 8, 16) == pytest.approx(2 * ENCODER.cost_s(8, 16), rel=0.05)


def test_without_a_calibration_the_estimate_grows_with_the_length() -> None:
    est = BatchTime()
    est.record(now=10.0, dispatched_at=9.9, samples=8, length=100)  # 0.1 s at length 100
    assert est.batch_s(10.0, 8, 100) == pytest.approx(0.1)
    assert est.batch_s(10.0, 8, 400) == pytest.approx(0.4)
    assert est.batch_s(10.0, 8) == pytest.approx(0.001)  # at length 1: a thousandth
    fixed = BatchTime()
    fixed.record(now=10.0, dispatched_at=9.9, samples=8)
    assert fixed.batch_s(10.0, 32) == pytest.approx(0.1)  # a fixed shape: per batch, as before
