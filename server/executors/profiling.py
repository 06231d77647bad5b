"""Times a model over a range of batch sizes (and, for a model with a dynamic dimension, of
padded lengths): warm-up runs, then repeats; median and quartiles; and which (samples, length)
points a calibration times.

Runs where the models run: in the CPU and GPU worker processes at start-up (the calibration),
and in the `microbatch compare` command; the server's event loop only reads calibration_sizes
to plan it. No torch here (the caller's `run(n, length)` brings it): it must return only once
a batch is complete, so a GPU run synchronises itself.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.models.padding import zero_batch
from server.models.spec import TensorSpec, is_dynamic

WARMUP_RUNS = 2
REPEATS = 7
MIN_REPEATS = 3
BUDGET_S = 2.0  # per model and device at start-up; sizes beyond it are left to the fit
SHORTEST_LENGTH = 8  # the shortest length a dynamic model's calibration times
# The biggest batch a dynamic model's calibration times, in padded tokens (samples x length):
# a full batch at the longest length (the encoder: 32 x 512, 0.8 s on one core) would spend
# the whole budget on one point; the fit carries the cost there from smaller batches.
TOKENS_PER_POINT = 2048


def calibration_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below the cap, then the cap itself: the sizes a queue forms most."""
    sizes = []
    n = 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch_size]


def calibration_lengths(max_length: int) -> list[int]:
    """Three lengths spread evenly on a log scale over [8, max_length]: 8, 64, 512 at 512."""
    shortest = min(SHORTEST_LENGTH, max_length)
    middle = round(math.sqrt(shortest * max_length))
    return sorted({shortest, middle, max_length})


def calibration_points(
    sizes: Sequence[int], specs: Sequence[TensorSpec], max_length: int
) -> list[tuple[int, int]]:
    """The (samples, length) points to time of the planned sizes: each at length 1 for a fixed
    shape; for a dynamic model, at each calibration length, the smallest size and the largest
    within TOKENS_PER_POINT (what the three terms of the cost need, in a budget like a fixed
    model's). Cheapest first: the budget leaves the dearest to the fit."""
    if not is_dynamic(specs) or not sizes:
        return [(n, 1) for n in sizes]
    points = set()
    for length in calibration_lengths(max_length):
        fits = [n for n in sizes if n * length <= TOKENS_PER_POINT]
        points |= {(min(sizes), length), (max(fits, default=min(sizes)), length)}
    return sorted(points, key=lambda p: (p[0] * p[1], p))


@dataclass(frozen=True)
class Timing:
    samples: int
    median_s: float
    p25_s: float
    p75_s: float
    runs: int
    length: int = 1  # the padded length (a model with a dynamic dimension); else 1

    def point(self) -> tuple[int, float] | tuple[int, int, float]:
        """(samples, seconds), or (samples, length, seconds) where the length varies."""
        if self.length == 1:
            return (self.samples, self.median_s)
        return (self.samples, self.length, self.median_s)


def time_sizes_blocking(
    run: Callable[[int], object],
    sizes: Sequence[int],
    *,
    warmup: int = WARMUP_RUNS,
    repeats: int = REPEATS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """time_points_blocking at one length: `run(n)` runs a batch of n."""
    return time_points_blocking(
        lambda n, _: run(n),
        [(n, 1) for n in sizes],
        warmup=warmup,
        repeats=repeats,
        budget_s=budget_s,
        clock=clock,
    )


def time_points_blocking(
    run: Callable[[int, int], object],
    points: Sequence[tuple[int, int]],
    *,
    warmup: int = WARMUP_RUNS,
    repeats: int = REPEATS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """Times each (samples, length) point `repeats` times, in rounds over all points, so that
    a burst of other load on the machine slows every point a little rather than one a lot.

    Bounded by `budget_s`: points are warmed up in order until half of it is spent (the rest
    are left to the fit), and rounds stop once it is spent, after at least MIN_REPEATS."""
    started = clock()
    kept: list[tuple[int, int]] = []
    for n, length in points:
        if kept and clock() - started > budget_s / 2:
            break
        for _ in range(warmup):
            run(n, length)
        kept.append((n, length))
    times: dict[tuple[int, int], list[float]] = {p: [] for p in kept}
    for round_ in range(repeats):
        if round_ >= MIN_REPEATS and clock() - started > budget_s:
            break
        for n, length in kept:
            t0 = clock()
            run(n, length)
            times[(n, length)].append(clock() - t0)
    timings = []
    for n, length in kept:
        p25, median, p75 = np.percentile(times[(n, length)], [25, 50, 75])
        runs = len(times[(n, length)])
        timings.append(Timing(n, float(median), float(p25), float(p75), runs, length))
    return timings


def zero_inputs(specs: Sequence[TensorSpec], samples: int, length: int = 1) -> list[np.ndarray]:
    """Timing inputs: zeros, which every served model accepts (loading checks it on one zero
    sample), where random values could trip a model's own input checks. A dense model's time
    does not depend on the values. At `length` for a model with a dynamic dimension."""
    return zero_batch(tuple(specs), samples, length)
