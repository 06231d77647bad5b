"""The one request body a run sends again and again: random inputs of the model's shape, or the
samples of a .npy file, encoded with the server's own msgpack codec.

Runs in the CLI process before the run; the bytes then go to every generator process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.loadgen.errors import LoadGenError
from server.models.spec import TensorSpec
from server.protocol.codec import MSGPACK, encode, encode_tensor


def random_batch(spec: TensorSpec, samples: int, rng: np.random.Generator) -> np.ndarray:
    shape = (samples, *spec.shape)
    dtype = spec.np_dtype
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def batch_from_file(array: np.ndarray, spec: TensorSpec, samples: int) -> np.ndarray:
    """`samples` rows for `spec` from one sample or a batch (rows reused in turn if short)."""
    if array.shape == spec.shape:
        rows = array[np.newaxis]
    elif array.shape[1:] == spec.shape and array.shape[0] > 0:
        rows = array
    else:
        raise LoadGenError(
            f"--input has shape {list(array.shape)}; input {spec.name!r} needs "
            f"{list(spec.shape)} or [N, {', '.join(map(str, spec.shape))}]"
        )
    picked = rows[np.arange(samples) % rows.shape[0]]
    return np.ascontiguousarray(picked, dtype=spec.np_dtype)


def build_body(
    specs: tuple[TensorSpec, ...],
    samples: int,
    input_path: str | None,
    timeout_ms: float | None,
    seed: int,
) -> bytes:
    if input_path is not None:
        if len(specs) != 1:
            raise LoadGenError(
                f"--input gives one array, but the model has {len(specs)} inputs; "
                "leave --input out to send random inputs"
            )
        try:
            array = np.load(input_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LoadGenError(f"cannot read --input {input_path}: {exc}") from None
        inputs = {specs[0].name: batch_from_file(array, specs[0], samples)}
    else:
        rng = np.random.default_rng(seed)
        inputs = {spec.name: random_batch(spec, samples, rng) for spec in specs}
    body: dict[str, Any] = {
        "inputs": {name: encode_tensor(arr, MSGPACK) for name, arr in inputs.items()}
    }
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    return encode(body, MSGPACK)
