"""`microbatch infer`: run one model in this process on a .npy file, the classic CPU/GPU demo
(or, with --url, through a running server: remote.py).

Runs in the CLI process; torch is imported only when it runs in-process. A bad --input
(missing, unreadable, or not shaped for the model) or a model that fails to load is a
ConfigError, which the CLI prints as one `microbatch: ...` line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from server.commands import remote
from server.commands.remote import format_prediction
from server.config import BUILTIN_MODELS, Config, ConfigError, Flags, ModelConfig, load_config
from server.errors import BadRequest
from server.models.matching import match_inputs
from server.models.padding import batch_length, filled
from server.models.spec import sent

if TYPE_CHECKING:
    from server.models.loading import LoadedModel

DESCRIPTION = (
    "Run a built-in (or configured) model in-process on the samples of a .npy "
    "file and print the device, the prediction and the inference time."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help=".npy file: one sample or a batch")
    p.add_argument("--model", default="linear", help="model name (default linear)")
    p.add_argument(
        "--device",
        choices=["cpu", "gpu", "auto"],
        default="auto",
        help="where to run; gpu falls back to the CPU with a warning where there is none",
    )
    p.add_argument("--config", help="TOML config that names the model, for user models")
    remote.add_url_flags(p, default=None)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.url:
        return remote.run_infer(args)
    # A built-in named without a config is served as `serve --model NAME` would serve it.
    builtin = args.model in BUILTIN_MODELS and not args.config
    config = load_config(args.config, os.environ, Flags(models=(args.model,) if builtin else ()))
    return run_in_process(config, args.model, args.input, args.device, print)


def pick_device(requested: str, warn: Callable[[str], None]) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "gpu" and not has_cuda:
        warn("Warning: --device gpu asked for, but no CUDA GPU is available; running on the CPU.")
        return "cpu"
    if requested in ("gpu", "auto") and has_cuda:
        return "cuda"
    return "cpu"


def run_in_process(
    config: Config, model_name: str, input_path: str, device: str, out: Callable[[str], None]
) -> int:
    try:
        cfg = config.model(model_name)
    except KeyError:
        names = ", ".join(m.name for m in config.models)
        raise ConfigError(f"--model {model_name!r} is not configured; known: {names}") from None
    # Read before torch is imported and the model loaded, so that a mistyped path fails at once.
    array = _read_input(input_path)
    from server.models.loading import ModelLoadError, load_model

    chosen = pick_device(device, _warn)
    try:
        model = load_model(cfg)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    inputs, single = _match_input(cfg.name, model, array, input_path)
    if chosen == "cuda":
        return _run_on_gpu(cfg, model, inputs, single, out)
    return _run_on_cpu(model, inputs, single, out)


def _run_on_cpu(
    model: LoadedModel, inputs: dict[str, np.ndarray], single: bool, out: Callable[[str], None]
) -> int:
    import torch

    tensors = [
        torch.from_numpy(np.ascontiguousarray(inputs[s.name], dtype=s.np_dtype))
        for s in model.inputs
    ]
    out("Processing input on CPU...")
    with torch.inference_mode():
        model.run(tensors)  # warm-up: the first call pays for lazy initialisation
        started = time.perf_counter()
        result = model.run(tensors)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    first = next(iter(result.values())).numpy()
    out(f"Prediction: {format_prediction(first[0] if single else first, single)}")
    out(f"Inference time: {elapsed_ms:.3f} ms")
    return 0


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _read_input(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ConfigError(f"cannot read --input {path}: {exc}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive loads as a mapping of arrays
        raise ConfigError(f"--input {path} is not a single array (.npy); an .npz is not supported")
    return array


def _match_input(
    model_name: str, model: LoadedModel, array: np.ndarray, path: str
) -> tuple[dict[str, np.ndarray], bool]:
    """The file's array in batch form, or a ConfigError in the server's own words, with the
    file named where the server would name the request field."""
    samples = max(array.shape[0] if array.ndim else 1, 1)  # any sample count fits in-process
    try:
        matched = match_inputs(
            model_name, sent(model.inputs), {"input": array}, samples, sys.maxsize
        )
    except BadRequest as exc:
        field = "inputs.input "
        text = str(exc)
        if text.startswith(field):
            raise ConfigError(f"--input {path} {text.removeprefix(field)}") from None
        raise ConfigError(f"--input {path}: {text}") from None
    inputs, samples, single, length = matched
    lengths = np.full(samples, length, dtype=np.int64)  # one request: no padding
    for spec in model.inputs:
        if spec.fill:
            inputs[spec.name] = filled(spec, lengths, length)
    return inputs, single


def _run_on_gpu(
    cfg: ModelConfig,
    model: LoadedModel,
    inputs: dict[str, np.ndarray],
    single: bool,
    out: Callable[[str], None],
) -> int:
    """The server's CUDA executor path: pinned staging, copy and compute streams, the model's
    half-precision and compile settings; timed host to host, synchronised."""
    import torch

    from server.executors.cuda_instance import CudaInstance, DeviceCap

    arrays = [np.ascontiguousarray(inputs[s.name], dtype=s.np_dtype) for s in model.inputs]
    n, length = int(arrays[0].shape[0]), batch_length(model.inputs, arrays)
    device = torch.device("cuda", 0)
    instance = CudaInstance(model, device, cfg.placement, n, DeviceCap(n), 1, length)
    out("Processing input on GPU...")
    instance.run_blocking(arrays)  # warm-up: the first call pays for lazy initialisation
    started = time.perf_counter()
    result, _ = instance.run_blocking(arrays)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    first = next(iter(result.values()))
    out(f"Prediction: {format_prediction(first[0] if single else first, single)}")
    out(f"Inference time: {elapsed_ms:.3f} ms")
    return 0
