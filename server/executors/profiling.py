"""Times a model over a range of batch sizes: warm-up runs, then repeats; median and quartiles;
and which batch sizes a calibration times.

Runs where the models run: in the CPU and GPU worker processes at start-up (the calibration),
and in the `microbatch compare` command; the server's event loop only reads calibration_sizes
to plan it. No torch here (the caller's `run(n)` brings it): it must return only once a batch
of n is complete, so a GPU run synchronises itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from server.models.padding import zero_batch
from server.models.spec import TensorSpec

WARMUP_RUNS = 2
REPEATS = 7
MIN_REPEATS = 3
BUDGET_S = 2.0  # per model and device at start-up; sizes beyond it are left to the fit


def calibration_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below the cap, then the cap itself: the sizes a queue forms most."""
    sizes = []
    n = 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    return [*sizes, max_batch_size]


@dataclass(frozen=True)
class Timing:
    samples: int
    median_s: float
    p25_s: float
    p75_s: float
    runs: int

    def to_wire(self) -> list[float]:
        return [self.samples, self.median_s]


def time_sizes_blocking(
    run: Callable[[int], object],
    sizes: Sequence[int],
    *,
    warmup: int = WARMUP_RUNS,
    repeats: int = REPEATS,
    budget_s: float = BUDGET_S,
    clock: Callable[[], float] = time.perf_counter,
) -> list[Timing]:
    """Times each size `repeats` times, in rounds over all sizes, so that a burst of other load
    on the machine slows every size a little rather than one size a lot.

    Bounded by `budget_s`: sizes are warmed up in order until half of it is spent (the rest
    are left to the fit), and rounds stop once it is spent, after at least MIN_REPEATS."""
    started = clock()
    kept: list[int] = []
    for n in sizes:
        if kept and clock() - started > budget_s / 2:
            break
        for _ in range(warmup):
            run(n)
        kept.append(n)
    times: dict[int, list[float]] = {n: [] for n in kept}
    for round_ in range(repeats):
        if round_ >= MIN_REPEATS and clock() - started > budget_s:
            break
        for n in kept:
            t0 = clock()
            run(n)
            times[n].append(clock() - t0)
    timings = []
    for n in kept:
        p25, median, p75 = np.percentile(times[n], [25, 50, 75])
        timings.append(Timing(n, float(median), float(p25), float(p75), len(times[n])))
    return timings


def zero_inputs(specs: Sequence[TensorSpec], samples: int, length: int = 1) -> list[np.ndarray]:
    """Timing inputs: zeros, which every served model accepts (loading checks it on one zero
    sample), where random values could trip a model's own input checks. A dense model's time
    does not depend on the values. At `length` for a model with a dynamic dimension."""
    return zero_batch(tuple(specs), samples, length)
