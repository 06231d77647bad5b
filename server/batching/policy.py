"""When to release a batch: a pure function of a snapshot of one model's queue.

No asyncio, no clock reads: the queue passes `now` in, so the rules are tested with numbers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)  # not frozen: one per batch formed, and frozen costs 4x to build
class QueueSnapshot:
    now: float
    queued_samples: int
    oldest_arrival_at: float | None
    free_slots: int  # batches the executors could start now
    max_batch_size: int
    max_delay_s: float
    # True where the executor gains from full batches (a GPU's fixed launch and copy cost).
    # False for the CPU pool: an idle worker is better used at once, and requests that arrive
    # while every worker is busy ride together in the next batch, so batches grow with load.
    hold_for_fill: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    release: bool
    wake_at: float | None = None  # look again then, unless an arrival or free slot comes first


HOLD = Decision(False)
RELEASE = Decision(True)


def decide(s: QueueSnapshot) -> Decision:
    if s.queued_samples == 0 or s.oldest_arrival_at is None:
        return HOLD
    if s.free_slots <= 0:
        return HOLD  # a finished batch frees a slot and wakes the queue
    if s.queued_samples >= s.max_batch_size or not s.hold_for_fill:
        return RELEASE
    flush_at = s.oldest_arrival_at + s.max_delay_s
    if s.now >= flush_at:
        return RELEASE
    return Decision(False, flush_at)
