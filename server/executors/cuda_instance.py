"""One copy of one model on one CUDA device: its streams, its buffers, and the split on CUDA
out-of-memory.

Runs in the GPU worker process (cuda_worker.py), each instance on its own thread, and in-process
for `microbatch infer --device gpu` and `microbatch compare`. Imports torch; the server's event
loop process never imports this module.

Per slot the instance owns a pinned host input buffer, a device input buffer and a pinned host
output buffer, allocated once at the model's max batch size (and max length). A batch is staged
into pinned memory, copied to the device on the copy stream, computed and copied back on the
compute stream; with two slots the next batch's host-to-device copy overlaps the current compute.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.config import Placement
from server.models.loading import LoadedModel, declared_output
from server.models.padding import batch_length, zero_batch
from server.models.spec import TensorSpec

_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class DeviceCap:
    """The largest batch one device runs in one go: starts at the max batch size and is only
    ever lowered (after an out-of-memory). Shared by the instances on the device."""

    def __init__(self, value: int) -> None:
        self.value = value
        self._lock = threading.Lock()

    def lower(self, to: int) -> bool:
        with self._lock:
            if to >= self.value:
                return False
            self.value = max(1, to)
            return True


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return "out of memory" in text.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in text


def run_in_chunks(
    samples: int,
    cap: DeviceCap,
    run_range: Callable[[int, int], None],
    oom: Callable[[BaseException], bool],
    release: Callable[[], None],
) -> None:
    """Rows [0, samples) in chunks of at most cap.value. A chunk that runs out of memory is
    halved and retried, and the device's cap lowered to the half so that later batches split
    at once; only a single sample that does not fit raises."""
    lo = 0
    while lo < samples:
        size = min(cap.value, samples - lo)
        try:
            run_range(lo, lo + size)
        except Exception as exc:
            if size <= 1 or not oom(exc):
                raise
        else:
            lo += size
            continue
        # Outside the except block: the failed attempt's tensors are unreferenced by now,
        # so the allocator can give their memory back before the retry.
        release()
        cap.lower(size // 2)


@dataclass
class Pending:
    """A submitted batch: wait_blocking() returns its compute seconds once outputs are ready."""

    samples: int
    outputs: list[torch.Tensor]  # pinned host views [:samples], valid after wait_blocking
    events: tuple[torch.cuda.Event, ...]
    staged_s: float

    def wait_blocking(self) -> float:
        h2d_start, h2d_end, compute_start, compute_end = self.events
        compute_end.synchronize()
        gpu_ms = h2d_start.elapsed_time(h2d_end) + compute_start.elapsed_time(compute_end)
        return self.staged_s + float(gpu_ms) / 1000.0


class CudaInstance:
    def __init__(
        self,
        model: LoadedModel,
        device: torch.device,
        placement: Placement,
        max_batch: int,
        cap: DeviceCap,
        slots: int = 2,
        max_length: int = 1,
    ) -> None:
        self.model = model
        self.device = device
        self.cap = cap
        self.max_batch = max_batch
        self._placement = placement
        model.module = model.module.to(device)
        self._eager = model.module
        if placement.compile:
            model.module = torch.compile(model.module)
        self._copy = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        self._compute = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
        # Flat buffers with room for max_batch samples at max_length; a batch uses the front
        # as [samples, *shape at its length] (one shape for a fixed-shape model).
        self.max_length = max_length
        self._pinned_in = [self._flat(model.inputs, pin_memory=True) for _ in range(slots)]
        self._device_in = [self._flat(model.inputs, device=device) for _ in range(slots)]
        self._pinned_out = [self._flat(model.outputs, pin_memory=True) for _ in range(slots)]

    def _flat(self, specs: Sequence[TensorSpec], **where: Any) -> list[torch.Tensor]:
        return [
            torch.empty(
                self.max_batch * s.sample_elements(self.max_length), dtype=_dtype(s.dtype), **where
            )
            for s in specs
        ]

    @staticmethod
    def _at(
        flats: Sequence[torch.Tensor], specs: Sequence[TensorSpec], samples: int, length: int
    ) -> list[torch.Tensor]:
        """Each flat buffer's front as a [samples, *shape at length] tensor."""
        return [
            flat[: samples * s.sample_elements(length)].view(samples, *s.at_length(length))
            for flat, s in zip(flats, specs, strict=True)
        ]

    def bind_thread(self) -> None:
        """Make this instance's device current on the calling thread (threads start on
        device 0, whatever the process chose)."""
        torch.cuda.set_device(self.device)

    def submit(
        self, slot: int, host_inputs: Sequence[torch.Tensor], samples: int, length: int = 1
    ) -> Pending:
        """Queue one batch on the device and return at once (out-of-memory splits excepted).
        `length`: the batch's padded length, for a model with a dynamic dimension."""
        started = time.perf_counter()
        specs = self.model.inputs
        pinned_in = self._at(self._pinned_in[slot], specs, samples, length)
        for pinned, src in zip(pinned_in, host_inputs, strict=True):
            pinned.copy_(src[:samples])
        staged_s = time.perf_counter() - started
        events = tuple(_timing_event() for _ in range(4))
        device_in = self._at(self._device_in[slot], specs, samples, length)
        outputs = self._at(self._pinned_out[slot], self.model.outputs, samples, length)
        with torch.cuda.stream(self._copy):
            events[0].record()
            for dst, pinned in zip(device_in, pinned_in, strict=True):
                dst.copy_(pinned, non_blocking=True)
            events[1].record()
        self._compute.wait_event(events[1])
        with torch.cuda.stream(self._compute), torch.inference_mode(), self._autocast():
            events[2].record()
            run_in_chunks(
                samples,
                self.cap,
                lambda lo, hi: self._forward(device_in, outputs, lo, hi, length),
                is_oom,
                torch.cuda.empty_cache,
            )
            events[3].record()
        return Pending(samples, outputs, events, staged_s)

    def _forward(
        self,
        device_in: list[torch.Tensor],
        outputs: list[torch.Tensor],
        lo: int,
        hi: int,
        length: int,
    ) -> None:
        result = self.model.run([t[lo:hi] for t in device_in])
        for spec, target in zip(self.model.outputs, outputs, strict=True):
            produced = declared_output(result, spec, hi - lo, length)
            target[lo:hi].copy_(produced.to(target.dtype), non_blocking=True)

    def run_blocking(
        self, inputs: Sequence[np.ndarray], slot: int = 0
    ) -> tuple[dict[str, np.ndarray], float]:
        """One batch from host arrays to host arrays: (outputs by name, compute seconds)."""
        samples = int(inputs[0].shape[0])
        length = batch_length(self.model.inputs, inputs)
        pending = self.submit(
            slot, [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs], samples, length
        )
        compute_s = pending.wait_blocking()
        names = [s.name for s in self.model.outputs]
        return {n: t.numpy().copy() for n, t in zip(names, pending.outputs, strict=True)}, compute_s

    def warm_blocking(
        self, sizes: Sequence[int], rounds: int = 2, lengths: Sequence[int] = (1,)
    ) -> list[str]:
        """Runs every size at every length (compiling, if asked, and filling the allocator's
        cache); returns notes for the server's log, such as a compile that failed and fell
        back to eager."""
        notes = []
        for n, length in itertools.product(sizes, lengths):
            zeros = zero_batch(self.model.inputs, n, length)
            for _ in range(rounds):
                try:
                    self.run_blocking(zeros)
                except Exception as exc:
                    if not self._placement.compile or self.model.module is self._eager:
                        raise
                    notes.append(f"torch.compile failed ({type(exc).__name__}: {exc}); eager")
                    self.model.module = self._eager
                    self.run_blocking(zeros)
        return notes

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = _AUTOCAST.get(self._placement.half_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=dtype)


def _timing_event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype
