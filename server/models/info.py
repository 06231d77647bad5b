"""A served model as the event loop knows it: specs reported by the workers, and its batching.

Plain data; built once at start-up, read on every request.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.config import BatchingConfig
from server.models.spec import TensorSpec


@dataclass(frozen=True)
class ModelInfo:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingConfig
