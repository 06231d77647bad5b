"""Per-batch cost of the CPU pool's process boundary, against the model's own compute.

Runs the real pool (worker processes, shared memory, pipe messages) from an event loop, sends
batches one at a time, and compares the round trip seen by the event loop with the model time
the worker measured. `python scripts/pool_overhead.py [--batches 300] [--sizes 1,8,32]`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.batching.pending import PendingRequest, RequestResult
from server.config import BatchingConfig, ModelConfig
from server.executors.base import Batch, BatchDone, BatchOutcome
from server.executors.cpu_pool import CpuPool
from server.metrics import Metrics
from server.models.builtin import builtin_input_spec


def _resolver(done: asyncio.Future[BatchOutcome]) -> Callable[[Batch, BatchOutcome], None]:
    return lambda _batch, outcome: done.set_result(outcome)


async def measure(model: str, sizes: list[int], batches: int) -> list[tuple[int, float, float]]:
    cfg = ModelConfig(model, f"builtin:{model}", "builtin", (), BatchingConfig(max(sizes)))
    pool = CpuPool((cfg,), 1, 1, Metrics())
    await pool.start(120)
    pool.set_batch_timeouts({model: 60.0}, lambda _model: None)  # watched, as when serving
    loop = asyncio.get_running_loop()
    spec = builtin_input_spec(model)[0]
    rows = []
    try:
        for n in sizes:
            x = np.random.default_rng(0).standard_normal((n, *spec.shape)).astype(np.float32)
            trips, computes = [], []
            for i in range(batches + 20):
                done: asyncio.Future[BatchOutcome] = loop.create_future()
                fut: asyncio.Future[RequestResult] = loop.create_future()
                request = PendingRequest({"input": x}, n, False, 0.0, 1e18, fut)
                started = time.perf_counter()
                pool.dispatch(Batch(model, [request], n), _resolver(done))
                outcome = await done
                elapsed = time.perf_counter() - started
                if i >= 20:  # the first few warm the path
                    trips.append(elapsed)
                    assert isinstance(outcome, BatchDone), outcome
                    computes.append(outcome.compute_s)
            rows.append((n, statistics.median(trips), statistics.median(computes)))
    finally:
        await pool.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--sizes", default="1,8,32")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        "| model | batch | round trip ms (median) | model ms (median) | overhead ms "
        "| overhead/model |"
    )
    print("|---|---|---|---|---|---|")
    for model in ("linear", "mlp"):
        for n, trip, compute in asyncio.run(measure(model, sizes, args.batches)):
            over = trip - compute
            print(
                f"| {model} | {n} | {trip * 1e3:.3f} | {compute * 1e3:.3f} | {over * 1e3:.3f} "
                f"| {over / compute:.2f}x |"
            )


if __name__ == "__main__":
    main()
