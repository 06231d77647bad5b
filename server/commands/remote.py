"""The commands that go through a running server with the Python client: `microbatch models
--url URL`, and `microbatch infer --url URL` (infer.py hands over here when --url is given).

Main process, blocking calls of client.Client; imports no torch and no aiohttp.web.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np

from client import Client, MicrobatchError, ModelInfo, Prediction

DEFAULT_URL = "http://127.0.0.1:8000"


DESCRIPTION = (
    "Print the models a running server serves, with their input and output "
    "specs and batching settings."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_url_flags(p, default=DEFAULT_URL)
    p.set_defaults(run=run_models)


def add_url_flags(p: argparse.ArgumentParser, default: str | None) -> None:
    where = f" (default {default})" if default else ""
    p.add_argument(
        "--url",
        default=default,
        help=f"the server: http://host:port or unix:///path/to.sock{where}",
    )
    p.add_argument(
        "--timeout-s", type=float, default=30.0, help="seconds the call may take (default 30)"
    )


def run_models(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, timeout_s=args.timeout_s) as client:
            models = client.models()
    except (MicrobatchError, ValueError) as exc:
        return _fail(exc)
    if not models:
        print(f"{args.url} serves no models")
    for info in models:
        print("\n".join(describe_model(info)))
    return 0


def describe_model(info: ModelInfo) -> list[str]:
    settings = ", ".join(f"{key}={value}" for key, value in info.batching.items())
    return [
        f"{info.name} ({'ready' if info.ready else 'not loaded'})",
        f"  inputs:   {', '.join(f'{s.name} {s.describe()}' for s in info.inputs) or '-'}",
        f"  outputs:  {', '.join(f'{s.name} {s.describe()}' for s in info.outputs) or '-'}",
        f"  batching: {settings}",
    ]


def run_infer(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """`microbatch infer --url`: the .npy file through the server, reported like the local run."""
    if args.device != "auto" or args.config:
        print(
            "microbatch: with --url the server picks the device and model; "
            "--device and --config are ignored",
            file=sys.stderr,
        )
    try:
        array = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError) as exc:
        print(f"microbatch: cannot read --input {args.input}: {exc}", file=sys.stderr)
        return 2
    try:
        with Client(args.url, timeout_s=args.timeout_s) as client:
            listing = {info.name: info for info in client.models()}
            started = time.perf_counter()
            prediction = client.predict(args.model, array, return_info=True)
            elapsed_ms = (time.perf_counter() - started) * 1000.0
    except (MicrobatchError, ValueError) as exc:
        return _fail(exc)
    info = listing.get(args.model)
    single = bool(info and info.inputs and array.ndim == len(info.inputs[0].shape))
    first = next(iter(prediction.outputs.values()))
    for line in report(args.url, prediction, first, single, elapsed_ms):
        out(line)
    return 0


def report(
    url: str, prediction: Prediction, output: np.ndarray, single: bool, elapsed_ms: float
) -> list[str]:
    """The classic three lines, with what the server reported about where and how it ran."""
    device = prediction.device
    label = "GPU" if device.startswith("cuda") else "CPU" if device == "cpu" else device
    parts = len(prediction.requests)
    over = f" over {parts} requests" if parts > 1 else ""
    return [
        f"Processing input on {label} (server {url}, device {device})...",
        f"Prediction: {format_prediction(output, single)}",
        f"Inference time: {elapsed_ms:.3f} ms (round trip{over}; server: queue "
        f"{prediction.queue_ms:.3f} ms, compute {prediction.compute_ms:.3f} ms, "
        f"batch size {prediction.batch_size})",
    ]


def _fail(exc: Exception) -> int:
    print(f"microbatch: {exc}", file=sys.stderr)
    return 1


def format_prediction(output: np.ndarray, single: bool) -> str:
    """A scalar for one sample of one value, a list otherwise (rounded for reading)."""
    if single:
        return _format_sample(output)
    return "[" + ", ".join(_format_sample(row) for row in output) + "]"


def _format_sample(row: np.ndarray) -> str:
    if row.size == 1:
        return f"{float(row.reshape(-1)[0]):.4g}"
    return "[" + ", ".join(f"{float(v):.4g}" for v in row.reshape(-1)) + "]"
