"""What the GPU worker makes of an exception: out of memory (split), a device failure (a sticky
CUDA error: report the batch as device-lost and exit) or the model's own error (bisect). Pure
functions of the exception; runs on any machine (the errors are built, not provoked)."""

from __future__ import annotations

import pytest
import torch

from server.executors.contract import FailureKind
from server.executors.cuda_failure import OOM_MESSAGE, classify, describe

ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\n"
    "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "oom"),
        (RuntimeError("CUDA error: out of memory"), "oom"),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), "oom"),
        (RuntimeError(ILLEGAL_ACCESS), "device"),
        (RuntimeError("CUDA error: device-side assert triggered"), "device"),
        (RuntimeError("CUDA error: misaligned address"), "device"),
        (RuntimeError("CUDA error: unspecified launch failure"), "device"),
        (ValueError("poisoned input 666"), "model"),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)"), "model"),
        # The text must start with it: a model's own message that mentions CUDA is its own.
        (RuntimeError("expected a CUDA error code, got none"), "model"),
        (IndexError("index 7 is out of bounds"), "model"),
    ],
)
def test_each_failure_is_classified(error: BaseException, kind: str) -> None:
    expected = {
        "oom": FailureKind.OUT_OF_MEMORY,
        "device": FailureKind.DEVICE,
        "model": FailureKind.MODEL,
    }[kind]
    assert classify(error) is expected


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch < 2.8")
def test_torch_accelerator_errors_are_device_failures_whatever_their_text() -> None:
    error_type = torch.AcceleratorError
    assert classify(error_type("CUDA error: an illegal memory access")) is FailureKind.DEVICE
    assert classify(error_type("something else went wrong")) is FailureKind.DEVICE
    assert classify(error_type("CUDA error: out of memory")) is FailureKind.OUT_OF_MEMORY


def test_a_device_failure_names_the_device_and_the_error_not_torchs_hints() -> None:
    message = describe("mlp", RuntimeError(ILLEGAL_ACCESS), "cuda:1")
    assert message == (
        "cuda:1 failed while running model 'mlp': RuntimeError: "
        "CUDA error: an illegal memory access was encountered"
    )


def test_oom_and_model_errors_keep_their_messages() -> None:
    assert describe("m", RuntimeError("CUDA error: out of memory")).startswith(OOM_MESSAGE)
    assert describe("m", ValueError("bad\nreally bad")) == "model 'm' raised ValueError: really bad"
