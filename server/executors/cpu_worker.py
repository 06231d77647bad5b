"""Entry point of one CPU worker process: load and warm the models, time them if asked, then
run batches.

Runs in its own (spawned) process and imports torch. It speaks contract.py's messages to the
pool over one Connection (worker_channel.py); tensors stay in shared memory. Only worker 0 is
asked to time sizes, once, before the server's first start.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import torch

from server.executors.contract import (
    Attach,
    Done,
    Failed,
    FailureKind,
    Loaded,
    LoadFailed,
    Points,
    Ready,
    Run,
    WorkerSetup,
)
from server.executors.profiling import calibration_points, time_points_blocking, zero_inputs
from server.executors.worker_channel import Channel
from server.executors.worker_segment import Segment, attached
from server.models.loading import LoadedModel, ModelLoadError, declared_output, load_model
from server.models.padding import zero_batch
from server.models.spec import TensorSpec, is_dynamic

if TYPE_CHECKING:
    from server.config import BatchingConfig, ModelConfig

WARMUP_ROUNDS = 3


def worker_main(conn: Connection, setup: WorkerSetup) -> None:
    # Ctrl-C reaches the whole process group; only the server decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(setup.threads)
    torch.set_num_interop_threads(1)
    channel = Channel(conn)
    models: dict[str, LoadedModel] = {}
    failed: dict[str, str] = {}  # each model's failure is reported; the pool decides
    for cfg in setup.models:
        try:
            models[cfg.name] = _load_and_warm(cfg)
        except ModelLoadError as exc:
            failed[cfg.name] = str(exc)
    if not models:
        channel.send(LoadFailed("; ".join(failed.values())))
        return
    channel.send(Loaded("", {n: (m.inputs, m.outputs) for n, m in models.items()}, failed))
    attach = channel.recv_blocking()
    if not isinstance(attach, Attach):
        return  # the server is gone, or stopping
    sizes = {cfg.name: cfg.batching for cfg in setup.models}
    layout = {
        n: (m.inputs, m.outputs, sizes[n].max_batch_size, sizes[n].max_length)
        for n, m in models.items()
    }
    with attached(attach, layout) as views:
        channel.send(Ready(profile_cpu_blocking(models, attach.plan, setup.models), {}, []))
        channel.serve_blocking(functools.partial(_run, channel, models, views))


def _load_and_warm(cfg: ModelConfig) -> LoadedModel:
    model = load_model(cfg)
    with torch.inference_mode():
        for n, length, rounds in warm_up_shapes(model.inputs, cfg.batching):
            tensors = [torch.from_numpy(a) for a in zero_batch(model.inputs, n, length)]
            try:
                for _ in range(rounds):
                    model.run(tensors)
            except Exception as exc:  # the model's own failure: named and reported, as plain text
                lines = str(exc).strip().splitlines()
                at = f"batch size {n}" + (f", length {length}" if is_dynamic(model.inputs) else "")
                raise ModelLoadError(
                    f"model {cfg.name!r} failed to warm up at {at}: "
                    f"{type(exc).__name__}: {lines[-1] if lines else ''}"
                ) from None
    return model


def warm_up_shapes(
    inputs: tuple[TensorSpec, ...], batching: BatchingConfig
) -> list[tuple[int, int, int]]:
    """(samples, length, rounds) to warm up at: the smallest and largest batch; for a model
    with a dynamic dimension, a short and the longest length too (the longest batch once: it
    can take a second)."""
    sizes = sorted({1, batching.max_batch_size})
    if not is_dynamic(inputs):
        return [(n, 1, WARMUP_ROUNDS) for n in sizes]
    short, longest = min(8, batching.max_length), batching.max_length
    shapes = [(n, short, WARMUP_ROUNDS) for n in sizes] + [(1, longest, WARMUP_ROUNDS)]
    return [*shapes, (batching.max_batch_size, longest, 1)]


def _run(channel: Channel, models: dict[str, LoadedModel], segment: Segment, run: Run) -> None:
    inputs, outputs = segment.batch(run.slot, run.model, run.samples, run.length)
    started = time.perf_counter()
    try:
        _run_batch(models[run.model], inputs, outputs, run.samples, run.length)
    except Exception as exc:  # a model's own failure: reported, the worker lives on
        text = str(exc).strip().splitlines()
        detail = text[-1] if text else ""
        message = f"model {run.model!r} raised {type(exc).__name__}: {detail}"
        channel.send(Failed(run.seq, FailureKind.MODEL, message))
        return
    channel.send(Done(run.seq, time.perf_counter() - started))


def profile_cpu_blocking(
    models: Mapping[str, LoadedModel],
    plan: Mapping[str, Sequence[int]],
    configs: Sequence[ModelConfig],
) -> dict[str, Points]:
    """Each planned model timed over its sizes (a model with a dynamic dimension over lengths
    too: profiling.calibration_points). A model that fails here is left out (the server logs
    that it has no calibration)."""
    max_lengths = {cfg.name: cfg.batching.max_length for cfg in configs}
    report: dict[str, Points] = {}
    for name, sizes in plan.items():
        model = models.get(name)
        if model is None:
            continue
        points = calibration_points(sizes, model.inputs, max_lengths.get(name, 1))
        inputs = {p: [torch.from_numpy(a) for a in zero_inputs(model.inputs, *p)] for p in points}
        try:
            timings = time_points_blocking(functools.partial(_run_cpu, model, inputs), points)
        except Exception:  # the worker's boundary: calibration must never stop a start-up
            continue
        report[name] = [t.point() for t in timings]
    return report


def _run_cpu(
    model: LoadedModel, inputs: Mapping[tuple[int, int], list[torch.Tensor]], n: int, length: int
) -> None:
    with torch.inference_mode():
        model.run(inputs[(n, length)])


def _run_batch(
    model: LoadedModel,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    samples: int,
    length: int,
) -> None:
    with torch.inference_mode():
        result = model.run(inputs)
        for spec, target in zip(model.outputs, outputs, strict=True):
            target.copy_(declared_output(result, spec, samples, length))
