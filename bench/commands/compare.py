"""`microbatch compare`: time a model on every available device over a range of batch sizes and
say which wins where, with the crossover batch size; optionally a plot and a JSON report. A model
with a dynamic dimension is timed at one padded length (--length, default max_length // 4).

Main process (the CLI); imports torch, and matplotlib for --plot, only when it runs. The CPU
is timed in this process with torch's threads; each visible GPU through the server's own CUDA
instance (pinned staging, copy and compute streams), host arrays in to host arrays out,
synchronised.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.comparison import Measurement, format_table, parse_sizes, summarize, to_json
from server.config import ConfigError, Flags, ModelConfig, load_config
from server.models.spec import is_dynamic

DEFAULT_SIZES = "1,2,4,...,1024"


DESCRIPTION = (
    "Measure a model's batch latency and throughput on the CPU and on every "
    "visible GPU, over a range of batch sizes (warm-up, repeats, median and p25-p75), "
    "and print which device wins at each size and where the GPUs start to win."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="mlp", help="model name (default mlp)")
    p.add_argument("--config", help="TOML config that names the model, for user models")
    p.add_argument("--input", help=".npy file whose samples fill the batches (default random)")
    p.add_argument(
        "--batch-sizes",
        default=DEFAULT_SIZES,
        help=f"sizes to time; `...` continues a doubling run (default {DEFAULT_SIZES})",
    )
    p.add_argument(
        "--length",
        type=int,
        help="padded length to time a model with a dynamic dimension at (default: its "
        "max_length // 4); not for a fixed-shape model",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed runs per size (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs per size (default 3)")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: as many as one of the server's CPU workers uses)",
    )
    p.add_argument("--plot", metavar="PNG", help="write latency and throughput plots here")
    p.add_argument("--json", metavar="FILE", help="write the measurements as JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    config = load_config(args.config, os.environ, Flags())
    try:
        cfg = config.model(args.model)
        sizes = parse_sizes(args.batch_sizes)
    except KeyError:
        names = ", ".join(m.name for m in config.models)
        raise ConfigError(f"--model {args.model!r} is not configured; known: {names}") from None
    except ValueError as exc:
        raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: {exc}") from None
    if args.repeats < 1 or args.warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    import torch

    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or config.workers.resolved_threads(cores))
    source = np.load(args.input, allow_pickle=False) if args.input else None
    measurements, context = _measure_all(cfg, sizes, source, args)
    summary = summarize(measurements)
    gpu = ", ".join(f"{d} {name}" for d, name in context["gpus"].items()) or "none found"
    threads = context["cpu_threads"]
    plural = "s" if threads != 1 else ""
    at = f" at length {context['length']}" if context["length"] is not None else ""
    out(f"model {cfg.name}{at}: CPU with {threads} torch thread{plural}; GPU: {gpu}")
    for line in format_table(summary, context["length"]):
        out(line)
    if summary.crossover is not None:
        out(f"crossover: batch size {summary.crossover}")
    if len(summary.crossovers) > 1:  # several GPUs: where each alone would take over
        out("crossover per GPU: " + ", ".join(f"{d} {c}" for d, c in summary.crossovers.items()))
    out(f"recommendation: {summary.recommendation}")
    report = to_json(summary, context)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        out(f"wrote {args.json}")
    if args.plot:
        _plot(report, args.plot, out)
    return 0


def _measure_all(
    cfg: ModelConfig, sizes: list[int], source: np.ndarray | None, args: argparse.Namespace
) -> tuple[list[Measurement], dict[str, Any]]:
    import torch

    from server.executors.profiling import time_sizes_blocking
    from server.models.loading import load_model

    model = load_model(cfg)
    length = _length(cfg, model.inputs, args.length)
    batches = {n: _batch(model.inputs, n, source, length or 1) for n in sizes}
    timing = {"warmup": args.warmup, "repeats": args.repeats, "budget_s": 600.0}

    def on_cpu(n: int) -> None:
        tensors = [torch.from_numpy(a) for a in batches[n]]
        with torch.inference_mode():
            model.run(tensors)

    measurements = _as_measurements("cpu", time_sizes_blocking(on_cpu, sizes, **timing))
    # Every visible device, as the server uses every one (CUDA_VISIBLE_DEVICES chooses them):
    # GPUs of one machine may differ, and each may need its own routing.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = {f"cuda:{i}": torch.cuda.get_device_name(i) for i in range(count)}
    context: dict[str, Any] = {
        "model": cfg.name,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "gpu": next(iter(gpus.values()), None),  # the first one's name, as before
        "gpus": gpus,
        "length": length,  # the padded length timed (a dynamic dimension); None: fixed shape
    }
    for index in range(count):
        measurements += _measure_gpu(cfg, index, sizes, batches, timing)
    return measurements, context


def _measure_gpu(
    cfg: ModelConfig,
    index: int,
    sizes: list[int],
    batches: dict[int, list[np.ndarray]],
    timing: dict[str, Any],
) -> list[Measurement]:
    """One GPU through the server's own CUDA instance, host arrays in and out, synchronised."""
    import torch

    from server.executors.cuda_instance import CudaInstance, DeviceCap
    from server.executors.profiling import time_sizes_blocking
    from server.models.loading import load_model

    biggest = max(sizes)
    device = torch.device("cuda", index)
    instance = CudaInstance(
        load_model(cfg), device, cfg.placement, biggest, DeviceCap(biggest), slots=1
    )
    instance.bind_thread()  # its events and allocations on its own device, not on cuda:0
    timings = time_sizes_blocking(lambda n: instance.run_blocking(batches[n]), sizes, **timing)
    return _as_measurements(f"cuda:{index}", timings)


