"""Built-in models `linear`, `mlp` and `encoder` (encoder.py), with weights drawn from numpy's
PCG64 so that they are identical on every machine and torch version (torch's own init RNG is
not promised to be).

The weight functions import no torch: tests and clients can compute expected outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.models.encoder import build_encoder
from server.models.spec import DYNAMIC, TensorSpec

SEED = 20261201
# (in, out) per layer; ReLU between layers, none after the last.
LAYERS: dict[str, tuple[tuple[int, int], ...]] = {
    "linear": ((10, 1),),
    "mlp": ((256, 1024), (1024, 1024), (1024, 1024), (1024, 10)),
}


def builtin_weights(name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight [out, in], bias [out]) per layer, float32, uniform(+-1/sqrt(in)) like torch."""
    rng = np.random.Generator(np.random.PCG64(SEED))
    weights = []
    for fan_in, fan_out in LAYERS[name]:
        bound = 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, size=(fan_out, fan_in)).astype(np.float32)
        b = rng.uniform(-bound, bound, size=(fan_out,)).astype(np.float32)
        weights.append((w, b))
    return weights


def builtin_input_spec(name: str) -> tuple[TensorSpec, ...]:
    if name == "encoder":
        return (
            TensorSpec("ids", "int64", (DYNAMIC,)),
            TensorSpec("padding_mask", "bool", (DYNAMIC,), fill="padding_mask"),
        )
    return (TensorSpec("input", "float32", (LAYERS[name][0][0],)),)


def reference_forward(name: str, x: np.ndarray) -> np.ndarray:
    """The built-in model in numpy (float64 accumulation), for checking answers."""
    out = x.astype(np.float64)
    layers = builtin_weights(name)
    for i, (w, b) in enumerate(layers):
        out = out @ w.T.astype(np.float64) + b
        if i < len(layers) - 1:
            out = np.maximum(out, 0.0)
    return out


def build_builtin(name: str) -> Any:
    """The torch module (imported lazily: only worker processes and `infer` pay for torch)."""
    import torch

    if name == "encoder":
        return build_encoder()
    modules: list[torch.nn.Module] = []
    for i, (w, b) in enumerate(builtin_weights(name)):
        layer = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(w))
            layer.bias.copy_(torch.from_numpy(b))
        modules.append(layer)
        if i < len(LAYERS[name]) - 1:
            modules.append(torch.nn.ReLU())
    model = modules[0] if len(modules) == 1 else torch.nn.Sequential(*modules)
    return model.eval()
