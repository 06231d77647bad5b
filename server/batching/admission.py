"""Whether to admit a request: a pure function of a snapshot of one model's queue and of what
the batch-time estimate (estimate.py) says: tokens answered per second of busy time, and the
time a batch takes. A token is a sample at one unit of its length (backlog.py): for a fixed
shape, a sample; for a sequence model the backlog drains by its tokens, not its count.

No asyncio, no clock reads: the queue passes `now` in, so the rules are tested with numbers.
The estimate is asked only where the answer depends on it (a backlog and a deadline): most
requests find neither, and admission runs twice per request.
Shedding here is cheap (a 503 before any work) and keeps the queue short enough that admitted
requests still meet their deadline, rather than computing answers that arrive too late.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

# A backlog is predicted to drain at this fraction of the measured rate: a busy machine slows
# down now and then (by 40% for seconds on a shared 2-core box), and a request admitted should
# still make its deadline when it does. The queue stays deep enough to keep executors busy.
RATE_MARGIN = 0.6
UNKNOWN_RETRY_AFTER_S = 1.0


class Estimate(Protocol):
    """What admission reads of a model's batch-time estimate (estimate.BatchTime)."""

    def rate(self, now: float) -> float:
        """Tokens answered per second of busy time; 0 while not measured."""
        ...

    def batch_s(self, now: float, samples: int, length: int = 1, *, idle: bool = False) -> float:
        """Seconds from dispatch to answer of a batch; 0 while not measured."""
        ...


# Not frozen: built twice per request, and a frozen dataclass's __init__ costs about four
# times as much (object.__setattr__ per field). Nothing keeps or changes it.
@dataclass(slots=True)
class Admission:
    now: float
    samples: int  # the new request's
    deadline_at: float
    queued_samples: int
    in_flight_samples: int
    max_queue_size: int
    estimate: Estimate
    batch_samples: int  # the batch whose time a request expects (max_batch_size)
    length: int  # its own: a long request expects a long batch, and adds more to drain
    queued_tokens: int
    in_flight_tokens: int


@dataclass(frozen=True, slots=True)
class Shed:
    reason: str  # "queue_full" | "deadline"
    message: str
    retry_after_s: float


def may_shed(queued_samples: int, samples: int, max_queue_size: int, deadline_at: float) -> bool:
    """False where `admit` would admit without asking anything (room in the queue, and no
    backlog or no deadline): the common case, decided before a snapshot is built."""
    if queued_samples + samples > max_queue_size:
        return True
    return queued_samples > 0 and deadline_at != math.inf


def admit(s: Admission) -> Shed | None:
    """None to admit; else why not and when a retry may succeed."""
    if s.queued_samples + s.samples > s.max_queue_size:
        return Shed(
            "queue_full",
            f"{s.queued_samples} samples queued, limit {s.max_queue_size}",
            _seconds(s.queued_tokens, s.estimate.rate(s.now)),
        )
    if not may_shed(s.queued_samples, s.samples, s.max_queue_size, s.deadline_at):
        return None  # no backlog (a free slot takes it soon), or no deadline to miss
    drain_rate = s.estimate.rate(s.now)
    if drain_rate <= 0.0:
        return None  # nothing measured yet
    # Everything ahead and the request itself drain at the measured rate; one more batch time
    # covers the batch that is computing when it is dispatched.
    tokens = s.queued_tokens + s.in_flight_tokens + s.samples * s.length
    batch_s = s.estimate.batch_s(s.now, s.batch_samples, s.length)
    done_at = s.now + tokens / (RATE_MARGIN * drain_rate) + batch_s
    if done_at <= s.deadline_at:
        return None
    return Shed(
        "deadline",
        f"{s.queued_samples} samples queued would take about "
        f"{(done_at - s.now) * 1000.0:.0f} ms, past this request's deadline",
        max(done_at - s.deadline_at, _seconds(s.queued_tokens, drain_rate)),
    )


def _seconds(tokens: int, rate: float) -> float:
    if rate <= 0.0:
        return UNKNOWN_RETRY_AFTER_S
    return max(0.001, tokens / rate)
