"""Poisoned batches: when the model raised on a batch, which sub-batches to run again so that
the request(s) that make it raise are found and their batch-mates still get their answers.

Pure functions over plain data (no asyncio, no clock); the queue runs the halves ahead of
everything queued, and a lone request that still fails is a culprit and gets model_error.
A batch of n requests with one culprit costs about 2 log2(n) extra runs; with every request
failing, 2n - 1 runs in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from server.errors import ErrorCode

T = TypeVar("T")


def should_bisect(code: str, model_raised: bool, requests: int) -> bool:
    """Only the model's own, input-dependent failures are bisected: not a worker that died twice
    (the dead worker may have been any batch's fault), not a shutdown, not a lone request."""
    return model_raised and code == ErrorCode.MODEL_ERROR.value and requests > 1


def halves(items: Sequence[T], sizes: Sequence[int]) -> tuple[list[T], list[T]]:
    """Two non-empty runs of `items`, in order, with sample counts `sizes` as even as possible."""
    if len(items) != len(sizes) or len(items) < 2:
        raise ValueError(f"need at least two items with one size each, got {len(items)}")
    total, run = sum(sizes), 0
    best, best_gap = 1, total + 1
    for i in range(1, len(items)):
        run += sizes[i - 1]
        gap = abs(total - 2 * run)
        if gap < best_gap:
            best, best_gap = i, gap
    return list(items[:best]), list(items[best:])
