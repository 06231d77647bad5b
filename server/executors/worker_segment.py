"""A worker's side of its shared-memory segment: torch tensors over the segment the server
attached it to, per slot and model, built once so that a batch only slices them.

Runs in the worker processes, CPU and GPU (imports torch). The server's side is staging.py;
both lay the segment out with shm_layout.plan_layout over the same specs, sizes and slots.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from multiprocessing.shared_memory import SharedMemory

import torch

from server.executors.contract import Attach
from server.executors.shm_layout import Layout, ModelLayout, plan_layout
from server.models.spec import is_dynamic


class Segment:
    """The segment's tensors per slot and model: built once for fixed shapes (a batch only
    slices them); for a model with a dynamic dimension, [samples, ..., length, ...] views at the
    front of its room, built per batch (a few microseconds) as staging.py wrote them."""

    def __init__(self, buf: memoryview, layout: Layout) -> None:
        self._buf = buf
        self._layout = layout
        self._fixed = [
            {
                name: (
                    [torch.from_numpy(p.view(buf)) for p in places.inputs],
                    [torch.from_numpy(p.view(buf)) for p in places.outputs],
                )
                for name, places in region.items()
                if not is_dynamic(tuple(p.spec for p in places.inputs))
            }
            for region in layout.slots
        ]

    def batch(
        self, slot: int, model: str, samples: int, length: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(inputs, outputs) of one batch: its first `samples` rows, at its padded length."""
        fixed = self._fixed[slot].get(model)
        if fixed is not None:
            inputs, outputs = fixed
            return [t[:samples] for t in inputs], [t[:samples] for t in outputs]
        places = self._layout.slots[slot][model]
        return (
            [torch.from_numpy(p.view_at(self._buf, samples, length)) for p in places.inputs],
            [torch.from_numpy(p.view_at(self._buf, samples, length)) for p in places.outputs],
        )


@contextmanager
def attached(attach: Attach, models: Mapping[str, ModelLayout]) -> Iterator[Segment]:
    """The segment's tensors while the block runs; detached (not removed: the server owns it)
    when it ends."""
    segment = SharedMemory(name=attach.segment)
    try:
        buf = segment.buf
        assert buf is not None
        yield Segment(buf, plan_layout(dict(models), attach.slots))
    finally:
        segment.close()
