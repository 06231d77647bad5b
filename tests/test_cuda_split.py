"""The CUDA out-of-memory split, with a fake forward that fails above a size: every row runs
exactly once, in order; the device's cap is lowered and remembered; only one sample that does
not fit fails. Runs everywhere (the real device is tested in test_cuda.py)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from server.executors.cuda_failure import OOM_MESSAGE, describe
from server.executors.cuda_instance import DeviceCap, is_oom, run_in_chunks


class FakeDevice:
    """A forward that runs out of memory on chunks bigger than `fits` rows."""

    def __init__(self, fits: int) -> None:
        self.fits = fits
        self.tried: list[tuple[int, int]] = []
        self.ran: list[tuple[int, int]] = []
        self.released = 0

    def run_range(self, lo: int, hi: int) -> None:
        self.tried.append((lo, hi))
        if hi - lo > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.ran.append((lo, hi))

    def release(self) -> None:
        self.released += 1


def test_an_oversized_batch_is_halved_until_it_fits_and_the_cap_remembers() -> None:
    device, cap = FakeDevice(fits=30), DeviceCap(100)
    run_in_chunks(100, cap, device.run_range, is_oom, device.release)
    assert device.tried[:3] == [(0, 100), (0, 50), (0, 25)]
    assert device.ran == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert (cap.value, device.released) == (25, 2)
    # The next batch splits at once: no more out-of-memory errors.
    device.tried.clear()
    run_in_chunks(60, cap, device.run_range, is_oom, device.release)
    assert device.tried == [(0, 25), (25, 50), (50, 60)]
    assert device.released == 2


def test_other_errors_are_not_retried() -> None:
    def broken(lo: int, hi: int) -> None:
        raise ValueError("shape mismatch")

    cap = DeviceCap(8)
    with pytest.raises(ValueError, match="shape mismatch"):
        run_in_chunks(8, cap, broken, is_oom, lambda: None)
    assert cap.value == 8


def test_a_single_sample_that_does_not_fit_fails() -> None:
    device, cap = FakeDevice(fits=0), DeviceCap(4)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_in_chunks(4, cap, device.run_range, is_oom, device.release)
    assert cap.value == 1 and device.ran == []


@given(st.integers(1, 300), st.integers(1, 256), st.integers(1, 64))
def test_every_row_runs_exactly_once_in_order(samples: int, cap_value: int, fits: int) -> None:
    device, cap = FakeDevice(fits), DeviceCap(cap_value)
    run_in_chunks(samples, cap, device.run_range, is_oom, device.release)
    rows = [row for lo, hi in device.ran for row in range(lo, hi)]
    assert rows == list(range(samples))
    assert all(hi - lo <= min(fits, cap_value) for lo, hi in device.ran)
    assert 1 <= cap.value <= cap_value


def test_the_cap_only_ever_goes_down() -> None:
    cap = DeviceCap(32)
    assert cap.lower(16) and cap.value == 16
    assert not cap.lower(20) and cap.value == 16
    assert cap.lower(0) and cap.value == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
        (RuntimeError("CUDA error: out of memory"), True),
        (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"), True),
        (RuntimeError("CUDA error: device-side assert triggered"), False),
        (ValueError("bad shape"), False),
    ],
)
def test_what_counts_as_out_of_memory(error: BaseException, expected: bool) -> None:
    assert is_oom(error) is expected


def test_the_oom_failure_names_itself_for_the_router() -> None:
    message = describe("mlp", torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert message.startswith(OOM_MESSAGE)
    assert describe("mlp", ValueError("x\nbad")) == "model 'mlp' raised ValueError: bad"
