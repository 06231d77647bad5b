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
from server.executors.contract import FailureKind


@dataclass(slots=True, eq=False)
class Batch:
    model: str
    requests: list[PendingRequest]
    samples: int
    length: int = 1  # the padded length of a batch of a model with a dynamic dimension; else 1
    attempts: int = 0  # how often it was sent to an executor (a worker crash retries once)


@dataclass(frozen=True, slots=True)
class BatchDone:
    outputs: dict[str, np.ndarray]  # [samples, *per-sample shape], owned by the receiver
    compute_s: float
    device: str


@dataclass(frozen=True, slots=True, init=False)
class BatchFailed:
    """code: the ErrorCode value the requests get; kind: why, which decides what happens next:
    the batcher bisects a batch the model raised on (model_raised: smaller sub-batches may
    isolate the request(s) that cause it, batching/bisection.py); the router runs a batch whose
    device failed under it elsewhere, whatever its attempts (device_lost: the batch may well be
    innocent), and one that ran out of GPU memory elsewhere once (routing/router.py)."""

    code: str
    message: str
    kind: FailureKind
    device: str  # where it failed, for the metrics ("" where it never reached one)

    def __init__(
        self,
        code: str,
        message: str,
        kind: FailureKind = FailureKind.WORKER,
        device: str = "",
        *,
        model_raised: bool = False,
        device_lost: bool = False,
    ) -> None:
        # model_raised / device_lost: shorthands for FailureKind.MODEL / DEVICE.
        if model_raised:
            kind = FailureKind.MODEL
        if device_lost:
            kind = FailureKind.DEVICE
        for name, value in (
            ("code", code),
            ("message", message),
            ("kind", kind),
            ("device", device),
        ):
            object.__setattr__(self, name, value)

    @property
    def model_raised(self) -> bool:
        return self.kind is FailureKind.MODEL or self.kind is FailureKind.OUT_OF_MEMORY

    @property
    def device_lost(self) -> bool:
        return self.kind is FailureKind.DEVICE


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
