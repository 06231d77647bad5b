"""The server over real HTTP on the built-in models: protocol, answers, errors, endpoints."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import aiohttp
import msgpack
import numpy as np
import pytest

from server.models.builtin import reference_forward
from tests.conftest import infer_json, infer_msgpack, output_array, request, tensor
from tests.server_process import ServerProcess, start_server

RTOL, ATOL = 1e-4, 1e-5


def test_single_sample_msgpack_answer_mirrors_the_request(default_server: ServerProcess) -> None:
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    status, headers, body = infer_msgpack(
        default_server.url, "linear", {"inputs": {"x": tensor(x)}, "id": "req-1"}
    )
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/msgpack")
    assert body["id"] == "req-1" and body["model"] == "linear" and body["device"] == "cpu"
    assert body["batch_size"] >= 1 and body["queue_ms"] >= 0 and body["compute_ms"] > 0
    out = output_array(body)
    assert out.shape == (1,)  # one sample in, one sample out: no batch dimension
    np.testing.assert_allclose(out, reference_forward("linear", x), rtol=RTOL, atol=ATOL)


def test_multi_sample_request_gets_its_rows_in_order(default_server: ServerProcess) -> None:
    x = np.random.default_rng(1).standard_normal((7, 256)).astype(np.float32)
    status, _, body = infer_msgpack(default_server.url, "mlp", {"inputs": {"input": tensor(x)}})
    assert status == 200, body
    out = output_array(body)
    assert out.shape == (7, 10)
    np.testing.assert_allclose(out, reference_forward("mlp", x), rtol=1e-3, atol=1e-4)


def test_json_request_gets_a_json_answer(default_server: ServerProcess) -> None:
    x = [[float(i) for i in range(10)], [0.5] * 10]
    payload = {"inputs": {"input": {"dtype": "float32", "shape": [2, 10], "data": x}}}
    status, headers, body = infer_json(default_server.url, "linear", payload)
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    out = np.array(body["outputs"]["output"]["data"], dtype=np.float32)
    expected = reference_forward("linear", np.array(x, dtype=np.float32))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


def test_safe_cast_float64_to_float32_is_accepted(default_server: ServerProcess) -> None:
    x = np.arange(10, dtype=np.float64) / 10
    status, _, body = infer_msgpack(default_server.url, "linear", {"inputs": {"x": tensor(x)}})
    assert status == 200, body
    np.testing.assert_allclose(output_array(body), reference_forward("linear", x), rtol=RTOL)


def bad(
    url: str, model: str, raw: bytes, ctype: str = "application/msgpack", method: str = "POST"
) -> tuple[int, dict[str, str], dict[str, object]]:
    status, headers, body = request(url, method, f"/v1/models/{model}/infer", raw, ctype)
    decoded = msgpack.unpackb(body) if "msgpack" in headers["Content-Type"] else json.loads(body)
    return status, headers, decoded


def packed(inputs: object, **extra: object) -> bytes:
    return msgpack.packb({"inputs": inputs, **extra})


f32 = np.zeros(10, np.float32)
MALFORMED = [
    ("bad msgpack", "linear", b"\xc1\xc1", 400, "bad_request", "not valid msgpack"),
    ("not a map", "linear", msgpack.packb([1]), 400, "bad_request", "must be a map"),
    ("missing inputs", "linear", msgpack.packb({"id": "x"}), 400, "bad_request", "'inputs'"),
    (
        "unknown dtype",
        "linear",
        packed({"x": {"dtype": "float8", "shape": [10], "data": b""}}),
        400,
        "bad_request",
        "dtype",
    ),
    (
        "data length",
        "linear",
        packed({"x": {"dtype": "float32", "shape": [10], "data": b"ab"}}),
        400,
        "bad_request",
        "has 2 bytes",
    ),
    (
        "negative dim",
        "linear",
        packed({"x": {"dtype": "float32", "shape": [-3], "data": b""}}),
        400,
        "bad_request",
        "non-negative",
    ),
    (
        "huge dims",
        "linear",
        packed({"x": {"dtype": "float32", "shape": [10**9, 10**9], "data": b""}}),
        413,
        "payload_too_large",
        "tensor elements",
    ),
    (
        "wrong sample shape",
        "linear",
        packed({"x": tensor(np.zeros(7, np.float32))}),
        400,
        "bad_request",
        "expects one sample of shape [10]",
    ),
    (
        "too many samples",
        "linear",
        packed({"x": tensor(np.zeros((33, 10), np.float32))}),
        400,
        "bad_request",
        "at most 32",
    ),
    (
        "bool cast accepted",
        "linear",
        packed({"x": tensor(np.zeros(10, np.complex64).view(np.float32)[:10].astype(bool))}),
        200,
        "",
        "",
    ),
    ("unknown model", "nope", packed({"x": tensor(f32)}), 404, "unknown_model", "'nope'"),
]


@pytest.mark.parametrize(
    ("case", "model", "raw", "status", "code", "fragment"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_requests_get_their_status_and_code(
    default_server: ServerProcess,
    case: str,
    model: str,
    raw: bytes,
    status: int,
    code: str,
    fragment: str,
) -> None:
    got, _, body = bad(default_server.url, model, raw)
    assert got == status, body
    if code:
        assert body["error"]["code"] == code  # type: ignore[index]
        assert fragment in body["error"]["message"]  # type: ignore[index]


def test_wrong_content_type_is_415(default_server: ServerProcess) -> None:
    status, _, body = bad(default_server.url, "linear", b"hello", ctype="text/plain")
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"  # type: ignore[index]


def test_wrong_method_is_405_with_allow(default_server: ServerProcess) -> None:
    status, headers, body = bad(default_server.url, "linear", b"", method="GET")
    assert status == 405 and headers["Allow"] == "POST"
    assert body["error"]["code"] == "method_not_allowed"  # type: ignore[index]


def test_unknown_path_is_404(default_server: ServerProcess) -> None:
    status, _, body = request(default_server.url, "GET", "/v3/nothing")  # /v2 is OIP's
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_oversized_body_is_413() -> None:
    with start_server("--model", "linear", env={"MICROBATCH_SERVER_MAX_BODY_BYTES": "1000"}) as s:
        raw = packed({"x": tensor(np.zeros((30, 10), np.float32))})
        status, _, body = bad(s.url, "linear", raw)
        assert status == 413 and body["error"]["code"] == "payload_too_large"  # type: ignore[index]


def test_models_endpoint_describes_models_and_batching(default_server: ServerProcess) -> None:
    status, _, body = request(default_server.url, "GET", "/v1/models")
    assert status == 200
    models = {m["name"]: m for m in json.loads(body)["models"]}
    assert set(models) == {"linear", "mlp"}
    assert models["mlp"]["inputs"] == [{"name": "input", "dtype": "float32", "shape": [256]}]
    assert models["mlp"]["outputs"] == [{"name": "output", "dtype": "float32", "shape": [10]}]
    assert models["linear"]["batching"]["max_batch_size"] == 32
    assert models["linear"]["devices"] == ["cpu"]


def test_health_ready_and_metrics(default_server: ServerProcess) -> None:
    assert request(default_server.url, "GET", "/healthz")[0] == 200
    assert request(default_server.url, "GET", "/readyz")[0] == 200
    infer_msgpack(default_server.url, "linear", {"inputs": {"x": tensor(f32)}})
    status, _, text = request(default_server.url, "GET", "/metrics")
    metrics = text.decode()
    assert status == 200
    for name in (
        'microbatch_requests_total{code="ok",model="linear"}',
        "microbatch_request_latency_seconds_bucket",
        "microbatch_queue_delay_seconds_bucket",
        "microbatch_batch_size_bucket",
        'microbatch_queue_depth{model="linear"}',
        'microbatch_busy_workers{device="cpu"}',
    ):
        assert name in metrics


async def _post(
    session: aiohttp.ClientSession, url: str, model: str, x: np.ndarray
) -> tuple[int, dict[str, object]]:
    async with session.post(
        f"{url}/v1/models/{model}/infer",
        data=msgpack.packb({"inputs": {"x": tensor(x)}}),
        headers={"Content-Type": "application/msgpack"},
    ) as response:
        return response.status, msgpack.unpackb(await response.read())


async def test_thousands_of_concurrent_requests_each_get_their_own_answer(
    default_server: ServerProcess,
) -> None:
    rng = np.random.default_rng(7)
    inputs = [
        rng.standard_normal((int(rng.integers(1, 6)), 10)).astype(np.float32) for _ in range(3000)
    ]
    connector = aiohttp.TCPConnector(limit=128)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(
            *(_post(session, default_server.url, "linear", x) for x in inputs)
        )
    batch_sizes = []
    for x, (status, body) in zip(inputs, results, strict=True):
        assert status == 200, body
        np.testing.assert_allclose(
            output_array(body), reference_forward("linear", x), rtol=RTOL, atol=ATOL
        )
        batch_sizes.append(body["batch_size"])
    assert max(batch_sizes) > 1  # they really were batched together


@dataclass(frozen=True)
class BadCall:
    """One bad request and the exact answer it must get."""

    case: str
    model: str
    raw: bytes
    status: int
    code: str
    content_type: str = "application/msgpack"
    method: str = "POST"


# The concurrent mix: every refused case above (an unknown model among them), plus the
# refusals that come before decoding.
SMALL_BODY_BYTES = 4096
OVERSIZED = BadCall(
    "oversized body",
    "linear",
    packed({"x": tensor(np.zeros((SMALL_BODY_BYTES // 40 + 1, 10), np.float32))}),
    413,
    "payload_too_large",
)
BAD_CALLS = [
    BadCall(case, model, raw, status, code)
    for case, model, raw, status, code, _ in MALFORMED
    if status != 200
] + [
    BadCall("wrong content type", "linear", b"hello", 415, "unsupported_media_type", "text/plain"),
    BadCall("wrong method", "linear", b"", 405, "method_not_allowed", method="GET"),
    OVERSIZED,
]


async def _send_bad(
    session: aiohttp.ClientSession, url: str, call: BadCall
) -> tuple[BadCall, int, str]:
    headers = {"Content-Type": call.content_type} if call.content_type else {}
    async with session.request(
        call.method, f"{url}/v1/models/{call.model}/infer", data=call.raw, headers=headers
    ) as r:
        raw = await r.read()
        reply = msgpack.unpackb(raw) if "msgpack" in r.content_type else json.loads(raw)
        return call, r.status, reply["error"]["code"]


async def test_malformed_requests_do_not_harm_concurrent_good_ones() -> None:
    # A small body limit, so that the 413 case costs kilobytes; every good request fits in it.
    env = {"MICROBATCH_SERVER_MAX_BODY_BYTES": str(SMALL_BODY_BYTES)}
    rng = np.random.default_rng(8)
    good = [rng.standard_normal((3, 10)).astype(np.float32) for _ in range(300)]
    bad_calls = BAD_CALLS * 10
    assert len(packed({"x": tensor(good[0])})) < SMALL_BODY_BYTES < len(OVERSIZED.raw)
    with start_server("--model", "linear", env=env) as server:
        # Bad requests on connections of their own: a refused body may end its connection, and
        # a good request must not be the one to find that out on a reused connection.
        bad_connector = aiohttp.TCPConnector(force_close=True)
        async with (
            aiohttp.ClientSession() as session,
            aiohttp.ClientSession(connector=bad_connector) as bad_session,
        ):
            results = await asyncio.gather(
                *(_post(session, server.url, "linear", x) for x in good),
                *(_send_bad(bad_session, server.url, call) for call in bad_calls),
            )
    for x, (status, body) in zip(good, results[: len(good)], strict=True):
        assert status == 200, body
        np.testing.assert_allclose(
            output_array(body), reference_forward("linear", x), rtol=RTOL, atol=ATOL
        )
    for call, status, code in results[len(good) :]:
        assert (status, code) == (call.status, call.code), call.case
