"""The Open Inference Protocol (/v2) driven by clients nobody here wrote: tritonclient's sync and
asyncio HTTP clients, KServe's InferenceRESTClient and curl, against a real server process.

Answers are checked against the model's arithmetic or the /v1 answers for the same rows.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from tritonclient.utils import InferenceServerException

from tests import model_files
from tests.conftest import infer_msgpack, output_array, request, tensor
from tests.probes import metric, wait_for
from tests.server_process import ServerProcess, start_server

ROWS = 3  # samples per request in the datatype tests; every EveryDtype input is [3] per sample


@pytest.fixture(scope="module")
def oip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("oip")
    every = model_files.save_script(model_files.EveryDtype(), d / "every.pt")
    neg = model_files.save_script(model_files.RaisesOnNegative(), d / "neg.pt")
    slow = model_files.save_script(model_files.Slow(60), d / "slow.pt")
    inputs = "\n".join(
        f'{name} = {{ dtype = "{dtype}", shape = [3] }}'
        for name, dtype in model_files.EVERY_DTYPE_INPUTS.items()
    )
    config = d / "oip.toml"
    config.write_text(
        f"""
[models.linear]
path = "builtin:linear"
[models.mlp]
path = "builtin:mlp"
[models.every]
path = "{every}"
[models.every.inputs]
{inputs}
[models.neg]
path = "{neg}"
input = {{ dtype = "float32", shape = [2] }}
[models.slow]
path = "{slow}"
input = {{ dtype = "float32", shape = [4] }}
max_batch_size = 4
max_queue_size = 8
"""
    )
    with start_server("--config", str(config), "--cpu-workers", "1") as server:
        yield server


def host(server: ServerProcess) -> str:
    return server.url.removeprefix("http://")


def v1_answer(server: ServerProcess, model: str, x: np.ndarray) -> np.ndarray:
    status, _, body = infer_msgpack(server.url, model, {"inputs": {"x": tensor(x)}})
    assert status == 200, body
    return output_array(body)


def test_health_and_metadata(oip: ServerProcess) -> None:
    with triton.InferenceServerClient(host(oip)) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("linear") and client.is_model_ready("linear", "1")
        assert not client.is_model_ready("linear", "2")
        assert not client.is_model_ready("nope")
        server = client.get_server_metadata()
        assert server["name"] == "microbatch" and "binary_tensor_data" in server["extensions"]
        meta = client.get_model_metadata("linear")
        assert meta == {
            "name": "linear",
            "versions": ["1"],
            "platform": "pytorch_builtin",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 10]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}],
        }
        every = client.get_model_metadata("every", "1")
        assert every["platform"] == "pytorch_torchscript"
        assert [t["datatype"] for t in every["inputs"]] == [
            "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"
        ]  # fmt: skip
        config = client.get_model_config("slow")
        assert config["max_batch_size"] == 4
        assert config["input"] == [
            {"name": "input", "data_type": "TYPE_FP32", "dims": [4], "format": "FORMAT_NONE"}
        ]
        with pytest.raises(InferenceServerException) as missing:
            client.get_model_metadata("nope")
        assert missing.value.status() == "404"


def _linear_inputs(x: np.ndarray, binary: bool) -> list[triton.InferInput]:
    tensor_in = triton.InferInput("input", list(x.shape), "FP32")
    return [tensor_in.set_data_from_numpy(x, binary_data=binary)]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
def test_infer_binary_and_json_inputs_and_outputs(
    oip: ServerProcess, binary_in: bool, binary_out: bool
) -> None:
    x = np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)
    outputs = [triton.InferRequestedOutput("output", binary_data=binary_out)]
    with triton.InferenceServerClient(host(oip)) as client:
        result = client.infer(
            "linear", _linear_inputs(x, binary_in), outputs=outputs, request_id="7"
        )
    np.testing.assert_array_equal(result.as_numpy("output"), v1_answer(oip, "linear", x))
    response = result.get_response()
    assert response["id"] == "7" and response["model_name"] == "linear"
    assert ("data" in response["outputs"][0]) is not binary_out
    assert 1 <= response["parameters"]["batch_size"] <= 32
    assert response["parameters"]["device"] == "cpu"


async def test_infer_with_the_asyncio_client(oip: ServerProcess) -> None:
    x = np.ones((2, 10), np.float32)
    async with triton_aio.InferenceServerClient(host(oip)) as client:
        assert await client.is_server_ready() and await client.is_model_ready("linear")
        assert (await client.get_model_metadata("mlp"))["inputs"][0]["shape"] == [-1, 256]
        result = await client.infer("linear", _linear_inputs(x, binary=True))
        with pytest.raises(InferenceServerException) as missing:
            await client.infer("nope", _linear_inputs(x, binary=True))
    np.testing.assert_array_equal(result.as_numpy("output"), v1_answer(oip, "linear", x))
    assert missing.value.status() == "404" and "nope" in str(missing.value.message())


def _every_dtype_rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    rows: dict[str, np.ndarray] = {}
    for name, dtype in model_files.EVERY_DTYPE_INPUTS.items():
        if dtype == "bool":
            rows[name] = rng.integers(0, 2, (ROWS, 3)).astype(bool)
        elif dtype.startswith(("int", "uint")):
            rows[name] = rng.integers(0, 100, (ROWS, 3)).astype(dtype)
        else:
            rows[name] = (rng.standard_normal((ROWS, 3)) * 10).astype(dtype)
    return rows


def _expected(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    expected = {}
    for name, dtype in model_files.EVERY_DTYPE_INPUTS.items():
        x = rows[name].astype(dtype)
        expected[f"{name}_out"] = ~x if dtype == "bool" else x * 2 if "float" in dtype else x + 1
    return expected


def _infer_every(
    client: triton.InferenceServerClient, rows: dict[str, np.ndarray], binary: bool
) -> triton.InferResult:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, x in rows.items():
        tensor_in = triton.InferInput(name, list(x.shape), np_to_triton_dtype(x.dtype))
        inputs.append(tensor_in.set_data_from_numpy(x, binary_data=binary))
    outputs = [triton.InferRequestedOutput(f"{n}_out", binary_data=binary) for n in rows]
    return client.infer("every", inputs, outputs=outputs)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_native_datatype_round_trips(oip: ServerProcess, binary: bool) -> None:
    rows = _every_dtype_rows()
    with triton.InferenceServerClient(host(oip)) as client:
        result = _infer_every(client, rows, binary)
    for name, want in _expected(rows).items():
        got = result.as_numpy(name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_unsigned_and_bf16_datatypes_are_cast_safely_to_the_model_input(
    oip: ServerProcess, binary: bool
) -> None:
    rows = _every_dtype_rows()
    rows["i32"] = np.array([[0, 1, 65535]] * ROWS, np.uint16)  # UINT16 -> int32
    rows["i64"] = np.array([[0, 1, 2**32 - 1]] * ROWS, np.uint32)  # UINT32 -> int64
    rows["f64"] = np.array([[0, 1, 2**53]] * ROWS, np.uint64)  # UINT64 -> float64
    if binary:  # tritonclient sends BF16 only as binary data
        rows["f32"] = np.array([[1.5, -2.0, 1.0e30]] * ROWS, ml_dtypes.bfloat16)  # -> float32
    with triton.InferenceServerClient(host(oip)) as client:
        result = _infer_every(client, rows, binary)
    want = _expected(rows)
    np.testing.assert_array_equal(result.as_numpy("i32_out"), [[1, 2, 65536]] * ROWS)
    np.testing.assert_array_equal(result.as_numpy("i64_out"), [[1, 2, 2**32]] * ROWS)
    np.testing.assert_array_equal(result.as_numpy("f64_out"), [[0.0, 2.0, 2.0**54]] * ROWS)
    np.testing.assert_array_equal(result.as_numpy("f32_out"), want["f32_out"].astype(np.float32))
    assert result.as_numpy("f32_out").dtype == np.float32


def test_bytes_tensors_get_a_clear_400(oip: ServerProcess) -> None:
    x = np.array([[b"a", b"b", b"c"]], dtype=np.object_)
    rows = _every_dtype_rows()
    with triton.InferenceServerClient(host(oip)) as client:
        inputs = [triton.InferInput("b", [1, 3], "BYTES").set_data_from_numpy(x)]
        inputs += [
            triton.InferInput(n, [ROWS, 3], triton_dtype(v)).set_data_from_numpy(v)
            for n, v in rows.items()
            if n != "b"
        ]
        with pytest.raises(InferenceServerException) as refused:
            client.infer("every", inputs)
    assert refused.value.status() == "400"
    assert "BYTES" in str(refused.value.message())


def triton_dtype(x: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(x.dtype))


def test_requested_outputs_come_back_alone_and_in_the_order_asked(oip: ServerProcess) -> None:
    rows = _every_dtype_rows()
    inputs = [
        triton.InferInput(n, list(v.shape), triton_dtype(v)).set_data_from_numpy(v)
        for n, v in rows.items()
    ]
    outputs = [
        triton.InferRequestedOutput("i8_out", binary_data=False),
        triton.InferRequestedOutput("b_out", binary_data=True),
    ]
    with triton.InferenceServerClient(host(oip)) as client:
        result = client.infer("every", inputs, outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["i8_out", "b_out"]
    np.testing.assert_array_equal(result.as_numpy("b_out"), ~rows["b"])
    np.testing.assert_array_equal(result.as_numpy("i8_out"), rows["i8"] + 1)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_inflated_and_answers_are_never_compressed(
    oip: ServerProcess, algorithm: str
) -> None:
    x = np.arange(40, dtype=np.float32).reshape(4, 10)
    with triton.InferenceServerClient(host(oip)) as client:
        result = client.infer(
            "linear",
            _linear_inputs(x, binary=algorithm == "gzip"),
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,  # asked for, and not done
        )
    np.testing.assert_array_equal(result.as_numpy("output"), v1_answer(oip, "linear", x))
    status, headers, _ = request(
        oip.url, "GET", "/v2/models/linear", headers={"Accept-Encoding": "gzip"}
    )
    assert status == 200 and "Content-Encoding" not in headers


def test_a_batch_over_max_batch_size_gets_the_v1_answer(oip: ServerProcess) -> None:
    x = np.ones((5, 4), np.float32)  # slow takes at most 4 samples per request
    status, _, v1 = infer_msgpack(oip.url, "slow", {"inputs": {"x": tensor(x)}})
    with triton.InferenceServerClient(host(oip)) as client:
        tensor_in = triton.InferInput("input", [5, 4], "FP32").set_data_from_numpy(x)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("slow", [tensor_in])
    assert status == 400 and refused.value.status() == "400"
    assert refused.value.message() == v1["error"]["message"]


async def test_64_requests_in_flight_are_batched_and_each_gets_its_own_answer(
    oip: ServerProcess,
) -> None:
    rows = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    async with triton_aio.InferenceServerClient(host(oip), conn_limit=64) as client:

        async def one(i: int) -> triton.InferResult:
            tensor_in = triton.InferInput("input", [1, 256], "FP32")
            tensor_in.set_data_from_numpy(rows[i : i + 1])
            return await client.infer("mlp", [tensor_in], request_id=str(i))

        results = await asyncio.gather(*(one(i) for i in range(64)))
    expected = np.concatenate([v1_answer(oip, "mlp", rows[i : i + 32]) for i in (0, 32)])
    for i, result in enumerate(results):
        assert result.get_response()["id"] == str(i)
        # Batches of other sizes may round in the last place: equal up to float32 rounding.
        np.testing.assert_allclose(result.as_numpy("output")[0], expected[i], rtol=1e-5, atol=1e-6)
    sizes = [r.get_response()["parameters"]["batch_size"] for r in results]
    assert max(sizes) > 1, sizes


def test_async_infer_with_a_connection_pool(oip: ServerProcess) -> None:
    rows = np.random.default_rng(4).standard_normal((16, 10)).astype(np.float32)
    with triton.InferenceServerClient(host(oip), concurrency=16) as client:
        pending = [
            client.async_infer("linear", _linear_inputs(rows[i : i + 1], binary=True))
            for i in range(16)
        ]
        answers = np.concatenate([p.get_result().as_numpy("output") for p in pending])
    # Other batch sizes may round in the last place: equal up to float32 rounding.
    np.testing.assert_allclose(answers, v1_answer(oip, "linear", rows), rtol=1e-6, atol=1e-6)


def test_statistics_count_what_was_served(oip: ServerProcess) -> None:
    with triton.InferenceServerClient(host(oip)) as client:
        before = client.get_inference_statistics("neg")["model_stats"][0]
        x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
        client.infer("neg", [triton.InferInput("input", [2, 2], "FP32").set_data_from_numpy(x)])
        after = client.get_inference_statistics("neg")["model_stats"][0]
        every = client.get_inference_statistics()["model_stats"]
    assert after["inference_count"] == before["inference_count"] + 2
    assert after["execution_count"] == before["execution_count"] + 1
    success = after["inference_stats"]["success"]
    assert success["count"] == before["inference_stats"]["success"]["count"] + 1
    assert success["ns"] > before["inference_stats"]["success"]["ns"]
    assert {s["name"] for s in every} == {"linear", "mlp", "every", "neg", "slow"}


def test_model_error_is_500_with_the_models_message(oip: ServerProcess) -> None:
    x = np.array([[-1.0, 0.0]], np.float32)
    client = triton.InferenceServerClient(host(oip))
    with client, pytest.raises(InferenceServerException) as failed:
        client.infer("neg", [triton.InferInput("x", [1, 2], "FP32").set_data_from_numpy(x)])
    assert failed.value.status() == "500"
    assert "negative input rejected" in str(failed.value.message())


def _slow_body(rows: int, **parameters: Any) -> bytes:
    x = {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [0.0] * (rows * 4)}
    return json.dumps({"inputs": [x], "parameters": parameters}).encode()


def _oip_error(answer: httpx.Response) -> str:
    assert answer.headers["Content-Type"] == "application/json"
    message = answer.json()["error"]
    assert isinstance(message, str) and message
    return message


async def test_an_expired_deadline_is_504(oip: ServerProcess) -> None:
    url = f"{oip.url}/v2/models/slow/infer"
    async with httpx.AsyncClient(timeout=120) as http:
        # Two full batches occupy the single worker for a while (as in test_server_faults).
        busy = [asyncio.ensure_future(http.post(url, content=_slow_body(4))) for _ in range(2)]
        await asyncio.to_thread(wait_for, lambda: metric(oip, "microbatch_busy_workers") >= 1)
        late = await http.post(url, content=_slow_body(1, timeout=5000))  # 5 ms, in microseconds
        answers = await asyncio.gather(*busy)
    assert late.status_code == 504, late.text
    assert "deadline" in _oip_error(late)
    assert [a.status_code for a in answers] == [200, 200]


async def test_a_full_queue_is_503_with_retry_after(oip: ServerProcess) -> None:
    url = f"{oip.url}/v2/models/slow/infer"
    async with httpx.AsyncClient(timeout=120) as http:
        answers = await asyncio.gather(*(http.post(url, content=_slow_body(4)) for _ in range(8)))
    statuses = [a.status_code for a in answers]
    assert 200 in statuses and 503 in statuses, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert "queue" in _oip_error(answer) or "deadline" in _oip_error(answer)
            assert int(answer.headers["Retry-After"]) >= 1


async def test_kserve_rest_client(oip: ServerProcess) -> None:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    x = np.random.default_rng(5).standard_normal((3, 10)).astype(np.float32)
    try:
        assert await client.is_server_live(oip.url) is True
        assert await client.is_server_ready(oip.url) is True
        assert await client.is_model_ready(oip.url, "linear") is True
        for binary in (False, True):
            tensor_in = InferInput("input", list(x.shape), "FP32")
            tensor_in.set_data_from_numpy(x, binary_data=binary)
            answer = await client.infer(
                oip.url, InferRequest("linear", [tensor_in], request_id="k"), model_name="linear"
            )
            assert answer.model_name == "linear" and answer.id == "k"
            assert answer.parameters is not None
            np.testing.assert_array_equal(answer.outputs[0].as_numpy(), v1_answer(oip, "linear", x))
        with pytest.raises(httpx.HTTPStatusError) as missing:
            await client.infer(oip.url, InferRequest("nope", [tensor_in]), model_name="nope")
        assert missing.value.response.status_code == 404
        assert "no model named 'nope'" in str(missing.value)
    finally:
        await client.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_plain_json(oip: ServerProcess) -> None:
    body = (
        '{"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", '
        '"data": [1,2,3,4,5,6,7,8,9,10]}]}'
    )
    done = subprocess.run(
        ["curl", "-s", "-i", "-H", "Content-Type: application/json", "-d", body,
         f"{oip.url}/v2/models/linear/infer"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    head, _, payload = done.stdout.partition("\n\n")  # text mode reads \r\n as \n
    assert head.startswith("HTTP/1.1 200") and "Content-Type: application/json" in head
    answer = json.loads(payload)
    x = np.arange(1, 11, dtype=np.float32)
    assert answer["outputs"][0]["data"] == v1_answer(oip, "linear", x[None]).ravel().tolist()


def test_v1_and_v2_share_the_model_counters(oip: ServerProcess) -> None:
    def served() -> float:
        text = request(oip.url, "GET", "/metrics")[2].decode()
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('microbatch_requests_total{code="ok",model="linear"}')
        )

    before = served()
    v1_answer(oip, "linear", np.ones((1, 10), np.float32))
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 10], "datatype": "FP32", "data": [1.0] * 10}]}
    )
    assert request(oip.url, "POST", "/v2/models/linear/infer", body.encode())[0] == 200
    assert served() == before + 2
