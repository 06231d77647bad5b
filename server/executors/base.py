"""What the batcher hands an executor and what comes back; the seam where executors plug in.

Event loop side. A Dispatcher (the CPU pool alone, or a router over the pool and GPUs) takes
a formed Batch and calls its `done` callback exactly once with one BatchOutcome, as plain data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from server.batching.pending import PendingRequest


@dataclass(slots=True, eq=False)
class Batch:
    model: str
    requests: list[PendingRequest]
    samples: int
    attempts: int = 0  # how often it was sent to an executor (a worker crash retries once)


@dataclass(frozen=True, slots=True)
class BatchDone:
    outputs: dict[str, np.ndarray]  # [samples, *per-sample shape], owned by the receiver
    compute_s: float
    device: str


@dataclass(frozen=True, slots=True)
class BatchFailed:
    code: str  # an ErrorCode value
    message: str
    # The model itself raised on these inputs (not a dead worker, not a shutdown): smaller
    # sub-batches may isolate the request(s) that cause it (batching/bisection.py).
    model_raised: bool = False
    # The executor's device failed (a sticky CUDA error): the batch may well be innocent, so
    # the router runs it on another executor whatever its attempts (routing/router.py).
    device_lost: bool = False
    device: str = ""  # where it failed, for the metrics ("" where it never reached one)


BatchOutcome = BatchDone | BatchFailed
DoneCallback = Callable[[Batch, BatchOutcome], None]


class Dispatcher(Protocol):
    """Runs batches somewhere; the batcher never knows where."""

    def free_slots(self, model: str) -> int:
        """How many batches of this model could start now."""

    def hold_for_fill(self, model: str) -> bool:
        """Whether holding a batch back for batch-mates (up to max_delay) pays off."""

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        """Take the batch; call done(batch, outcome) once, later, on the event loop."""

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        """Call listener whenever a slot frees up."""
