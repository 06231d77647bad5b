"""The CUDA executor on a real GPU: answers against the CPU reference, half precision within its
documented error, copies overlapping compute on the streams, the out-of-memory split on the
device, `infer --device gpu`, and routing through a real server. Skipped without CUDA; run by
scripts/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import BatchingConfig, ModelConfig, Placement
from server.executors.cuda_instance import CudaInstance, DeviceCap
from server.models.builtin import reference_forward
from server.models.loading import LoadedModel, load_model
from server.models.spec import TensorSpec
from tests.conftest import infer_msgpack, output_array, request, tensor
from tests.server_process import ServerProcess, start_server

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REPO = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda", 0)


def mlp(half: str = "off", batch: int = 64) -> CudaInstance:
    cfg = ModelConfig(
        "mlp", "builtin:mlp", "builtin", (), BatchingConfig(), Placement(half_precision=half)
    )
    return CudaInstance(load_model(cfg), DEVICE, cfg.placement, batch, DeviceCap(batch))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_fp32_answers_match_the_cpu_reference() -> None:
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    outputs, compute_s = mlp().run_blocking([x])
    assert outputs["output"].shape == (64, 10) and compute_s > 0
    np.testing.assert_allclose(outputs["output"], reference_forward("mlp", x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("half", "bound"), [("fp16", 5e-3), ("bf16", 4e-2)])
def test_half_precision_stays_within_the_documented_error(half: str, bound: float) -> None:
    x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    outputs, _ = mlp(half).run_blocking([x])
    error = relative_error(outputs["output"], reference_forward("mlp", x))
    print(f"{half}: max error {error:.2e} of the largest output")  # shown by gpu_check.sh
    assert outputs["output"].dtype == np.float32
    assert error < bound


def heavy_model(width: int, layers: int) -> LoadedModel:
    modules: list[torch.nn.Module] = [torch.nn.Linear(4 * width, width)]
    modules += [torch.nn.Linear(width, width) for _ in range(layers)]
    spec_in = (TensorSpec("input", "float32", (4 * width,)),)
    spec_out = (TensorSpec("output", "float32", (width,)),)
    return LoadedModel("heavy", torch.nn.Sequential(*modules).eval(), spec_in, spec_out)


def test_the_next_batch_copies_in_while_the_current_one_computes() -> None:
    batch = 256
    # ~550 GFLOP per batch (milliseconds on any GPU) against 16 MB to copy in.
    instance = CudaInstance(heavy_model(4096, 64), DEVICE, Placement(), batch, DeviceCap(batch))
    x = [torch.randn(batch, 4 * 4096)]
    instance.submit(0, x, batch).wait_blocking()  # warm-up: cuBLAS handles, allocator
    first = instance.submit(0, x, batch)
    second = instance.submit(1, x, batch)
    first.wait_blocking()
    second.wait_blocking()
    _, _, _, first_compute_end = first.events
    second_copy_start, second_copy_end, second_compute_start, _ = second.events
    # elapsed_time(a, b) > 0: b happened after a on the device's clock.
    assert second_copy_start.elapsed_time(first_compute_end) > 0  # copy began during compute
    assert second_copy_end.elapsed_time(first_compute_end) > 0  # ... and ended during it
    assert first_compute_end.elapsed_time(second_compute_start) >= 0  # compute stays in order


class Hog(torch.nn.Module):
    """Needs `per_sample_bytes` of scratch per sample: big batches run out of memory."""

    def __init__(self, per_sample_bytes: int) -> None:
        super().__init__()
        self.floats = per_sample_bytes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.empty((x.shape[0], self.floats), device=x.device)
        return x * 2 + scratch[:, :1].zero_()


def test_out_of_memory_splits_the_batch_and_lowers_the_cap() -> None:
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(DEVICE)
    specs = (TensorSpec("input", "float32", (4,)),)
    model = LoadedModel("hog", Hog(free // 6), specs, specs)  # 6 samples would fill the device
    instance = CudaInstance(model, DEVICE, Placement(), 16, DeviceCap(16))
    x = np.arange(64, dtype=np.float32).reshape(16, 4)
    outputs, _ = instance.run_blocking([x])  # 16 and 8 run out; 4 fits
    np.testing.assert_array_equal(outputs["output"], x * 2)
    assert instance.cap.value == 4
    outputs, _ = instance.run_blocking([x])  # split at once now
    np.testing.assert_array_equal(outputs["output"], x * 2)
    torch.cuda.empty_cache()


def test_infer_device_gpu_uses_the_gpu() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/inference.py", "--device", "gpu", "--input", "data/sample1.npy"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Processing input on GPU..." in result.stdout


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cache = tmp_path_factory.mktemp("cal") / "cal.json"
    env = {"MICROBATCH_DEVICES_CALIBRATION_CACHE": str(cache)}
    with start_server("--model", "mlp", env=env) as server:
        yield server


def test_the_server_runs_the_gpu_and_shows_its_costs(gpu_server: ServerProcess) -> None:
    assert "cuda:0 (" in gpu_server.log() and "no CUDA GPU found" not in gpu_server.log()
    _, _, body = request(gpu_server.url, "GET", "/v1/models")
    model = json.loads(body)["models"][0]
    assert model["devices"] == ["cpu", "cuda:0"]
    assert set(model["costs"]) == {"cpu", "cuda:0"}
    x = np.random.default_rng(3).standard_normal((32, 256)).astype(np.float32)
    status, _, answer = infer_msgpack(gpu_server.url, "mlp", {"inputs": {"input": tensor(x)}})
    assert status == 200
    np.testing.assert_allclose(
        output_array(answer), reference_forward("mlp", x), rtol=1e-4, atol=1e-4
    )


def expected_device(costs: dict[str, dict[str, float]], samples: int) -> str | None:
    """The device an idle server should pick for this batch size; None when the two are
    within 20 % of each other (then either answer is right, and corrections may flip it)."""
    cost = {d: c["fixed_ms"] + c["per_sample_ms"] * samples for d, c in costs.items()}
    best, other = sorted(cost, key=cost.__getitem__)
    return best if cost[other] > 1.2 * cost[best] else None


def test_shallow_and_deep_queues_go_where_the_costs_say(gpu_server: ServerProcess) -> None:
    _, _, body = request(gpu_server.url, "GET", "/v1/models")
    costs = json.loads(body)["models"][0]["costs"]
    one = {"inputs": {"input": tensor(np.ones(256, np.float32))}}
    shallow = [infer_msgpack(gpu_server.url, "mlp", one)[2]["device"] for _ in range(100)]
    full = {"inputs": {"input": tensor(np.ones((32, 256), np.float32))}}

    def send_full(_: int) -> str:
        return str(infer_msgpack(gpu_server.url, "mlp", full)[2]["device"])

    with ThreadPoolExecutor(32) as pool:
        deep = list(pool.map(send_full, range(400)))
    counts = {"shallow": Counter(shallow), "deep": Counter(deep)}
    print(f"routing on real devices: {counts}; costs {costs}")  # shown by gpu_check.sh
    small, large = expected_device(costs, 1), expected_device(costs, 32)
    if small is not None:
        assert counts["shallow"][small] >= 80
    if large is not None:
        assert counts["deep"][large] > len(deep) // 2
