"""/v2 over plain HTTP: every failure is OIP's `{"error": "..."}` in JSON with the right status,
the same limits and auth as /v1 apply, and a bad request harms nothing else.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import request
from tests.probes import wait_for
from tests.server_process import ServerProcess, start_server

TOKEN = "oip-secret-token"
INFER = "/v2/models/linear/infer"


def oip_error(answer: tuple[int, dict[str, str], bytes]) -> str:
    _, headers, body = answer
    assert headers["Content-Type"] == "application/json", headers
    message = json.loads(body)["error"]
    assert isinstance(message, str) and message
    return message


def linear_input(**overrides: Any) -> dict[str, Any]:
    """One input for `linear`; an override of None leaves that key out."""
    tensor = {"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [1.0] * 10, **overrides}
    return {k: v for k, v in tensor.items() if v is not None}


def body_of(*inputs: dict[str, Any], **fields: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **fields}).encode()


def test_unknown_routes_methods_and_versions(default_server: ServerProcess) -> None:
    url = default_server.url
    for path in ("/v2/nothing", "/v2/models/linear/explain", "/v2/models/linear/versions"):
        answer = request(url, "GET", path)
        assert answer[0] == 404 and "no such endpoint" in oip_error(answer)
    answer = request(url, "GET", INFER)
    assert answer[0] == 405 and answer[1]["Allow"] == "POST" and "POST" in oip_error(answer)
    answer = request(url, "DELETE", "/v2/models/linear")
    assert answer[0] == 405 and answer[1]["Allow"] == "GET"
    answer = request(url, "POST", "/v2/models/linear/versions/2/infer", body_of(linear_input()))
    assert answer[0] == 404 and "no version '2'" in oip_error(answer)
    answer = request(url, "GET", "/v2/models/nope/ready")
    assert answer[0] == 404 and "no model named 'nope'" in oip_error(answer)
    # Only /v2 and /v2/... belong to OIP: /v2x is an unknown /v1-style path.
    status, _, body = request(url, "GET", "/v2x")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_health_answers_carry_a_json_body(default_server: ServerProcess) -> None:
    assert json.loads(request(default_server.url, "GET", "/v2/health/live")[2]) == {"live": True}
    assert json.loads(request(default_server.url, "GET", "/v2/health/ready")[2]) == {"ready": True}
    ready = json.loads(request(default_server.url, "GET", "/v2/models/mlp/versions/1/ready")[2])
    assert ready == {"name": "mlp", "ready": True}


# A gzip header, then a deflate block of the invalid type 3.
CORRUPT_GZIP = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xff\xff\xff\xff"
BAD_REQUESTS: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("not json", b"{", {}, 400, "not valid JSON"),
    ("not an object", b"[1]", {}, 400, "JSON object"),
    ("no inputs", b"{}", {}, 400, "'inputs'"),
    ("unknown field", body_of(linear_input(), inputz=1), {}, 400, "inputz"),
    ("no batch dim", body_of(linear_input(shape=[10])), {}, 400, "batch dimension"),
    ("wrong shape", body_of(linear_input(shape=[1, 9], data=[1.0] * 9)), {}, 400, "shape"),
    ("short data", body_of(linear_input(data=[1.0] * 9)), {}, 400, "9 elements"),
    ("string data", body_of(linear_input(data=["a"] * 10)), {}, 400, "numbers"),
    ("int overflow", body_of(linear_input(datatype="INT8", data=[300] * 10)), {}, 400, "INT8"),
    ("unknown datatype", body_of(linear_input(datatype="FP8")), {}, 400, "FP8"),
    ("bf16 as json", body_of(linear_input(datatype="BF16")), {}, 400, "binary data"),
    ("bytes", body_of(linear_input(datatype="BYTES", data=["a"] * 10)), {}, 400, "BYTES"),
    ("twice", body_of(linear_input(), linear_input()), {}, 400, "twice"),
    (
        "shared memory",
        body_of(linear_input(parameters={"shared_memory_region": "r"})),
        {},
        400,
        "shared-memory",
    ),
    (
        "sequence",
        body_of(linear_input(), parameters={"sequence_id": 3}),
        {},
        400,
        "sequence extension",
    ),
    ("unknown output", body_of(linear_input(), outputs=[{"name": "y"}]), {}, 400, "no output"),
    (
        "classification",
        body_of(linear_input(), outputs=[{"name": "output", "parameters": {"classification": 2}}]),
        {},
        400,
        "classification",
    ),
    ("bad timeout", body_of(linear_input(), parameters={"timeout": -1}), {}, 400, "timeout"),
    (
        "header length too long",
        body_of(linear_input()),
        {"Inference-Header-Content-Length": "99999"},
        400,
        "Inference-Header-Content-Length",
    ),
    (
        "binary without header length",
        body_of(linear_input(data=None, parameters={"binary_data_size": 40})),
        {},
        400,
        "Inference-Header-Content-Length",
    ),
    ("corrupt gzip", CORRUPT_GZIP, {"Content-Encoding": "gzip"}, 400, "corrupt"),
    ("unknown coding", body_of(linear_input()), {"Content-Encoding": "compress"}, 415, "compress"),
    (
        "too many elements",
        body_of(linear_input(shape=[2**20, 2**20])),
        {},
        413,
        "server.max_elements",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_their_status_and_a_message(
    default_server: ServerProcess, body: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    answer = request(default_server.url, "POST", INFER, body, headers=headers)
    assert answer[0] == status, answer
    assert words in oip_error(answer)
    # Nothing else was harmed: the same connection-less request right after is served.
    assert request(default_server.url, "POST", INFER, body_of(linear_input()))[0] == 200


def binary_body(x: np.ndarray, extra: bytes = b"") -> tuple[bytes, dict[str, str]]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + x.tobytes() + extra, {"Inference-Header-Content-Length": str(len(header))}


def test_binary_framing_is_checked_and_answered_in_kind(default_server: ServerProcess) -> None:
    x = np.arange(20, dtype=np.float32).reshape(2, 10)
    body, headers = binary_body(x)
    status, answer_headers, answer = request(
        default_server.url, "POST", INFER, body, headers=headers
    )
    assert status == 200 and answer_headers["Content-Type"] == "application/octet-stream"
    json_length = int(answer_headers["Inference-Header-Content-Length"])
    header = json.loads(answer[:json_length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8}
    assert np.frombuffer(answer[json_length:], np.float32).shape == (2,)
    body, headers = binary_body(x, extra=b"\0" * 4)
    answer_tuple = request(default_server.url, "POST", INFER, body, headers=headers)
    assert answer_tuple[0] == 400 and "4 bytes of binary data beyond" in oip_error(answer_tuple)
    body, headers = binary_body(x)
    answer_tuple = request(default_server.url, "POST", INFER, body[:-1], headers=headers)
    assert answer_tuple[0] == 400 and "declares 80 bytes" in oip_error(answer_tuple)


def test_deflate_and_gzip_bodies_with_binary_data(default_server: ServerProcess) -> None:
    x = np.ones((3, 10), np.float32)
    body, headers = binary_body(x)
    for coding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        answer = request(
            default_server.url,
            "POST",
            INFER,
            packed,
            headers={**headers, "Content-Encoding": coding},
        )
        assert answer[0] == 200, answer


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerProcess]:
    env = {
        "MICROBATCH_SERVER_AUTH_TOKEN": TOKEN,
        "MICROBATCH_SERVER_MAX_BODY_BYTES": str(64 * 1024),
        "MICROBATCH_SERVER_MAX_DECOMPRESSED_BYTES": str(64 * 1024),
    }
    with start_server(env=env, wait_ready=False) as server:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        wait_for(
            lambda: request(server.url, "GET", "/readyz", headers=auth)[0] == 200, 120, "ready"
        )
        yield server


def test_every_v2_path_but_live_needs_the_token(guarded: ServerProcess) -> None:
    for method, path in (
        ("GET", "/v2"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/linear"),
        ("GET", "/v2/models/stats"),
        ("POST", INFER),
        ("GET", "/v2/no/such/path"),
    ):
        answer = request(guarded.url, method, path, headers={"Authorization": "Bearer wrong"})
        assert answer[0] == 401, path
        assert answer[1]["WWW-Authenticate"].startswith("Bearer")
        assert "bearer token" in oip_error(answer)
    assert request(guarded.url, "GET", "/v2/health/live")[0] == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with triton.InferenceServerClient(guarded.url.removeprefix("http://")) as client:
        assert not client.is_server_ready()
        assert client.is_server_ready(headers=auth)
        x = np.ones((1, 10), np.float32)
        tensor_in = triton.InferInput("x", [1, 10], "FP32").set_data_from_numpy(x)
        assert client.infer("linear", [tensor_in], headers=auth).as_numpy("output").shape == (1, 1)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("linear", [tensor_in])
    assert refused.value.status() == "401"


def test_body_limits_apply_to_the_raw_and_the_inflated_body(guarded: ServerProcess) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = body_of(linear_input(shape=[1, 10], data=[1.0] * 10), id="x" * 100) + b" " * 70000
    answer = request(guarded.url, "POST", INFER, big, headers=auth)
    assert answer[0] == 413 and "server.max_body_bytes" in oip_error(answer)
    # 70 kB of JSON padding gzips to a few hundred bytes: refused once inflated past the limit.
    bomb = gzip.compress(big)
    assert len(bomb) < 1024
    answer = request(guarded.url, "POST", INFER, bomb, headers={**auth, "Content-Encoding": "gzip"})
    assert answer[0] == 413 and "server.max_decompressed_bytes" in oip_error(answer)
    small = gzip.compress(body_of(linear_input()))
    answer = request(
        guarded.url, "POST", INFER, small, headers={**auth, "Content-Encoding": "gzip"}
    )
    assert answer[0] == 200
