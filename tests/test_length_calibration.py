"""Calibration over lengths: the (samples, length) points a dynamic model is timed at, a real
profile of a tiny torch module in the worker's code (its times are not asserted), the Ready
message and the cache carrying lengths, and what Devices makes of them with a fake pool and a
fake GPU: the cost by length in /v1/models and /metrics, the admission prior, the watchdog's
limit at max_length; and `microbatch compare --length`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench.commands.compare import _batch, _length
from server.config import BatchingConfig, ConfigError, ModelConfig, Placement
from server.cost_gauges import register_cost_gauges
from server.executors.contract import Ready, decode_from_worker, encode
from server.executors.cpu_worker import profile_cpu_blocking
from server.executors.profiling import (
    TOKENS_PER_POINT,
    calibration_lengths,
    calibration_points,
    calibration_sizes,
    zero_inputs,
)
from server.http.model_listing import describe_routing
from server.metrics import Metrics
from server.models.info import ModelInfo
from server.models.loading import LoadedModel
from server.models.spec import TensorSpec
from server.routing import calibration as cal
from server.routing.cost import CostFit
from server.routing.devices import Devices
from server.routing.policy import crossover
from tests.test_router_calibration import SPEC_OUT, Clock, FakeGpu, FakePool, config, make_devices

REPO = Path(__file__).resolve().parents[1]
IDS = (TensorSpec("ids", "int64", (-1,)),)
FEATURES = (TensorSpec("input", "float32", (4,)),)
CPU_COST = CostFit(2e-3, 3e-6, 5e-8)
GPU_COST = CostFit(4e-3, 0.1e-6, 2e-9)


def timed(fit: CostFit, sizes: list[int], max_length: int = 512) -> list[tuple[int, int, float]]:
    return [(n, at, fit.cost_s(n, at)) for n, at in calibration_points(sizes, IDS, max_length)]


def encoder(name: str = "enc", max_length: int = 512, **placement: Any) -> ModelConfig:
    batching = BatchingConfig(max_batch_size=32, max_length=max_length)
    return ModelConfig(name, "builtin:enc", "builtin", (), batching, Placement(**placement))


# --- the plan ---------------------------------------------------------------------------------


def test_a_dynamic_model_is_timed_at_three_lengths_within_a_token_budget() -> None:
    assert calibration_lengths(512) == [8, 64, 512]
    assert calibration_lengths(100) == [8, 28, 100] and calibration_lengths(4) == [4]
    points = calibration_points(calibration_sizes(32), IDS, 512)
    assert points == [(1, 8), (1, 64), (32, 8), (1, 512), (4, 512), (32, 64)]  # cheapest first
    assert max(n * at for n, at in points) <= TOKENS_PER_POINT
    assert calibration_points([1], IDS, 512) == [(1, 8), (1, 64), (1, 512)]  # max_batch_size 1


def test_a_fixed_shape_is_timed_at_its_sizes_as_before() -> None:
    sizes = calibration_sizes(32)
    assert calibration_points(sizes, FEATURES, 512) == [(n, 1) for n in sizes]


def test_zero_inputs_take_the_length_where_a_dimension_is_dynamic() -> None:
    frames = (TensorSpec("frames", "float32", (-1, 80)), TensorSpec("mask", "bool", (-1,)))
    shapes = [a.shape for a in zero_inputs(frames, 4, 100)]
    assert shapes == [(4, 100, 80), (4, 100)]
    assert zero_inputs(FEATURES, 3)[0].shape == (3, 4)


# --- the worker's profile and its message -----------------------------------------------------


class Pooled(torch.nn.Module):
    """Token ids -> a mean-pooled embedding: its time grows with the length."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(100, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).mean(dim=1)


def test_the_worker_times_a_dynamic_model_over_lengths_and_a_fixed_one_over_sizes() -> None:
    torch.manual_seed(0)
    models = {
        "enc": LoadedModel("enc", Pooled().eval(), IDS),
        "lin": LoadedModel("lin", torch.nn.Linear(4, 1).eval(), FEATURES),
    }
    configs = [
        encoder(max_length=64),
        ModelConfig("lin", "builtin:linear", "builtin", (), BatchingConfig()),
    ]
    plan = {"enc": calibration_sizes(8), "lin": calibration_sizes(4)}
    report = profile_cpu_blocking(models, plan, configs)
    assert [p[:2] for p in report["enc"]] == calibration_points(plan["enc"], IDS, 64)
    assert all(len(p) == 3 and p[-1] > 0 for p in report["enc"])
    assert [p[0] for p in report["lin"]] == [1, 2, 4]
    assert all(len(p) == 2 and p[-1] > 0 for p in report["lin"])  # as before: no length
    # Over the pipe: lengths kept, a fixed shape's points as small as before.
    ready = decode_from_worker(encode(Ready(report, {}, [])))
    assert isinstance(ready, Ready) and ready.timings == report


def test_the_cache_keeps_lengths_and_ignores_an_older_version(tmp_path: Path) -> None:
    path = str(tmp_path / "cal.json")
    fresh = {"enc-key": timed(CPU_COST, [1, 32]), "mlp-key": [(1, 1e-3), (32, 2e-3)]}
    cal.save_cache_blocking(path, fresh)
    assert cal.load_cache_blocking(path) == fresh
    Path(path).write_text('{"version": 1, "entries": {"k": {"points": [[1, 1.0]]}}}')
    assert cal.load_cache_blocking(path) == {}


