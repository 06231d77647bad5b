"""The queue's part for a model with a dynamic dimension (token ids, frames): which waiting
requests ride together (formation.py's policy over the oldest few), and each request's answer
cut back to its own length from the batch's padded outputs.

Event loop; pure (numpy, no asyncio). The queue hands it the waiting requests in arrival order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.batching.formation import (
    BatchCost,
    Waiting,
    arrival_order,
    by_length,
    default_cost,
    window,
)
from server.batching.pending import PendingRequest
from server.models.padding import along
from server.models.spec import TensorSpec


@dataclass(frozen=True, slots=True)
class Lengths:
    """`trim`: output name -> its per-sample dynamic axis (outputs that follow the length);
    `length_aware`: batch similar lengths together, else the oldest requests as they came;
    `cost`: seconds for batches of (samples, padded length), what the choice weighs."""

    trim: dict[str, int]
    length_aware: bool = True
    cost: BatchCost = default_cost  # the model's calibrated cost, where there is one

    @classmethod
    def of(
        cls, outputs: Sequence[TensorSpec], length_aware: bool, cost: BatchCost | None = None
    ) -> Lengths:
        trim = {s.name: s.dynamic_axis for s in outputs if s.dynamic_axis is not None}
        return cls(trim, length_aware, cost or default_cost)

    def take(self, pending: deque[PendingRequest], max_batch: int) -> list[PendingRequest]:
        """The next batch's requests, taken out of `pending` (oldest first); the others stay
        in their order. The choice looks at the oldest window(max_batch) only."""
        head = [pending.popleft() for _ in range(min(len(pending), window(max_batch)))]
        picked = set(self.pick(head, max_batch))
        pending.extendleft(reversed([r for i, r in enumerate(head) if i not in picked]))
        return [r for i, r in enumerate(head) if i in picked]

    def pick(self, waiting: Sequence[PendingRequest], max_batch: int) -> tuple[int, ...]:
        """Indices into `waiting` (oldest first) of the requests to batch now; the oldest is
        always among them, so its delay bound holds and nothing starves."""
        seen = [Waiting(r.samples, r.length) for r in waiting]
        if self.length_aware:
            return by_length(seen, max_batch, self.cost).picked
        return arrival_order(seen, max_batch).picked

    def answer(
        self, outputs: dict[str, np.ndarray], rows: slice, request: PendingRequest
    ) -> dict[str, np.ndarray]:
        """One request's rows of the batch's outputs, each output that follows the length cut
        to the request's own; without the batch dimension if it was sent without."""
        mine = {
            name: arr[along(self.trim[name], request.length, rows)]
            if name in self.trim
            else arr[rows]
            for name, arr in outputs.items()
        }
        return {name: arr[0] for name, arr in mine.items()} if request.single else mine
