"""Plain descriptions of a model's tensors: what crosses process boundaries and the wire.

Pure data (no torch, no aiohttp): the config loader, the codec, the batcher and the worker
processes all share these.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

# Wire dtype names; every one maps to a numpy dtype of the same name (bool too).
SUPPORTED_DTYPES: tuple[str, ...] = (
    "float16",
    "float32",
    "float64",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "bool",
)


# What the server fills into an input that clients do not send (`fill` of a TensorSpec), for
# a model whose inputs have a dynamic length: from each sample's own length.
FILLS: tuple[str, ...] = (
    "padding_mask",  # bool [L]: true at padding (torch's src_key_padding_mask)
    "attention_mask",  # [L]: 1 at real tokens, 0 at padding (the Hugging Face convention)
    "lengths",  # integer []: the sample's own length
)
DYNAMIC = -1  # the one per-sample dimension that may vary from request to request


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model, described per sample (the batch dimension left out). One
    dimension may be DYNAMIC (-1): a length that varies between requests; a batch is padded
    to its longest with `pad`. An input with a `fill` is not sent: the server fills it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    pad: float = 0
    fill: str = ""

    @cached_property
    def dynamic_axis(self) -> int | None:
        """The per-sample axis that is DYNAMIC, or None for a fixed shape."""
        return self.shape.index(DYNAMIC) if DYNAMIC in self.shape else None

    def at_length(self, length: int) -> tuple[int, ...]:
        """The per-sample shape with its dynamic dimension set to `length`."""
        if self.dynamic_axis is None:
            return self.shape  # per batch in the worker: no tuple built for a fixed shape
        return tuple(length if d == DYNAMIC else d for d in self.shape)

    @cached_property
    def np_dtype(self) -> np.dtype[np.generic]:
        # Cached: read on every request, and np.dtype(str) costs a microsecond.
        return np.dtype(self.dtype)

    def sample_elements(self, length: int = 1) -> int:
        """Elements of one sample (at `length` where a dimension is dynamic)."""
        return int(np.prod(self.at_length(length), dtype=np.int64))

    def sample_bytes(self, length: int = 1) -> int:
        return self.sample_elements(length) * self.np_dtype.itemsize

    def describe(self) -> str:
        """`float32[16]`, the form used in CLI flags and error messages."""
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
        }
        if self.pad:
            wire["pad"] = self.pad
        if self.fill:
            wire["fill"] = self.fill
        return wire

    @classmethod
    def from_wire(cls, obj: dict[str, object]) -> TensorSpec:
        shape, pad = obj["shape"], obj.get("pad", 0)
        assert isinstance(shape, list) and isinstance(pad, int | float)
        return cls(
            str(obj["name"]),
            str(obj["dtype"]),
            tuple(int(d) for d in shape),
            pad,
            str(obj.get("fill", "")),
        )


def sent(specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The inputs a client sends: all but those the server fills."""
    return tuple(s for s in specs if not s.fill)


def is_dynamic(specs: Sequence[TensorSpec]) -> bool:
    """Whether a model's inputs have a dynamic length (so its batches are padded)."""
    return any(s.dynamic_axis is not None for s in specs)
