"""The CUDA executor and the GPU worker's serving loop, on any machine: the real CudaExecutor
(event loop side) spawns a stand-in worker (tests/gpu_standins.py) that speaks the real
protocol and serves through the real `cuda_worker.serve_blocking` lanes, with fake model
instances that compute `2 * x` on the CPU. Covers start-up, staging, slots per instance,
results, the OOM failure, the cap report, a worker that dies, and a sticky CUDA error
(device-lost: the worker exits, its batches go to the CPU). The device itself is tested in
test_cuda.py; the contract every worker keeps, in test_worker_contract.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

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
from server.executors.cpu_pool import CpuPool
from server.executors.cuda import CudaExecutor
from server.executors.cuda_failure import OOM_MESSAGE
from server.http.model_listing import describe_routing
from server.metrics import Metrics
from server.models.builtin import reference_forward
from server.routing.devices import Devices
from server.routing.router import Router
from tests.gpu_standins import (
    ILLEGAL_ACCESS,
    OUT,
    SPEC,
    STICKY,
    STICKY_LATE,
    STUCK,
    failing_worker,
    fake_gpu_worker,
    standin_gpu_worker,
)


def _request(samples: int) -> PendingRequest:
    return PendingRequest({}, samples, False, 0.0, 1.0, None)  # type: ignore[arg-type]


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
    batch = Batch(model, [_request(len(x))], len(x), attempts=attempts)
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
        assert describe_routing(devices, "a")["devices"] == ["cpu", "cuda:0"]
        assert describe_routing(devices, "c")["devices"] == ["cpu"]
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
