"""Open Inference Protocol (KServe v2) infer requests: JSON tensors and the binary tensor
extension to numpy arrays, with validation.

Pure (numpy, json, zlib; no aiohttp, no torch); runs on the event loop. Every malformed request
raises BadRequest (PayloadTooLarge, UnsupportedMediaType) naming the input and what was wrong;
shapes are checked against the limits before any buffer is made. Responses are built in
oip_response.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import BadRequest, UnsupportedMediaType
from server.protocol.codec import Limits, check_json_size, check_shape, decode_id, loads_json
from server.protocol.oip_tensor import from_binary, from_json, kind_of

_REQUEST_KEYS = frozenset(("id", "parameters", "inputs", "outputs", "model_name", "model_version"))
_INPUT_KEYS = frozenset(("name", "shape", "datatype", "parameters", "data"))
_OUTPUT_KEYS = frozenset(("name", "parameters"))
_SHARED_MEMORY = "shared_memory_region"
_CODINGS = frozenset(("", "identity", "gzip", "x-gzip", "deflate", "br", "zstd"))


@dataclass(frozen=True)
class Framing:
    """What the handler knows of a body before reading it: its headers and the model's outputs
    (requested output names are checked before anything is computed)."""

    header_length: str | None  # Inference-Header-Content-Length
    content_encoding: str | None  # the body arrives inflated (see _check_encoding)
    output_names: tuple[str, ...]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: as the request's binary_data_output says


@dataclass(frozen=True)
class OipRequest:
    inputs: dict[str, np.ndarray]
    id: str | None
    timeout_ms: float | None
    outputs: tuple[RequestedOutput, ...] | None  # None: every output
    binary_output: bool  # parameters.binary_data_output


def decode_infer_request(body: bytes, framing: Framing, limits: Limits) -> OipRequest:
    """An infer request body (JSON header, then binary tensor data in input order)."""
    _check_encoding(framing.content_encoding)
    json_end = _json_length(framing.header_length, len(body))
    header = _parse_json(body[:json_end] if json_end < len(body) else body, limits)
    if not isinstance(header, dict):
        raise BadRequest(f"the request must be a JSON object with 'inputs', got {kind_of(header)}")
    unknown = header.keys() - _REQUEST_KEYS
    if unknown:
        raise BadRequest(
            f"unknown request field(s) {sorted(unknown)}; known: {sorted(_REQUEST_KEYS)}"
        )
    params = _parameters(header.get("parameters"), "parameters")
    if params.get("sequence_id") not in (None, 0, ""):
        raise BadRequest("the sequence extension is not supported: send no sequence_id")
    binary_output = _flag(params, "binary_data_output", "parameters") or False
    tail = memoryview(body)[json_end:]
    return OipRequest(
        inputs=_decode_inputs(header.get("inputs"), tail, limits),
        id=decode_id(header.get("id"), limits),
        timeout_ms=_timeout_ms(params.get("timeout")),
        outputs=_requested_outputs(header.get("outputs"), framing.output_names),
        binary_output=binary_output,
    )


def _check_encoding(encoding: str | None) -> None:
    """aiohttp's parser has already inflated a gzip, deflate, br or zstd body, in bounded
    steps, with server.max_body_bytes applied to the inflated size; any other coding would
    arrive as it was sent, so it is refused here rather than misread."""
    if encoding is not None and encoding.strip().lower() not in _CODINGS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or identity"
        )


def _json_length(header_length: str | None, body_bytes: int) -> int:
    if header_length is None:
        return body_bytes
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 <= length <= body_bytes:
        raise BadRequest(
            f"Inference-Header-Content-Length must be an integer from 0 to the body's "
            f"{body_bytes} bytes, got {header_length!r}"
        )
    return length


def _parse_json(data: bytes, limits: Limits) -> Any:
    check_json_size(len(data), limits)
    try:
        return loads_json(data)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("the request's JSON is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise BadRequest(f"the request is not valid JSON: {exc}") from None


def _parameters(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be a JSON object, got {kind_of(value)}")
    for key, item in value.items():
        if isinstance(item, (dict, list)) or item is None:
            raise BadRequest(f"{field}.{key} must be a string, number or boolean")
    return value


def _flag(params: dict[str, Any], key: str, field: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise BadRequest(f"{field}.{key} must be true or false, got {kind_of(value)}")
    return value


def _timeout_ms(value: Any) -> float | None:
    """parameters.timeout is in microseconds, as Triton and tritonclient have it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(
            f"parameters.timeout must be a number of microseconds, got {kind_of(value)}"
        )
    try:
        timeout_us = float(value)  # an integer of 400 digits does not fit a float
    except OverflowError:
        timeout_us = math.inf
    if not (timeout_us > 0 and math.isfinite(timeout_us)):
        shown = f"{str(value)[:20]}..." if timeout_us > 0 else value
        raise BadRequest(
            f"parameters.timeout must be a positive finite number of microseconds, got {shown}"
        )
    return timeout_us / 1000.0


def _decode_inputs(inputs: Any, tail: memoryview, limits: Limits) -> dict[str, np.ndarray]:
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(f"'inputs' must be a non-empty list of tensors, got {kind_of(inputs)}")
    if len(inputs) > limits.max_inputs:
        raise BadRequest(f"'inputs' has {len(inputs)} tensors, at most {limits.max_inputs}")
    decoded: dict[str, np.ndarray] = {}
    budget, offset = limits.max_elements, 0
    for index, tensor in enumerate(inputs):
        name, arr, offset = _decode_input(tensor, index, tail, offset, limits, budget)
        if name in decoded:
            raise BadRequest(f"input {name!r} is given twice")
        budget -= arr.size
        decoded[name] = arr
    if offset != len(tail):
        raise BadRequest(
            f"the body has {len(tail) - offset} bytes of binary data beyond what the inputs' "
            "binary_data_size parameters account for"
        )
    return decoded


def _decode_input(
    tensor: Any, index: int, tail: memoryview, offset: int, limits: Limits, budget: int
) -> tuple[str, np.ndarray, int]:
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise BadRequest(f"inputs[{index}] must be an object with a string 'name'")
    name: str = tensor["name"]
    field = f"input {name!r}"
    unknown = tensor.keys() - _INPUT_KEYS
    if unknown:
        raise BadRequest(
            f"{field} has unknown key(s) {sorted(unknown)}; known: {sorted(_INPUT_KEYS)}"
        )
    params = _parameters(tensor.get("parameters"), f"{field} parameters")
    if _SHARED_MEMORY in params:
        raise BadRequest(
            f"{field} names a shared-memory region: the shared-memory extensions are not "
            "supported; send the data in the body"
        )
    datatype = tensor.get("datatype")
    shape: Any = tensor.get("shape")
    elements = check_shape(shape, f"{field} shape", limits, budget)
    size = params.get("binary_data_size")
    if size is None:
        if "data" not in tensor:
            raise BadRequest(f"{field} has neither 'data' nor parameters.binary_data_size")
        return name, from_json(tensor["data"], datatype, shape, elements, field), offset
    if "data" in tensor:
        raise BadRequest(f"{field} has both 'data' and parameters.binary_data_size; give one")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise BadRequest(f"{field} parameters.binary_data_size must be a non-negative integer")
    if offset + size > len(tail):
        raise BadRequest(
            f"{field} declares {size} bytes of binary data but the body holds "
            f"{len(tail) - offset} after the JSON header (is Inference-Header-Content-Length set?)"
        )
    arr = from_binary(tail[offset : offset + size], datatype, shape, elements, field)
    return name, arr, offset + size


def _requested_outputs(
    outputs: Any, model_outputs: tuple[str, ...]
) -> tuple[RequestedOutput, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise BadRequest(
            f"'outputs' must be a list of {{name, parameters}}, got {kind_of(outputs)}"
        )
    requested: dict[str, RequestedOutput] = {}
    for index, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise BadRequest(f"outputs[{index}] must be an object with a string 'name'")
        name: str = output["name"]
        field = f"output {name!r}"
        if output.keys() - _OUTPUT_KEYS:
            raise BadRequest(f"{field} has unknown key(s); known: {sorted(_OUTPUT_KEYS)}")
        if name not in model_outputs:
            raise BadRequest(
                f"no output named {name!r}; the model's outputs: {list(model_outputs)}"
            )
        if name in requested:
            raise BadRequest(f"{field} is requested twice")
        params = _parameters(output.get("parameters"), f"{field} parameters")
        if _SHARED_MEMORY in params:
            raise BadRequest(f"{field}: the shared-memory extensions are not supported")
        if params.get("classification") not in (None, 0):
            raise BadRequest(f"{field}: the classification extension is not supported")
        requested[name] = RequestedOutput(name, _flag(params, "binary_data", f"{field} parameters"))
    return tuple(requested.values())
