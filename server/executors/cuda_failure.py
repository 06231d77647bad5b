"""What an exception raised on a CUDA device means for the GPU worker: out of memory (split and
retry, already done by the instance), a device failure (the CUDA context is gone: report and
exit), or the model's own error (bisect the batch).

Runs in the GPU worker process (cuda_worker.py) and imports torch; pure functions of the
exception, so that they are tested on any machine (tests/test_cuda_failure.py).
"""

from __future__ import annotations

import torch

from server.executors.contract import FailureKind
from server.executors.cuda_instance import is_oom

# torch >= 2.8 raises this for CUDA runtime errors; older versions raise a RuntimeError whose
# text starts with "CUDA error". Looked up once so that both work.
_ACCELERATOR_ERROR: type[BaseException] | None = getattr(torch, "AcceleratorError", None)
_CUDA_ERROR_PREFIX = "CUDA error"
OOM_MESSAGE = "CUDA out of memory"  # how an out-of-memory failure's message starts


def classify(exc: BaseException) -> FailureKind:
    """MODEL, OUT_OF_MEMORY or DEVICE. Out of memory is checked first: it also arrives as
    "CUDA error: out of memory", and it leaves the context usable. Any other CUDA runtime error
    (an illegal memory access, a device-side assert) is sticky: every later launch on this
    context fails with it, whichever batch it belongs to, so it must never be blamed on the
    batch that happened to see it."""
    if is_oom(exc):
        return FailureKind.OUT_OF_MEMORY
    if _ACCELERATOR_ERROR is not None and isinstance(exc, _ACCELERATOR_ERROR):
        return FailureKind.DEVICE
    if isinstance(exc, RuntimeError) and str(exc).lstrip().startswith(_CUDA_ERROR_PREFIX):
        return FailureKind.DEVICE
    return FailureKind.MODEL


def describe(model: str, exc: BaseException, device: str = "the GPU") -> str:
    """The failure's message for the server, the logs and the client."""
    kind = classify(exc)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if kind is FailureKind.OUT_OF_MEMORY:
        return f"{OOM_MESSAGE} for model {model!r} even at one sample"
    if kind is FailureKind.DEVICE:
        # The first line names the error; the lines after it are torch's debugging hints.
        first = lines[0] if lines else ""
        return f"{device} failed while running model {model!r}: {type(exc).__name__}: {first}"
    return f"model {model!r} raised {type(exc).__name__}: {lines[-1] if lines else ''}"
