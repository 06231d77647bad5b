"""Times a model over a range of batch sizes: warm-up runs, then repeats; median and quartiles.

Runs where torch runs: in CPU worker processes and the GPU worker process at start-up (the
calibration), and in the `microbatch compare` command. Never on the server's event loop.
`run(n)` must return only once a batch of n is complete: a GPU run synchronises itself.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from server.models.loading import LoadedModel
from server.models.spec import TensorSpec

WARMUP_RUNS = 2
REPEATS = 7
MIN_REPEATS = 3
BUDGET_S = 2.0  # per model and device at start-up; sizes beyond it are left to the fit


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


def zero_inputs(specs: Sequence[TensorSpec], samples: int) -> list[np.ndarray]:
    """Timing inputs: zeros, which every served model accepts (loading checks it on one zero
    sample), where random values could trip a model's own input checks. A dense model's time
    does not depend on the values."""
    return [np.zeros((samples, *s.shape), dtype=s.np_dtype) for s in specs]


def profile_cpu_blocking(
    models: Mapping[str, LoadedModel], plan: Mapping[str, Sequence[int]]
) -> dict[str, list[list[float]]]:
    """In a CPU worker: each planned model timed over its sizes; plain data for the pool. A
    model that fails here is left out (the server logs that it has no calibration)."""
    report: dict[str, list[list[float]]] = {}
    for name, sizes in plan.items():
        model = models.get(name)
        if model is None:
            continue
        inputs = {n: [torch.from_numpy(a) for a in zero_inputs(model.inputs, n)] for n in sizes}
        try:
            timings = time_sizes_blocking(functools.partial(_run_cpu, model, inputs), sizes)
        except Exception:  # the worker's boundary: calibration must never stop a start-up
            continue
        report[name] = [t.to_wire() for t in timings]
    return report


def _run_cpu(model: LoadedModel, inputs: Mapping[int, list[torch.Tensor]], n: int) -> None:
    with torch.inference_mode():
        model.run(inputs[n])
