"""The contract every worker process keeps with the server (server/executors/contract.py), run
against each kind of worker through the real WorkerLink and Staging: the CPU worker, a CPU
stand-in of the GPU worker (the real cuda_worker serving loop over instances that run the model
on the CPU, tests/gpu_standins.py), and the real GPU worker where there is a GPU (marked cuda).

Each worker loads the built-in `linear` and a TorchScript model that raises on a poisoned
sample, times the sizes asked, answers every batch once with its own outputs, reports a model's
exception as a failure of that batch only, and exits when told to stop or when the server is
gone; a worker that dies, or that the watchdog kills in a stuck batch, has its batches handed
back. A stopped worker (SIGSTOP) stands for a stuck one: no sleeps, no timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from server.batching.pending import PendingRequest
from server.config import BatchingConfig, ModelConfig
from server.executors.base import Batch
from server.executors.contract import (
    Attach,
    CudaSetup,
    Done,
    Failed,
    FailureKind,
    Loaded,
    LoadFailed,
    Ready,
    WorkerSetup,
)
from server.executors.staging import Staging
from server.executors.watchdog import BatchLimits
from server.executors.worker_entry import run_cpu_worker, run_cuda_worker
from server.executors.worker_link import Flight, WorkerLink
from server.models.builtin import reference_forward
from server.models.spec import TensorSpec
from tests import fault_models
from tests.gpu_standins import standin_gpu_worker

CAP = 8  # every model's max_batch_size
SLOTS = 2  # two batches in flight: one GPU instance's slots, two regions of a CPU segment
WORKERS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("gpu-stand-in", id="gpu-stand-in"),
    pytest.param(
        "gpu",
        id="gpu",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]
Answer = tuple[Flight, Done | Failed]


def model_configs(tmp_path: Path) -> tuple[ModelConfig, ...]:
    work = fault_models.save(fault_models.Work(), tmp_path / "work.pt")
    batching = BatchingConfig(max_batch_size=CAP)
    work_input = (TensorSpec("input", "float32", (2,)),)
    return (
        ModelConfig("linear", "builtin:linear", "builtin", (), batching),
        ModelConfig("work", str(work), "torchscript", work_input, batching),
    )


class Harness:
    """The executor's side of one link, as plain as the link allows: it records what the worker
    says and hands nothing on."""

    def __init__(self, kind: str, models: tuple[ModelConfig, ...]) -> None:
        entries: dict[str, tuple[Callable[[Connection, Any], None], object]] = {
            "cpu": (run_cpu_worker, WorkerSetup(0, models, 1)),
            "gpu-stand-in": (standin_gpu_worker, CudaSetup(0, models)),
            "gpu": (run_cuda_worker, CudaSetup(0, models)),
        }
        self.entry, self.setup = entries[kind]
        self.limits = BatchLimits()
        self.link = WorkerLink(f"the {kind} worker", 0, self, self.limits)
        self.messages: asyncio.Queue[Loaded | LoadFailed | Ready] = asyncio.Queue()
        self.answers: list[Answer] = []
        self.answered = asyncio.Event()
        self.lost: list[list[Flight]] = []
        self.gone = asyncio.Event()
        self.staging: Staging | None = None

    async def start(self, plan: Mapping[str, list[int]]) -> tuple[Loaded, Ready]:
        self.link.start(self.entry, self.setup, "microbatch-contract-test")
        loaded = await asyncio.wait_for(self.messages.get(), 120.0)
        assert isinstance(loaded, Loaded), loaded
        layout = {name: (*specs, CAP, 1) for name, specs in loaded.models.items()}
        self.staging = Staging(layout, SLOTS)
        self.link.send(Attach(self.staging.name, SLOTS, dict(plan)))
        ready = await asyncio.wait_for(self.messages.get(), 120.0)
        assert isinstance(ready, Ready), ready
        return loaded, ready

    def send(self, slot: int, model: str, x: np.ndarray) -> Batch:
        request = PendingRequest({"input": x}, len(x), False, 0.0, 1e18, None)  # type: ignore[arg-type]
        batch = Batch(model, [request], len(x))
        assert self.staging is not None
        self.staging.stage(slot, batch)
        self.link.run(batch, lambda batch, outcome: None, slot)
        return batch

    async def until_answered(self, count: int) -> list[Answer]:
        while len(self.answers) < count:
            self.answered.clear()
            await asyncio.wait_for(self.answered.wait(), 60.0)
        return self.answers

    def outputs(self, answer: Answer) -> np.ndarray:
        flight, _ = answer
        assert self.staging is not None
        batch = flight.batch
        return self.staging.outputs(flight.slot, batch)["output"]

    async def close(self, stop: bool) -> int | None:
        self.link.close(stop=stop)
        await self.link.join(30.0)
        if self.staging is not None:
            self.staging.close()
        assert self.link.process is not None
        return self.link.process.exitcode

    # LinkOwner ---------------------------------------------------------------------------
    def on_message(self, link: WorkerLink, message: Loaded | LoadFailed | Ready) -> None:
        self.messages.put_nowait(message)

    def on_result(self, link: WorkerLink, flight: Flight, message: Done | Failed) -> None:
        self.answers.append((flight, message))
        self.answered.set()

    def on_lost(self, link: WorkerLink, flights: list[Flight]) -> None:
        self.lost.append(flights)
        self.gone.set()

    async def killed(self) -> list[Flight]:
        """The batches the link handed back, once the worker is gone and has been reaped."""
        await asyncio.wait_for(self.gone.wait(), 30.0)
        process = self.link.process
        assert process is not None
        for _ in range(1500):  # the reaper collects its status within a few of its 0.1 s rounds
            if process.exitcode is not None:
                break
            await asyncio.sleep(0.02)
        assert process.exitcode == -signal.SIGKILL
        (flights,) = self.lost
        return flights


def rows(samples: int, seed: int, width: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((samples, width)).astype(np.float32)


@pytest.mark.parametrize("kind", WORKERS)
async def test_a_worker_times_the_plan_and_answers_each_batch_once_with_its_own_outputs(
    kind: str, tmp_path: Path
) -> None:
    harness = Harness(kind, model_configs(tmp_path))
    loaded, ready = await harness.start({"linear": [1, 2, 4]})
    try:
        assert loaded.failed == {} and set(loaded.models) == {"linear", "work"}
        assert loaded.models["work"][0] == (TensorSpec("input", "float32", (2,)),)
        assert (loaded.device_name == "") == (kind == "cpu")
        assert [n for n, _ in ready.timings["linear"]] == [1, 2, 4] and "work" not in ready.timings
        assert all(seconds > 0 for _, seconds in ready.timings["linear"])
        assert ready.caps == ({} if kind == "cpu" else {"linear": CAP, "work": CAP})

        sent: list[tuple[Batch, np.ndarray]] = []
        for pair in range(3):  # both slots in flight at once, three times over
            xs = [rows(2 * pair + slot + 1, seed=10 * pair + slot) for slot in range(SLOTS)]
            sent += [(harness.send(slot, "linear", x), x) for slot, x in enumerate(xs)]
            for answer in (await harness.until_answered(len(sent)))[-SLOTS:]:
                flight, message = answer
                assert isinstance(message, Done), message
                assert message.compute_s > 0 and message.cap == (0 if kind == "cpu" else CAP)
                x = next(x for batch, x in sent if batch is flight.batch)
                expected = reference_forward("linear", x)
                np.testing.assert_allclose(harness.outputs(answer), expected, rtol=1e-5, atol=1e-6)
        assert sorted(id(f.batch) for f, _ in harness.answers) == sorted(id(b) for b, _ in sent)
        assert harness.link.flights == {} and harness.lost == []

        # The model raises on one batch: that batch fails, its batch-mate in the other slot is
        # answered, and the worker serves on.
        poisoned = np.array([[fault_models.POISON, 0.0], [1.0, 0.0]], np.float32)
        clean = np.array([[3.0, 0.0]], np.float32)
        bad, good = harness.send(0, "work", poisoned), harness.send(1, "work", clean)
        answers = dict((id(f.batch), (f, m)) for f, m in await harness.until_answered(8))
        failed = answers[id(bad)][1]
        assert isinstance(failed, Failed) and failed.kind is FailureKind.MODEL
        assert failed.message.startswith("model 'work' raised ")
        assert "poisoned input 666" in failed.message
        assert isinstance(answers[id(good)][1], Done)
        np.testing.assert_array_equal(harness.outputs(answers[id(good)]), clean * 2)
    finally:
        exitcode = await harness.close(stop=True)
    assert exitcode == 0 and harness.lost == []


@pytest.mark.parametrize("kind", WORKERS)
async def test_a_worker_whose_server_is_gone_exits(kind: str, tmp_path: Path) -> None:
    harness = Harness(kind, model_configs(tmp_path))
    await harness.start({})
    assert await harness.close(stop=False) == 0  # its pipe closed, unasked: nothing to answer


async def stuck(harness: Harness, batches: int) -> list[Batch]:
    """Batches sent to a worker that cannot run them (stopped, as a stuck one would be)."""
    assert harness.link.process is not None and harness.link.process.pid is not None
    os.kill(harness.link.process.pid, signal.SIGSTOP)
    return [harness.send(slot, "linear", rows(1, slot)) for slot in range(batches)]


@pytest.mark.parametrize("kind", WORKERS)
async def test_a_worker_that_dies_hands_back_its_batches(kind: str, tmp_path: Path) -> None:
    harness = Harness(kind, model_configs(tmp_path))
    await harness.start({})
    try:
        sent = await stuck(harness, SLOTS)
        assert harness.link.process is not None and harness.link.process.pid is not None
        os.kill(harness.link.process.pid, signal.SIGKILL)
        flights = await harness.killed()
        assert [f.batch for f in flights] == sent and not any(f.timed_out for f in flights)
        assert harness.answers == [] and not harness.link.alive and not harness.link.ready
    finally:
        await harness.close(stop=False)


@pytest.mark.parametrize("kind", WORKERS)
async def test_the_watchdog_kills_a_worker_stuck_in_a_batch(kind: str, tmp_path: Path) -> None:
    harness = Harness(kind, model_configs(tmp_path))
    await harness.start({})
    timeouts: list[str] = []
    harness.limits.set({"linear": 0.3}, timeouts.append)
    try:
        (batch,) = await stuck(harness, 1)
        flights = await harness.killed()
        assert [f.batch for f in flights] == [batch] and flights[0].timed_out
        assert timeouts == ["linear"] and harness.answers == [] and not harness.link.alive
    finally:
        await harness.close(stop=False)
