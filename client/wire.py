"""The client's side of the wire: infer bodies out, outputs and errors in, all through the
server's own codec (server.protocol.codec), so both ends agree byte for byte.

Runs on the client's event loop; numpy and msgpack only. The server's `Any` is narrowed here,
and anything that is not the protocol becomes InvalidResponse.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from client.errors import InvalidResponse, ServerError, server_error
from client.prediction import RequestInfo
from client.retry import parse_retry_after
from server.errors import ServingError
from server.protocol.codec import (
    JSON,
    MSGPACK,
    Limits,
    decode,
    decode_tensor,
    encode,
    encode_tensor,
)

MSGPACK_HEADERS = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}
ACCEPT_MSGPACK = {"Accept": "application/msgpack"}
# Answers are bounded by what the server chose to send, not by a request budget.
_RESPONSE_LIMITS = Limits(max_elements=2**62, max_dims=64)


def encode_inputs(inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Tensors to wire maps once per request; retries only rebuild the small outer map."""
    return {name: encode_tensor(arr, MSGPACK) for name, arr in inputs.items()}


def infer_body(tensors: dict[str, Any], request_id: str, timeout_ms: float) -> bytes:
    return encode({"inputs": tensors, "id": request_id, "timeout_ms": timeout_ms}, MSGPACK)


def decode_body(body: bytes, content_type: str, what: str) -> Any:
    """A msgpack or JSON answer to plain data (the server answers in the request's encoding)."""
    try:
        return decode(body, _encoding_of(content_type))
    except ServingError as exc:
        raise InvalidResponse(f"{what}: {exc}") from None


def decode_infer(
    body: bytes, content_type: str, request_id: str
) -> tuple[dict[str, np.ndarray], RequestInfo]:
    """A 200 infer answer to (writable outputs by name, the server's report); the id must match."""
    encoding = _encoding_of(content_type)
    obj = decode_body(body, content_type, "infer answer")
    if not isinstance(obj, dict) or not isinstance(obj.get("outputs"), dict):
        raise InvalidResponse("infer answer is not a map with an 'outputs' map")
    if obj.get("id") != request_id:
        raise InvalidResponse(
            f"infer answer carries id {obj.get('id')!r}, but the request sent {request_id!r}"
        )
    try:
        outputs = {
            str(name): np.array(decode_tensor(t, f"outputs.{name}", encoding, _RESPONSE_LIMITS))
            for name, t in obj["outputs"].items()
        }
        info = RequestInfo(
            request_id=request_id,
            model=str(obj["model"]),
            batch_size=int(obj["batch_size"]),
            device=str(obj["device"]),
            queue_ms=float(obj["queue_ms"]),
            compute_ms=float(obj["compute_ms"]),
        )
    except ServingError as exc:
        raise InvalidResponse(f"infer answer: {exc.message}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidResponse(f"infer answer lacks a valid field: {exc!r}") from None
    return outputs, info


def decode_error(
    status: int, content_type: str, body: bytes, retry_after: str | None
) -> ServerError:
    """An error answer to its exception; a body that is not an error map keeps the status."""
    retry_after_s = parse_retry_after(retry_after, time.time())
    try:
        obj = decode_body(body, content_type, "error answer")
        error = obj["error"]
        code, message = error["code"], error["message"]
        if not isinstance(code, str) or not isinstance(message, str):
            raise TypeError("code and message must be strings")
    except (InvalidResponse, KeyError, TypeError):
        text = body[:200].decode("utf-8", "replace").strip()
        return server_error(f"http_{status}", f"HTTP {status}: {text}", status, retry_after_s)
    return server_error(code, message, status, retry_after_s)


def _encoding_of(content_type: str) -> str:
    return JSON if "json" in content_type.lower() else MSGPACK
