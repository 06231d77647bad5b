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
from server.models.padding import along, filled, sample_lengths
from server.models.spec import is_dynamic


class Staging:
    """`models`: name -> (input specs, output specs, max batch size, max length); `slots`
    batch regions."""

    def __init__(self, models: Mapping[str, ModelLayout], slots: int) -> None:
        layout = plan_layout(dict(models), slots)
        self._segment = SharedMemory(create=True, size=layout.total_bytes)
        self.name = self._segment.name
        buf = self._segment.buf
        assert buf is not None
        self._buf = buf
        self._specs = {name: (model[0], model[1]) for name, model in models.items()}
        self._places = layout.slots
        self._dynamic = {name for name, (inputs, _) in self._specs.items() if is_dynamic(inputs)}
        self._views = [
            {
                name: ([p.view(buf) for p in places.inputs], [p.view(buf) for p in places.outputs])
                for name, places in region.items()
                if name not in self._dynamic
            }
            for region in layout.slots
        ]

    def stage(self, slot: int, batch: Batch) -> None:
        """The batch's inputs, request after request, into the slot's input tensors."""
        if batch.model in self._dynamic:
            self._stage_padded(slot, batch)
            return
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

    def _stage_padded(self, slot: int, batch: Batch) -> None:
        """Each request's rows at the front of the batch's padded length, the rest `pad`; the
        filled inputs (masks, lengths) from each sample's own length."""
        n, padded = batch.samples, batch.length
        requests = batch.requests
        places = self._places[slot][batch.model].inputs
        lengths = [r.length for r in requests]
        for place in places:
            spec = place.spec
            dst = place.view_at(self._buf, n, padded)
            if spec.fill:
                per_sample = sample_lengths(lengths, [r.samples for r in requests])
                dst[...] = filled(spec, per_sample, padded)
                continue
            axis = spec.dynamic_axis
            if axis is None:
                np.concatenate(
                    [r.inputs[spec.name] for r in requests], axis=0, out=dst, casting="unsafe"
                )
                continue
            if min(lengths) < padded:
                dst[...] = spec.pad
            row = 0
            for request in requests:
                rows = slice(row, row + request.samples)
                np.copyto(
                    dst[along(axis, request.length, rows)],
                    request.inputs[spec.name],
                    casting="unsafe",
                )
                row += request.samples

    def outputs(self, slot: int, batch: Batch) -> dict[str, np.ndarray]:
        """Copies of the slot's first `batch.samples` output rows (at the batch's padded length
        where an output has the dynamic dimension), owned by the caller."""
        if batch.model in self._dynamic:
            places = self._places[slot][batch.model].outputs
            return {
                p.spec.name: p.view_at(self._buf, batch.samples, batch.length).copy()
                for p in places
            }
        _, outputs = self._views[slot][batch.model]
        specs = self._specs[batch.model][1]
        return {
            spec.name: view[: batch.samples].copy()
            for spec, view in zip(specs, outputs, strict=True)
        }

    def close(self) -> None:
        """Unmaps and removes the segment (a worker still attached keeps its own mapping)."""
        self._views.clear()
        self._places = ()
        del self._buf
        self._segment.close()
        self._segment.unlink()
