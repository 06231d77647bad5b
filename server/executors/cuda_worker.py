"""Entry point of one GPU worker process (one per CUDA device): load the models onto the device,
warm and time them, then run batches on one thread pair per model instance.

Runs in its own (spawned) process and imports torch. It talks to the server like a CPU worker:
small msgpack messages over one Connection, tensors in a shared-memory segment:
    -> ["loaded", device name, [[model, inputs, outputs], ...]] | ["load_failed", message]
    <- ["attach", segment name, slots, {model: [sizes to time]}]
        -> ["ready", {model: [[samples, seconds], ...]}, {model: cap}, [notes for the log]]
    <- ["run", seq, slot, model, samples]
        -> ["done", seq, compute_s, cap] | ["failed", seq, code, message, model_raised?]
           | ["device_lost", seq, message]   (then the worker exits: its CUDA context is gone)
    <- ["stop"]
Slot s of a model belongs to its instance s // SLOTS_PER_INSTANCE. Each instance has an issue
thread (stage, copy, launch) and a completion thread (wait, copy out, answer), so that two
batches per instance are in flight; torch releases the GIL while the device works.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import msgpack
import torch

from server.errors import ErrorCode
from server.executors.cuda import SLOTS_PER_INSTANCE, CudaSetup
from server.executors.cuda_failure import FailureKind, classify, describe
from server.executors.cuda_instance import CudaInstance, DeviceCap, Pending
from server.executors.profiling import calibration_sizes, time_sizes_blocking, zero_inputs
from server.executors.shm_layout import plan_layout
from server.models.loading import load_model

_Send = Callable[[list[Any]], None]
_Views = list[dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]]


def cuda_worker_main(conn: Connection, setup: CudaSetup) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(setup.threads)
    lock = threading.Lock()

    def send(message: list[Any]) -> None:
        with lock, contextlib.suppress(OSError):  # the server is gone: nobody left to tell
            conn.send_bytes(msgpack.packb(message, use_bin_type=True))

    try:
        instances = _load(setup)
    except Exception as exc:  # worker entry: any failure to load is reported, not raised
        send(["load_failed", f"cuda:{setup.device_index}: {type(exc).__name__}: {exc}"])
        return
    first = {cfg.name: instances[cfg.name][0] for cfg in setup.models}
    specs = [
        [name, [s.to_wire() for s in i.model.inputs], [s.to_wire() for s in i.model.outputs]]
        for name, i in first.items()
    ]
    send(["loaded", torch.cuda.get_device_name(setup.device_index), specs])
    try:
        _, segment_name, slots, plan = _recv(conn)
    except EOFError:
        return
    segment = SharedMemory(name=segment_name)
    try:
        if _warm_and_time(send, setup.device_index, instances, plan):
            _serve_blocking(conn, send, instances, _views(segment, setup, first, slots))
    finally:
        segment.close()


def _warm_and_time(
    send: _Send, index: int, instances: dict[str, list[CudaInstance]], plan: dict[str, list[int]]
) -> bool:
    """Warms every instance, times the first of each planned model, reports ready."""
    try:
        notes = [n for group in instances.values() for i in group for n in _warm(i)]
    except Exception as exc:  # a model that loads but cannot run on this device
        send(["load_failed", f"cuda:{index}: warm-up failed: {type(exc).__name__}: {exc}"])
        return False
    first = {name: group[0] for name, group in instances.items()}
    timings = {name: _profile(first[name], sizes) for name, sizes in plan.items() if name in first}
    caps = {name: i.cap.value for name, i in first.items()}
    send(["ready", timings, caps, notes])
    return True


def _load(setup: CudaSetup) -> dict[str, list[CudaInstance]]:
    if not torch.cuda.is_available() or setup.device_index >= torch.cuda.device_count():
        raise RuntimeError("no such CUDA device")
    device = torch.device("cuda", setup.device_index)
    torch.cuda.set_device(device)
    instances = {}
    for cfg in setup.models:
        cap = DeviceCap(cfg.batching.max_batch_size)
        instances[cfg.name] = [
            CudaInstance(
                load_model(cfg),
                device,
                cfg.placement,
                cfg.batching.max_batch_size,
                cap,
                SLOTS_PER_INSTANCE,
            )
            for _ in range(cfg.placement.cuda_instances)
        ]
    return instances


def _warm(instance: CudaInstance) -> list[str]:
    return instance.warm_blocking(calibration_sizes(instance.max_batch))


def _profile(instance: CudaInstance, sizes: list[int]) -> list[list[float]]:
    inputs = {n: zero_inputs(instance.model.inputs, n) for n in sizes}
    try:
        timings = time_sizes_blocking(lambda n: instance.run_blocking(inputs[n]), sizes)
    except Exception:  # calibration must never stop a start-up: no points, a logged warning
        return []
    return [t.to_wire() for t in timings]


def _views(
    segment: SharedMemory, setup: CudaSetup, first: dict[str, CudaInstance], slots: int
) -> _Views:
    """Torch tensors over the shared segment, per slot and model, built once."""
    caps = {cfg.name: cfg.batching.max_batch_size for cfg in setup.models}
    layout = plan_layout(
        {n: (i.model.inputs, i.model.outputs, caps[n]) for n, i in first.items()}, slots
    )
    buf = segment.buf
    assert buf is not None
    return [
        {
            name: (
                [torch.from_numpy(p.view(buf)) for p in places.inputs],
                [torch.from_numpy(p.view(buf)) for p in places.outputs],
            )
            for name, places in region.items()
        }
        for region in layout.slots
    ]


def _serve_blocking(
    conn: Connection, send: _Send, instances: dict[str, list[CudaInstance]], views: _Views
) -> None:
    lanes = {
        (name, k): _Lane(instance, views, send)
        for name, group in instances.items()
        for k, instance in enumerate(group)
    }
    try:
        while True:
            try:
                message = _recv(conn)
            except EOFError:
                return  # the server is gone: nothing left to answer
            if message[0] != "run":
                return
            _, seq, slot, model, samples = message
            lanes[(model, slot // SLOTS_PER_INSTANCE)].jobs.put((seq, slot, model, samples))
    finally:
        for lane in lanes.values():
            lane.stop()


class _Lane:
    """One instance's two threads: issue (stage, copy, launch) and completion (wait, answer)."""

    def __init__(self, instance: CudaInstance, views: _Views, send: _Send) -> None:
        self.instance, self._views, self._send = instance, views, send
        self._device = str(instance.device)  # "cuda:N", for the messages
        self.jobs: queue.Queue[tuple[int, int, str, int] | None] = queue.Queue()
        self._issued: queue.Queue[tuple[int, int, str, Pending] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._issue_blocking, daemon=True),
            threading.Thread(target=self._complete_blocking, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30.0)

    def _issue_blocking(self) -> None:
        self.instance.bind_thread()
        while (job := self.jobs.get()) is not None:
            seq, slot, model, samples = job
            inputs, _ = self._views[slot][model]
            try:
                pending = self.instance.submit(slot % SLOTS_PER_INSTANCE, inputs, samples)
            except Exception as exc:  # the model's own failure, OOM at one sample, or the device
                self._fail(seq, model, exc)
                continue
            self._issued.put((seq, slot, model, pending))
        self._issued.put(None)

    def _complete_blocking(self) -> None:
        self.instance.bind_thread()
        while (item := self._issued.get()) is not None:
            seq, slot, model, pending = item
            try:
                compute_s = pending.wait_blocking()
                _, outputs = self._views[slot][model]
                for target, produced in zip(outputs, pending.outputs, strict=True):
                    target[: pending.samples].copy_(produced)
            except Exception as exc:  # raised by the device: an asynchronous kernel error
                self._fail(seq, model, exc, raised=False)
                continue
            self._send(["done", seq, compute_s, self.instance.cap.value])

    def _fail(self, seq: int, model: str, exc: BaseException, raised: bool = True) -> None:
        message = describe(model, exc, self._device)
        if classify(exc) is FailureKind.DEVICE:
            # The context is dead: every later launch here fails with the same error, whatever
            # its batch. Reported as the device's failure (the router runs the batch elsewhere),
            # then exit, so the server sees this worker die and sends the rest elsewhere too
            # rather than bisecting innocent batches on a device that can no longer run any.
            self._send(["device_lost", seq, message])
            os._exit(3)
        # raised: the model raised (or ran out of memory even at one sample), so the batcher
        # may split the batch to find the culprit; the router retries an OOM on the CPU.
        self._send(["failed", seq, ErrorCode.MODEL_ERROR.value, message, raised])


def _recv(conn: Connection) -> list[Any]:
    message = msgpack.unpackb(conn.recv_bytes(), raw=False)
    assert isinstance(message, list)
    return message
