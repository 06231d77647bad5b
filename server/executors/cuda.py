"""The CUDA executor, seen from the event loop: one GPU worker process per device, batches staged
in its shared memory, results read through loop.add_reader; and the probe for CUDA devices.

Event loop only (the probe is a blocking subprocess call meant for a thread); never imports
torch: the worker (cuda_worker.py) does. A GPU worker that dies is not replaced: its batches
fail back to the router, which retries them elsewhere, and the device is left out from then on;
one that reports its device lost (a sticky CUDA error) before exiting is left out at once, its
batches failed as device-lost, which the router always runs elsewhere. A batch that runs past
workers.batch_timeout_s (watchdog.py) has the worker killed, and is then handled as for a death.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

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
    Ready,
    Run,
    ServerMessage,
    Stop,
    WorkerMessage,
    decode_from_worker,
    encode,
)
from server.executors.reaper import reap
from server.executors.shm_layout import plan_layout
from server.executors.watchdog import Watchdog
from server.executors.worker_entry import run_cuda_worker

log = logging.getLogger(__name__)
_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([torch.cuda.get_device_name(i) for i in range(n)]))"
)


class CudaStartError(RuntimeError):
    pass


def probe_cuda_blocking(timeout_s: float = 120.0) -> list[str]:
    """Names of the visible CUDA devices, found in a subprocess so that this process never
    imports torch; [] at once where the installed torch has no CUDA library at all."""
    if not _torch_has_gpu_library():
        return []
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the CUDA probe failed: %s", exc)
        return []
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        error = result.stderr.strip().splitlines()
        log.warning("the CUDA probe failed: %s", error[-1] if error else result.returncode)
        return []
    return [str(name) for name in json.loads(lines[-1])]


def _torch_has_gpu_library() -> bool:
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib"
        if any(lib.glob("*torch_cuda*")) or any(lib.glob("*torch_hip*")):
            return True
    return False


class _InFlight:
    __slots__ = ("batch", "done", "slot", "started_at")

    def __init__(self, batch: Batch, done: DoneCallback, slot: int) -> None:
        self.batch, self.done, self.slot = batch, done, slot
        self.started_at = time.monotonic()

    @property
    def model(self) -> str:
        return self.batch.model


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
        self._slots: dict[str, list[_InFlight | None]] = {
            m.name: [None] * (m.placement.cuda_instances * SLOTS_PER_INSTANCE) for m in models
        }
        self._by_seq: dict[int, _InFlight] = {}
        self._seq = itertools.count()
        self._views: list[dict[str, tuple[list[np.ndarray], list[np.ndarray]]]] = []
        self._listeners: list[Callable[[], None]] = []
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._segment: SharedMemory | None = None
        self._phase: asyncio.Future[Loaded | Ready] | None = None
        self._alive = False
        self.specs: dict[str, ModelSpecs] = {}
        self.caps = {m.name: m.batching.max_batch_size for m in models}
        self.calibration: dict[str, list[tuple[int, float]]] = {}
        self._batch_timeouts: dict[str, float] = {}
        self._on_timeout: Callable[[str], None] = lambda model: None
        self._watchdog = Watchdog[_InFlight](self._on_stuck)
        self._watchdog.watch(self._batch_timeouts, self._by_seq.values)

    # Start and stop ------------------------------------------------------------------------
    async def start(self, timeout_s: float, plan: Mapping[str, Sequence[int]]) -> None:
        """Spawn the worker; wait until it has loaded, warmed up, timed `plan` and attached."""
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(
            target=self._worker, args=(child, self._setup), name=f"microbatch-{self.device}"
        )
        self._process.daemon = True
        self._process.start()
        child.close()  # our copy of its end must go, or its death would never read as EOF
        self._conn = parent
        self._phase = loop.create_future()
        loop.add_reader(parent.fileno(), self._on_readable)
        loaded = await asyncio.wait_for(self._phase, timeout_s)
        assert isinstance(loaded, Loaded)
        self._on_loaded(loaded)
        self._phase = loop.create_future()
        slots = max(len(s) for s in self._slots.values())
        sizes = {name: list(sizes) for name, sizes in plan.items()}
        self._send(Attach(self._segment_name(slots), slots, sizes))
        ready = await asyncio.wait_for(self._phase, timeout_s)
        assert isinstance(ready, Ready)
        self._phase = None
        self.calibration = ready.timings
        self.caps.update(ready.caps)
        for note in ready.notes:
            log.warning("%s: %s", self.device, note)
        self._alive = True
        log.info("%s (%s) ready: %s", self.device, self.gpu_name, ", ".join(self._configs))

    def _on_loaded(self, loaded: Loaded) -> None:
        self.gpu_name = loaded.device_name
        self.specs.update(loaded.models)

    def _segment_name(self, slots: int) -> str:
        layout = plan_layout(
            {
                name: (inputs, outputs, self._configs[name].batching.max_batch_size)
                for name, (inputs, outputs) in self.specs.items()
            },
            slots,
        )
        self._segment = SharedMemory(create=True, size=layout.total_bytes)
        buf = self._segment.buf
        assert buf is not None
        self._views = [
            {
                n: ([p.view(buf) for p in m.inputs], [p.view(buf) for p in m.outputs])
                for n, m in r.items()
            }
            for r in layout.slots
        ]
        return self._segment.name

    async def stop(self, timeout_s: float = 10.0) -> None:
        was_alive, self._alive = self._alive, False
        self._fail_in_flight(ErrorCode.SHUTTING_DOWN, "the server stopped", FailureKind.STOPPED)
        if self._conn is not None:
            if was_alive:
                with contextlib.suppress(OSError):
                    self._send(Stop())
            self._close_conn()
        if self._process is not None:
            await asyncio.to_thread(self._process.join, timeout_s)
            if self._process.is_alive():
                log.warning("%s worker did not stop in %.0f s; killing it", self.device, timeout_s)
                self._process.kill()
                await asyncio.to_thread(self._process.join, 1.0)
        if self._segment is not None:
            self._segment.close()
            self._segment.unlink()
            self._segment = None

    # What the router reads ---------------------------------------------------------------
    def alive(self) -> bool:
        return self._alive

    def lanes(self, model: str) -> int:
        return max(1, len(self._slots.get(model, ())) // SLOTS_PER_INSTANCE)

    def cap(self, model: str) -> int:
        return self.caps.get(model, 1)

    def in_flight(self) -> int:
        return len(self._by_seq)

    def unavailable(self) -> str | None:
        """Why this GPU cannot run a batch now (its worker is gone, or stalled), or None."""
        if not self._alive:
            return f"{self.device} is out of service"
        stalled = self._watchdog.stalled_s(time.monotonic())
        if stalled is None:
            return None
        return f"{self.device} has been running one batch for over {stalled:.1f} s"

    # Dispatcher protocol -------------------------------------------------------------------
    def free_slots(self, model: str) -> int:
        if not self._alive or model not in self.specs:
            return 0
        return self._slots[model].count(None)

    def hold_for_fill(self, model: str) -> bool:
        return False

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        slots = self._slots[batch.model]
        free = [i for i, used in enumerate(slots) if used is None]
        if not self._alive or not free:
            failed = BatchFailed(
                ErrorCode.INTERNAL.value, f"{self.device} had no free slot", FailureKind.OTHER
            )
            done(batch, failed)
            return

        def busy(slot: int) -> int:
            first = slot - slot % SLOTS_PER_INSTANCE
            return sum(s is not None for s in slots[first : first + SLOTS_PER_INSTANCE])

        slot = min(free, key=busy)  # the least busy instance
        inputs, _ = self._views[slot][batch.model]
        specs = self.specs[batch.model][0]
        for spec, target in zip(specs, inputs, strict=True):
            arrays = [r.inputs[spec.name] for r in batch.requests]
            np.concatenate(arrays, axis=0, out=target[: batch.samples], casting="unsafe")
        seq = next(self._seq)
        flight = _InFlight(batch, done, slot)
        slots[slot] = flight
        self._by_seq[seq] = flight
        batch.attempts += 1
        try:
            self._send(Run(seq, slot, batch.model, batch.samples))
        except OSError:
            self._on_death()
            return
        self._watchdog.started()

    def set_batch_timeouts(
        self, limits: Mapping[str, float], on_timeout: Callable[[str], None]
    ) -> None:
        """Watch every batch from now on: model -> seconds; on_timeout(model) counts a kill."""
        self._batch_timeouts.clear()
        self._batch_timeouts.update(limits)
        self._on_timeout = on_timeout

    def _on_stuck(self) -> None:
        """The watchdog: a batch ran past its limit. The worker is killed and handled as dead:
        its batches go back to the router, which runs them elsewhere."""
        for flight in self._watchdog.overdue(time.monotonic()):
            self._on_timeout(flight.model)
            log.error(
                "%s has run a batch of %d samples of model %r past workers.batch_timeout_s "
                "(%.1f s); killing its worker",
                self.device,
                flight.batch.samples,
                flight.model,
                self._batch_timeouts[flight.model],
            )
        if self._process is not None and self._process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGKILL)
        self._on_death(f"the {self.device} worker was killed: a batch ran past its time limit")

    # Worker messages -----------------------------------------------------------------------
    def _on_readable(self) -> None:
        conn = self._conn
        try:
            while conn is not None and not conn.closed and conn.poll():
                self._on_message(decode_from_worker(conn.recv_bytes()))
        except (EOFError, OSError):
            self._on_death()

    def _on_message(self, message: WorkerMessage) -> None:
        if isinstance(message, (Loaded, Ready)):
            if self._phase is not None and not self._phase.done():
                self._phase.set_result(message)
        elif isinstance(message, LoadFailed):
            self._fail_start(message.message)
        elif isinstance(message, Failed) and message.kind is FailureKind.DEVICE:
            self._on_device_lost(message.seq, message.message)
        elif isinstance(message, (Done, Failed)):
            self._on_result(message)

    def _on_result(self, message: Done | Failed) -> None:
        flight = self._by_seq.pop(message.seq)
        batch = flight.batch
        self._slots[batch.model][flight.slot] = None
        if isinstance(message, Done):
            _, outputs = self._views[flight.slot][batch.model]
            result = {
                spec.name: view[: batch.samples].copy()
                for spec, view in zip(self.specs[batch.model][1], outputs, strict=True)
            }
            self._note_cap(batch.model, message.cap, batch.samples)
            flight.done(batch, BatchDone(result, message.compute_s, self.device))
        else:
            failed = BatchFailed(
                ErrorCode.MODEL_ERROR.value, message.message, message.kind, self.device
            )
            flight.done(batch, failed)
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
        self._close_conn()

    def _on_device_lost(self, seq: int, message: str) -> None:
        """The worker's CUDA context failed and the worker is exiting. Every batch in flight
        there is lost with it, the reported one included, through no fault of its own: all are
        failed as device-lost (the router runs them elsewhere), and the device is left out
        now, before the worker's exit is even seen, so that nothing more is sent to it."""
        if not self._alive:
            return
        self._alive = False
        log.error("%s failed (%s); its batches go to the other executors", self.device, message)
        self._close_conn()
        reported = self._by_seq.pop(seq, None)
        if reported is not None:
            reported.done(
                reported.batch,
                BatchFailed(ErrorCode.MODEL_ERROR.value, message, FailureKind.DEVICE, self.device),
            )
        lost = f"{self.device} failed while this batch was on it"
        self._fail_in_flight(ErrorCode.MODEL_ERROR, lost, FailureKind.DEVICE)
        for listener in self._listeners:
            listener()

    def _on_death(self, why: str = "") -> None:
        if self._phase is not None:
            self._fail_start(f"the {self.device} worker exited during start-up")
            return
        if not self._alive:
            return
        self._alive = False
        log.error("the %s worker died; its batches go to the other executors", self.device)
        self._close_conn()
        if self._process is not None:
            reap(self._process)
        why = why or f"the {self.device} worker died"
        self._fail_in_flight(ErrorCode.MODEL_ERROR, why, FailureKind.WORKER)
        for listener in self._listeners:
            listener()

    def _fail_in_flight(self, code: ErrorCode, message: str, kind: FailureKind) -> None:
        flights = list(self._by_seq.values())
        self._by_seq.clear()
        for slots in self._slots.values():
            slots[:] = [None] * len(slots)
        for flight in flights:
            failed = BatchFailed(code.value, message, kind, self.device)
            flight.done(flight.batch, failed)

    def _close_conn(self) -> None:
        self._watchdog.stop()
        if self._conn is not None and not self._conn.closed:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._conn.close()

    def _send(self, message: ServerMessage) -> None:
        if self._conn is None or self._conn.closed:
            raise OSError("the GPU worker connection is closed")
        self._conn.send_bytes(encode(message))
