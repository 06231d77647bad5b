"""The model ceiling: the raw forward pass of each built-in model, timed by batch size, with as
many torch threads as one of the server's CPU workers gets.

Runs in one spawned process (torch is imported there only, never in the bench's process); the
results come back as plain dataclasses.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

MAX_ITERATIONS = 100_000
MIN_ITERATIONS = 5


@dataclass(frozen=True)
class ModelPoint:
    batch_size: int
    batch_ms: float  # median time of one forward pass of the whole batch
    samples_per_s: float


def measure_models(
    models: tuple[str, ...], batch_sizes: tuple[int, ...], min_time_s: float, threads: int
) -> dict[str, list[ModelPoint]]:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        future = pool.submit(_measure_blocking, models, batch_sizes, min_time_s, threads)
        budget_s = 120.0 + 2 * min_time_s * len(models) * len(batch_sizes)
        return future.result(timeout=budget_s)


def _measure_blocking(
    models: tuple[str, ...], batch_sizes: tuple[int, ...], min_time_s: float, threads: int
) -> dict[str, list[ModelPoint]]:
    import torch

    from server.models.builtin import build_builtin, builtin_input_spec

    torch.set_num_threads(threads)
    results: dict[str, list[ModelPoint]] = {}
    for name in models:
        module = build_builtin(name)
        spec = builtin_input_spec(name)[0]
        points = []
        for batch in batch_sizes:
            x = torch.randn(batch, *spec.shape)
            with torch.inference_mode():
                for _ in range(MIN_ITERATIONS):  # warm-up: lazy init and caches
                    module(x)
                times: list[float] = []
                deadline = time.perf_counter() + min_time_s
                while len(times) < MAX_ITERATIONS and (
                    time.perf_counter() < deadline or len(times) < MIN_ITERATIONS
                ):
                    started = time.perf_counter()
                    module(x)
                    times.append(time.perf_counter() - started)
            median_s = statistics.median(times)
            points.append(ModelPoint(batch, median_s * 1000.0, batch / median_s))
        results[name] = points
    return results
