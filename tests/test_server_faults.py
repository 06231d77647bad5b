"""Faults a user would notice: a model that raises, a killed worker, deadlines, overload,
graceful shutdown, and start-up errors. Real server processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import pytest

from tests import model_files
from tests.conftest import infer_msgpack, output_array, request, tensor
from tests.server_process import ROOT, ServerProcess, start_server


def wait_for(condition, timeout_s: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def metric(server: ServerProcess, prefix: str) -> float:
    text = request(server.url, "GET", "/metrics")[2].decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix)]
    return sum(values)


def worker_pids(server: ServerProcess) -> list[int]:
    body = json.loads(request(server.url, "GET", "/v1/models")[2])
    return [pid for ex in body["executors"] for pid in ex["pids"]]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("faulty")
    neg = model_files.save_script(model_files.RaisesOnNegative(), d / "neg.pt")
    slow = model_files.save_script(model_files.Slow(60), d / "slow.pt")
    with start_server(
        "--model",
        f"neg={neg}:float32[2]",
        "--model",
        f"slow={slow}:float32[4]",
        "--max-batch-size",
        "4",
        "--max-queue-size",
        "8",
    ) as server:
        yield server


def test_model_that_raises_gives_model_error_and_the_server_stays_up(faulty: ServerProcess) -> None:
    status, _, body = infer_msgpack(
        faulty.url, "neg", {"inputs": {"x": tensor(np.array([-1.0, 0.0], np.float32))}}
    )
    assert status == 500
    assert body["error"]["code"] == "model_error"
    assert "negative input rejected" in body["error"]["message"]
    status, _, body = infer_msgpack(
        faulty.url, "neg", {"inputs": {"x": tensor(np.array([1.0, 0.0], np.float32))}}
    )
    assert status == 200 and output_array(body).tolist() == [2.0, 0.0]
    assert request(faulty.url, "GET", "/readyz")[0] == 200


async def _send(
    session: aiohttp.ClientSession, url: str, model: str, x: np.ndarray, **extra: object
) -> tuple[int, dict[str, str], dict[str, object]]:
    async with session.post(
        f"{url}/v1/models/{model}/infer",
        data=msgpack.packb({"inputs": {"x": tensor(x)}, **extra}),
        headers={"Content-Type": "application/msgpack"},
    ) as r:
        return r.status, dict(r.headers), msgpack.unpackb(await r.read())


async def test_expired_deadline_gets_504_and_is_not_computed(faulty: ServerProcess) -> None:
    x = np.zeros((4, 4), np.float32)
    async with aiohttp.ClientSession() as session:
        # Two full batches occupy both slots of the single worker for a while.
        busy = [asyncio.ensure_future(_send(session, faulty.url, "slow", x)) for _ in range(2)]
        await asyncio.to_thread(wait_for, lambda: metric(faulty, "microbatch_busy_workers") >= 1)
        dropped_before = metric(
            faulty, 'microbatch_dropped_requests_total{model="slow",reason="deadline"}'
        )
        status, _, body = await _send(session, faulty.url, "slow", x[:1], timeout_ms=5)
        results = await asyncio.gather(*busy)
    assert status == 504 and body["error"]["code"] == "deadline_exceeded", body
    assert all(s == 200 for s, _, _ in results)
    after = metric(faulty, 'microbatch_dropped_requests_total{model="slow",reason="deadline"}')
    assert after == dropped_before + 1


async def test_full_queue_gets_503_overloaded_with_retry_after(faulty: ServerProcess) -> None:
    x = np.zeros((4, 4), np.float32)
    async with aiohttp.ClientSession() as session:
        sends = [_send(session, faulty.url, "slow", x) for _ in range(8)]
        results = await asyncio.gather(*sends)
    statuses = [s for s, _, _ in results]
    assert 200 in statuses and 503 in statuses, statuses
    for status, headers, body in results:
        if status == 503:
            assert body["error"]["code"] == "overloaded"  # type: ignore[index]
            assert int(headers["Retry-After"]) >= 1


async def test_killed_worker_is_replaced_and_its_batch_still_answered(
    faulty: ServerProcess,
) -> None:
    x = np.ones((4, 4), np.float32)
    (pid,) = worker_pids(faulty)
    restarts = metric(faulty, "microbatch_worker_restarts_total")
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(_send(session, faulty.url, "slow", x, timeout_ms=60000))
        await asyncio.to_thread(wait_for, lambda: metric(faulty, "microbatch_busy_workers") >= 1)
        os.kill(pid, signal.SIGKILL)
        status, _, body = await asyncio.wait_for(pending, 120)
    assert status == 200, body
    np.testing.assert_allclose(output_array(body), x + 1)
    assert metric(faulty, "microbatch_worker_restarts_total") == restarts + 1
    new_pids = worker_pids(faulty)
    assert len(new_pids) == 1 and new_pids[0] != pid


def test_sigterm_drains_admitted_requests_and_exits_zero(tmp_path: Path) -> None:
    slow = model_files.save_script(model_files.Slow(60), tmp_path / "slow.pt")
    server = start_server("--model", f"slow={slow}:float32[4]", "--max-batch-size", "2")

    async def scenario() -> list[int]:
        async with aiohttp.ClientSession() as session:
            sends = [
                asyncio.ensure_future(
                    _send(session, server.url, "slow", np.zeros((2, 4), np.float32))
                )
                for _ in range(6)
            ]
            await asyncio.to_thread(wait_for, lambda: metric(server, "microbatch_busy_workers"))
            server.process.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*sends, return_exceptions=True)
        return [r[0] if isinstance(r, tuple) else -1 for r in results]

    statuses = asyncio.run(scenario())
    assert server.process.wait(60) == 0, server.log()
    # Everything admitted before SIGTERM is answered 200; nothing is lost.
    assert statuses == [200] * 6, statuses


def test_model_that_fails_to_load_stops_start_up_naming_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript file")
    server = start_server("--model", f"bad={broken}:float32[4]", timeout_s=120)
    assert server.process.wait(120) == 1
    assert "bad" in server.log() and "failed to load" in server.log()


def test_bad_flag_value_stops_start_up_naming_the_setting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--max-batch-size", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "max-batch-size" in result.stderr or "max_batch_size" in result.stderr
