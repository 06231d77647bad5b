"""A real server without a GPU: it says once that it runs CPU-only, answers from the CPU, shows
the calibrated costs in /v1/models and /metrics, and writes its calibration cache. One server
process for the whole module (the GPU counterpart is in test_cuda.py)."""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import infer_msgpack, request, tensor
from tests.server_process import ServerProcess, start_server

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the CPU-only behaviour; test_cuda.py covers a GPU"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calibration")


@pytest.fixture(scope="module")
def server(cache_dir: Path) -> Iterator[ServerProcess]:
    config = cache_dir / "config.toml"
    config.write_text(
        textwrap.dedent(
            """
            [models.mlp]
            path = "builtin:mlp"
            [models.linear]
            path = "builtin:linear"
            routing = "cuda"
            """
        )
    )
    env = {"MICROBATCH_DEVICES_CALIBRATION_CACHE": str(cache_dir / "cal.json")}
    with start_server("--config", str(config), env=env) as process:
        yield process


def test_it_says_once_that_it_runs_cpu_only(server: ServerProcess) -> None:
    log = server.log()
    assert log.count("no CUDA GPU found; running CPU-only") == 1
    assert "model 'linear' has routing = 'cuda' but no GPU runs it: CPU" in log


def test_answers_come_from_the_cpu(server: ServerProcess) -> None:
    x = np.ones((3, 256), np.float32)
    status, _, body = infer_msgpack(server.url, "mlp", {"inputs": {"input": tensor(x)}})
    assert status == 200 and body["device"] == "cpu"
    status, _, body = infer_msgpack(
        server.url, "linear", {"inputs": {"input": tensor(np.ones(10, np.float32))}}
    )
    assert status == 200 and body["device"] == "cpu"


def test_models_show_devices_and_calibrated_costs(server: ServerProcess) -> None:
    status, _, body = request(server.url, "GET", "/v1/models")
    assert status == 200
    models = {m["name"]: m for m in json.loads(body)["models"]}
    mlp = models["mlp"]
    assert (mlp["routing"], mlp["devices"], mlp["crossover_batch_size"]) == ("auto", ["cpu"], None)
    cost = mlp["costs"]["cpu"]
    assert cost["calibrated_fixed_ms"] >= 0 and cost["calibrated_per_sample_ms"] >= 0
    assert cost["fixed_ms"] + 32 * cost["per_sample_ms"] > 0
    assert models["linear"]["routing"] == "cuda" and models["linear"]["devices"] == ["cpu"]
    executors = json.loads(body)["executors"]
    assert [e["device"] for e in executors] == ["cpu"]


def test_metrics_export_costs_and_batches_per_device(server: ServerProcess) -> None:
    infer_msgpack(server.url, "mlp", {"inputs": {"input": tensor(np.ones(256, np.float32))}})
    _, _, body = request(server.url, "GET", "/metrics")
    text = body.decode()
    for name in ("microbatch_cost_fixed_seconds", "microbatch_cost_per_sample_seconds"):
        for kind in ("calibrated", "current"):
            labels = f'{{device="cpu",kind="{kind}",model="mlp"}}'
            assert re.search(rf"^{name}{labels} [0-9.e+-]+$", text, re.M), (name, kind)
    batches = re.search(
        r'^microbatch_batches_total{device="cpu",model="mlp",outcome="ok"} ([0-9.]+)$', text, re.M
    )
    assert batches and float(batches.group(1)) >= 1


def test_the_calibration_is_cached_on_disk(server: ServerProcess, cache_dir: Path) -> None:
    # A calibration that failed its sanity check (a busy machine) is logged and not cached;
    # every other one is.
    flagged = set(re.findall(r"calibration of '(\w+)' on cpu/", server.log()))
    path = cache_dir / "cal.json"
    entries = json.loads(path.read_text())["entries"] if path.exists() else {}
    cached = {key.split(" | ")[0] for key in entries}
    assert cached == {"mlp", "linear"} - flagged
    assert all(len(e["points"]) >= 2 for e in entries.values())
