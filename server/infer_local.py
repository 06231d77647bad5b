"""`microbatch infer`: run one model in this process on a .npy file, the classic CPU/GPU demo.

Runs in the CLI process and imports torch; no server involved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from server.config import Config, ConfigError, ModelConfig
from server.models.matching import match_inputs

if TYPE_CHECKING:
    from server.models.loading import LoadedModel


def pick_device(requested: str, warn: Callable[[str], None]) -> str:
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "gpu" and not has_cuda:
        warn("Warning: --device gpu asked for, but no CUDA GPU is available; running on the CPU.")
        return "cpu"
    if requested in ("gpu", "auto") and has_cuda:
        return "cuda"
    return "cpu"


def format_prediction(output: np.ndarray, single: bool) -> str:
    """A scalar for one sample of one value, a list otherwise (rounded for reading)."""
    if single:
        return _format_sample(output)
    return "[" + ", ".join(_format_sample(row) for row in output) + "]"


def _format_sample(row: np.ndarray) -> str:
    if row.size == 1:
        return f"{float(row.reshape(-1)[0]):.4g}"
    return "[" + ", ".join(f"{float(v):.4g}" for v in row.reshape(-1)) + "]"


def run_infer(
    config: Config, model_name: str, input_path: str, device: str, out: Callable[[str], None]
) -> int:
    import torch

    from server.models.loading import load_model

    try:
        cfg = config.model(model_name)
    except KeyError:
        names = ", ".join(m.name for m in config.models)
        raise ConfigError(f"--model {model_name!r} is not configured; known: {names}") from None
    chosen = pick_device(device, out)
    model = load_model(cfg)
    array = np.load(input_path, allow_pickle=False)
    inputs, _, single = match_inputs(
        cfg.name, model.inputs, {"input": array}, max(array.shape[0] if array.ndim else 1, 1)
    )
    if chosen == "cuda":
        return _run_on_gpu(cfg, model, inputs, single, out)
    module = model.module.to(chosen) if hasattr(model.module, "to") else model.module
    model.module = module
    tensors = [
        torch.from_numpy(np.ascontiguousarray(inputs[s.name], dtype=s.np_dtype)).to(chosen)
        for s in model.inputs
    ]
    out(f"Processing input on {'GPU' if chosen == 'cuda' else 'CPU'}...")
    with torch.inference_mode():
        model.run(tensors)  # warm-up: the first call pays for lazy initialisation
        if chosen == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = model.run(tensors)
        if chosen == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - started) * 1000.0
    first = next(iter(result.values())).cpu().numpy()
    out(f"Prediction: {format_prediction(first[0] if single else first, single)}")
    out(f"Inference time: {elapsed_ms:.3f} ms")
    return 0


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
    n = int(arrays[0].shape[0])
    device = torch.device("cuda", 0)
    instance = CudaInstance(model, device, cfg.placement, n, DeviceCap(n), slots=1)
    out("Processing input on GPU...")
    instance.run_blocking(arrays)  # warm-up: the first call pays for lazy initialisation
    started = time.perf_counter()
    result, _ = instance.run_blocking(arrays)
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    first = next(iter(result.values()))
    out(f"Prediction: {format_prediction(first[0] if single else first, single)}")
    out(f"Inference time: {elapsed_ms:.3f} ms")
    return 0
