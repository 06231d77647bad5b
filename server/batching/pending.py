"""A request waiting for its batch, its result, and the one place futures are resolved.

Event loop only. Resolution helpers ignore a future that is already done or cancelled (the
client went away), so every request is answered at most once and nothing raises on a race.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)  # not frozen: one per request, and frozen costs 4x to build
class RequestResult:
    outputs: dict[str, np.ndarray]
    batch_size: int
    device: str
    queue_ms: float
    compute_ms: float


@dataclass(slots=True, eq=False)
class PendingRequest:
    """One admitted request: inputs in batch form ([n, *sample]), matched to the model's names."""

    inputs: dict[str, np.ndarray]
    samples: int
    single: bool  # sent without the batch dimension: the answer drops it too
    arrived_at: float
    deadline_at: float
    future: asyncio.Future[RequestResult]
    request_id: str | None = None
    dispatched_at: float = field(default=0.0)
    length: int = 1  # its samples' length, for a model with a dynamic dimension; else 1

    def is_gone(self) -> bool:
        """The handler gave up (client disconnected or cancelled): never compute it."""
        return self.future.done()


def resolve(future: asyncio.Future[RequestResult], result: RequestResult) -> None:
    if not future.done():
        future.set_result(result)


def reject(future: asyncio.Future[RequestResult], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
