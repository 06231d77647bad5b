"""One model's batches in an executor: when each was dispatched, and which of their requests
have outlived their deadline there (a stopped or stuck worker), so that the queue answers those
with 504 at their deadline rather than when, or if, the batch comes back.

Event loop only; plain data. The queue owns one, adds each batch it dispatches and removes it
when the batch's outcome comes; a late outcome then finds those futures already answered.
"""

from __future__ import annotations

import math

from server.batching.pending import PendingRequest
from server.executors.base import Batch


class Running:
    def __init__(self) -> None:
        self._batches: dict[Batch, float] = {}  # batch -> when it was dispatched
        # A lower bound on the deadlines of unanswered requests in flight (exact after a sweep),
        # so that the common case, nothing overdue, costs one comparison.
        self.earliest_deadline_at = math.inf

    def add(self, batch: Batch, now: float, earliest_deadline_at: float) -> None:
        self._batches[batch] = now
        if earliest_deadline_at < self.earliest_deadline_at:
            self.earliest_deadline_at = earliest_deadline_at

    def pop(self, batch: Batch, now: float) -> float:
        """When the batch was dispatched (`now` for a batch it never saw)."""
        return self._batches.pop(batch, now)

    def overdue(self, now: float) -> list[tuple[PendingRequest, float]]:
        """Each unanswered request in flight whose deadline has passed, with how long its batch
        has been running; the bound is then recomputed over those still waiting."""
        if self.earliest_deadline_at > now:
            return []
        late: list[tuple[PendingRequest, float]] = []
        earliest = math.inf
        for batch, dispatched_at in self._batches.items():
            for request in batch.requests:
                if request.is_gone():
                    continue
                if request.deadline_at <= now:
                    late.append((request, now - dispatched_at))
                elif request.deadline_at < earliest:
                    earliest = request.deadline_at
        self.earliest_deadline_at = earliest
        return late
