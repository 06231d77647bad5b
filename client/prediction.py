"""What a predict call returns when asked for more than the arrays: outputs plus the server's
report on each HTTP request (batch size, device, time in the queue and in the model).

Plain frozen data; built on the client's event loop, read from any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestInfo:
    """The server's report on one HTTP request."""

    request_id: str
    model: str
    batch_size: int  # samples in the batch the server ran it in (batch-mates included)
    device: str  # where it ran, e.g. "cpu" or "cuda:0"
    queue_ms: float  # from arrival to the start of its batch
    compute_ms: float  # the batch's time in the model


@dataclass(frozen=True)
class Prediction:
    """Outputs by name, and one RequestInfo per HTTP request, in input order.

    There is one request unless the input held more samples than the model's max_batch_size
    and was split; `info` is then the first part's report and `requests` has them all.
    """

    outputs: dict[str, np.ndarray]
    requests: tuple[RequestInfo, ...]

    @property
    def output(self) -> np.ndarray:
        """The only output of a single-output model."""
        if len(self.outputs) != 1:
            raise ValueError(
                f"the model has {len(self.outputs)} outputs ({', '.join(self.outputs)}); "
                "read them from .outputs by name"
            )
        return next(iter(self.outputs.values()))

    @property
    def info(self) -> RequestInfo:
        return self.requests[0]

    @property
    def device(self) -> str:
        return self.requests[0].device

    @property
    def batch_size(self) -> int:
        return self.requests[0].batch_size

    @property
    def queue_ms(self) -> float:
        """The longest queue wait among the requests (they ran concurrently)."""
        return max(r.queue_ms for r in self.requests)

    @property
    def compute_ms(self) -> float:
        """The longest model time among the requests (they ran concurrently)."""
        return max(r.compute_ms for r in self.requests)
