"""Open Inference Protocol tensors: datatypes, JSON data (flat or nested) and binary data (the
binary tensor extension) to numpy arrays.

Pure (numpy only; no aiohttp, no torch); runs on the event loop, called by oip.py once the
declared shape has passed the limits (codec.check_shape, shared with /v1). Every bad tensor
raises BadRequest naming the input before any buffer is made for it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from server.errors import BadRequest

# OIP datatype -> its wire (little-endian) numpy dtype. BF16 and BYTES are handled apart.
WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(code)
    for name, code in (
        ("BOOL", "|b1"),
        ("UINT8", "|u1"),
        ("UINT16", "<u2"),
        ("UINT32", "<u4"),
        ("UINT64", "<u8"),
        ("INT8", "|i1"),
        ("INT16", "<i2"),
        ("INT32", "<i4"),
        ("INT64", "<i8"),
        ("FP16", "<f2"),
        ("FP32", "<f4"),
        ("FP64", "<f8"),
    )
}
# A native-order dtype -> its OIP datatype (for metadata and responses).
DATATYPE_OF: dict[np.dtype[Any], str] = {
    dtype.newbyteorder("="): name for name, dtype in WIRE_DTYPES.items()
}
BF16 = "BF16"
BYTES = "BYTES"
# The kinds of JSON value (as numpy reads a list of them) that each kind of dtype takes.
_ACCEPTS = {"b": "biu", "i": "iu", "u": "iu", "f": "iuf"}
_WANTS = {"b": "true/false (or 0/1)", "i": "integers", "u": "integers", "f": "numbers"}


def _wire_dtype(datatype: Any, field: str) -> np.dtype[Any]:
    dtype = WIRE_DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is not None:
        return dtype
    if datatype == BYTES:
        raise BadRequest(
            f"{field} has datatype BYTES, which no model here takes: microbatch serves "
            "PyTorch models over numeric tensors"
        )
    known = ", ".join([*WIRE_DTYPES, BF16])
    raise BadRequest(f"{field} datatype must be one of {known}; got {datatype!r}")


def from_binary(
    raw: memoryview, datatype: Any, shape: list[int], elements: int, field: str
) -> np.ndarray:
    # bfloat16 is the upper half of a float32: read as 16-bit words, it widens exactly.
    dtype = WIRE_DTYPES["UINT16"] if datatype == BF16 else _wire_dtype(datatype, field)
    expected = elements * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"{field} has {len(raw)} bytes of binary data; shape {shape} of {datatype} "
            f"needs {expected}"
        )
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)  # a read-only view of the body
    if datatype == BF16:
        return (arr.astype(np.uint32) << 16).view(np.float32)  # the model sees float32
    if dtype.kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise BadRequest(f"{field} holds bytes other than 0 and 1 for datatype BOOL")
    return arr if dtype.isnative else arr.astype(dtype.newbyteorder("="))


def from_json(data: Any, datatype: Any, shape: list[int], elements: int, field: str) -> np.ndarray:
    if datatype == BF16:
        raise BadRequest(f"{field}: BF16 tensors must be sent as binary data (binary_data_size)")
    dtype = _wire_dtype(datatype, field).newbyteorder("=")
    if not isinstance(data, list):
        if isinstance(data, (bool, int, float)) and elements == 1:
            data = [data]
        else:
            raise BadRequest(f"{field} data must be a (flat or nested) list, got {kind_of(data)}")
    try:
        raw = np.array(data)  # read in the values' own kind, then cast only if each one fits
    except (ValueError, TypeError, OverflowError) as exc:
        raise BadRequest(f"{field} data is not a regular list of numbers: {exc}") from None
    if raw.size != elements:
        raise BadRequest(f"{field} data has {raw.size} elements; shape {shape} needs {elements}")
    if dtype.kind == "u" and raw.dtype.kind == "f":
        raw = _exact_integers(data, raw)
    return _fit(raw, dtype, datatype, field).reshape(shape)


def _fit(raw: np.ndarray, dtype: np.dtype[Any], datatype: str, field: str) -> np.ndarray:
    kind, target = raw.dtype.kind, dtype.kind
    if raw.size == 0 or raw.dtype == dtype:
        return raw.astype(dtype, copy=False)
    wants = f"{field} data must hold {_WANTS[target]} for datatype {datatype}"
    if kind not in _ACCEPTS[target]:
        raise BadRequest(wants)
    if target in "biu":
        low, high = (0, 1) if target == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if raw.min() < low or raw.max() > high:
            raise BadRequest(f"{field} data holds values outside [{low}, {high}] for {datatype}")
        return raw.astype(dtype)
    try:
        with np.errstate(over="raise"):
            return raw.astype(dtype)
    except FloatingPointError:
        raise BadRequest(f"{field} data holds a value beyond the range of {datatype}") from None


def _exact_integers(data: Any, raw: np.ndarray) -> np.ndarray:
    """numpy reads a list that mixes integers of 2**63 and above with smaller ones as floats
    (losing digits): read it again as the integers it holds, where it holds only integers."""
    values = np.array(data, dtype=object).ravel()
    if not all(type(v) is int for v in values):
        return raw  # floats or booleans among them: judged as they are
    try:
        return np.array(values.tolist(), dtype=np.uint64)
    except OverflowError:
        return raw  # a negative or too large value: refused by the range check


def kind_of(value: Any) -> str:
    """How a JSON value reads in an error message."""
    if value is None:
        return "null"
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    for typ, name in names.items():
        if isinstance(value, typ):
            return name
    return f"a number ({value!r})" if isinstance(value, (int, float)) else type(value).__name__
