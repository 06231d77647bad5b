"""Stand-ins for the GPU worker that run on any machine: the real `cuda_worker` serving loop
(lanes, threads, slots per instance, the failure rules) over instances that compute on the CPU.
FakeInstance computes 2 * x and fails on chosen values; CpuStandIn runs the real model.

Runs in a spawned worker process (each entry point is a module-level function, so that spawn
can find it); imports torch only there.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from server.config import ModelConfig
from server.executors.contract import Attach, CudaSetup, Loaded, LoadFailed, Points, Ready
from server.executors.worker_channel import Channel
from server.models.spec import TensorSpec

SPEC = TensorSpec("input", "float32", (3,))
OUT = TensorSpec("output", "float32", (3,))
STICKY = 555.0  # a sample with this value meets a sticky CUDA error at launch
STICKY_LATE = 556.0  # ... or when its batch is waited on (an asynchronous kernel error)
STUCK = 777.0  # a batch with this value stays in flight until the worker exits
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


@dataclass
class FakeModel:
    inputs: tuple[TensorSpec, ...] = (SPEC,)
    outputs: tuple[TensorSpec, ...] = (OUT,)


class FakePending:
    def __init__(
        self,
        samples: int,
        outputs: list[Any],
        release: threading.Event,
        error: BaseException | None = None,
    ) -> None:
        self.samples, self.outputs, self._release, self._error = samples, outputs, release, error

    def wait_blocking(self) -> float:
        self._release.wait(30.0)
        if self._error is not None:
            raise self._error
        return 0.002


class FakeInstance:
    """2 * x on the CPU; a -1 anywhere is an OOM at one sample, a 999 kills the process, a
    7 lowers the cap to 4 (as a split would), STICKY and STICKY_LATE raise a CUDA error, and
    STUCK never finishes."""

    device = "cuda:0"

    def __init__(self, cfg: ModelConfig, cap: Any) -> None:
        self.model, self.cap = FakeModel(), cap
        self.release = threading.Event()
        self.release.set()

    def bind_thread(self) -> None:
        pass

    def submit(self, slot: int, inputs: list[Any], samples: int, length: int = 1) -> FakePending:
        import torch

        x = inputs[0][:samples]
        if bool((x == 999).any()):
            os._exit(9)
        if bool((x == -1).any()):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        if bool((x == 7).any()):
            self.cap.lower(4)
        if bool((x == STICKY).any()):
            raise torch.AcceleratorError(ILLEGAL_ACCESS)
        if bool((x == STUCK).any()):
            return FakePending(samples, [x * 2], threading.Event())
        late = RuntimeError(ILLEGAL_ACCESS) if bool((x == STICKY_LATE).any()) else None
        return FakePending(samples, [x * 2], self.release, late)


class CpuStandIn:
    """A "GPU" instance that runs the real model on the CPU, 1 microsecond per batch; a
    STICKY value meets a sticky CUDA error instead."""

    device = "cuda:0"

    def __init__(self, cfg: ModelConfig, cap: Any) -> None:
        from server.models.loading import load_model

        self.model, self.cap = load_model(cfg), cap

    def bind_thread(self) -> None:
        pass

    def submit(self, slot: int, inputs: list[Any], samples: int, length: int = 1) -> FakePending:
        import torch

        if bool((inputs[0][:samples] == STICKY).any()):
            raise RuntimeError(ILLEGAL_ACCESS)
        with torch.inference_mode():
            result = self.model.run([t[:samples] for t in inputs])
        outputs = [result[spec.name].clone() for spec in self.model.outputs]
        ready = threading.Event()
        ready.set()
        pending = FakePending(samples, outputs, ready)
        pending.wait_blocking = lambda: 1e-6  # type: ignore[method-assign]
        return pending


def fake_gpu_worker(conn: Connection, setup: CudaSetup) -> None:
    """FakeInstances on "Fake GPU", timed as 1 ms + 10 us per sample."""
    _serve(conn, setup, "Fake GPU", FakeInstance, lambda n: 0.001 + 1e-5 * n, ["a note"])


def standin_gpu_worker(conn: Connection, setup: CudaSetup) -> None:
    """CpuStandIns on "Stand-in GPU", timed as 1 us per batch."""
    _serve(conn, setup, "Stand-in GPU", CpuStandIn, lambda n: 1e-6, [])


def failing_worker(conn: Connection, setup: CudaSetup) -> None:
    Channel(conn).send(LoadFailed("cuda:0: no CUDA device here"))


def _serve(
    conn: Connection,
    setup: CudaSetup,
    name: str,
    make: Callable[[ModelConfig, Any], Any],
    seconds: Callable[[int], float],
    notes: list[str],
) -> None:
    """The handshake of cuda_worker_main with these instances, then its real serving loop."""
    from server.executors import cuda_worker
    from server.executors.cuda_instance import DeviceCap
    from server.executors.worker_segment import attached

    channel = Channel(conn)
    instances = {}
    for cfg in setup.models:
        cap = DeviceCap(cfg.batching.max_batch_size)  # shared by the model's instances
        instances[cfg.name] = [make(cfg, cap) for _ in range(cfg.placement.cuda_instances)]
    first = {n: group[0] for n, group in instances.items()}
    channel.send(Loaded(name, {n: (i.model.inputs, i.model.outputs) for n, i in first.items()}, {}))
    attach = channel.recv_blocking()
    if not isinstance(attach, Attach):
        return
    sizes = {cfg.name: cfg.batching for cfg in setup.models}
    layout = {
        n: (i.model.inputs, i.model.outputs, sizes[n].max_batch_size, sizes[n].max_length)
        for n, i in first.items()
    }
    timings: dict[str, Points] = {
        model: [(n, seconds(n)) for n in sizes] for model, sizes in attach.plan.items()
    }
    with attached(attach, layout) as views:
        channel.send(Ready(timings, {n: i.cap.value for n, i in first.items()}, notes))
        cuda_worker.serve_blocking(channel, instances, views)
