"""Entry point of one GPU worker process (one per CUDA device): load the models onto the device,
warm and time them, then run batches on one thread pair per model instance.

Runs in its own (spawned) process and imports torch. It speaks contract.py's messages to the
server like a CPU worker (worker_channel.py), tensors in a shared-memory segment; its Loaded
names the device, its Ready carries the batch caps and notes for the log, each Done the cap
now, and a Failed of kind DEVICE is its last word (its CUDA context is gone: it exits).
Slot s of a model belongs to its instance s // SLOTS_PER_INSTANCE. Each instance has an issue
thread (stage, copy, launch) and a completion thread (wait, copy out, answer), so that two
batches per instance are in flight; torch releases the GIL while the device works.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
from multiprocessing.connection import Connection

import torch

from server.executors.contract import (
    SLOTS_PER_INSTANCE,
    Attach,
    CudaSetup,
    Done,
    Failed,
    FailureKind,
    Loaded,
    LoadFailed,
    Points,
    Ready,
    Run,
)
from server.executors.cuda_failure import classify, describe
from server.executors.cuda_instance import CudaInstance, DeviceCap, Pending
from server.executors.profiling import (
    calibration_points,
    calibration_sizes,
    time_points_blocking,
    zero_inputs,
)
from server.executors.worker_channel import Channel
from server.executors.worker_segment import Segment, attached
from server.models.loading import load_model
from server.models.spec import is_dynamic


def cuda_worker_main(conn: Connection, setup: CudaSetup) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(setup.threads)
    channel = Channel(conn)
    try:
        instances = _load(setup)
    except Exception as exc:  # worker entry: any failure to load is reported, not raised
        channel.send(LoadFailed(f"cuda:{setup.device_index}: {type(exc).__name__}: {exc}"))
        return
    first = {cfg.name: instances[cfg.name][0] for cfg in setup.models}
    specs = {name: (i.model.inputs, i.model.outputs) for name, i in first.items()}
    channel.send(Loaded(torch.cuda.get_device_name(setup.device_index), specs, {}))
    attach = channel.recv_blocking()
    if not isinstance(attach, Attach):
        return
    sizes = {cfg.name: cfg.batching for cfg in setup.models}
    layout = {n: (*specs[n], sizes[n].max_batch_size, sizes[n].max_length) for n in specs}
    with attached(attach, layout) as views:
        if _warm_and_time(channel, setup, instances, attach.plan):
            serve_blocking(channel, instances, views)


def _warm_and_time(
    channel: Channel,
    setup: CudaSetup,
    instances: dict[str, list[CudaInstance]],
    plan: dict[str, list[int]],
) -> bool:
    """Warms every instance, times the first of each planned model, reports ready."""
    index = setup.device_index
    try:
        notes = [n for group in instances.values() for i in group for n in _warm(i)]
    except Exception as exc:  # a model that loads but cannot run on this device
        channel.send(LoadFailed(f"cuda:{index}: warm-up failed: {type(exc).__name__}: {exc}"))
        return False
    first = {name: group[0] for name, group in instances.items()}
    max_lengths = {cfg.name: cfg.batching.max_length for cfg in setup.models}
    timings = {
        name: _profile(first[name], sizes, max_lengths[name])
        for name, sizes in plan.items()
        if name in first
    }
    caps = {name: i.cap.value for name, i in first.items()}
    channel.send(Ready(timings, caps, notes))
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
                cfg.batching.max_length,
            )
            for _ in range(cfg.placement.cuda_instances)
        ]
    return instances


def _warm(instance: CudaInstance) -> list[str]:
    lengths = sorted({min(8, instance.max_length), instance.max_length})
    if not is_dynamic(instance.model.inputs):
        lengths = [1]
    return instance.warm_blocking(calibration_sizes(instance.max_batch), lengths=lengths)


def _profile(instance: CudaInstance, sizes: list[int], max_length: int) -> Points:
    points = calibration_points(sizes, instance.model.inputs, max_length)
    inputs = {p: zero_inputs(instance.model.inputs, *p) for p in points}
    try:
        timings = time_points_blocking(lambda n, at: instance.run_blocking(inputs[(n, at)]), points)
    except Exception:  # calibration must never stop a start-up: no points, a logged warning
        return []
    return [t.point() for t in timings]


def serve_blocking(
    channel: Channel, instances: dict[str, list[CudaInstance]], segment: Segment
) -> None:
    """Hands each Run to its instance's lane until Stop, then lets the lanes finish."""
    lanes = {
        (name, k): _Lane(instance, segment, channel)
        for name, group in instances.items()
        for k, instance in enumerate(group)
    }
    try:
        channel.serve_blocking(
            lambda run: lanes[(run.model, run.slot // SLOTS_PER_INSTANCE)].put(run)
        )
    finally:
        for lane in lanes.values():
            lane.stop()


class _Lane:
    """One instance's two threads: issue (stage, copy, launch) and completion (wait, answer)."""

    def __init__(self, instance: CudaInstance, segment: Segment, channel: Channel) -> None:
        self.instance, self._segment, self._channel = instance, segment, channel
        self._device = str(instance.device)  # "cuda:N", for the messages
        self._jobs: queue.Queue[Run | None] = queue.Queue()
        self._issued: queue.Queue[tuple[Run, Pending] | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._issue_blocking, daemon=True),
            threading.Thread(target=self._complete_blocking, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def put(self, run: Run) -> None:
        self._jobs.put(run)

    def stop(self) -> None:
        self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30.0)

    def _issue_blocking(self) -> None:
        self.instance.bind_thread()
        while (run := self._jobs.get()) is not None:
            inputs, _ = self._segment.batch(run.slot, run.model, run.samples, run.length)
            try:
                slot = run.slot % SLOTS_PER_INSTANCE
                pending = self.instance.submit(slot, inputs, run.samples, run.length)
            except Exception as exc:  # the model's own failure, OOM at one sample, or the device
                self._fail(run, exc)
                continue
            self._issued.put((run, pending))
        self._issued.put(None)

    def _complete_blocking(self) -> None:
        self.instance.bind_thread()
        while (item := self._issued.get()) is not None:
            run, pending = item
            try:
                compute_s = pending.wait_blocking()
                _, outputs = self._segment.batch(run.slot, run.model, run.samples, run.length)
                for target, produced in zip(outputs, pending.outputs, strict=True):
                    target.copy_(produced)
            except Exception as exc:  # raised by the device: an asynchronous kernel error
                self._fail(run, exc, at_launch=False)
                continue
            self._channel.send(Done(run.seq, compute_s, self.instance.cap.value))

    def _fail(self, run: Run, exc: BaseException, at_launch: bool = True) -> None:
        message = describe(run.model, exc, self._device)
        kind = classify(exc)
        if kind is FailureKind.DEVICE:
            # The context is dead: every later launch here fails with the same error, whatever
            # its batch. Reported as the device's failure (the router runs the batch elsewhere),
            # then exit, so the server sees this worker die and sends the rest elsewhere too
            # rather than bisecting innocent batches on a device that can no longer run any.
            self._channel.send(Failed(run.seq, kind, message))
            os._exit(3)
        if kind is FailureKind.MODEL and not at_launch:
            # Raised only when the batch was waited on: not the model's inputs, so the batcher
            # must not split the batch to find a culprit.
            kind = FailureKind.OTHER
        # MODEL and OUT_OF_MEMORY (even at one sample): the batcher may split the batch to find
        # the culprit; the router runs an OOM elsewhere (the CPU) first.
        self._channel.send(Failed(run.seq, kind, message))
