"""A worker's shared-memory segment as the event loop sees it: each batch's inputs are copied into
its slot there before the worker is told to run it, and its outputs copied out once it is done.

Event loop (main process), for the CPU pool and the CUDA executor alike; numpy, no torch. The
worker lays out its own views with the same shm_layout.plan_layout over the same specs, sizes
and slots (worker_segment.py), so that both sides agree by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from server.executors.base import Batch
from server.executors.shm_layout import ModelLayout, plan_layout


class Staging:
    """`models`: name -> (input specs, output specs, max batch size); `slots` batch regions."""

    def __init__(self, models: Mapping[str, ModelLayout], slots: int) -> None:
        layout = plan_layout(dict(models), slots)
        self._segment = SharedMemory(create=True, size=layout.total_bytes)
        self.name = self._segment.name
        buf = self._segment.buf
        assert buf is not None
        self._specs = {name: (inputs, outputs) for name, (inputs, outputs, _) in models.items()}
        self._views = [
            {
                name: ([p.view(buf) for p in places.inputs], [p.view(buf) for p in places.outputs])
                for name, places in region.items()
            }
            for region in layout.slots
        ]

    def stage(self, slot: int, batch: Batch) -> None:
        """The batch's inputs, request after request, into the slot's input tensors."""
        inputs, _ = self._views[slot][batch.model]
        for spec, target in zip(self._specs[batch.model][0], inputs, strict=True):
            dst = target[: batch.samples]
            arrays = [r.inputs[spec.name] for r in batch.requests]
            # Dtypes were checked at admission; the cast to the model's dtype happens here,
            # in the one copy into shared memory.
            if len(arrays) == 1:
                np.copyto(dst, arrays[0], casting="unsafe")
            else:
                np.concatenate(arrays, axis=0, out=dst, casting="unsafe")

    def outputs(self, slot: int, model: str, samples: int) -> dict[str, np.ndarray]:
        """Copies of the slot's first `samples` output rows, owned by the caller."""
        _, outputs = self._views[slot][model]
        specs = self._specs[model][1]
        return {spec.name: view[:samples].copy() for spec, view in zip(specs, outputs, strict=True)}

    def close(self) -> None:
        """Unmaps and removes the segment (a worker still attached keeps its own mapping)."""
        self._views.clear()
        self._segment.close()
        self._segment.unlink()
