"""The request bodies a run sends, in turn, again and again: random inputs of the model's shape,
or the samples of a .npy file, encoded with the server's own msgpack codec. One body for a
fixed-shape model; for a model with a dynamic length (a -1 in its input shape), a pool of
bodies whose lengths follow the `--lengths` distribution (lengths.py).

Runs in the CLI process before the run; the bytes then go to every generator process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.loadgen.errors import LoadGenError
from bench.loadgen.lengths import LengthDist, draw_lengths
from server.models.spec import TensorSpec, sent
from server.protocol.codec import MSGPACK, encode, encode_tensor

Bodies = tuple[bytes, ...]  # sent in turn
POOL = 256  # bodies drawn for a length distribution: enough to follow its shape


def random_batch(
    spec: TensorSpec, samples: int, rng: np.random.Generator, length: int = 0
) -> np.ndarray:
    """Random inputs; a dynamic dimension (-1) takes `length`."""
    shape = (samples, *(length if d == -1 else d for d in spec.shape))
    dtype = spec.np_dtype
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def build_bodies(
    specs: tuple[TensorSpec, ...],
    samples: int,
    input_path: str | None,
    timeout_ms: float | None,
    seed: int,
    lengths: LengthDist | None,
) -> Bodies:
    """The bodies of a run: one, or a pool of POOL with lengths drawn from `lengths`."""
    specs = sent(specs)  # not the inputs the server fills (a padding mask, the lengths)
    dynamic = any(-1 in spec.shape for spec in specs)
    if not dynamic:
        if lengths is not None:
            raise LoadGenError("--lengths is for models with a dynamic length (-1 in a shape)")
        return (build_body(specs, samples, input_path, timeout_ms, seed),)
    if input_path is not None:
        raise LoadGenError("--input is not supported for a model with a dynamic length")
    if lengths is None:
        raise LoadGenError("the model takes inputs of any length: give --lengths")
    rng = np.random.default_rng(seed)
    return tuple(
        _encode(
            {spec.name: random_batch(spec, samples, rng, int(length)) for spec in specs},
            timeout_ms,
        )
        for length in draw_lengths(lengths, POOL, rng)
    )


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
    return _encode(inputs, timeout_ms)


def _encode(inputs: dict[str, np.ndarray], timeout_ms: float | None) -> bytes:
    body: dict[str, Any] = {
        "inputs": {name: encode_tensor(arr, MSGPACK) for name, arr in inputs.items()}
    }
    if timeout_ms is not None:
        body["timeout_ms"] = timeout_ms
    return encode(body, MSGPACK)
