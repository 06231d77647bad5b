"""A served model as the event loop knows it: specs reported by the workers, and its batching.

Plain data; built once at start-up, read on every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.config import BatchingConfig
from server.models.spec import TensorSpec, sent


@dataclass(frozen=True)
class ModelInfo:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingConfig
    # The inputs a client sends (the server fills the rest): worked out once, read per request.
    sent_inputs: tuple[TensorSpec, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sent_inputs", sent(self.inputs))
