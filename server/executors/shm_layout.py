"""Where each batch tensor lives in a worker's shared-memory segment.

Pure data, computed on both sides of the process boundary from the same specs, sizes and slots
(staging.py on the event loop, worker_segment.py in the worker), so they agree by construction.
A segment holds `slots` independent regions (one batch in flight per slot); each region holds
every model's inputs and outputs at its max_batch_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.models.spec import TensorSpec

_ALIGN = 64  # cache line: no two tensors share one


@dataclass(frozen=True)
class TensorPlace:
    spec: TensorSpec
    offset: int
    max_batch: int

    def view(self, buf: memoryview) -> np.ndarray:
        """The full [max_batch, *shape] array over the segment (no copy)."""
        return np.ndarray(
            (self.max_batch, *self.spec.shape),
            dtype=self.spec.np_dtype,
            buffer=buf,
            offset=self.offset,
        )


@dataclass(frozen=True)
class ModelPlaces:
    inputs: tuple[TensorPlace, ...]
    outputs: tuple[TensorPlace, ...]


@dataclass(frozen=True)
class Layout:
    total_bytes: int
    # slots[slot][model name]
    slots: tuple[dict[str, ModelPlaces], ...]


ModelLayout = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], int]  # inputs, outputs, cap


def plan_layout(models: dict[str, ModelLayout], slots: int) -> Layout:
    """models: name -> (input specs, output specs, max_batch_size)."""
    offset = 0
    planned = []
    for _ in range(slots):
        region: dict[str, ModelPlaces] = {}
        for name, (inputs, outputs, max_batch) in models.items():
            places = []
            for spec in (*inputs, *outputs):
                places.append(TensorPlace(spec, offset, max_batch))
                offset += _aligned(spec.sample_bytes * max_batch)
            region[name] = ModelPlaces(tuple(places[: len(inputs)]), tuple(places[len(inputs) :]))
        planned.append(region)
    return Layout(max(offset, _ALIGN), tuple(planned))


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN
