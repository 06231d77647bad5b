"""Inputs before they are sent: named, C-contiguous, of a wire dtype, checked against the model's
specs with the server's own matching code (same messages), and split at max_batch_size; and
the split parts' outputs joined back in order.

Pure numpy on the client's event loop; no I/O.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.errors import BadRequest, server_error
from client.model_info import ModelInfo
from server.errors import ServingError
from server.models.matching import Matched, match_inputs
from server.models.spec import SUPPORTED_DTYPES, sent

Inputs = np.ndarray | Mapping[str, np.ndarray]
_WIRE_DTYPES = frozenset(np.dtype(name) for name in SUPPORTED_DTYPES)


def named_inputs(x: Inputs) -> dict[str, np.ndarray]:
    """One array (named `input`) or a map of them, as C-contiguous arrays of wire dtypes."""
    items: list[tuple[Any, Any]] = list(x.items()) if isinstance(x, Mapping) else [("input", x)]
    if not items:
        raise BadRequest(
            "bad_request", "'inputs' must be a non-empty map of name to tensor, got a map", 400
        )
    arrays: dict[str, np.ndarray] = {}
    for name, value in items:
        if not isinstance(name, str):
            raise BadRequest(
                "bad_request", f"input names must be strings, got {type(name).__name__}", 400
            )
        arr = np.asarray(value)
        # Byte order is the codec's business; only the kind of number matters here.
        if arr.dtype.newbyteorder("=") not in _WIRE_DTYPES:
            raise BadRequest(
                "bad_request",
                f"inputs.{name}.dtype must be one of {', '.join(SUPPORTED_DTYPES)}, "
                f"got {arr.dtype.name!r}",
                400,
            )
        arrays[name] = arr if arr.flags.c_contiguous else np.array(arr, order="C")
    return arrays


def batch_form(info: ModelInfo, inputs: dict[str, np.ndarray]) -> Matched:
    """(inputs as [n, *sample] by the model's names, n, sent as one sample, length), or
    BadRequest.

    The server's own check, run here so that a mistake costs no round trip and reads the same.
    """
    max_length = int(info.batching.get("max_length", sys.maxsize))
    try:
        return match_inputs(info.name, sent(info.inputs), inputs, sys.maxsize, max_length)
    except ServingError as exc:
        raise server_error(exc.code.value, exc.message, exc.http_status) from None


def split(batched: dict[str, np.ndarray], samples: int, size: int) -> list[dict[str, np.ndarray]]:
    """Consecutive parts of at most `size` samples (views: slices of C arrays stay contiguous)."""
    return [
        {name: arr[start : start + size] for name, arr in batched.items()}
        for start in range(0, samples, size)
    ]


def join(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The parts' outputs concatenated along the sample axis, in the parts' order."""
    names = list(parts[0])
    return {name: np.concatenate([part[name] for part in parts]) for name in names}
