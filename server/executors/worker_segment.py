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
from server.executors.shm_layout import ModelLayout, plan_layout

# views[slot][model] = (input tensors, output tensors), each [max batch, *per-sample shape]
SegmentViews = list[dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]]


@contextmanager
def attached(attach: Attach, models: Mapping[str, ModelLayout]) -> Iterator[SegmentViews]:
    """The segment's tensors while the block runs; detached (not removed: the server owns it)
    when it ends."""
    segment = SharedMemory(name=attach.segment)
    try:
        buf = segment.buf
        assert buf is not None
        layout = plan_layout(dict(models), attach.slots)
        yield [
            {
                name: (
                    [torch.from_numpy(p.view(buf)) for p in places.inputs],
                    [torch.from_numpy(p.view(buf)) for p in places.outputs],
                )
                for name, places in region.items()
            }
            for region in layout.slots
        ]
    finally:
        segment.close()
