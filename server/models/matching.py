"""Matches a decoded request's tensors to a model's inputs: names, sample count, shapes, dtypes.

Event loop; pure numpy. Every mismatch is a BadRequest naming the input and saying what was
expected and what came. Safe casts are allowed (any integer or float to a float, and numpy's
"safe" casts such as int32 to int64 or bool to anything); the cast itself happens in the copy
into the batch, except where a value may not fit (float64 to float32, integers to float16):
those are cast here, and a finite value that overflows is a 400 (inf and nan pass as data).
`DeclaredShapes` checks a JSON tensor's declared shape before its array is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from server.errors import BadRequest
from server.models.spec import DYNAMIC, TensorSpec, sent


def castable(src: np.dtype[np.generic], dst: np.dtype[np.generic]) -> bool:
    if src is dst or src == dst or np.can_cast(src, dst, casting="safe"):
        return True
    return src.kind in "iuf" and dst.kind == "f"


class Matched(NamedTuple):
    inputs: dict[str, np.ndarray]  # in batch form ([n, *sample]), keyed by the model's names
    samples: int
    single: bool  # sent as one sample, without the batch dimension
    length: int  # the dynamic dimension's length (1 for a model with fixed shapes)


def match_inputs(
    model: str,
    specs: tuple[TensorSpec, ...],
    inputs: dict[str, np.ndarray],
    max_batch: int,
    max_length: int = 1,
) -> Matched:
    """The request's inputs checked against `specs`, the inputs a client sends (spec.sent: the
    server fills the others)."""
    named = _by_model_names(model, specs, inputs)
    samples: int | None = None
    single: bool | None = None
    length: tuple[int, str] | None = None  # the first dynamic input's length, and its field
    batched: dict[str, np.ndarray] = {}
    for spec in specs:
        arr, sent_name = named[spec.name]
        field = f"inputs.{sent_name}"
        if not castable(arr.dtype, spec.np_dtype):
            raise BadRequest(
                f"{field} has dtype {arr.dtype.name}; model {model!r} expects {spec.dtype} "
                "(safe casts such as float64 to float32 are accepted)"
            )
        this_single, this_samples = sample_count(model, spec, arr.shape, field)
        if samples is None:
            samples, single = this_samples, this_single
        elif (this_samples, this_single) != (samples, single):
            raise BadRequest(
                f"{field} carries {this_samples} sample(s) but other inputs carry {samples}; "
                "every input of a request needs the same number of samples"
            )
        if spec.dynamic_axis is not None:
            this_length = arr.shape[spec.dynamic_axis + (0 if this_single else 1)]
            length = _same_length(model, length, this_length, field, max_length)
        if arr.dtype != spec.np_dtype and not np.can_cast(arr.dtype, spec.np_dtype, "safe"):
            arr = _narrowed(arr, spec.np_dtype, field)
        batched[spec.name] = arr.reshape((1, *arr.shape)) if this_single else arr
    assert samples is not None and single is not None
    if samples == 0:
        raise BadRequest("the request carries 0 samples; send at least one")
    if samples > max_batch:
        raise BadRequest(
            f"the request carries {samples} samples; model {model!r} takes at most "
            f"{max_batch} per request (max_batch_size); split it into smaller requests"
        )
    return Matched(batched, samples, single, 1 if length is None else length[0])


def _same_length(
    model: str, seen: tuple[int, str] | None, length: int, field: str, max_length: int
) -> tuple[int, str]:
    """A request has one length: every dynamic input the same, from 1 to max_length."""
    if seen is not None and seen[0] != length:
        raise BadRequest(
            f"{field} has length {length} but {seen[1]} has length {seen[0]}; the dynamic "
            "dimension of every input of a request has one length"
        )
    if length > max_length:
        raise BadRequest(
            f"{field} has length {length}; model {model!r} takes at most {max_length} "
            "(max_length): shorten or split it"
        )
    if length < 1:
        raise BadRequest(f"{field} has length 0; send at least one position")
    return length, field


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


def sample_count(
    model: str, spec: TensorSpec, shape: tuple[int, ...], field: str
) -> tuple[bool, int]:
    """(sent as one sample, how many samples) for a tensor of `shape`; 400 if it fits neither.
    A dynamic dimension (-1) matches any length."""
    want, rank = spec.shape, len(spec.shape)
    if len(shape) == rank and (shape == want or _fits(shape, want)):
        return True, 1
    if len(shape) == rank + 1 and (shape[1:] == want or _fits(shape[1:], want)):
        return False, shape[0]
    per_sample = ", ".join("L" if d == DYNAMIC else str(d) for d in spec.shape)
    raise BadRequest(
        f"{field} has shape {list(shape)}; model {model!r} expects one sample of shape "
        f"[{per_sample}] or n samples of shape [n, {per_sample}]"
        + (" (L: any length)" if spec.dynamic_axis is not None else "")
    )


def _fits(shape: tuple[int, ...], spec: tuple[int, ...]) -> bool:
    return all(d == want or want == DYNAMIC for d, want in zip(shape, spec, strict=True))


def _narrowed(arr: np.ndarray, dtype: np.dtype[np.generic], field: str) -> np.ndarray:
    """`arr` cast to a float dtype that may not hold every value: a finite value that would
    overflow is refused (it would silently become inf); inf, -inf and nan are data."""
    try:
        with np.errstate(over="raise"):
            return arr.astype(dtype)
    except FloatingPointError:
        limit = float(np.finfo(dtype).max)  # type: ignore[type-var]  # a float dtype here
        raise BadRequest(
            f"{field} holds a value beyond the range of {dtype.name} (+-{limit:.4g}), the "
            "model's input dtype"
        ) from None


@dataclass(frozen=True, slots=True)
class DeclaredShapes:
    """A model's inputs, to check a tensor's declared shape before its array is built (a JSON
    body's numbers cost far more to turn into an array than to refuse)."""

    model: str
    specs: tuple[TensorSpec, ...]

    def check(self, name: str, shape: list[int], field: str) -> None:
        specs = sent(self.specs)
        if len(specs) == 1:
            spec: TensorSpec | None = specs[0]  # a single-input model takes any one name
        else:
            spec = next((s for s in specs if s.name == name), None)
        if spec is not None:  # an unknown name is reported by match_inputs, with the others
            sample_count(self.model, spec, tuple(shape), field)
