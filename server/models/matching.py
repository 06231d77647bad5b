"""Matches a decoded request's tensors to a model's inputs: names, sample count, shapes, dtypes.

Event loop; pure numpy. Every mismatch is a BadRequest naming the input and saying what was
expected and what came. Safe casts are allowed (any integer or float to a float, and numpy's
"safe" casts such as int32 to int64 or bool to anything); the cast itself happens in the copy
into the batch.
"""

from __future__ import annotations

import numpy as np

from server.errors import BadRequest
from server.models.spec import TensorSpec


def castable(src: np.dtype[np.generic], dst: np.dtype[np.generic]) -> bool:
    if src is dst or src == dst or np.can_cast(src, dst, casting="safe"):
        return True
    return src.kind in "iuf" and dst.kind == "f"


def match_inputs(
    model: str, specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray], max_batch: int
) -> tuple[dict[str, np.ndarray], int, bool]:
    """Returns (inputs in batch form keyed by the model's names, samples, sent as one sample)."""
    named = _by_model_names(model, specs, inputs)
    samples: int | None = None
    single: bool | None = None
    batched: dict[str, np.ndarray] = {}
    for spec in specs:
        arr, sent_name = named[spec.name]
        field = f"inputs.{sent_name}"
        if not castable(arr.dtype, spec.np_dtype):
            raise BadRequest(
                f"{field} has dtype {arr.dtype.name}; model {model!r} expects {spec.dtype} "
                "(safe casts such as float64 to float32 are accepted)"
            )
        this_single, this_samples = _sample_count(model, spec, arr, field)
        if samples is None:
            samples, single = this_samples, this_single
        elif (this_samples, this_single) != (samples, single):
            raise BadRequest(
                f"{field} carries {this_samples} sample(s) but other inputs carry {samples}; "
                "every input of a request needs the same number of samples"
            )
        batched[spec.name] = arr.reshape((1, *spec.shape)) if this_single else arr
    assert samples is not None and single is not None
    if samples == 0:
        raise BadRequest("the request carries 0 samples; send at least one")
    if samples > max_batch:
        raise BadRequest(
            f"the request carries {samples} samples; model {model!r} takes at most "
            f"{max_batch} per request (max_batch_size); split it into smaller requests"
        )
    return batched, samples, single


def _by_model_names(
    model: str, specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, str]]:
    if len(specs) == 1 and len(inputs) == 1:
        # A single-input model accepts any one name.
        ((sent_name, arr),) = inputs.items()
        return {specs[0].name: (arr, sent_name)}
    expected = {s.name for s in specs}
    missing, unknown = expected - inputs.keys(), inputs.keys() - expected
    if missing or unknown:
        raise BadRequest(
            f"model {model!r} takes inputs {sorted(expected)}; "
            f"missing {sorted(missing)}, unknown {sorted(unknown)}"
        )
    return {name: (arr, name) for name, arr in inputs.items()}


def _sample_count(model: str, spec: TensorSpec, arr: np.ndarray, field: str) -> tuple[bool, int]:
    rank = len(spec.shape)
    if arr.ndim == rank and arr.shape == spec.shape:
        return True, 1
    if arr.ndim == rank + 1 and arr.shape[1:] == spec.shape:
        return False, arr.shape[0]
    raise BadRequest(
        f"{field} has shape {list(arr.shape)}; model {model!r} expects one sample of shape "
        f"{list(spec.shape)} or n samples of shape [n, {', '.join(map(str, spec.shape))}]"
    )
