"""Which executor runs a formed batch: the one expected to finish it first. Pure functions over
plain numbers (time as floats, costs as fits), so the rule is tested with numbers.

Runs on the event loop, called by the router for every batch; no clock reads, no I/O.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from server.routing.cost import CostFit

# An idle executor that has not run this model for this many batches gets the next one if it
# would finish it within EXPLORE_RATIO of the best: its cost estimate is checked against a real
# batch now and then, so that a calibration that is wrong against it can still be corrected.
EXPLORE_EVERY = 64
EXPLORE_RATIO = 3.0


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    backlog_s: float  # expected wait before it could start one more batch
    fit: CostFit  # this model's cost on it
    cap: int  # largest batch it runs in one go; bigger ones run as several
    free_slots: int  # batches it takes now; 0 means a chosen batch waits for a slot
    idle: bool = False  # nothing of any model in flight there
    batches_since_used: int = 0  # batches of this model routed elsewhere since it ran one


def batch_cost_s(fit: CostFit, samples: int, cap: int, length: int = 1) -> float:
    """A batch over the cap runs as full chunks of `cap` plus one remainder, each padded to
    the batch's length."""
    if samples <= cap:
        return fit.cost_s(samples, length)
    full, rest = divmod(samples, cap)
    return full * fit.cost_s(cap, length) + (fit.cost_s(rest, length) if rest else 0.0)


def finish_s(candidate: Candidate, samples: int, length: int = 1) -> float:
    return candidate.backlog_s + batch_cost_s(candidate.fit, samples, candidate.cap, length)


def choose(samples: int, candidates: Sequence[Candidate], length: int = 1) -> int:
    """The index of the candidate that should run a batch of `samples` padded to `length`.

    Earliest expected finish wins; on a tie one with a free slot, then the earlier listed (the
    CPU pool is listed first). Exploration may pick an idle, neglected one instead.
    """
    if not candidates:
        raise ValueError("no executor to choose from")
    finishes = [finish_s(c, samples, length) for c in candidates]
    best = min(
        range(len(candidates)),
        key=lambda i: (finishes[i], candidates[i].free_slots <= 0, i),
    )
    for i, c in enumerate(candidates):
        neglected = c.batches_since_used >= EXPLORE_EVERY and c.idle and c.free_slots > 0
        if neglected and i != best and finishes[i] <= EXPLORE_RATIO * finishes[best]:
            return i
    return best


def backlog_s(
    now: float, lanes: int, running: Sequence[tuple[float, float]], waiting: Sequence[float]
) -> float:
    """When the earliest of `lanes` parallel lanes frees up, in seconds from now.

    running: (started_at, expected cost) of the batches computing now, one per busy lane;
    waiting: the expected costs of batches queued behind them, in order. A batch that runs over
    its estimate is taken to finish now.
    """
    lanes = max(1, lanes)
    free_at = [max(0.0, started + cost - now) for started, cost in running[:lanes]]
    free_at += [0.0] * (lanes - len(free_at))
    heapq.heapify(free_at)
    for cost in (*(c for _, c in running[lanes:]), *waiting):
        heapq.heappush(free_at, heapq.heappop(free_at) + cost)
    return free_at[0]


def crossover(cpu: CostFit, gpu: CostFit, max_samples: int, length: int = 1) -> int | None:
    """The smallest batch size from which the GPU is cheaper at every size up to max_samples,
    for batches padded to `length`; None when the CPU is cheaper (or as cheap) at max_samples."""
    cpu, gpu = cpu.at_length(length), gpu.at_length(length)
    if gpu.cost_s(max_samples) >= cpu.cost_s(max_samples):
        return None
    # At one length both are lines in n: the difference changes sign at most once.
    slope = cpu.per_sample_s - gpu.per_sample_s
    gap = gpu.fixed_s - cpu.fixed_s  # how much more the GPU costs at n = 0
    if gap < 0.0 or cpu.cost_s(1) > gpu.cost_s(1):
        return 1
    return max(1, min(max_samples, math.floor(gap / slope) + 1))
