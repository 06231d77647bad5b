"""Wire codec: msgpack and JSON bodies to numpy arrays and back, with validation.

Runs on the server's event loop and inside clients; imports neither torch nor aiohttp. Every
malformed input raises BadRequest (or PayloadTooLarge) naming the field; declared shapes are
checked against the body and the element limits before any buffer is made. Nothing here
unpickles: msgpack (ext types refused) and JSON only.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Protocol, cast

import msgpack
import numpy as np

from server.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from server.models.spec import SUPPORTED_DTYPES
from server.protocol.json_tensor import array_from_list, json_values, kind_of

MSGPACK = "msgpack"
JSON = "json"
MSGPACK_CONTENT_TYPE = "application/msgpack"
JSON_CONTENT_TYPE = "application/json"
_CONTENT_TYPES = {
    "application/msgpack": MSGPACK,
    "application/x-msgpack": MSGPACK,
    "application/vnd.msgpack": MSGPACK,
    "application/json": JSON,
}
CONTENT_TYPE_OF = {MSGPACK: MSGPACK_CONTENT_TYPE, JSON: JSON_CONTENT_TYPE}

# Little-endian wire dtypes, resolved once; numpy converts to native order where it differs.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<") for name in SUPPORTED_DTYPES
}
# dtype.name costs microseconds on the hot path; a dict lookup on the dtype costs nanoseconds.
_NAME_OF: dict[np.dtype[Any], str] = {np.dtype(name): name for name in SUPPORTED_DTYPES}
_BIG_ENDIAN_HOST = sys.byteorder == "big"
_TENSOR_KEYS = frozenset(("dtype", "shape", "data"))
_REQUEST_KEYS = frozenset(("inputs", "id", "timeout_ms"))


@dataclass(frozen=True)
class Limits:
    """What one request may ask the server to allocate."""

    max_elements: int = 16 * 1024 * 1024
    max_dims: int = 8
    # A JSON body (or OIP's JSON header) costs about 25x its size to parse into Python numbers
    # and holds the event loop all the while: it gets a smaller limit than msgpack.
    max_json_bytes: int = 1024 * 1024
    max_inputs: int = 64
    max_id_chars: int = 256
    # msgpack only (JSON nesting is bounded by the parser's recursion limit, also a 400):
    max_depth: int = 16  # containers within containers
    max_items: int = 1024  # entries of one array or map
    max_str_bytes: int = 4096  # bytes of one string


@dataclass
class InferRequest:
    inputs: dict[str, np.ndarray]
    id: str | None
    timeout_ms: float | None


def encoding_of(content_type: str) -> str:
    """`msgpack` or `json` for a Content-Type (parameters ignored); 415 for anything else."""
    exact = _CONTENT_TYPES.get(content_type)  # the usual case, without parsing
    if exact is not None:
        return exact
    base = content_type.split(";", 1)[0].strip().lower()
    try:
        return _CONTENT_TYPES[base]
    except KeyError:
        raise UnsupportedMediaType(
            f"Content-Type must be application/msgpack or application/json, got {base!r}"
        ) from None


def encode(obj: Any, encoding: str) -> bytes:
    if encoding == MSGPACK:
        return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _refuse_constant(name: str) -> Any:
    raise BadRequest(f"body is not valid json: {name} is not a JSON number (send msgpack for it)")


def check_json_size(size: int, limits: Limits) -> None:
    if size > limits.max_json_bytes:
        raise PayloadTooLarge(
            f"a JSON body of {size} bytes exceeds server.max_json_body_bytes "
            f"({limits.max_json_bytes}); send large tensors in msgpack"
        )


def loads_json(body: bytes | str) -> Any:
    """JSON as the standard has it: NaN, Infinity and -Infinity (which Python's parser takes)
    are a 400, never values; non-finite inputs travel in msgpack (or binary OIP) tensors."""
    return json.loads(body, parse_constant=_refuse_constant)


def decode(body: bytes, encoding: str, limits: Limits | None = None) -> Any:
    """Parse a body; msgpack lengths are bounded by the body's own length (so a small body
    never makes a large buffer) and, given `limits`, by them; ext types are then refused."""
    try:
        if encoding == MSGPACK:
            if limits is None:
                return msgpack.unpackb(body, raw=False, strict_map_key=True)
            size = len(body)
            return msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=True,
                max_str_len=min(limits.max_str_bytes, size),
                max_bin_len=size,
                max_array_len=min(limits.max_items, size),
                max_map_len=min(limits.max_items, size),
                max_ext_len=0,
            )
        if limits is not None:
            check_json_size(len(body), limits)
        return loads_json(body)
    except (BadRequest, PayloadTooLarge):
        raise
    except RecursionError:
        raise BadRequest(f"body is not valid {encoding}: nested too deeply") from None
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        if encoding == MSGPACK and limits is not None and isinstance(exc, ValueError):
            raise BadRequest(_msgpack_refusal(str(exc) or type(exc).__name__, limits)) from None
        raise BadRequest(f"body is not valid {encoding}: {exc}") from None


# msgpack's words for a length over a bound given to unpackb, e.g. "5000 exceeds max_str_len(4096)".
_OVER_BOUND = re.compile(r"\d+ exceeds max_(str|bin|array|map|ext)_len\((\d+)\)")
# The Limits field behind each bound, and the server setting that fills it (server/engine.py).
_SETTING_OF = {
    "str": ("max_str_bytes", "server.max_msgpack_str_bytes"),
    "array": ("max_items", "server.max_msgpack_items"),
    "map": ("max_items", "server.max_msgpack_items"),
}


def _msgpack_refusal(text: str, limits: Limits) -> str:
    """A refused msgpack body explained: which setting a length ran into, or that the body is
    corrupt (a length beyond the body's own size). Error path only; msgpack's words are kept."""
    match = _OVER_BOUND.fullmatch(text)
    if match is None:
        return f"body is not valid msgpack: {text}"
    kind, bound = match.group(1), int(match.group(2))
    if kind == "ext":
        return f"body is not accepted: {text}; msgpack ext types are refused"
    setting = _SETTING_OF.get(kind)
    if setting is not None and bound == getattr(limits, setting[0]):
        return f"body is not accepted: {text}, the limit set by {setting[1]}"
    # decode() also bounds every length by the body's size: claiming more means it is cut short.
    return f"body is not valid msgpack: {text}, the body's own length (truncated or corrupt?)"


class ShapeCheck(Protocol):
    """Checks a tensor's declared shape against the model before its array is built."""

    def check(self, name: str, shape: list[int], field: str) -> None: ...


def decode_request(
    body: bytes, encoding: str, limits: Limits, shapes: ShapeCheck | None = None
) -> InferRequest:
    """Decode and validate an infer request body (tensors are not yet matched to a model;
    `shapes`, where given, refuses a JSON tensor of the wrong shape before its array is made)."""
    obj = decode(body, encoding, limits)
    try:
        return _request_from(obj, encoding, limits, shapes)
    except BadRequest:
        # Every field of an accepted request is checked by type, so it nests 4 deep at most:
        # only a refused body can hide deeper nesting, and then that is the fault to name.
        if encoding == MSGPACK:
            _check_depth(obj, limits.max_depth)
        raise


def _request_from(
    obj: Any, encoding: str, limits: Limits, shapes: ShapeCheck | None
) -> InferRequest:
    if not isinstance(obj, dict):
        raise BadRequest(f"body must be a map with an 'inputs' key, got {kind_of(obj)}")
    if not _REQUEST_KEYS.issuperset(obj):
        unknown = obj.keys() - _REQUEST_KEYS
        raise BadRequest(
            f"unknown request field(s) {sorted(map(str, unknown))}; known: inputs, id, timeout_ms"
        )
    return InferRequest(
        inputs=_decode_inputs(obj.get("inputs"), encoding, limits, shapes),
        id=decode_id(obj.get("id"), limits),
        timeout_ms=_decode_timeout(obj.get("timeout_ms")),
    )


def _check_depth(obj: Any, limit: int) -> None:
    """Containers nest at most `limit` deep (a request needs 4); iterative, so it cannot
    overflow a stack, and linear in the parsed items, so it costs no more than the parse."""
    stack: list[tuple[Any, int]] = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            raise BadRequest(
                f"body nests maps and arrays more than {limit} deep (server.max_msgpack_depth)"
            )
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _decode_inputs(
    inputs: Any, encoding: str, limits: Limits, shapes: ShapeCheck | None
) -> dict[str, np.ndarray]:
    if inputs is None:
        raise BadRequest("missing field 'inputs' (a map of input name to tensor)")
    if not isinstance(inputs, dict) or not inputs:
        raise BadRequest(
            f"'inputs' must be a non-empty map of name to tensor, got {kind_of(inputs)}"
        )
    if len(inputs) > limits.max_inputs:
        raise BadRequest(f"'inputs' has {len(inputs)} entries, at most {limits.max_inputs}")
    decoded: dict[str, np.ndarray] = {}
    budget = limits.max_elements
    for name, tensor in inputs.items():
        if not isinstance(name, str):
            raise BadRequest(f"input names must be strings, got {kind_of(name)}")
        check = shapes if encoding == JSON else None  # a msgpack array is a view: cheap
        arr = decode_tensor(tensor, f"inputs.{name}", encoding, limits, budget, check, name)
        budget -= arr.size
        decoded[name] = arr
    return decoded


def decode_id(value: Any, limits: Limits) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"'id' must be a string, got {kind_of(value)}")
    if len(value) > limits.max_id_chars:
        raise BadRequest(f"'id' has {len(value)} characters, at most {limits.max_id_chars}")
    return value


def _decode_timeout(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"'timeout_ms' must be a number, got {kind_of(value)}")
    try:
        timeout_ms = float(value)  # a JSON integer of 400 digits does not fit a float
    except OverflowError:
        timeout_ms = math.inf
    if not (timeout_ms > 0 and math.isfinite(timeout_ms)):
        shown = f"{str(value)[:20]}... ({len(str(value))} digits)" if timeout_ms > 0 else value
        raise BadRequest(f"'timeout_ms' must be a positive finite number, got {shown}")
    return timeout_ms


def decode_tensor(
    obj: Any,
    field: str,
    encoding: str,
    limits: Limits,
    budget: int | None = None,
    shapes: ShapeCheck | None = None,
    name: str = "",
) -> np.ndarray:
    """One wire tensor to a native-order array (read-only for msgpack: a view of the body)."""
    if not isinstance(obj, dict):
        raise BadRequest(f"{field} must be a map with dtype, shape and data, got {kind_of(obj)}")
    if len(obj) != 3 and not _TENSOR_KEYS.issuperset(obj):
        unknown = sorted(map(str, obj.keys() - _TENSOR_KEYS))
        raise BadRequest(f"{field} has unknown key(s) {unknown}; a tensor has dtype, shape, data")
    dtype_name, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    dtype = _WIRE_DTYPES.get(dtype_name) if type(dtype_name) is str else None
    if dtype is None:
        raise BadRequest(
            f"{field}.dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype_name!r}"
        )
    elements = check_shape(
        shape, f"{field}.shape", limits, limits.max_elements if budget is None else budget
    )
    if shapes is not None:
        shapes.check(name, cast(list[int], shape), field)  # check_shape saw to it
    if encoding == MSGPACK:
        arr = _array_from_bytes(data, dtype, shape, elements, field)
    else:
        arr = array_from_list(data, dtype, elements, field).reshape(shape)
    if dtype_name == "bool" and arr.size and arr.view(np.uint8).max() > 1:
        raise BadRequest(f"{field}.data holds bytes other than 0 and 1 for dtype bool")
    return arr


