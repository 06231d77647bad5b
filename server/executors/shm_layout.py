"""Where each batch tensor lives in a worker's shared-memory segment.

Pure data, computed on both sides of the process boundary from the same specs, sizes and slots
(staging.py on the event loop, worker_segment.py in the worker), so they agree by construction.
A segment holds `slots` independent regions (one batch in flight per slot); each region holds
every model's inputs and outputs at its max_batch_size (and, for a dynamic dimension, at its
max_length: a batch of padded length L uses the front of that room as a [n, ..., L, ...] array).
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
        """The full [max_batch, *shape] array over the segment (no copy); fixed shapes only."""
        return np.ndarray(
            (self.max_batch, *self.spec.shape),
            dtype=self.spec.np_dtype,
            buffer=buf,
            offset=self.offset,
        )

    def view_at(self, buf: memoryview, samples: int, length: int) -> np.ndarray:
        """A contiguous [samples, *shape at `length`] array at the front of the room (no copy):
        a padded batch's tensor, laid out as the model takes it."""
        return np.ndarray(
            (samples, *self.spec.at_length(length)),
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


# inputs, outputs, max_batch_size, max_length (the longest dynamic dimension)
ModelLayout = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...], int, int]


def plan_layout(models: dict[str, ModelLayout], slots: int) -> Layout:
    """models: name -> (input specs, output specs, max_batch_size, max_length)."""
    offset = 0
    planned = []
    for _ in range(slots):
        region: dict[str, ModelPlaces] = {}
        for name, (inputs, outputs, max_batch, max_length) in models.items():
            places = []
            for spec in (*inputs, *outputs):
                places.append(TensorPlace(spec, offset, max_batch))
                offset += _aligned(spec.sample_bytes(max_length) * max_batch)
            region[name] = ModelPlaces(tuple(places[: len(inputs)]), tuple(places[len(inputs) :]))
        planned.append(region)
    return Layout(max(offset, _ALIGN), tuple(planned))


def _aligned(size: int) -> int:
    return (size + _ALIGN - 1) // _ALIGN * _ALIGN
