"""The CUDA executor and the GPU worker's serving loop, on any machine: the real CudaExecutor
(event loop side) spawns a stand-in worker that speaks the real protocol and serves through the
real `cuda_worker._serve_blocking` lanes, with fake model instances that compute `2 * x` on the
CPU. Covers start-up, staging, slots per instance, results, the OOM failure, the cap report, a
worker that dies, and a sticky CUDA error (device-lost: the worker exits, its batches go to the
CPU). The device itself is tested in test_cuda.py."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.batching.pending import PendingRequest
from server.clock import MonotonicClock
from server.config import (
    BatchingConfig,
    Config,
    DevicesConfig,
    ModelConfig,
    Placement,
    ServerSettings,
    WorkersConfig,
)
from server.executors.base import Batch, BatchDone, BatchFailed, BatchOutcome
from server.executors.contract import Attach, CudaSetup, Loaded, LoadFailed, Ready
from server.executors.cpu_pool import CpuPool
from server.executors.cuda import CudaExecutor
from server.executors.cuda_failure import OOM_MESSAGE
from server.executors.worker_channel import Channel
from server.metrics import Metrics
from server.models.builtin import reference_forward
from server.models.spec import TensorSpec
from server.routing.devices import Devices
from server.routing.router import Router

SPEC = TensorSpec("input", "float32", (3,))
OUT = TensorSpec("output", "float32", (3,))


def _request(samples: int) -> PendingRequest:
    return PendingRequest({}, samples, False, 0.0, 1.0, None)  # type: ignore[arg-type]


@dataclass
class FakeModel:
    inputs: tuple[TensorSpec, ...] = (SPEC,)
    outputs: tuple[TensorSpec, ...] = (OUT,)


STICKY = 555.0  # a sample with this value meets a sticky CUDA error at launch
STICKY_LATE = 556.0  # ... or when its batch is waited on (an asynchronous kernel error)
STUCK = 777.0  # a batch with this value stays in flight until the worker exits
ILLEGAL_ACCESS = "CUDA error: an illegal memory access was encountered"


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

    def __init__(self, cap: Any) -> None:
        self.model, self.cap = FakeModel(), cap
        self.release = threading.Event()
        self.release.set()

    def bind_thread(self) -> None:
        pass

    def submit(self, slot: int, inputs: list[Any], samples: int) -> FakePending:
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


def fake_gpu_worker(conn: Connection, setup: CudaSetup) -> None:
    """The handshake of cuda_worker_main, with fake instances, then its real serving loop."""
    from server.executors import cuda_worker
    from server.executors.cuda_instance import DeviceCap

    channel = Channel(conn)
    instances = {}
    for cfg in setup.models:
        cap = DeviceCap(cfg.batching.max_batch_size)  # shared by the model's instances
        instances[cfg.name] = [FakeInstance(cap) for _ in range(cfg.placement.cuda_instances)]
    channel.send(Loaded("Fake GPU", {n: ((SPEC,), (OUT,)) for n in instances}, {}))
    attach = channel.recv_blocking()
    assert isinstance(attach, Attach)
    segment = SharedMemory(name=attach.segment)
    first = {name: group[0] for name, group in instances.items()}
    views = cuda_worker.segment_views(segment, setup, first, attach.slots)  # type: ignore[arg-type]
    timings = {name: [(n, 0.001 + 1e-5 * n) for n in sizes] for name, sizes in attach.plan.items()}
    channel.send(Ready(timings, {n: i.cap.value for n, i in first.items()}, ["a note"]))
    try:
        cuda_worker.serve_blocking(channel, instances, views)  # type: ignore[arg-type]
    finally:
        segment.close()


def models(instances: int = 2) -> tuple[ModelConfig, ...]:
    batching = BatchingConfig(max_batch_size=8)
    return (
        ModelConfig(
            "m", "builtin:mlp", "builtin", (), batching, Placement(cuda_instances=instances)
        ),
    )


def batch_of(*rows: list[float]) -> Batch:
    requests = [_request(1) for _ in rows]
    for request, row in zip(requests, rows, strict=True):
        request.inputs = {"input": np.array([row], np.float32)}
    return Batch("m", requests, len(rows))


def settle(done: asyncio.Future[BatchOutcome]) -> Callable[[Batch, BatchOutcome], None]:
    return lambda batch, outcome: done.set_result(outcome)


async def run(executor: CudaExecutor, batch: Batch) -> BatchOutcome:
    done: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
    executor.dispatch(batch, lambda b, outcome: done.set_result(outcome))
    return await asyncio.wait_for(done, 30.0)


async def test_the_executor_runs_batches_through_the_worker_protocol(
    caplog: pytest.LogCaptureFixture,
) -> None:
    executor = CudaExecutor(0, models(), worker=fake_gpu_worker)
    await executor.start(60.0, {"m": [1, 2, 4, 8]})
    try:
        assert (executor.gpu_name, executor.alive(), executor.lanes("m")) == ("Fake GPU", True, 2)
        assert executor.specs["m"] == ((SPEC,), (OUT,))
        assert executor.calibration["m"][0][1] == pytest.approx(0.00101)
        assert executor.free_slots("m") == 4 and executor.free_slots("other") == 0
        assert "cuda:0: a note" in caplog.text

        outcome = await run(executor, batch_of([1, 2, 3], [4, 5, 6]))
        assert isinstance(outcome, BatchDone) and outcome.device == "cuda:0"
        assert outcome.outputs["output"].tolist() == [[2, 4, 6], [8, 10, 12]]
        assert outcome.compute_s == pytest.approx(0.002)

        outcomes = await asyncio.gather(*(run(executor, batch_of([i, i, i])) for i in range(4)))
        assert [o.outputs["output"][0, 0] for o in outcomes] == [0, 2, 4, 6]  # type: ignore[union-attr]

        failed = await run(executor, batch_of([1, -1, 1]))
        assert isinstance(failed, BatchFailed) and failed.message.startswith(OOM_MESSAGE)

        assert executor.cap("m") == 8
        await run(executor, batch_of([7, 7, 7]))
        assert executor.cap("m") == 4
        assert "cuda:0 ran out of memory on model 'm'" in caplog.text
        assert executor.free_slots("m") == 4 and executor.in_flight() == 0
    finally:
        await executor.stop()
    assert not executor.alive()


async def test_a_worker_that_dies_fails_its_batches_and_is_left_out() -> None:
    executor = CudaExecutor(0, models(instances=1), worker=fake_gpu_worker)
    await executor.start(60.0, {})
    woken: list[bool] = []
    executor.add_capacity_listener(lambda: woken.append(executor.alive()))
    try:
        outcome = await run(executor, batch_of([999, 0, 0]))
        assert isinstance(outcome, BatchFailed) and "worker died" in outcome.message
        assert not executor.alive() and executor.free_slots("m") == 0
        assert woken == [False]
        late = await run(executor, batch_of([1, 1, 1]))  # sent anyway: failed at once
        assert isinstance(late, BatchFailed)
    finally:
        await executor.stop()


async def test_a_worker_that_cannot_load_fails_the_start() -> None:
    executor = CudaExecutor(0, models(), worker=failing_worker)
    with pytest.raises(Exception, match="no CUDA device here"):
        await executor.start(60.0, {})
    await executor.stop()


async def test_a_sticky_cuda_error_loses_the_device_not_the_batch() -> None:
    executor = CudaExecutor(0, models(instances=2), worker=fake_gpu_worker)
    await executor.start(60.0, {})
    try:
        loop = asyncio.get_running_loop()
        stuck: asyncio.Future[BatchOutcome] = loop.create_future()
        executor.dispatch(batch_of([STUCK, 0, 0]), settle(stuck))
        outcome = await run(executor, batch_of([1, STICKY, 1]))
        # Device-lost, not "the model raised": the batcher must not bisect it, the router runs
        # it elsewhere; and the batch that was merely on the same device goes with it.
        assert isinstance(outcome, BatchFailed) and outcome.device_lost
        assert not outcome.model_raised
        assert outcome.message == (
            f"cuda:0 failed while running model 'm': AcceleratorError: {ILLEGAL_ACCESS}"
        )
        other = await asyncio.wait_for(stuck, 30.0)
        assert isinstance(other, BatchFailed) and other.device_lost
        assert "cuda:0 failed while this batch was on it" in other.message
        assert not executor.alive() and executor.free_slots("m") == 0
        assert executor.in_flight() == 0
    finally:
        await executor.stop()
    assert executor.process is not None and executor.process.exitcode == 3  # it exited


async def test_a_sticky_error_seen_when_waiting_also_loses_the_device() -> None:
    executor = CudaExecutor(0, models(instances=1), worker=fake_gpu_worker)
    await executor.start(60.0, {})
    try:
        outcome = await run(executor, batch_of([STICKY_LATE, 0, 0]))
        assert isinstance(outcome, BatchFailed) and outcome.device_lost
        assert ILLEGAL_ACCESS in outcome.message and not executor.alive()
    finally:
        await executor.stop()
    assert executor.process is not None and executor.process.exitcode == 3


async def test_a_stuck_batch_has_the_gpu_worker_killed_by_the_watchdog() -> None:
    executor = CudaExecutor(0, models(instances=1), worker=fake_gpu_worker)
    await executor.start(60.0, {})
    timeouts: list[str] = []
    executor.set_batch_timeouts({"m": 0.3}, timeouts.append)
    try:
        assert executor.unavailable() is None
        outcome = await run(executor, batch_of([STUCK, 0, 0]))
        # A dead worker's batch, not the model's fault: the router runs it elsewhere.
        assert isinstance(outcome, BatchFailed) and not outcome.model_raised
        assert outcome.device == "cuda:0" and "ran past its time limit" in outcome.message
        assert timeouts == ["m"] and not executor.alive() and executor.in_flight() == 0
        assert executor.unavailable() == "cuda:0 is out of service"
    finally:
        await executor.stop()
    assert executor.process is not None and executor.process.exitcode == -9  # SIGKILL


def failing_worker(conn: Connection, setup: CudaSetup) -> None:
    Channel(conn).send(LoadFailed("cuda:0: no CUDA device here"))


class CpuStandIn:
    """A "GPU" instance that runs the real model on the CPU, 1 microsecond per batch; a
    STICKY value meets a sticky CUDA error instead."""

    device = "cuda:0"

    def __init__(self, cfg: ModelConfig, cap: Any) -> None:
        from server.models.loading import load_model

        self.model, self.cap = load_model(cfg), cap

    def bind_thread(self) -> None:
        pass

    def submit(self, slot: int, inputs: list[Any], samples: int) -> FakePending:
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


def standin_gpu_worker(conn: Connection, setup: CudaSetup) -> None:
    from server.executors import cuda_worker
    from server.executors.cuda_instance import DeviceCap

    channel = Channel(conn)
    instances = {
        cfg.name: [CpuStandIn(cfg, DeviceCap(cfg.batching.max_batch_size))] for cfg in setup.models
    }
    first = {name: group[0] for name, group in instances.items()}
    specs = {n: (i.model.inputs, i.model.outputs) for n, i in first.items()}
    channel.send(Loaded("Stand-in GPU", specs, {}))
    attach = channel.recv_blocking()
    assert isinstance(attach, Attach)
    segment = SharedMemory(name=attach.segment)
    views = cuda_worker.segment_views(segment, setup, first, attach.slots)  # type: ignore[arg-type]
    timings = {name: [(n, 1e-6) for n in sizes] for name, sizes in attach.plan.items()}
    channel.send(Ready(timings, {n: i.cap.value for n, i in first.items()}, []))
    try:
        cuda_worker.serve_blocking(channel, instances, views)  # type: ignore[arg-type]
    finally:
        segment.close()


def stand_in_config(tmp_path: Path) -> Config:
    batching = BatchingConfig(max_batch_size=8)
    auto = ModelConfig("a", "builtin:linear", "builtin", (), batching)
    cpu_only = ModelConfig("c", "builtin:linear", "builtin", (), batching, Placement("cpu"))
    return Config(
        ServerSettings(),
        batching,
        WorkersConfig(cpu_workers=1, threads_per_worker=1),
        (auto, cpu_only),
        DevicesConfig(calibration_cache=str(tmp_path / "cal.json")),
    )


def stand_in_devices(config: Config) -> Devices:
    def stand_in(index: int, wanted: tuple[ModelConfig, ...]) -> CudaExecutor:
        return CudaExecutor(index, wanted, worker=standin_gpu_worker)

    return Devices(config, MonotonicClock(), lambda: ["Stand-in GPU"], stand_in)


async def routed(router: Router, model: str, x: np.ndarray, attempts: int = 0) -> BatchOutcome:
    batch = Batch(model, [_request(len(x))], len(x), attempts)
    batch.requests[0].inputs = {"input": x}
    done: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
    router.dispatch(batch, settle(done))
    return await asyncio.wait_for(done, 30.0)


async def test_devices_route_between_a_real_pool_and_a_stand_in_gpu(tmp_path: Path) -> None:
    config = stand_in_config(tmp_path)
    devices = stand_in_devices(config)
    pool = CpuPool(config.models, 1, 1, Metrics(), calibrate=await devices.prepare(1))
    try:
        infos = await pool.start(60.0)
        await devices.start(pool, infos)
        router = devices.dispatcher_for("a")
        assert isinstance(router, Router)
        assert devices.describe("a")["devices"] == ["cpu", "cuda:0"]
        assert devices.describe("c")["devices"] == ["cpu"]
        x = np.arange(30, dtype=np.float32).reshape(3, 10) / 10
        for name, device in (("a", "cuda:0"), ("c", "cpu")):
            batch = Batch(name, [_request(3)], 3)
            batch.requests[0].inputs = {"input": x}
            done: asyncio.Future[BatchOutcome] = asyncio.get_running_loop().create_future()
            router.dispatch(batch, settle(done))
            outcome = await asyncio.wait_for(done, 30.0)
            assert isinstance(outcome, BatchDone) and outcome.device == device
            expected = reference_forward("linear", x)
            np.testing.assert_allclose(outcome.outputs["output"], expected, rtol=1e-5, atol=1e-6)
        assert router.costs()[("a", "cuda:0")][2] == 1  # the observed batch corrected the fit
    finally:
        await devices.stop()
        await pool.stop()


async def test_a_batch_on_a_gpu_that_loses_its_device_is_answered_by_the_cpu(
    tmp_path: Path,
) -> None:
    config = stand_in_config(tmp_path)
    devices = stand_in_devices(config)
    pool = CpuPool(config.models, 1, 1, Metrics(), calibrate=await devices.prepare(1))
    try:
        await devices.start(pool, await pool.start(60.0))
        router = devices.dispatcher_for("a")
        assert isinstance(router, Router)
        x = np.arange(30, dtype=np.float32).reshape(3, 10) / 10
        x[1, 0] = STICKY  # the stand-in GPU meets a sticky CUDA error on this batch
        # attempts=1: with the GPU's own this uses up the retry that a dead worker gets; a
        # device-lost batch is run elsewhere all the same (it did not fail, the device did).
        outcome = await routed(router, "a", x, attempts=1)
        assert isinstance(outcome, BatchDone) and outcome.device == "cpu"
        expected = reference_forward("linear", x)
        np.testing.assert_allclose(outcome.outputs["output"], expected, rtol=1e-5, atol=1e-6)
        assert not devices.gpus[0].alive()
        after = await routed(router, "a", x[:1])  # the lost GPU is left out from now on
        assert isinstance(after, BatchDone) and after.device == "cpu"
    finally:
        await devices.stop()
        await pool.stop()
