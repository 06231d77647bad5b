"""Padding a batch of requests of different lengths to one length, and what the server fills in
for the model to ignore the padding (a mask or the lengths: TensorSpec.fill).

Pure numpy, no torch: the event loop stages batches with it (executors/staging.py), and the
workers build their warm-up and calibration inputs with it, so both fill the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.models.spec import TensorSpec


def filled(spec: TensorSpec, lengths: np.ndarray, padded: int) -> np.ndarray:
    """The `spec.fill` input for samples of `lengths` padded to `padded`: [n, padded] masks or
    [n] lengths, in the spec's dtype."""
    if spec.fill == "lengths":
        return lengths.astype(spec.np_dtype)
    real = np.arange(padded) < lengths[:, None]
    return (~real if spec.fill == "padding_mask" else real).astype(spec.np_dtype)


def sample_lengths(lengths: list[int], samples: list[int]) -> np.ndarray:
    """Each sample's own length, from each request's length and sample count."""
    return np.repeat(np.asarray(lengths, dtype=np.int64), samples)


def along(axis: int, length: int, rows: slice) -> tuple[slice, ...]:
    """An index into a [n, *sample] array: `rows`, and the first `length` positions of the
    per-sample dynamic `axis`."""
    return (rows, *(slice(None),) * axis, slice(0, length))


def zero_batch(specs: tuple[TensorSpec, ...], samples: int, length: int) -> list[np.ndarray]:
    """Inputs for a batch of `samples` all of `length` (warm-up, calibration): zeros, and the
    filled inputs as the server fills them (a mask with no padding, so no row is all masked)."""
    lengths = np.full(samples, length, dtype=np.int64)
    return [
        filled(s, lengths, length)
        if s.fill
        else np.zeros((samples, *s.at_length(length)), s.np_dtype)
        for s in specs
    ]


def batch_length(specs: tuple[TensorSpec, ...], arrays: Sequence[np.ndarray]) -> int:
    """The length of a batch of equal-length arrays in the specs' order (1 for fixed shapes)."""
    for spec, arr in zip(specs, arrays, strict=True):
        if spec.dynamic_axis is not None:
            return int(arr.shape[1 + spec.dynamic_axis])
    return 1
