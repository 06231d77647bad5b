"""The client against real `microbatch serve` processes: TCP and a Unix socket; one sample, many,
several inputs and outputs; splitting past max_batch_size; predict_many; the server's errors;
local checks that read like the server's; the sync client shared by many threads.

Two server processes for the whole module (each costs seconds); answers are checked against the
built-ins' numpy reference, and the multi-input model is a small TorchScript file made here.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import client
from client import AsyncClient, Client
from server.cli import main
from server.models.builtin import reference_forward
from server.models.spec import TensorSpec
from tests.conftest import infer_msgpack, tensor
from tests.server_process import ServerProcess, start_server

RTOL, ATOL = 1e-4, 1e-5
PAIR_SPEC = "a=float32[3];b=int64[2]"


def make_pair_model(path: Path) -> None:
    """Two inputs, two outputs, and a failure on demand (any `a` above 1e6)."""
    import torch

    class Pair(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
            if bool((a > 1e6).any()):
                raise RuntimeError("a holds a value above 1e6")
            total = a.sum(dim=1, keepdim=True) + b.to(torch.float32).sum(dim=1, keepdim=True)
            return {"total": total, "double": a * 2.0}

    torch.jit.script(Pair()).save(str(path))  # type: ignore[no-untyped-call]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    pair = tmp_path_factory.mktemp("models") / "pair.pt"
    make_pair_model(pair)
    models = ["--model", "linear", "--model", "mlp", "--model", f"pair={pair}:{PAIR_SPEC}"]
    with start_server(*models, "--max-batch-size", "64") as process:
        assert process.url, process.log()
        yield process


@pytest.fixture(scope="module")
def uds_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    path = tmp_path_factory.mktemp("uds") / "mb.sock"
    # A small element budget, so that a payload_too_large answer is easy to provoke.
    env = {"MICROBATCH_SERVER_MAX_ELEMENTS": "1000"}
    with start_server("--uds", str(path), "--model", "linear", "--model", "mlp", env=env) as s:
        assert s.uds, s.log()
        yield s


def data(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def assert_model_output(model: str, x: np.ndarray, y: np.ndarray) -> None:
    expected = reference_forward(model, x[None] if x.ndim == 1 else x)
    np.testing.assert_allclose(y, expected[0] if x.ndim == 1 else expected, rtol=RTOL, atol=ATOL)


def test_one_sample_and_many_over_tcp(server: ServerProcess) -> None:
    with Client(server.url) as mb:
        one = data(10)
        y = mb.predict("linear", one)
        assert y.shape == (1,) and y.dtype == np.float32
        assert_model_output("linear", one, y)
        many = data(5, 256, seed=1)
        assert_model_output("mlp", many, mb.predict("mlp", many))
        y[0] = 0.0  # answers are the caller's own, writable arrays


def test_unix_socket_sync_and_async(uds_server: ServerProcess) -> None:
    url = f"unix://{uds_server.uds}"
    x = data(3, 10, seed=2)
    with Client(url) as mb:
        assert mb.ready() and mb.health()
        assert_model_output("linear", x, mb.predict("linear", x))
        assert [m.name for m in mb.models()] == ["linear", "mlp"]
        with pytest.raises(client.PayloadTooLarge) as info:
            mb.predict("mlp", np.zeros((8, 256), np.float32))
        assert info.value.http_status == 413

    async def scenario() -> np.ndarray:
        async with AsyncClient(url) as amb:
            return await amb.predict("linear", x)

    assert_model_output("linear", x, asyncio.run(scenario()))


def test_cli_models_over_unix_socket(
    uds_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--url", f"unix://{uds_server.uds}"]) == 0
    out = capsys.readouterr().out
    assert "linear (ready)" in out and "input float32[10]" in out


def test_several_inputs_and_outputs(server: ServerProcess) -> None:
    a = data(4, 3, seed=3)
    b = np.arange(8, dtype=np.int64).reshape(4, 2)
    with Client(server.url) as mb:
        out = mb.predict("pair", {"a": a, "b": b})
        one = mb.predict("pair", {"a": a[0], "b": b[0]})
        with pytest.raises(TypeError, match="2 outputs"):
            mb.predict("pair", a)
    assert set(out) == {"total", "double"}
    total = a.sum(axis=1, keepdims=True) + b.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["total"], total, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out["double"], 2 * a, rtol=RTOL)
    assert one["total"].shape == (1,) and one["double"].shape == (3,)
    np.testing.assert_allclose(one["double"], 2 * a[0], rtol=RTOL)


def test_1000_samples_split_over_max_batch_size_64_and_joined_in_order(
    server: ServerProcess,
) -> None:
    x = data(1000, 256, seed=4)

    async def scenario() -> client.Prediction:
        async with AsyncClient(server.url) as mb:
            return await mb.predict("mlp", x, return_info=True)

    prediction = asyncio.run(scenario())
    assert len(prediction.requests) == 16  # ceil(1000 / 64)
    assert all(1 <= r.batch_size <= 64 for r in prediction.requests)
    assert prediction.output.shape == (1000, 10)
    assert_model_output("mlp", x, prediction.output)


def test_predict_many_keeps_input_order(server: ServerProcess) -> None:
    items = [data(1 + k % 3, 10, seed=100 + k) for k in range(40)]

    async def scenario() -> list[np.ndarray]:
        async with AsyncClient(server.url) as mb:
            return await mb.predict_many("linear", items, concurrency=4)

    with Client(server.url) as mb:
        from_sync = mb.predict_many("linear", items, concurrency=3)
    for results in (asyncio.run(scenario()), from_sync):
        assert len(results) == len(items)
        for x, y in zip(items, results, strict=True):
            assert_model_output("linear", x, y)


def test_timing_is_reported_when_asked(server: ServerProcess) -> None:
    with Client(server.url) as mb:
        p = mb.predict("linear", data(2, 10), request_id="timing-1", return_info=True)
    assert (p.info.request_id, p.info.model, p.device) == ("timing-1", "linear", "cpu")
    assert 2 <= p.batch_size <= 64
    assert p.queue_ms >= 0 and p.compute_ms > 0
    assert p.output.shape == (2, 1)


def test_server_errors_raise_their_class(server: ServerProcess) -> None:
    with Client(server.url) as mb:
        with pytest.raises(client.UnknownModel, match="no model named 'nope'") as unknown:
            mb.predict("nope", data(10))
        with pytest.raises(client.BadRequest, match="'id' has 300 characters") as bad:
            mb.predict("linear", data(10), request_id="x" * 300)
        poisoned: dict[str, np.ndarray] = {
            "a": np.full(3, 1e7, np.float32),
            "b": np.zeros(2, np.int64),
        }
        with pytest.raises(client.ModelError, match="a holds a value above 1e6") as failed:
            mb.predict("pair", poisoned)
        fine = mb.predict("pair", {"a": np.ones(3, np.float32), "b": np.ones(2, np.int64)})
    assert (unknown.value.code, unknown.value.http_status) == ("unknown_model", 404)
    assert (bad.value.code, bad.value.http_status) == ("bad_request", 400)
    assert (failed.value.code, failed.value.http_status) == ("model_error", 500)
    np.testing.assert_allclose(fine["total"], [5.0])  # the worker lives on


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        ("linear", {"input": np.zeros(11, np.float32)}),
        ("linear", {"input": np.zeros((0, 10), np.float32)}),
        ("linear", {"input": np.zeros(10, np.complex64)}),
        ("pair", {"a": np.zeros(3, np.float32)}),
        ("pair", {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}),
        ("pair", {"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 2), np.int64)}),
    ],
)
def test_local_checks_read_like_the_server(
    server: ServerProcess, model: str, inputs: dict[str, np.ndarray]
) -> None:
    wire: dict[str, Any] = {name: tensor(arr) for name, arr in inputs.items()}
    status, _, answer = infer_msgpack(server.url, model, {"inputs": wire})
    assert status == 400
    with Client(server.url) as mb, pytest.raises(client.BadRequest) as info:
        mb.predict(model, inputs)
    assert info.value.message == answer["error"]["message"]


def test_models_ready_and_health(server: ServerProcess) -> None:
    with Client(server.url) as mb:
        assert mb.ready() is True and mb.health() is True
        infos = {m.name: m for m in mb.models()}
    assert list(infos) == ["linear", "mlp", "pair"]
    assert infos["pair"].inputs == (
        TensorSpec("a", "float32", (3,)),
        TensorSpec("b", "int64", (2,)),
    )
    assert infos["mlp"].outputs == (TensorSpec("output", "float32", (10,)),)
    assert infos["linear"].max_batch_size == 64
    assert infos["linear"].batching["max_delay_ms"] == 5.0


def test_sync_client_is_safe_from_many_threads(server: ServerProcess) -> None:
    answers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    failures: list[BaseException] = []

    def work(mb: Client, thread: int) -> None:
        try:
            for i in range(25):
                x = data(1 + i % 4, 10, seed=1000 * thread + i)
                answers[thread, i] = (x, mb.predict("linear", x))
        except BaseException as exc:  # reported to the test thread below
            failures.append(exc)

    with Client(server.url) as mb:
        threads = [threading.Thread(target=work, args=(mb, t)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
    assert not failures, failures
    assert len(answers) == 8 * 25
    for x, y in answers.values():
        assert_model_output("linear", x, y)


LEFT_OPEN = """
import gc, sys
import numpy as np
from client import Client
mb = Client(sys.argv[1])
print(mb.predict("linear", np.ones(10, np.float32))[0])
if sys.argv[2] == "dropped":
    del mb
    gc.collect()
    print("collected")
"""


@pytest.mark.parametrize("how", ["left_open", "dropped"])
def test_a_sync_client_never_closed_exits_without_unclosed_warnings(
    server: ServerProcess, how: str
) -> None:
    # "left_open": still referenced at interpreter exit; "dropped": collected before it.
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", LEFT_OPEN, server.url, how],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[0]) == pytest.approx(
        float(reference_forward("linear", np.ones((1, 10), np.float32))[0, 0]), rel=1e-4
    )
    assert "Unclosed" not in done.stderr and "unclosed" not in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
