"""User models (TorchScript, torch.export), batching behaviour under load, and the Unix socket."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import pytest

from tests import model_files
from tests.conftest import infer_msgpack, output_array, request, tensor
from tests.server_process import ServerProcess, start_server


@pytest.fixture(scope="module")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("models")
    affine = model_files.save_script(model_files.Affine(), d / "affine.pt")
    two = model_files.save_script(model_files.TwoInOut(), d / "two.pt")
    exported = model_files.save_export(d / "affine.pt2")
    with start_server(
        "--model",
        f"ts={affine}:float32[16]",
        "--model",
        f"two={two}:a=float32[1];b=int64[3]",
        "--model",
        f"ep={exported}",
    ) as server:
        yield server


@pytest.mark.parametrize("model", ["ts", "ep"])
def test_torchscript_and_export_models_answer(user_models: ServerProcess, model: str) -> None:
    x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
    status, _, body = infer_msgpack(user_models.url, model, {"inputs": {"x": tensor(x)}})
    assert status == 200, body
    np.testing.assert_allclose(output_array(body), 3 * x + 1, rtol=1e-6)


def test_export_input_spec_is_read_from_the_program(user_models: ServerProcess) -> None:
    models = {
        m["name"]: m for m in json.loads(request(user_models.url, "GET", "/v1/models")[2])["models"]
    }
    assert models["ep"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [16]}]
    assert models["ep"]["format"] == "export"


def test_multi_input_multi_output_model(user_models: ServerProcess) -> None:
    a = np.array([[1.0], [2.0]], np.float32)
    b = np.array([[1, 2, 3], [4, 5, 6]], np.int64)
    status, _, body = infer_msgpack(
        user_models.url, "two", {"inputs": {"a": tensor(a), "b": tensor(b)}}
    )
    assert status == 200, body
    np.testing.assert_allclose(output_array(body, "sum"), [[7.0], [17.0]])
    np.testing.assert_allclose(output_array(body, "twice"), [[2.0], [4.0]])


@pytest.fixture(scope="module")
def small_batches() -> Iterator[ServerProcess]:
    with start_server("--model", "mlp", "--max-batch-size", "8", "--max-delay-ms", "50") as s:
        yield s


async def test_batches_fill_under_concurrency(small_batches: ServerProcess) -> None:
    """4 x max_batch_size concurrent clients: the mean batch is at least half full."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(256).astype(np.float32)
    body = msgpack.packb({"inputs": {"input": tensor(x)}})
    url = f"{small_batches.url}/v1/models/mlp/infer"
    sizes: list[int] = []

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(40):
            async with session.post(
                url, data=body, headers={"Content-Type": "application/msgpack"}
            ) as r:
                assert r.status == 200
                sizes.append(msgpack.unpackb(await r.read())["batch_size"])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        await asyncio.gather(*(client(session) for _ in range(32)))
    # Per-request sizes over-weight big batches; use the server's own per-batch counts.
    text = request(small_batches.url, "GET", "/metrics")[2].decode()
    total = _sample(text, "microbatch_batch_size_sum{", 'model="mlp"')
    count = _sample(text, "microbatch_batch_size_count{", 'model="mlp"')
    assert total / count >= 4, f"mean batch size {total / count:.2f} of max 8"


def _sample(text: str, prefix: str, label: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(prefix) and label in x)
    return float(line.split()[-1])


def test_lone_sequential_client_does_not_pay_max_delay(small_batches: ServerProcess) -> None:
    x = np.zeros(256, np.float32)
    latencies = []
    for _ in range(30):
        started = time.perf_counter()
        status, _, body = infer_msgpack(small_batches.url, "mlp", {"inputs": {"x": tensor(x)}})
        latencies.append(time.perf_counter() - started)
        assert status == 200 and body["batch_size"] == 1
    # max_delay_ms is 50: a server that waited for batch-mates would show >= 50 ms.
    assert statistics.median(latencies) < 0.025


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._path)
        self.sock = sock


def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "mb.sock")
    with start_server("--model", "linear", "--uds", path) as server:
        assert server.uds == path
        assert oct(Path(path).stat().st_mode & 0o777) == oct(0o600)
        conn = _UnixHTTPConnection(path)
        x = np.ones((2, 10), np.float32)
        conn.request(
            "POST",
            "/v1/models/linear/infer",
            msgpack.packb({"inputs": {"x": tensor(x)}}),
            {"Content-Type": "application/msgpack"},
        )
        response = conn.getresponse()
        body = msgpack.unpackb(response.read())
        assert response.status == 200 and output_array(body).shape == (2, 1)
        conn.close()
