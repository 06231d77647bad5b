"""JSON tensor data: a JSON list to an array of a dtype, only where every value fits it, and an
array back to JSON values (NaN and infinities as the strings of protobuf's JSON mapping).

Pure numpy, no aiohttp, no torch; used by the codec on the event loop and in clients. Every
misfit is a BadRequest naming the field and the first value that does not fit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from server.errors import BadRequest


def array_from_list(data: Any, dtype: np.dtype[Any], elements: int, field: str) -> np.ndarray:
    if isinstance(data, (int, float)) and elements == 1:
        data = [data]  # a scalar tensor (shape []) may be sent as a bare number
    if not isinstance(data, list):
        raise BadRequest(
            f"{field}.data must be a (flat or nested) list in JSON, got {kind_of(data)}"
        )
    try:
        # Read in the values' own kind, then cast (about the cost of one direct parse, measured):
        # np.array(data, dtype) would truncate 1.5 to 1, read 2 as True, parse "1" as a number
        # and overflow 1e39 to inf with only a RuntimeWarning.
        raw = np.array(data)
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"{field}.data is not a regular list of {dtype.name}: {exc}") from None
    if raw.size != elements:
        raise BadRequest(f"{field}.data has {raw.size} elements; its shape needs {elements}")
    return _fit(raw, dtype.newbyteorder("="), data, field).reshape(-1)


# The kinds of JSON value (as numpy reads a list of them) that each kind of dtype takes.
_ACCEPTS = {"b": "biu", "i": "iu", "u": "iu", "f": "iuf"}
_WANTS = {"b": "true/false (or 0/1)", "i": "integers", "u": "integers", "f": "numbers"}


def _fit(raw: np.ndarray, dtype: np.dtype[Any], data: list[Any], field: str) -> np.ndarray:
    """`raw` (numpy's reading of a JSON list) cast to `dtype` if every value fits it: integers
    in range for integer dtypes, true/false or 0/1 for bool, numbers within range for floats.
    numpy promotes a list that mixes kinds first (true among numbers reads as 1)."""
    kind, target = raw.dtype.kind, dtype.kind
    if raw.size == 0 or raw.dtype == dtype:
        return raw.astype(dtype, copy=False)  # an empty list reads as float64: nothing to fit
    if kind not in _ACCEPTS[target]:
        raise _misfit(data, dtype, field)
    if target in "biu":
        low, high = _range(dtype)
        if raw.min() < low or raw.max() > high:
            raise _misfit(data, dtype, field)
    elif dtype.itemsize < 8:  # float16 or float32: a finite value may overflow to inf
        try:
            with np.errstate(over="raise"):
                return raw.astype(dtype)
        except FloatingPointError:
            limit = float(np.finfo(dtype).max)
            raise BadRequest(
                f"{field}.data holds a value beyond the range of {dtype.name} (+-{limit:.4g})"
            ) from None
    return raw.astype(dtype)


def _range(dtype: np.dtype[Any]) -> tuple[int, int]:
    if dtype.kind == "b":
        return 0, 1
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _misfit(data: list[Any], dtype: np.dtype[Any], field: str) -> BadRequest:
    """The error for a list whose values do not fit `dtype`, naming the first that does not.
    Only on the error path, so a plain walk; iterative, as JSON may nest deeper than a shape.
    For float dtypes an integer must still fit 64 bits: numpy reads a larger one as an object."""
    wants = f"{field}.data must hold {_WANTS[dtype.kind]} for dtype {dtype.name}"
    low, high = _range(dtype) if dtype.kind in "biu" else (-(2**63), 2**64 - 1)
    numbers = int if dtype.kind in "biu" else (int, float)
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if not isinstance(item, numbers):
                return BadRequest(f"{wants}, got {kind_of(item)}")
            if isinstance(item, int) and not low <= item <= high:
                where = (
                    f"dtype {dtype.name} [{low}, {high}]"
                    if dtype.kind in "biu"
                    else "a 64-bit integer (send it as a float)"
                )
                return BadRequest(f"{field}.data holds {item}, out of range for {where}")
        else:
            stack.pop()
    return BadRequest(wants)  # every value on its own fits: only a list of booleans gets here


# How JSON carries what it has no numbers for: the strings of the protobuf JSON mapping.
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def json_values(arr: np.ndarray) -> Any:
    """An array as nested lists for JSON, a non-finite float as "NaN", "Infinity" or
    "-Infinity" (a model's output may hold them; msgpack carries them as they are)."""
    values = arr.tolist()
    if arr.dtype.kind != "f" or bool(np.isfinite(arr).all()):
        return values
    return _replace_non_finite(values)


def _replace_non_finite(values: Any) -> Any:
    if isinstance(values, list):
        return [_replace_non_finite(v) for v in values]
    if math.isfinite(values):
        return values
    return _NON_FINITE.get(values, "NaN")


def kind_of(value: Any) -> str:
    """How a value reads in an error message: its wire type, not a Python repr."""
    names = {dict: "a map", list: "a list", str: "a string", bytes: "binary", bool: "a boolean"}
    if value is None:
        return "nothing (nil)"
    for typ, name in names.items():
        if isinstance(value, typ):
            return name
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return type(value).__name__
