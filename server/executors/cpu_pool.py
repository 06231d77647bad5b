"""The CPU worker pool, seen from the event loop: one worker link (worker_link.py) per worker
process, each batch staged in its worker's shared memory (staging.py).

Event loop only; never imports torch (the workers do). The policy is this module's: a dead worker
is replaced, and its batches are retried once on another worker, then failed with model_error,
so no request goes unanswered. A worker whose batch runs past workers.batch_timeout_s is killed
by its link's watchdog, and the same follows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from server.config import ModelConfig
from server.errors import ErrorCode
from server.executors.base import Batch, BatchDone, BatchFailed, DoneCallback
from server.executors.contract import (
    Attach,
    Done,
    Failed,
    FailureKind,
    Loaded,
    LoadFailed,
    Points,
    Ready,
    WorkerSetup,
)
from server.executors.staging import Staging
from server.executors.watchdog import BatchLimits
from server.executors.worker_entry import run_cpu_worker
from server.executors.worker_link import Flight, WorkerLink
from server.metrics import Metrics
from server.models.info import ModelInfo

log = logging.getLogger(__name__)

# Batches in flight per worker. A second slot would stage the next batch while the current one
# computes, but measured on 2 cores it halves batch sizes and doubles the per-batch system
# calls, costing more than the idle gap it hides (README, "Batching").
SLOTS_PER_WORKER = 1
MAX_ATTEMPTS = 2  # a batch whose worker died is retried once
RESPAWN_BACKOFF_S = (0.0, 0.5, 2.0, 5.0)


class PoolStartError(RuntimeError):
    pass


class _Worker:
    """One worker as the pool keeps it: its link, which of its slots are busy, its start-up."""

    def __init__(self, link: WorkerLink, started: asyncio.Future[None] | None) -> None:
        self.link = link
        self.busy_slots = [False] * SLOTS_PER_WORKER
        self.started = started  # until the pool has started: the worker's start-up

    def free_slot(self) -> int | None:
        if not self.link.ready or all(self.busy_slots):
            return None
        return self.busy_slots.index(False)

    @property
    def busy(self) -> int:
        return sum(self.busy_slots)


class CpuPool:
    device = "cpu"

    def __init__(
        self,
        models: tuple[ModelConfig, ...],
        workers: int,
        threads: int,
        metrics: Metrics,
        calibrate: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        self._configs = models
        # Worker 0 times these models over these batch sizes once, before it reports ready.
        self._calibrate = {name: list(sizes) for name, sizes in (calibrate or {}).items()}
        self.calibration: dict[str, Points] = {}
        self._size = workers
        self._threads = threads
        self._metrics = metrics
        self._workers: dict[int, _Worker] = {}
        self._staging: dict[int, Staging] = {}  # by worker index, kept for its replacements
        self.models: dict[str, ModelInfo] = {}
        self.missing: dict[str, str] = {}  # model -> why it failed to load or warm up
        self._listeners: list[Callable[[], None]] = []
        self._retry: deque[tuple[Batch, DoneCallback]] = deque()
        self._stopping = False
        self._failures: dict[int, int] = {}
        self._started = False  # after start(): a worker that fails is replaced, not fatal
        self._limits = BatchLimits()

    # Start and stop ------------------------------------------------------------------------
    async def start(self, timeout_s: float) -> dict[str, ModelInfo]:
        """Spawn every worker and wait until each has loaded, warmed up and attached."""
        for index in range(self._size):
            self._spawn(index)
        waits = [w.started for w in self._workers.values() if w.started is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout_s)
        except asyncio.TimeoutError:
            late = [i for i, w in self._workers.items() if not w.link.ready]
            raise PoolStartError(
                f"CPU workers {late} were not ready after {timeout_s:.0f} s "
                "(workers.start_timeout_s)"
            ) from None
        self._started = True
        for worker in self._workers.values():
            worker.started = None
        log.info("CPU pool ready: %d workers x %d threads", self._size, self._threads)
        return self.models

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        for worker in list(self._workers.values()):
            for flight in worker.link.take_flights():
                failed = BatchFailed(
                    ErrorCode.SHUTTING_DOWN.value,
                    "the server stopped",
                    FailureKind.STOPPED,
                    self.device,
                )
                flight.done(flight.batch, failed)
            worker.link.close(stop=True)
        await asyncio.gather(*(w.link.join(timeout_s) for w in self._workers.values()))
        for staging in self._staging.values():
            staging.close()
        self._staging.clear()

    def _spawn(self, index: int) -> None:
        link = WorkerLink(f"CPU worker {index}", index, self, self._limits)
        started = None if self._started else asyncio.get_running_loop().create_future()
        self._workers[index] = _Worker(link, started)
        setup = WorkerSetup(index, self._configs, self._threads)
        link.start(run_cpu_worker, setup, f"microbatch-cpu-{index}")

    # Dispatcher protocol -------------------------------------------------------------------
    def free_slots(self, model: str) -> int:
        if self._retry:
            return 0  # batches of crashed workers go first
        return sum(w.busy_slots.count(False) for w in self._workers.values() if w.link.ready)

    def hold_for_fill(self, model: str) -> bool:
        return False

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        worker = min(
            (w for w in self._workers.values() if w.free_slot() is not None),
            key=lambda w: w.busy,
            default=None,
        )
        if worker is None:
            self._retry.append((batch, done))  # no capacity: runs on the next free slot
            return
        slot = worker.free_slot()
        assert slot is not None
        self._staging[worker.link.index].stage(slot, batch)
        worker.busy_slots[slot] = True
        worker.link.run(batch, done, slot)

    # Worker messages -----------------------------------------------------------------------
    def on_result(self, link: WorkerLink, flight: Flight, message: Done | Failed) -> None:
        self._workers[link.index].busy_slots[flight.slot] = False
        batch = flight.batch
        if isinstance(message, Done):
            outputs = self._staging[link.index].outputs(flight.slot, batch)
            # The next batch goes to the worker before this one's answers are written, so the
            # worker computes while the event loop answers.
            self._capacity_freed()
            flight.done(batch, BatchDone(outputs, message.compute_s, self.device))
        else:
            # The worker reports only the model's own exceptions this way. Answered first, so
            # that the halves of a poisoned batch take the freed slot ahead of the queue.
            code = ErrorCode.MODEL_ERROR.value
            flight.done(batch, BatchFailed(code, message.message, message.kind, self.device))
            self._capacity_freed()

    def on_message(self, link: WorkerLink, message: Loaded | LoadFailed | Ready) -> None:
        worker = self._workers[link.index]
        if isinstance(message, Loaded):
            self._on_loaded(link, message)
        elif isinstance(message, Ready):
            self.calibration.update(message.timings)
            self._failures.pop(link.index, None)
            if worker.started is not None and not worker.started.done():
                worker.started.set_result(None)
            self._capacity_freed()
        else:
            self._on_load_failed(link, message.message)

    def _on_loaded(self, link: WorkerLink, loaded: Loaded) -> None:
        batching = {cfg.name: cfg.batching for cfg in self._configs}
        infos = {
            name: ModelInfo(name, inputs, outputs, batching[name])
            for name, (inputs, outputs) in loaded.models.items()
        }
        if not self.models:
            self.models = infos
            self.missing = dict(loaded.failed)
        elif infos != self.models:
            self._on_load_failed(
                link,
                f"worker {link.index} loaded other models or specs than the first worker "
                f"({sorted(infos)}, expected {sorted(self.models)})",
            )
            return
        if link.index not in self._staging:
            layout = {
                n: (m.inputs, m.outputs, m.batching.max_batch_size, m.batching.max_length)
                for n, m in infos.items()
            }
            self._staging[link.index] = Staging(layout, SLOTS_PER_WORKER)
        plan = self._calibrate if link.index == 0 and not self._started else {}
        link.send(Attach(self._staging[link.index].name, SLOTS_PER_WORKER, plan))

    def _on_load_failed(self, link: WorkerLink, message: str) -> None:
        log.error("CPU worker %d failed to start: %s", link.index, message)
        started = self._workers[link.index].started
        if started is not None and not started.done():
            started.set_exception(PoolStartError(message))
            link.close()
            return
        link.lose()

    # Death and replacement -----------------------------------------------------------------
    def set_batch_timeouts(
        self, limits: Mapping[str, float], on_timeout: Callable[[str], None]
    ) -> None:
        """Watch every batch from now on: model -> seconds; on_timeout(model) counts a kill."""
        self._limits.set(limits, on_timeout)

    def on_lost(self, link: WorkerLink, flights: list[Flight]) -> None:
        worker = self._workers[link.index]
        worker.busy_slots = [False] * SLOTS_PER_WORKER
        if worker.started is not None and not worker.started.done():
            worker.started.set_exception(
                PoolStartError(f"CPU worker {link.index} exited during start-up")
            )
            return
        if self._stopping:
            return
        pid = link.process.pid if link.process is not None else None
        log.error("CPU worker %d (pid %s) died; replacing it", link.index, pid)
        self._metrics.worker_restarts += 1
        self._retry_or_fail(flights)
        failures = self._failures.get(link.index, 0)
        self._failures[link.index] = failures + 1
        delay = RESPAWN_BACKOFF_S[min(failures, len(RESPAWN_BACKOFF_S) - 1)]
        asyncio.get_running_loop().call_later(delay, self._respawn, link.index)
        self._capacity_freed()

    def _retry_or_fail(self, flights: list[Flight]) -> None:
        for flight in flights:
            if flight.batch.attempts < MAX_ATTEMPTS:
                self._metrics.batch_retries += 1
                self._retry.append((flight.batch, flight.done))
                continue
            if flight.timed_out:
                limit = self._limits.seconds[flight.model]
                message = (
                    f"the batch ran past workers.batch_timeout_s ({limit:g} s) and its worker "
                    "was killed, twice (on retry too)"
                )
            else:
                message = "the worker process died while running this batch, and again on retry"
            code = ErrorCode.MODEL_ERROR.value
            flight.done(flight.batch, BatchFailed(code, message, FailureKind.WORKER, self.device))

    def _respawn(self, index: int) -> None:
        if not self._stopping:
            self._spawn(index)

    def _capacity_freed(self) -> None:
        while self._retry and any(w.free_slot() is not None for w in self._workers.values()):
            batch, done = self._retry.popleft()
            self.dispatch(batch, done)
        for listener in self._listeners:
            listener()

    # Introspection -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return any(w.link.ready for w in self._workers.values())

    def busy_workers(self) -> int:
        return sum(1 for w in self._workers.values() if w.link.ready and w.busy)

    def live_workers(self) -> int:
        return sum(1 for w in self._workers.values() if w.link.ready)

    def unavailable(self) -> str | None:
        """Why no worker can run a batch now (none ready, or each stalled in one), or None."""
        ready = [w.link for w in self._workers.values() if w.link.ready]
        if not ready:
            return f"no CPU worker is ready ({len(self._workers)} restarting)"
        now = time.monotonic()
        stalled = [link.stalled_s(now) for link in ready]
        if any(s is None for s in stalled):
            return None
        longest = max(s for s in stalled if s is not None)
        return (
            f"every CPU worker has been running one batch for over {longest:.1f} s "
            "(a stuck batch; workers.batch_timeout_s ends it)"
        )

    def worker_pids(self) -> list[int]:
        links = [w.link for w in self._workers.values() if w.link.alive]
        return [link.process.pid for link in links if link.process and link.process.pid]