def check_shape(shape: Any, label: str, limits: Limits, budget: int) -> int:
    """The elements of a declared shape (`label` names it in errors: "inputs.x.shape"), checked
    before any buffer is made, for /v1 and /v2 alike."""
    if not isinstance(shape, list):
        raise BadRequest(f"{label} must be a list of non-negative integers, got {kind_of(shape)}")
    if len(shape) > limits.max_dims:
        raise BadRequest(f"{label} has {len(shape)} dimensions, at most {limits.max_dims}")
    elements = bound = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise BadRequest(f"{label} must hold non-negative integers, got {shape!r}")
        elements *= dim
        # Checked as we go so that huge declared dims never reach an allocation; zero dims are
        # counted as 1, so that a 0 cannot hide an absurd shape such as [0, 2**70] from numpy.
        bound *= max(dim, 1)
        if bound > budget:
            raise PayloadTooLarge(
                f"{label} {shape!r} exceeds the limit of {limits.max_elements} tensor elements "
                "per request (server.max_elements)"
            )
    return elements


def _array_from_bytes(
    data: Any, dtype: np.dtype[Any], shape: Any, elements: int, field: str
) -> np.ndarray:
    if type(data) is not bytes:
        raise BadRequest(f"{field}.data must be binary (msgpack bin), got {kind_of(data)}")
    expected = elements * dtype.itemsize
    if len(data) != expected:
        raise BadRequest(f"{field}.data has {len(data)} bytes; its shape and dtype need {expected}")
    # A read-only view of the body in its final shape: one call, no copy.
    arr = np.ndarray(shape, dtype=dtype, buffer=data)
    return arr if not _BIG_ENDIAN_HOST else arr.astype(dtype.newbyteorder("="))


def encode_tensor(arr: np.ndarray, encoding: str) -> dict[str, Any]:
    """An array to its wire map (C-order little-endian bytes, or a nested list for JSON)."""
    name = _NAME_OF.get(arr.dtype)
    if name is None:  # a byte-swapped array: bring it to native order first
        arr = arr.astype(arr.dtype.newbyteorder("="))
        name = _NAME_OF.get(arr.dtype)
        if name is None:
            raise ValueError(f"dtype {arr.dtype} has no wire name; supported: {SUPPORTED_DTYPES}")
    if encoding == JSON:
        return {"dtype": name, "shape": list(arr.shape), "data": json_values(arr)}
    if _BIG_ENDIAN_HOST:  # the wire is little-endian
        arr = arr.astype(_WIRE_DTYPES[name])
    return {"dtype": name, "shape": list(arr.shape), "data": arr.tobytes()}


def error_body(code: str, message: str, encoding: str) -> bytes:
    return encode({"error": {"code": code, "message": message}}, encoding)
