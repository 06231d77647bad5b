"""The requests that every front must answer as the standalone server does (test_exchange.py:
the transport-free Exchange; test_ray_serve.py: through Ray Serve's proxy), and how two answers
are compared: errors byte for byte; successes by outputs, with the timings left out.

Runs in the test process. The config (CONFIG_TOML) sets a token and small body limits, so that
auth, 413s and the decompression limit are among the cases.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

TOKEN = "exchange-secret"
MAX_BODY_BYTES = 65536
MAX_DECOMPRESSED_BYTES = 131072
CONFIG_TOML = f"""
[server]
auth_token = "{TOKEN}"
max_body_bytes = {MAX_BODY_BYTES}
max_decompressed_bytes = {MAX_DECOMPRESSED_BYTES}
[workers]
cpu_workers = 1
threads_per_worker = 1
[devices]
calibration_cache = ""
"""
AUTH = (("Authorization", f"Bearer {TOKEN}"),)
MSGPACK = (*AUTH, ("Content-Type", "application/msgpack"))
JSON = (*AUTH, ("Content-Type", "application/json"))
# What the server says of itself; the rest (Content-Length, Date, Server) is the transport's.
COMPARED_HEADERS = (
    "Content-Type",
    "Retry-After",
    "Allow",
    "WWW-Authenticate",
    "Inference-Header-Content-Length",
)
_TIMINGS = frozenset(("batch_size", "queue_ms", "compute_ms"))


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""


def _x(n: int = 10) -> np.ndarray:
    return np.arange(n, dtype=np.float32) / 7.0


def _msgpack_infer(x: np.ndarray) -> bytes:
    tensor = {"dtype": "float32", "shape": list(x.shape), "data": x.tobytes()}
    return msgpack.packb({"inputs": {"input": tensor}, "id": "r1"})


def _json_infer(x: np.ndarray) -> bytes:
    tensor = {"dtype": "float32", "shape": list(x.shape), "data": x.tolist()}
    return json.dumps({"inputs": {"input": tensor}, "id": "r2"}).encode()


def _oip_binary(x: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 10],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes(), len(header)


def cases() -> list[Case]:
    x = _x()
    oip_body, oip_header = _oip_binary(x)
    oip_json = json.dumps(
        {
            "id": "o1",
            "inputs": [{"name": "input", "shape": [1, 10], "datatype": "FP32", "data": x.tolist()}],
        }
    ).encode()
    big = msgpack.packb(
        {"inputs": {"input": {"dtype": "float32", "shape": [10], "data": b"\0" * MAX_BODY_BYTES}}}
    )
    bomb = gzip.compress(b"\x90" * (2 * MAX_DECOMPRESSED_BYTES))
    infer = "/v1/models/linear/infer"
    return [
        Case("v1 msgpack", "POST", infer, MSGPACK, _msgpack_infer(x)),
        Case("v1 json", "POST", infer, JSON, _json_infer(x)),
        Case(
            "v1 mlp batch of 3",
            "POST",
            "/v1/models/mlp/infer",
            MSGPACK,
            _msgpack_infer(np.ones((3, 256), np.float32)),
        ),
        Case(
            "v1 gzip",
            "POST",
            infer,
            (*MSGPACK, ("Content-Encoding", "gzip")),
            gzip.compress(_msgpack_infer(x)),
        ),
        Case(
            "v1 corrupt gzip",
            "POST",
            infer,
            (*MSGPACK, ("Content-Encoding", "gzip")),
            b"\x1f\x8b\x08\x00not gzip at all",
        ),
        Case("v1 unknown model", "POST", "/v1/models/nope/infer", MSGPACK, _msgpack_infer(x)),
        Case("v1 wrong method", "GET", infer, AUTH),
        Case("v1 bad msgpack", "POST", infer, MSGPACK, b"\xc1\xc1"),
        Case("v1 wrong shape json", "POST", infer, JSON, _json_infer(_x(9))),
        Case("v1 media type", "POST", infer, (*AUTH, ("Content-Type", "text/plain")), b"hi"),
        Case("v1 body too large", "POST", infer, MSGPACK, big),
        Case(
            "v1 inflated too large", "POST", infer, (*MSGPACK, ("Content-Encoding", "gzip")), bomb
        ),
        Case(
            "v1 expect continue",
            "POST",
            infer,
            (*MSGPACK, ("Expect", "100-continue")),
            _msgpack_infer(x),
        ),
        Case(
            "v1 expectation",
            "POST",
            infer,
            (*MSGPACK, ("Expect", "the-impossible")),
            _msgpack_infer(x),
        ),
        Case(
            "v1 no token",
            "POST",
            infer,
            (("Content-Type", "application/msgpack"),),
            _msgpack_infer(x),
        ),
        Case(
            "v1 wrong token json",
            "POST",
            infer,
            (("Authorization", "Bearer nope"), ("Content-Type", "application/json")),
            _json_infer(x),
        ),
        Case("no such path", "GET", "/nowhere", AUTH),
        Case("healthz", "GET", "/healthz", ()),
        Case("readyz probe without token", "GET", "/readyz", ()),
        Case("readyz", "GET", "/readyz", AUTH),
        Case("v2 json", "POST", "/v2/models/linear/infer", JSON, oip_json),
        Case(
            "v2 binary",
            "POST",
            "/v2/models/linear/infer",
            (*AUTH, ("Inference-Header-Content-Length", str(oip_header))),
            oip_body,
        ),
        Case("v2 unknown model", "POST", "/v2/models/nope/infer", JSON, oip_json),
        Case("v2 bad json", "POST", "/v2/models/linear/infer", JSON, b"{"),
        Case("v2 no token", "POST", "/v2/models/linear/infer", (), oip_json),
        Case("v2 wrong method", "GET", "/v2/models/linear/infer", AUTH),
        Case("v2 model metadata", "GET", "/v2/models/mlp", AUTH),
        Case("v2 model ready", "GET", "/v2/models/linear/ready", AUTH),
        Case("v2 live", "GET", "/v2/health/live", ()),
        Case("v2 ready", "GET", "/v2/health/ready", AUTH),
        Case("v2 unknown version", "GET", "/v2/models/linear/versions/7", AUTH),
    ]


def comparable(status: int, headers: Mapping[str, str], body: bytes) -> tuple[Any, ...]:
    """An answer as two fronts must agree on it: status, the server's own headers, and the
    body (decoded, timings and the OIP header's length dropped, for answers with outputs)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    kept = {h: lowered.get(h.lower()) for h in COMPARED_HEADERS}
    ctype = kept["Content-Type"] or ""
    header_length = kept.pop("Inference-Header-Content-Length")
    if status != 200:
        return status, kept, body
    if header_length is not None:  # OIP binary: a JSON header, then the tensors' bytes
        cut = int(header_length)
        return status, kept, _untimed(json.loads(body[:cut])), body[cut:]
    if "msgpack" in ctype:
        return status, kept, _untimed(msgpack.unpackb(body))
    return status, kept, _untimed(json.loads(body))


def _untimed(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k not in _TIMINGS}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value
