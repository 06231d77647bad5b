"""Clear answers at the edges, against real server processes: JSON that is not JSON (NaN,
Infinity), values beyond a dtype's range (JSON and msgpack), a model output that is not finite
(a well-formed answer in either encoding, counted), a large JSON body refused before it costs
memory, absurd numbers, an expectation the server cannot meet, and a request that arrives
before the server is ready (503 not_ready, never 404 for a model still loading)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import msgpack
import numpy as np
import pytest

from tests import model_files
from tests.conftest import infer_json, infer_msgpack, request, tensor
from tests.probes import metric, peak_rss_bytes
from tests.server_process import ServerProcess, start_server

JSON = "application/json"


@pytest.fixture(scope="module")
def log_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = model_files.save_script(model_files.Log(), tmp_path_factory.mktemp("log") / "log.pt")
    with start_server("--model", "linear", "--model", f"log={path}:float32[3]") as server:
        yield server


def post_json(server: ServerProcess, model: str, text: str) -> tuple[int, dict[str, object]]:
    status, _, body = request(server.url, "POST", f"/v1/models/{model}/infer", text.encode(), JSON)
    return status, json.loads(body)


def error_of(body: dict[str, object]) -> tuple[str, str]:
    error = body["error"]
    assert isinstance(error, dict)
    return str(error["code"]), str(error["message"])


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_json_nan_and_infinity_tokens_are_a_400(log_server: ServerProcess, token: str) -> None:
    data = ", ".join([token, "1", "1"])
    text = f'{{"inputs": {{"x": {{"dtype": "float32", "shape": [3], "data": [{data}]}}}}}}'
    status, body = post_json(log_server, "log", text)
    code, message = error_of(body)
    assert (status, code) == (400, "bad_request")
    assert f"{token} is not a JSON number" in message


def test_json_values_beyond_float32_are_a_400(log_server: ServerProcess) -> None:
    for dtype in ("float32", "float64"):  # refused by the decoder, and by the cast to the model
        payload = {"inputs": {"x": {"dtype": dtype, "shape": [3], "data": [1e308, 1.0, 1.0]}}}
        status, _, body = infer_json(log_server.url, "log", payload)
        code, message = error_of(body)
        assert (status, code) == (400, "bad_request"), (dtype, body)
        assert "beyond the range of float32" in message


def test_msgpack_float64_values_that_overflow_float32_are_a_400_non_finite_ones_data(
    log_server: ServerProcess,
) -> None:
    finite = np.array([1e39, 1.0, 1.0], np.float64)
    status, _, body = infer_msgpack(log_server.url, "log", {"inputs": {"x": tensor(finite)}})
    code, message = error_of(body)
    assert (status, code) == (400, "bad_request")
    assert message.startswith("inputs.x holds a value beyond the range of float32")
    data = np.array([np.inf, -np.inf, np.nan], np.float64)  # masks use -inf: they are data
    status, _, body = infer_msgpack(log_server.url, "log", {"inputs": {"x": tensor(data)}})
    assert status == 200, body
    out = np.frombuffer(body["outputs"]["output"]["data"], np.float32)
    assert out[0] == np.inf and np.isnan(out[1:]).all()


def test_non_finite_outputs_answer_well_formed_in_both_encodings_and_are_counted(
    log_server: ServerProcess,
) -> None:
    counted = 'microbatch_non_finite_outputs_total{model="log"}'
    before = metric(log_server, counted)
    x = np.array([0.0, -1.0, 1.0], np.float32)  # log: -inf, nan, 0
    status, _, body = infer_msgpack(log_server.url, "log", {"inputs": {"x": tensor(x)}})
    assert status == 200
    out = np.frombuffer(body["outputs"]["output"]["data"], np.float32)
    assert out[0] == -np.inf and np.isnan(out[1]) and out[2] == 0.0
    payload = {"inputs": {"x": {"dtype": "float32", "shape": [2, 3], "data": [[0, -1, 1]] * 2}}}
    status, headers, body = infer_json(log_server.url, "log", payload)
    assert status == 200 and headers["Content-Type"].startswith(JSON)
    assert body["outputs"]["output"]["data"] == [["-Infinity", "NaN", 0.0]] * 2
    assert metric(log_server, counted) == before + 3  # samples with a non-finite output


def test_a_large_json_body_is_refused_before_it_costs_memory(log_server: ServerProcess) -> None:
    """32 MB of JSON numbers once held the event loop for over a second and 350 MB of memory
    before its 400; now the JSON limit (1 MiB by default) refuses it at its Content-Length."""
    pid = log_server.process.pid
    before = peak_rss_bytes(pid)
    numbers = ",".join(["0.5"] * 8_000_000)
    text = f'{{"inputs": {{"x": {{"dtype": "float32", "shape": [8000000], "data": [{numbers}]}}}}}}'
    status, body = post_json(log_server, "log", text)
    code, message = error_of(body)
    grown_mb = (peak_rss_bytes(pid) - before) / 2**20
    print(f"\n32 MB JSON body: {status} {code}; server peak RSS grew {grown_mb:.0f} MB")
    assert (status, code) == (413, "payload_too_large")
    assert "server.max_json_body_bytes" in message
    assert grown_mb < 50


def test_a_json_tensor_of_the_wrong_shape_is_refused_by_its_declared_shape(
    log_server: ServerProcess,
) -> None:
    text = '{"inputs": {"x": {"dtype": "float32", "shape": [7], "data": [1, 2, 3, 4, 5, 6, 7]}}}'
    status, body = post_json(log_server, "log", text)
    code, message = error_of(body)
    assert (status, code) == (400, "bad_request")
    assert message.startswith("inputs.x has shape [7]; model 'log' expects one sample of shape")


def test_a_timeout_of_400_digits_is_a_400(log_server: ServerProcess) -> None:
    data = '{"dtype": "float32", "shape": [3], "data": [1, 2, 3]}'
    text = f'{{"inputs": {{"x": {data}}}, "timeout_ms": {"9" * 400}}}'
    status, body = post_json(log_server, "log", text)
    code, message = error_of(body)
    assert (status, code) == (400, "bad_request")
    assert "'timeout_ms' must be a positive finite number" in message and len(message) < 200
    oip = (
        '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}], '
        f'"parameters": {{"timeout": {"9" * 400}}}}}'
    )
    status, _, raw = request(log_server.url, "POST", "/v2/models/log/infer", oip.encode(), JSON)
    assert status == 400 and "parameters.timeout" in json.loads(raw)["error"]


def test_an_expectation_other_than_100_continue_is_a_417(log_server: ServerProcess) -> None:
    x = np.ones(10, np.float32)
    body = msgpack.packb({"inputs": {"x": tensor(x)}})
    headers = {"Expect": "something-else"}
    status, _, raw = request(
        log_server.url, "POST", "/v1/models/linear/infer", body, "application/msgpack", headers
    )
    answer = msgpack.unpackb(raw)
    assert (status, answer["error"]["code"]) == (417, "expectation_failed")
    assert "100-continue" in answer["error"]["message"]


def test_requests_before_ready_get_503_not_ready_never_404() -> None:
    server = start_server("--model", "linear", wait_ready=False)
    answers: list[tuple[int, str, str | None]] = []
    try:
        parts = urlsplit(server.url)
        deadline = time.monotonic() + 120
        x = {"inputs": {"x": tensor(np.ones(10, np.float32))}}
        while time.monotonic() < deadline:
            try:
                status, headers, body = infer_msgpack(server.url, "linear", x, timeout_s=5)
            except (TimeoutError, ConnectionError):
                continue
            answers.append(
                (status, body.get("error", {}).get("code", "ok"), headers.get("Retry-After"))
            )
            if status == 200:
                break
            time.sleep(0.01)
        unknown = infer_msgpack(server.url, "nope", x)
        assert parts.hostname == "127.0.0.1"
    finally:
        server.stop()
    early = answers[:-1]
    print(f"\nbefore ready: {len(early)} answers, all {set(early)}; then {answers[-1][:2]}")
    assert answers[-1][0] == 200
    assert early, "the server was ready before any request reached it"
    assert all(status == 503 and code == "not_ready" for status, code, _ in early), early
    assert all(retry is not None and int(retry) >= 1 for _, _, retry in early)
    assert unknown[0] == 404 and unknown[2]["error"]["code"] == "unknown_model"


def test_json_answers_carry_nested_lists_and_finite_floats_stay_numbers(
    log_server: ServerProcess,
) -> None:
    payload = {"inputs": {"x": {"dtype": "float32", "shape": [1, 3], "data": [1, math.e, 4]}}}
    status, _, body = infer_json(log_server.url, "log", payload)
    assert status == 200
    (row,) = body["outputs"]["output"]["data"]
    assert row == pytest.approx([0.0, 1.0, math.log(4)])
