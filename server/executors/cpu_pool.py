"""The CPU worker pool, seen from the event loop: spawns worker processes, stages each batch in
the worker's shared memory, and reads results through loop.add_reader (no threads).

Event loop only; never imports torch (the workers do). A dead worker is replaced; its batches
are retried once on another worker, then failed with model_error, so no request goes unanswered.
A worker whose batch runs past workers.batch_timeout_s (watchdog.py) is killed, and the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory

import numpy as np

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
    Ready,
    Run,
    ServerMessage,
    Stop,
    WorkerMessage,
    WorkerSetup,
    decode_from_worker,
    encode,
)
from server.executors.framing import FrameReader
from server.executors.reaper import reap
from server.executors.shm_layout import ModelPlaces, plan_layout
from server.executors.watchdog import Watchdog
from server.executors.worker_entry import run_cpu_worker
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


class _InFlight:
    __slots__ = ("batch", "done", "slot", "started_at", "timed_out")

    def __init__(self, batch: Batch, done: DoneCallback, slot: int) -> None:
        self.batch, self.done, self.slot = batch, done, slot
        self.started_at = time.monotonic()
        self.timed_out = False  # the watchdog killed its worker

    @property
    def model(self) -> str:
        return self.batch.model


class _Worker:
    def __init__(
        self, index: int, process: BaseProcess, conn: Connection, watchdog: Watchdog[_InFlight]
    ) -> None:
        self.index = index
        self.watchdog = watchdog
        self.process = process
        self.conn = conn
        self.ready = False
        self.alive = True
        self.slots: list[_InFlight | None] = [None] * SLOTS_PER_WORKER
        self.by_seq: dict[int, _InFlight] = {}
        self.started: asyncio.Future[None] | None = None
        self.frames = FrameReader()

    def free_slot(self) -> int | None:
        for i, used in enumerate(self.slots):
            if used is None:
                return i
        return None

    @property
    def busy(self) -> int:
        return SLOTS_PER_WORKER - self.slots.count(None)


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
        self.calibration: dict[str, list[tuple[int, float]]] = {}
        self._size = workers
        self._threads = threads
        self._metrics = metrics
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._segments: dict[int, SharedMemory] = {}
        self._places: list[dict[str, ModelPlaces]] | None = None
        self._views: dict[int, list[dict[str, tuple[list[np.ndarray], list[np.ndarray]]]]] = {}
        self.models: dict[str, ModelInfo] = {}
        self.missing: dict[str, str] = {}  # model -> why it failed to load or warm up
        self._listeners: list[Callable[[], None]] = []
        self._retry: deque[tuple[Batch, DoneCallback]] = deque()
        self._seq = itertools.count()
        self._stopping = False
        self._failures: dict[int, int] = {}
        self._started = False  # after start(): a worker that fails is replaced, not fatal
        self._batch_timeouts: dict[str, float] = {}  # none until set: start-up is not watched
        self._on_timeout: Callable[[str], None] = lambda model: None

    # Start and stop ------------------------------------------------------------------------
    async def start(self, timeout_s: float) -> dict[str, ModelInfo]:
        """Spawn every worker and wait until each has loaded, warmed up and attached."""
        for index in range(self._size):
            self._spawn(index)
        waits = [w.started for w in self._workers.values() if w.started is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout_s)
        except asyncio.TimeoutError:
            late = [w.index for w in self._workers.values() if not w.ready]
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
            self._fail_in_flight(worker, ErrorCode.SHUTTING_DOWN, "the server stopped")
            if worker.alive:
                self._close_worker(worker, send_stop=True)
        procs = [w.process for w in self._workers.values()]
        await asyncio.gather(*(asyncio.to_thread(p.join, timeout_s) for p in procs))
        for proc in procs:
            if proc.is_alive():
                log.warning("worker pid %s did not stop in %.0f s; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.join(1.0)
        for segment in self._segments.values():
            segment.close()
            segment.unlink()
        self._segments.clear()

    def _spawn(self, index: int) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        setup = WorkerSetup(index, self._configs, self._threads)
        process = self._ctx.Process(
            target=run_cpu_worker,
            args=(child_conn, setup),
            name=f"microbatch-cpu-{index}",
            daemon=True,
        )
        process.start()
        # Our copy of the child's end must go, or its death would never read as EOF here.
        child_conn.close()
        worker = _Worker(
            index, process, parent_conn, Watchdog[_InFlight](lambda: self._on_stuck(worker))
        )
        worker.watchdog.watch(self._batch_timeouts, worker.by_seq.values)
        if not self._started:
            worker.started = asyncio.get_running_loop().create_future()
        self._workers[index] = worker
        asyncio.get_running_loop().add_reader(parent_conn.fileno(), self._on_readable, worker)
        log.info("started CPU worker %d (pid %s)", index, process.pid)

    # Dispatcher protocol -------------------------------------------------------------------
    def free_slots(self, model: str) -> int:
        if self._retry:
            return 0  # batches of crashed workers go first
        return sum(w.slots.count(None) for w in self._workers.values() if w.ready)

    def hold_for_fill(self, model: str) -> bool:
        return False

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        worker = min(
            (w for w in self._workers.values() if w.ready and w.free_slot() is not None),
            key=lambda w: w.busy,
            default=None,
        )
        if worker is None:
            self._retry.append((batch, done))  # no capacity: runs on the next free slot
            return
        slot = worker.free_slot()
        assert slot is not None
        self._stage_inputs(worker.index, slot, batch)
        seq = next(self._seq)
        flight = _InFlight(batch, done, slot)
        worker.slots[slot] = flight
        worker.by_seq[seq] = flight
        batch.attempts += 1
        try:
            self._send(worker, Run(seq, slot, batch.model, batch.samples))
        except OSError:
            self._on_death(worker)
            return
        worker.watchdog.started()

    def _stage_inputs(self, index: int, slot: int, batch: Batch) -> None:
        inputs, _ = self._views[index][slot][batch.model]
        specs = self.models[batch.model].inputs
        for spec, target in zip(specs, inputs, strict=True):
            dst = target[: batch.samples]
            arrays = [r.inputs[spec.name] for r in batch.requests]
            # Dtypes were checked at admission; the cast to the model's dtype happens here,
            # in the one copy into shared memory.
            if len(arrays) == 1:
                np.copyto(dst, arrays[0], casting="unsafe")
            else:
                np.concatenate(arrays, axis=0, out=dst, casting="unsafe")

    # Worker messages -----------------------------------------------------------------------
    def _on_readable(self, worker: _Worker) -> None:
        # One read per wake-up, framing parsed here: Connection.poll + recv_bytes would cost
        # three system calls per message, and system calls dominate the per-batch cost.
        try:
            chunk = os.read(worker.conn.fileno(), 1 << 16)
        except OSError:
            chunk = b""
        if not chunk:
            self._on_death(worker)
            return
        for payload in worker.frames.feed(chunk):
            if not worker.alive:
                return
            self._on_message(worker, decode_from_worker(payload))

    def _on_message(self, worker: _Worker, message: WorkerMessage) -> None:
        if isinstance(message, (Done, Failed)):
            self._on_result(worker, message)
        elif isinstance(message, Loaded):
            self._on_loaded(worker, message)
        elif isinstance(message, Ready):
            worker.ready = True
            self.calibration.update(message.timings)
            self._failures.pop(worker.index, None)
            if worker.started is not None and not worker.started.done():
                worker.started.set_result(None)
            self._capacity_freed()
        elif isinstance(message, LoadFailed):
            self._on_load_failed(worker, message.message)

    def _on_result(self, worker: _Worker, message: Done | Failed) -> None:
        flight = worker.by_seq.pop(message.seq)
        worker.slots[flight.slot] = None
        batch = flight.batch
        if isinstance(message, Done):
            _, outputs = self._views[worker.index][flight.slot][batch.model]
            specs = self.models[batch.model].outputs
            result = {
                spec.name: view[: batch.samples].copy()
                for spec, view in zip(specs, outputs, strict=True)
            }
            # The next batch goes to the worker before this one's answers are written, so the
            # worker computes while the event loop answers.
            self._capacity_freed()
            flight.done(batch, BatchDone(result, message.compute_s, self.device))
        else:
            # The worker reports only the model's own exceptions this way. Answered first, so
            # that the halves of a poisoned batch take the freed slot ahead of the queue.
            failed = BatchFailed(
                ErrorCode.MODEL_ERROR.value, message.message, message.kind, self.device
            )
            flight.done(batch, failed)
            self._capacity_freed()

    def _on_loaded(self, worker: _Worker, loaded: Loaded) -> None:
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
                worker,
                f"worker {worker.index} loaded other models or specs than the first worker "
                f"({sorted(infos)}, expected {sorted(self.models)})",
            )
            return
        if worker.index not in self._segments:
            self._create_segment(worker.index)
        calibrate = worker.index == 0 and not self._started
        plan = self._calibrate if calibrate else {}
        self._send(worker, Attach(self._segments[worker.index].name, SLOTS_PER_WORKER, plan))

    def _create_segment(self, index: int) -> None:
        layout = plan_layout(
            {n: (m.inputs, m.outputs, m.batching.max_batch_size) for n, m in self.models.items()},
            SLOTS_PER_WORKER,
        )
        segment = SharedMemory(create=True, size=layout.total_bytes)
        self._segments[index] = segment
        buf = segment.buf
        assert buf is not None
        self._views[index] = [
            {
                name: ([p.view(buf) for p in places.inputs], [p.view(buf) for p in places.outputs])
                for name, places in region.items()
            }
            for region in layout.slots
        ]

    def _on_load_failed(self, worker: _Worker, message: str) -> None:
        log.error("CPU worker %d failed to start: %s", worker.index, message)
        if worker.started is not None and not worker.started.done():
            worker.started.set_exception(PoolStartError(message))
            self._close_worker(worker, send_stop=False)
            return
        self._on_death(worker)

    # Death and replacement -----------------------------------------------------------------
    def set_batch_timeouts(
        self, limits: Mapping[str, float], on_timeout: Callable[[str], None]
    ) -> None:
        """Watch every batch from now on: model -> seconds; on_timeout(model) counts a kill."""
        self._batch_timeouts.clear()
        self._batch_timeouts.update(limits)
        self._on_timeout = on_timeout

    def _on_stuck(self, worker: _Worker) -> None:
        """The watchdog: a batch ran past its limit. Its worker is killed and handled as dead
        (replaced, the batch retried once); a kill is certain, unlike a stop request."""
        now = time.monotonic()
        for flight in worker.watchdog.overdue(now):
            flight.timed_out = True
            self._on_timeout(flight.model)
            log.error(
                "CPU worker %d (pid %s) has run a batch of %d samples of model %r for %.1f s, "
                "past workers.batch_timeout_s (%.1f s); killing it",
                worker.index,
                worker.process.pid,
                flight.batch.samples,
                flight.model,
                now - flight.started_at,
                self._batch_timeouts[flight.model],
            )
        with contextlib.suppress(ProcessLookupError):
            if worker.process.pid is not None:
                os.kill(worker.process.pid, signal.SIGKILL)
        self._on_death(worker)

    def _on_death(self, worker: _Worker) -> None:
        if not worker.alive:
            return
        self._close_worker(worker, send_stop=False)
        reap(worker.process)
        if worker.started is not None and not worker.started.done():
            worker.started.set_exception(
                PoolStartError(f"CPU worker {worker.index} exited during start-up")
            )
            return
        if self._stopping:
            return
        log.error("CPU worker %d (pid %s) died; replacing it", worker.index, worker.process.pid)
        self._metrics.worker_restarts += 1
        self._requeue_in_flight(worker)
        failures = self._failures.get(worker.index, 0)
        self._failures[worker.index] = failures + 1
        delay = RESPAWN_BACKOFF_S[min(failures, len(RESPAWN_BACKOFF_S) - 1)]
        asyncio.get_running_loop().call_later(delay, self._respawn, worker.index)
        self._capacity_freed()

    def _requeue_in_flight(self, worker: _Worker) -> None:
        for flight in list(worker.by_seq.values()):
            if flight.batch.attempts < MAX_ATTEMPTS:
                self._metrics.batch_retries += 1
                self._retry.append((flight.batch, flight.done))
            elif flight.timed_out:
                limit = self._batch_timeouts[flight.model]
                message = (
                    f"the batch ran past workers.batch_timeout_s ({limit:g} s) and its worker "
                    "was killed, twice (on retry too)"
                )
                flight.done(flight.batch, self._failed(message))
            else:
                message = "the worker process died while running this batch, and again on retry"
                flight.done(flight.batch, self._failed(message))
        worker.by_seq.clear()
        worker.slots = [None] * SLOTS_PER_WORKER

    def _respawn(self, index: int) -> None:
        if not self._stopping:
            self._spawn(index)

    def _close_worker(self, worker: _Worker, *, send_stop: bool) -> None:
        worker.alive = worker.ready = False
        worker.watchdog.stop()
        asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        if send_stop:
            with contextlib.suppress(OSError):
                self._send(worker, Stop())
        worker.conn.close()

    def _fail_in_flight(self, worker: _Worker, code: ErrorCode, message: str) -> None:
        for flight in list(worker.by_seq.values()):
            failed = BatchFailed(code.value, message, FailureKind.STOPPED, self.device)
            flight.done(flight.batch, failed)
        worker.by_seq.clear()

    def _failed(self, message: str) -> BatchFailed:
        return BatchFailed(ErrorCode.MODEL_ERROR.value, message, FailureKind.WORKER, self.device)

    def _capacity_freed(self) -> None:
        while self._retry and any(
            w.ready and w.free_slot() is not None for w in self._workers.values()
        ):
            batch, done = self._retry.popleft()
            self.dispatch(batch, done)
        for listener in self._listeners:
            listener()

    @staticmethod
    def _send(worker: _Worker, message: ServerMessage) -> None:
        worker.conn.send_bytes(encode(message))

    # Introspection -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return any(w.ready for w in self._workers.values())

    def busy_workers(self) -> int:
        return sum(1 for w in self._workers.values() if w.ready and w.busy)

    def live_workers(self) -> int:
        return sum(1 for w in self._workers.values() if w.ready)

    def unavailable(self) -> str | None:
        """Why no worker can run a batch now (none ready, or each stalled in one), or None."""
        ready = [w for w in self._workers.values() if w.ready]
        if not ready:
            return f"no CPU worker is ready ({len(self._workers)} restarting)"
        now = time.monotonic()
        stalled = [w.watchdog.stalled_s(now) for w in ready]
        if any(s is None for s in stalled):
            return None
        longest = max(s for s in stalled if s is not None)
        return (
            f"every CPU worker has been running one batch for over {longest:.1f} s "
            "(a stuck batch; workers.batch_timeout_s ends it)"
        )

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers.values() if w.alive and w.process.pid]