def _as_measurements(device: str, timings: list[Any]) -> list[Measurement]:
    return [Measurement(device, t.samples, t.median_s, t.p25_s, t.p75_s, t.runs) for t in timings]


def _length(cfg: ModelConfig, specs: Any, given: int | None) -> int | None:
    """The padded length to time at: None for a fixed-shape model (which takes no --length)."""
    if not is_dynamic(specs):
        if given is not None:
            raise ConfigError(
                f"--length: model {cfg.name!r} has no dynamic dimension (its inputs are "
                f"{', '.join(s.describe() for s in specs)}); leave --length out"
            )
        return None
    length = given if given is not None else max(1, cfg.batching.max_length // 4)
    if not 1 <= length <= cfg.batching.max_length:
        raise ConfigError(
            f"--length must be between 1 and the model's max_length ({cfg.batching.max_length}), "
            f"got {length}"
        )
    return length


def _batch(specs: Any, n: int, source: np.ndarray | None, length: int = 1) -> list[np.ndarray]:
    """n samples per input (a dynamic dimension at `length`): the --input file's samples
    repeated, or seeded random ones."""
    if source is not None:
        if len(specs) != 1:
            raise ConfigError("--input serves single-input models only")
        shape = specs[0].at_length(length)
        samples = source.reshape(-1, *shape) if source.shape != shape else source[None]
        return [np.resize(samples, (n, *shape)).astype(specs[0].np_dtype)]
    rng = np.random.default_rng(0)
    batch = []
    for spec in specs:
        shape = (n, *spec.at_length(length))
        if spec.np_dtype.kind == "f":
            batch.append(rng.standard_normal(shape).astype(spec.np_dtype))
        else:
            batch.append(np.zeros(shape, dtype=spec.np_dtype))
    return batch


def _plot(report: dict[str, Any], path: str, out: Callable[[str], None]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out("--plot needs matplotlib (pip install 'microbatch[plot]'); no plot written")
        return
    at = f" at length {report['length']}" if report.get("length") is not None else ""
    fig, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for device in report["devices"]:
        rows = [r for r in report["rows"] if device in r]
        x = [r["batch_size"] for r in rows]
        med = np.array([r[device]["median_ms"] for r in rows])
        low = med - np.array([r[device]["p25_ms"] for r in rows])
        high = np.array([r[device]["p75_ms"] for r in rows]) - med
        latency.errorbar(x, med, yerr=[low, high], marker="o", capsize=3, label=device)
        throughput.plot(x, [r[device]["samples_per_s"] for r in rows], marker="o", label=device)
    for ax, label in ((latency, "batch latency, ms (median, p25-p75)"), (throughput, "samples/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size" + at)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        if report["crossover_batch_size"]:
            ax.axvline(report["crossover_batch_size"], linestyle="--", color="grey")
        ax.legend()
    fig.suptitle(f"{report['model']}{at}: {report['recommendation']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    out(f"wrote {path}")
