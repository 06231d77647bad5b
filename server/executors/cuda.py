"""The CUDA executor, seen from the event loop: one GPU worker process per device behind one worker
link (worker_link.py), batches staged in its shared memory (staging.py).

Event loop only; never imports torch: the worker (cuda_worker.py) does. The policy is this
module's: a GPU worker that dies is not replaced: its batches fail back to the router, which
retries them elsewhere, and the device is left out from then on; one that reports its device
lost (a sticky CUDA error) before exiting is left out at once, its batches failed as
device-lost, which the router always runs elsewhere. A batch that runs past
workers.batch_timeout_s has the worker killed by its link's watchdog, and the same follows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from server.config import ModelConfig
from server.errors import ErrorCode
from server.executors.base import Batch, BatchDone, BatchFailed, DoneCallback
from server.executors.contract import (
    SLOTS_PER_INSTANCE,
    Attach,
    CudaSetup,
    Done,
    Failed,
    FailureKind,
    Loaded,
    LoadFailed,
    ModelSpecs,
    Points,
    Ready,
)
from server.executors.staging import Staging
from server.executors.watchdog import BatchLimits
from server.executors.worker_entry import run_cuda_worker
from server.executors.worker_link import Flight, WorkerLink

log = logging.getLogger(__name__)


class CudaStartError(RuntimeError):
    pass


class CudaExecutor:
    """One CUDA device: `cuda_instances` copies of each model, two batch slots per copy."""

    def __init__(
        self,
        index: int,
        models: tuple[ModelConfig, ...],
        threads: int = 1,
        worker: Callable[[Connection, CudaSetup], None] = run_cuda_worker,
    ) -> None:
        self.device = f"cuda:{index}"
        self.gpu_name = ""
        self._setup = CudaSetup(index, models, threads)
        self._worker = worker  # the process's entry point: a stand-in in CPU-only tests
        self._configs = {m.name: m for m in models}
        self._busy: dict[str, list[bool]] = {
            m.name: [False] * (m.placement.cuda_instances * SLOTS_PER_INSTANCE) for m in models
        }
        self._limits = BatchLimits()
        self._link = WorkerLink(f"the {self.device} worker", index, self, self._limits)
        self._staging: Staging | None = None
        self._listeners: list[Callable[[], None]] = []
        self._phase: asyncio.Future[Loaded | Ready] | None = None  # start-up's next message
        self.specs: dict[str, ModelSpecs] = {}
        self.caps = {m.name: m.batching.max_batch_size for m in models}
        self.calibration: dict[str, Points] = {}

    # Start and stop ------------------------------------------------------------------------
    async def start(self, timeout_s: float, plan: Mapping[str, Sequence[int]]) -> None:
        """Spawn the worker; wait until it has loaded, warmed up, timed `plan` and attached."""
        loop = asyncio.get_running_loop()
        self._phase = loop.create_future()
        self._link.start(self._worker, self._setup, f"microbatch-{self.device}")
        loaded = await asyncio.wait_for(self._phase, timeout_s)
        assert isinstance(loaded, Loaded)
        self.gpu_name = loaded.device_name
        self.specs.update(loaded.models)
        self._phase = loop.create_future()
        slots = max(len(s) for s in self._busy.values())
        batching = {n: self._configs[n].batching for n in self.specs}
        self._staging = Staging(
            {
                n: (*s, batching[n].max_batch_size, batching[n].max_length)
                for n, s in self.specs.items()
            },
            slots,
        )
        sizes = {name: list(sizes) for name, sizes in plan.items()}
        self._link.send(Attach(self._staging.name, slots, sizes))
        ready = await asyncio.wait_for(self._phase, timeout_s)
        assert isinstance(ready, Ready)
        self._phase = None
        self.calibration = ready.timings
        self.caps.update(ready.caps)
        for note in ready.notes:
            log.warning("%s: %s", self.device, note)
        log.info("%s (%s) ready: %s", self.device, self.gpu_name, ", ".join(self._configs))

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._fail(self._link.take_flights(), "the server stopped", FailureKind.STOPPED)
        self._link.close(stop=self._link.ready)
        await self._link.join(timeout_s)
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    # What the router reads ---------------------------------------------------------------
    def alive(self) -> bool:
        return self._link.ready

    def lanes(self, model: str) -> int:
        return max(1, len(self._busy.get(model, ())) // SLOTS_PER_INSTANCE)

    def cap(self, model: str) -> int:
        return self.caps.get(model, 1)

    def in_flight(self) -> int:
        return len(self._link.flights)

    def unavailable(self) -> str | None:
        """Why this GPU cannot run a batch now (its worker is gone, or stalled), or None."""
        if not self._link.ready:
            return f"{self.device} is out of service"
        stalled = self._link.stalled_s(time.monotonic())
        if stalled is None:
            return None
        return f"{self.device} has been running one batch for over {stalled:.1f} s"

    @property
    def process(self) -> BaseProcess | None:
        """The worker process (None before start), for its exit status."""
        return self._link.process

    # Dispatcher protocol -------------------------------------------------------------------
    def free_slots(self, model: str) -> int:
        if not self._link.ready or model not in self.specs:
            return 0
        return self._busy[model].count(False)

    def hold_for_fill(self, model: str) -> bool:
        return False

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        busy = self._busy[batch.model]
        free = [i for i, used in enumerate(busy) if not used]
        if not self._link.ready or not free or self._staging is None:
            failed = BatchFailed(
                ErrorCode.INTERNAL.value, f"{self.device} had no free slot", FailureKind.OTHER
            )
            done(batch, failed)
            return

        def load(slot: int) -> int:
            first = slot - slot % SLOTS_PER_INSTANCE
            return sum(busy[first : first + SLOTS_PER_INSTANCE])

        slot = min(free, key=load)  # the least busy instance
        self._staging.stage(slot, batch)
        busy[slot] = True
        self._link.run(batch, done, slot)

    def set_batch_timeouts(
        self, limits: Mapping[str, float], on_timeout: Callable[[str], None]
    ) -> None:
        """Watch every batch from now on: model -> seconds; on_timeout(model) counts a kill."""
        self._limits.set(limits, on_timeout)

    # Worker messages -----------------------------------------------------------------------
    def on_message(self, link: WorkerLink, message: Loaded | LoadFailed | Ready) -> None:
        if isinstance(message, LoadFailed):
            self._fail_start(message.message)
        elif self._phase is not None and not self._phase.done():
            self._phase.set_result(message)

    def on_result(self, link: WorkerLink, flight: Flight, message: Done | Failed) -> None:
        batch = flight.batch
        self._busy[batch.model][flight.slot] = False
        if isinstance(message, Failed) and message.kind is FailureKind.DEVICE:
            self._on_device_lost(flight, message.message)
            return
        if isinstance(message, Done):
            assert self._staging is not None
            outputs = self._staging.outputs(flight.slot, batch)
            self._note_cap(batch.model, message.cap, batch.samples)
            flight.done(batch, BatchDone(outputs, message.compute_s, self.device))
        else:
            code = ErrorCode.MODEL_ERROR.value
            flight.done(batch, BatchFailed(code, message.message, message.kind, self.device))
        for listener in self._listeners:
            listener()

    def _note_cap(self, model: str, cap: int, samples: int) -> None:
        if cap < self.caps.get(model, cap):
            log.warning(
                "%s ran out of memory on model %r (a batch of %d samples ran split); its batch "
                "cap there is now %d",
                self.device,
                model,
                samples,
                cap,
            )
            self.caps[model] = cap

    def _fail_start(self, message: str) -> None:
        if self._phase is not None and not self._phase.done():
            self._phase.set_exception(CudaStartError(message))
        self._link.close()

    def _on_device_lost(self, reported: Flight, message: str) -> None:
        """The worker's CUDA context failed and the worker is exiting. Every batch in flight
        there is lost with it, the reported one included, through no fault of its own: all are
        failed as device-lost (the router runs them elsewhere), and the device is left out
        now, before the worker's exit is even seen, so that nothing more is sent to it."""
        log.error("%s failed (%s); its batches go to the other executors", self.device, message)
        others = self._link.end()
        self._fail([reported], message, FailureKind.DEVICE)
        self._fail(others, f"{self.device} failed while this batch was on it", FailureKind.DEVICE)
        for listener in self._listeners:
            listener()

    def on_lost(self, link: WorkerLink, flights: list[Flight]) -> None:
        if self._phase is not None:
            self._fail_start(f"the {self.device} worker exited during start-up")
            return
        log.error("the %s worker died; its batches go to the other executors", self.device)
        if any(f.timed_out for f in flights):
            why = f"the {self.device} worker was killed: a batch ran past its time limit"
        else:
            why = f"the {self.device} worker died"
        self._fail(flights, why, FailureKind.WORKER)
        for listener in self._listeners:
            listener()

    def _fail(self, flights: list[Flight], message: str, kind: FailureKind) -> None:
        code = ErrorCode.SHUTTING_DOWN if kind is FailureKind.STOPPED else ErrorCode.MODEL_ERROR
        for busy in self._busy.values():
            busy[:] = [False] * len(busy)
        for flight in flights:
            flight.done(flight.batch, BatchFailed(code.value, message, kind, self.device))
