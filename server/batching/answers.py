"""Each request of a finished batch answered from the batch's outputs: its own rows (cut back to
its own length where the model has a dynamic dimension), without the batch dimension if it was
sent without; and the count of samples whose outputs are not finite.

Event loop; numpy only. The queue calls it once per successful batch.
"""

from __future__ import annotations

import numpy as np

from server.batching.lengths import Lengths
from server.batching.pending import RequestResult, resolve
from server.executors.base import Batch, BatchDone


def answer_each(batch: Batch, outcome: BatchDone, lengths: Lengths | None) -> None:
    compute_ms = outcome.compute_s * 1000.0
    offset = 0
    for request in batch.requests:
        end = offset + request.samples
        if lengths is not None:
            outputs = lengths.answer(outcome.outputs, slice(offset, end), request)
        elif request.single:
            outputs = {name: arr[offset] for name, arr in outcome.outputs.items()}
        else:
            outputs = {name: arr[offset:end] for name, arr in outcome.outputs.items()}
        offset = end
        queue_ms = (request.dispatched_at - request.arrived_at) * 1000.0
        resolve(
            request.future,
            RequestResult(outputs, batch.samples, outcome.device, queue_ms, compute_ms),
        )


def non_finite_samples(outputs: dict[str, np.ndarray]) -> int:
    """Samples whose outputs hold NaN or infinity (answered as they are: see codec.py)."""
    rows: np.ndarray | None = None
    for arr in outputs.values():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
            rows = bad if rows is None else rows | bad
    return 0 if rows is None else int(rows.sum())
