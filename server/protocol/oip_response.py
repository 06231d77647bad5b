"""Open Inference Protocol (KServe v2) answers: infer responses (JSON tensors or the binary
tensor extension), errors, server and model metadata, Triton's model configuration and
statistics shapes.

Pure (numpy, json; no aiohttp, no torch); runs on the event loop. Shapes here carry the batch
dimension first, as OIP clients expect of a batching model: `[-1, *per-sample shape]`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from server.config import BatchingConfig
from server.metrics import ModelTotals
from server.models.info import ModelInfo
from server.models.spec import TensorSpec, sent
from server.protocol.json_tensor import json_values
from server.protocol.oip import OipRequest
from server.protocol.oip_tensor import DATATYPE_OF, WIRE_DTYPES

SERVER_NAME = "microbatch"
# Only what is implemented: the binary tensor data extension, Triton's model configuration
# (GET .../config) and statistics (GET .../stats).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics")
VERSION = "1"  # every model has one version
PLATFORMS = {
    "torchscript": "pytorch_torchscript",
    "export": "pytorch_export",
    "builtin": "pytorch_builtin",
}
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def error_body(message: str) -> bytes:
    """The OIP error object: `{"error": message}`, as tritonclient and KServe parse it."""
    return dumps({"error": message})


def encode_infer_response(
    model: str,
    outputs: Mapping[str, np.ndarray],
    request: OipRequest,
    parameters: dict[str, Any],
) -> tuple[bytes, int | None]:
    """The response body and, when any output travels as binary data, the JSON header's length
    (the Inference-Header-Content-Length header); binary data follows in output order."""
    # No list (or an empty one, as Triton reads it) asks for every output, in the model's order.
    selected: list[tuple[str, bool | None]] = (
        [(o.name, o.binary) for o in request.outputs]
        if request.outputs
        else [(name, None) for name in outputs]
    )
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in selected:
        arr = outputs[name]
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": _datatype(arr),
            "shape": list(arr.shape),
        }
        if request.binary_output if binary is None else binary:
            data = _wire_bytes(arr)
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            # NaN and infinities as "NaN", "Infinity", "-Infinity", as on /v1 (numpy, and so
            # tritonclient's as_numpy, reads these strings back as floats).
            tensor["data"] = json_values(arr.ravel())
        tensors.append(tensor)
    body: dict[str, Any] = {"model_name": model, "model_version": VERSION}
    if request.id is not None:
        body["id"] = request.id
    body["parameters"] = parameters
    body["outputs"] = tensors
    header = dumps(body)
    if not chunks:
        return header, None
    return b"".join((header, *chunks)), len(header)


def _datatype(arr: np.ndarray) -> str:
    name = DATATYPE_OF.get(arr.dtype) or DATATYPE_OF.get(arr.dtype.newbyteorder("="))
    if name is None:
        raise ValueError(f"dtype {arr.dtype} has no OIP datatype")
    return name


def _wire_bytes(arr: np.ndarray) -> bytes:
    if _BIG_ENDIAN_HOST or not arr.dtype.isnative:
        arr = arr.astype(WIRE_DTYPES[_datatype(arr)])
    return np.ascontiguousarray(arr).tobytes()


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": DATATYPE_OF[spec.np_dtype], "shape": [-1, *spec.shape]}


def model_metadata(info: ModelInfo, model_format: str) -> dict[str, Any]:
    return {
        "name": info.name,
        "versions": [VERSION],
        "platform": PLATFORMS.get(model_format, "pytorch"),
        "inputs": [_tensor_metadata(s) for s in sent(info.inputs)],  # not those filled
        "outputs": [_tensor_metadata(s) for s in info.outputs],
    }


def _config_tensor(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "data_type": "TYPE_" + DATATYPE_OF[spec.np_dtype],
        "dims": list(spec.shape),  # per sample: max_batch_size > 0 adds the batch dimension
    }


def model_config(info: ModelInfo, model_format: str, cpu_workers: int) -> dict[str, Any]:
    """Triton's model configuration, as far as it describes this server's model."""
    batching: BatchingConfig = info.batching
    return {
        "name": info.name,
        "platform": PLATFORMS.get(model_format, "pytorch"),
        "backend": "pytorch",
        "version_policy": {"specific": {"versions": [int(VERSION)]}},
        "max_batch_size": batching.max_batch_size,
        "input": [{**_config_tensor(s), "format": "FORMAT_NONE"} for s in sent(info.inputs)],
        "output": [_config_tensor(s) for s in info.outputs],
        "dynamic_batching": {
            "max_queue_delay_microseconds": round(batching.max_delay_ms * 1000),
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(batching.timeout_ms * 1000),
                "allow_timeout_override": True,
                "max_queue_size": batching.max_queue_size,
            },
        },
        "instance_group": [{"name": info.name, "kind": "KIND_CPU", "count": cpu_workers}],
    }


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * 1e9)}


def model_stats(name: str, totals: ModelTotals) -> dict[str, Any]:
    """One model's entry of Triton's statistics extension. Queue time is counted per request,
    model time per batch; input and output copies are inside the batch's compute time."""
    nothing = _duration(0, 0.0)
    return {
        "name": name,
        "version": VERSION,
        "last_inference": round(totals.last_batch_at * 1000),
        "inference_count": totals.samples,
        "execution_count": totals.batches,
        "inference_stats": {
            "success": _duration(totals.ok_requests, totals.ok_latency_s),
            "fail": _duration(totals.failed_requests, totals.failed_latency_s),
            "queue": _duration(totals.queued_requests, totals.queue_s),
            "compute_input": nothing,
            "compute_infer": _duration(totals.batches, totals.compute_s),
            "compute_output": nothing,
            "cache_hit": nothing,
            "cache_miss": nothing,
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": nothing,
                "compute_infer": _duration(count, seconds),
                "compute_output": nothing,
            }
            for size, (count, seconds) in totals.by_batch_size.items()
        ],
    }