# --- Devices: costs by length ----------------------------------------------------------------


class WatchedPool(FakePool):
    def __init__(self, calibration: dict[str, Any]) -> None:
        super().__init__(calibration)
        self.limits: dict[str, float] = {}

    def set_batch_timeouts(self, limits: dict[str, float], on_timeout: Any) -> None:
        self.limits = dict(limits)


class DynamicGpu(FakeGpu):
    """A fake GPU that loads the model with token ids, as the CPU does."""

    async def start(self, timeout_s: float, plan: dict[str, Any]) -> None:
        await super().start(timeout_s, plan)
        self.specs = {m.name: (IDS, SPEC_OUT) for m in self.models}


def dynamic_infos(*models: ModelConfig) -> dict[str, ModelInfo]:
    return {m.name: ModelInfo(m.name, IDS, SPEC_OUT, m.batching) for m in models}


async def test_a_gpu_and_the_cpu_are_compared_at_a_typical_length(tmp_path: Path) -> None:
    enc = encoder()

    def gpu(index: int, models: tuple[ModelConfig, ...]) -> Any:
        return DynamicGpu(index, models, profile=lambda sizes: timed(GPU_COST, sizes))

    devices = Devices(config(tmp_path, enc), Clock(), lambda: ["Fake GPU"], gpu)
    plan = await devices.prepare(threads=1)
    assert plan == {"enc": calibration_sizes(32)}  # the sizes; the worker adds the lengths
    await devices.start(FakePool({"enc": timed(CPU_COST, plan["enc"])}), dynamic_infos(enc))  # type: ignore[arg-type]
    shown = describe_routing(devices, "enc")
    assert shown["crossover_length"] == 128  # max_length // 4
    assert shown["crossover_batch_size"] == crossover(CPU_COST, GPU_COST, 32, 128) == 2
    cpu = shown["costs"]["cpu"]
    assert cpu["calibrated_per_sample_length2_ms"] == pytest.approx(CPU_COST.quadratic_s * 1e3)
    assert cpu["per_sample_ms"] == pytest.approx(CPU_COST.per_sample_s * 1e3)
    prior = devices.calibrated_cost("enc")
    assert prior is not None
    for n, at in ((1, 8), (8, 256), (32, 512)):  # the cheaper device at each
        assert prior(n, at) == pytest.approx(min(CPU_COST.cost_s(n, at), GPU_COST.cost_s(n, at)))
    metrics = Metrics()
    register_cost_gauges(metrics, devices)
    text = metrics.render().decode()
    name = "microbatch_cost_per_sample_length_squared_seconds"
    line = f'{name}{{device="cuda:0",kind="calibrated",model="enc"}}'
    (value,) = [row.split()[-1] for row in text.splitlines() if row.startswith(line)]
    assert float(value) == pytest.approx(GPU_COST.quadratic_s)
    cached = cal.load_cache_blocking(str(tmp_path / "cal.json"))
    assert sorted(len(p) for points in cached.values() for p in points) == [3] * 12
    await devices.stop()


async def test_a_fixed_shape_model_shows_no_length(tmp_path: Path) -> None:
    m = ModelConfig("m", "builtin:mlp", "builtin", (), BatchingConfig())
    devices, _ = make_devices(config(tmp_path, m), ["Fake GPU"], [])
    plan = await devices.prepare(threads=1)
    pool = FakePool({"m": [(n, 1e-4 + 1e-4 * n) for n in plan["m"]]})
    infos = {"m": ModelInfo("m", FEATURES, SPEC_OUT, m.batching)}
    await devices.start(pool, infos)  # type: ignore[arg-type]
    shown = describe_routing(devices, "m")
    assert "crossover_length" not in shown and shown["crossover_batch_size"] == 5
    assert "per_sample_length2_ms" not in shown["costs"]["cpu"]
    await devices.stop()


async def test_the_watchdog_allows_a_full_batch_at_max_length(tmp_path: Path) -> None:
    enc, short = encoder(), encoder("short", max_length=8)
    devices, _ = make_devices(config(tmp_path, enc, short), [], [])
    plan = await devices.prepare(threads=1)
    pool = WatchedPool({n: timed(CPU_COST, sizes) for n, sizes in plan.items()})
    await devices.start(pool, dynamic_infos(enc, short))  # type: ignore[arg-type]
    devices.watch_batches(Metrics())
    # 32 x 512 costs 0.47 s calibrated: 50x that; at max_length 8 the 5 s floor.
    assert pool.limits["enc"] == pytest.approx(50 * CPU_COST.cost_s(32, 512))
    assert pool.limits["short"] == 5.0
    await devices.stop()


# --- microbatch compare --length --------------------------------------------------------------


def test_compare_times_a_dynamic_model_at_a_length() -> None:
    assert _length(encoder(), IDS, None) == 128  # max_length // 4
    assert _length(encoder(), IDS, 300) == 300
    with pytest.raises(ConfigError, match="between 1 and the model's max_length"):
        _length(encoder(), IDS, 513)
    with pytest.raises(ConfigError, match="has no dynamic dimension"):
        _length(encoder(), FEATURES, 16)
    assert _length(encoder(), FEATURES, None) is None
    (ids,) = _batch(IDS, 4, None, 300)
    assert ids.shape == (4, 300) and ids.dtype == np.int64


def test_compare_refuses_a_length_for_a_fixed_shape_model() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "compare", "--model", "linear", "--length", "16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--length: model 'linear' has no dynamic dimension" in result.stderr
