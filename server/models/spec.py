"""Plain descriptions of a model's tensors: what crosses process boundaries and the wire.

Pure data (no torch, no aiohttp): the config loader, the codec, the batcher and the worker
processes all share these.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model, described per sample (the batch dimension left out)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @cached_property
    def np_dtype(self) -> np.dtype[np.generic]:
        # Cached: read on every request, and np.dtype(str) costs a microsecond.
        return np.dtype(self.dtype)

    @property
    def sample_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def sample_bytes(self) -> int:
        return self.sample_elements * self.np_dtype.itemsize

    def describe(self) -> str:
        """`float32[16]`, the form used in CLI flags and error messages."""
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    def to_wire(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_wire(cls, obj: dict[str, object]) -> TensorSpec:
        shape = obj["shape"]
        assert isinstance(shape, list)
        return cls(str(obj["name"]), str(obj["dtype"]), tuple(int(d) for d in shape))
