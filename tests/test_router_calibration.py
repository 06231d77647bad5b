"""Calibration: the sizes profiled, the timing loop (on a fake clock), the cache on disk and its
keys, and the start-up wiring in `Devices` with a fake pool, a fake probe and fake GPUs.
No torch on the GPU side, no processes, no sleeps."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from server.config import (
    BatchingConfig,
    Config,
    DevicesConfig,
    ModelConfig,
    Placement,
    ServerSettings,
    WorkersConfig,
)
from server.cost_gauges import register_cost_gauges
from server.executors.base import Batch, DoneCallback
from server.executors.cuda import CudaStartError
from server.executors.profiling import calibration_sizes, time_sizes_blocking
from server.http.model_listing import describe_routing
from server.metrics import Metrics
from server.models.info import ModelInfo
from server.models.spec import TensorSpec
from server.routing import calibration as cal
from server.routing.cost import CostFit
from server.routing.devices import Devices
from server.routing.router import Router

REPO = Path(__file__).resolve().parents[1]
SPEC_IN = (TensorSpec("input", "float32", (4,)),)
SPEC_OUT = (TensorSpec("output", "float32", (1,)),)


def line(fixed_s: float, per_sample_s: float, sizes: Sequence[int]) -> list[tuple[int, float]]:
    return [(n, fixed_s + per_sample_s * n) for n in sizes]


# --- sizes, keys, cache -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cap", "sizes"),
    [(1, [1]), (2, [1, 2]), (32, [1, 2, 4, 8, 16, 32]), (48, [1, 2, 4, 8, 16, 32, 48])],
)
def test_calibration_sizes_double_up_to_the_cap(cap: int, sizes: list[int]) -> None:
    assert calibration_sizes(cap) == sizes


def model(name: str = "m", path: str = "builtin:mlp", **placement: Any) -> ModelConfig:
    fmt = "builtin" if path.startswith("builtin:") else "export"
    return ModelConfig(name, path, fmt, (), BatchingConfig(), Placement(**placement))


def test_cache_keys_name_everything_a_profile_depends_on(tmp_path: Path) -> None:
    ident = cal.Identity("builtin:mlp", "2.13.0")
    cpu = cal.cache_key(model(), ident, "cpu/EPYC/1t")
    assert cpu == "m | builtin:mlp | cpu/EPYC/1t | torch 2.13.0 | max 32 length 512"
    longer = ModelConfig("m", "builtin:mlp", "builtin", (), BatchingConfig(max_length=1024))
    assert cal.cache_key(longer, ident, "cpu/EPYC/1t") != cpu  # its lengths are others
    gpu = cal.cache_key(model(half_precision="fp16"), ident, "cuda/H200")
    assert gpu.endswith("| half fp16 compile False")
    assert gpu != cal.cache_key(model(compile=True, half_precision="fp16"), ident, "cuda/H200")


def test_a_model_file_is_identified_by_its_contents(tmp_path: Path) -> None:
    path = tmp_path / "m.pt2"
    path.write_bytes(b"one")
    first = cal.identify_blocking(model(path=str(path)))
    path.write_bytes(b"two")
    second = cal.identify_blocking(model(path=str(path)))
    assert first.model_digest.startswith("sha256:") and first != second
    assert cal.identify_blocking(model()).model_digest == "builtin:mlp"
    assert cal.identify_blocking(model(path=str(tmp_path / "gone.pt2"))).model_digest.startswith(
        "unreadable"
    )


def test_the_cache_round_trips_and_merges(tmp_path: Path) -> None:
    path = str(tmp_path / "deep" / "calibration.json")
    assert cal.load_cache_blocking(path) == {}
    cal.save_cache_blocking(path, {"a": [(1, 0.5), (2, 0.75)]})
    cal.save_cache_blocking(path, {"b": [(1, 1.0)]})
    assert cal.load_cache_blocking(path) == {"a": [(1, 0.5), (2, 0.75)], "b": [(1, 1.0)]}
    assert [p.name for p in (tmp_path / "deep").iterdir()] == ["calibration.json"]


@pytest.mark.parametrize(
    "text",
    ["not json", '{"version": 99, "entries": {}}', '{"version": 1, "entries": {"k": {}}}', "[]"],
)
def test_a_bad_cache_reads_as_empty(tmp_path: Path, text: str) -> None:
    path = tmp_path / "calibration.json"
    path.write_text(text)
    assert cal.load_cache_blocking(str(path)) == {}
    cal.save_cache_blocking(str(path), {"k": [(1, 1.0)]})  # and is replaced, not merged
    assert json.loads(path.read_text())["entries"] == {"k": {"points": [[1, 1.0]]}}


def test_the_server_side_of_routing_imports_no_torch() -> None:
    code = (
        "import sys, server.lifecycle, server.routing.devices, server.executors.cuda, "
        "bench.commands.compare; print(sorted({'torch', 'matplotlib'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]"


def test_no_cache_path_means_no_cache(tmp_path: Path) -> None:
    assert cal.load_cache_blocking(None) == {}
    cal.save_cache_blocking(None, {"k": [(1, 1.0)]})
    blocker = tmp_path / "file"
    blocker.write_text("")
    cal.save_cache_blocking(str(blocker / "x.json"), {"k": [(1, 1.0)]})  # logged, not raised


# --- the timing loop --------------------------------------------------------------------------


class FakeTimer:
    """A run of n takes n ms of fake time; records the order of runs."""

    def __init__(self) -> None:
        self.t = 0.0
        self.runs: list[int] = []

    def clock(self) -> float:
        return self.t

    def run(self, n: int) -> None:
        self.runs.append(n)
        self.t += n * 1e-3


def test_sizes_are_timed_in_interleaved_rounds_after_warm_up() -> None:
    fake = FakeTimer()
    timings = time_sizes_blocking(
        fake.run, [1, 2, 4], warmup=1, repeats=3, budget_s=10.0, clock=fake.clock
    )
    assert fake.runs == [1, 2, 4] + [1, 2, 4] * 3
    assert [(t.samples, t.runs) for t in timings] == [(1, 3), (2, 3), (4, 3)]
    assert [t.median_s for t in timings] == pytest.approx([1e-3, 2e-3, 4e-3])


def test_the_budget_bounds_the_sizes_and_the_rounds() -> None:
    fake = FakeTimer()
    timings = time_sizes_blocking(
        fake.run, [1, 10, 100, 1000], warmup=1, repeats=10, budget_s=0.05, clock=fake.clock
    )
    # Warm-up stops at 1 + 10 + 100 ms (over half the budget): 1000 is left to the fit.
    assert [t.samples for t in timings] == [1, 10, 100]
    assert all(t.runs == 3 for t in timings)  # the budget is spent: the minimum of 3 rounds


# --- Devices: start-up wiring with fakes ------------------------------------------------------


class FakePool:
    device = "cpu"
    ready = True

    def __init__(self, calibration: dict[str, list[tuple[int, float]]]) -> None:
        self.calibration = calibration
        self.listeners: list[Callable[[], None]] = []

    def live_workers(self) -> int:
        return 1

    def free_slots(self, model: str) -> int:
        return 2

    def hold_for_fill(self, model: str) -> bool:
        return False

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        raise AssertionError("not in these tests")


class FakeGpu:
    """What Devices reads of a CudaExecutor; start() fails when told to."""

    def __init__(
        self,
        index: int,
        models: tuple[ModelConfig, ...],
        fail: bool = False,
        profile: Callable[[Sequence[int]], list[tuple[int, float]]] | None = None,
    ) -> None:
        self.device, self.gpu_name = f"cuda:{index}", "Fake GPU"
        self.models, self.fail = models, fail
        self.profile = profile or (lambda sizes: line(0.5e-3, 0.01e-3, sizes))
        self.specs: dict[str, tuple[Any, Any]] = {}
        self.calibration: dict[str, list[tuple[int, float]]] = {}
        self.caps = {m.name: m.batching.max_batch_size for m in models}
        self.plan: dict[str, Any] = {}
        self.stopped = False

    async def start(self, timeout_s: float, plan: dict[str, Any]) -> None:
        self.plan = plan
        if self.fail:
            raise CudaStartError("no such CUDA device")
        self.specs = {m.name: (SPEC_IN, SPEC_OUT) for m in self.models}
        self.calibration = {n: self.profile(sizes) for n, sizes in plan.items()}

    async def stop(self) -> None:
        self.stopped = True

    def alive(self) -> bool:
        return not self.fail

    def lanes(self, model: str) -> int:
        return 1

    def cap(self, model: str) -> int:
        return self.caps[model]

    def free_slots(self, model: str) -> int:
        return 2

    def hold_for_fill(self, model: str) -> bool:
        return False

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        pass

    def dispatch(self, batch: Batch, done: DoneCallback) -> None:
        raise AssertionError("not in these tests")


def config(tmp_path: Path, *models: ModelConfig, recalibrate: bool = False) -> Config:
    devices = DevicesConfig(calibration_cache=str(tmp_path / "cal.json"), recalibrate=recalibrate)
    return Config(ServerSettings(), BatchingConfig(), WorkersConfig(), models, devices)


def infos(*models: ModelConfig) -> dict[str, ModelInfo]:
    return {m.name: ModelInfo(m.name, SPEC_IN, SPEC_OUT, m.batching) for m in models}


class Clock:
    def now(self) -> float:
        return 0.0


def make_devices(
    cfg: Config,
    gpus: list[str],
    made: list[FakeGpu],
    fail: bool = False,
    profile: Callable[[Sequence[int]], list[tuple[int, float]]] | None = None,
) -> tuple[Devices, list[int]]:
    probes: list[int] = []

    def probe() -> list[str]:
        probes.append(1)
        return gpus

    def factory(index: int, models: tuple[ModelConfig, ...]) -> Any:
        made.append(FakeGpu(index, models, fail, profile))
        return made[-1]

    return Devices(cfg, Clock(), probe, factory), probes


async def test_without_a_gpu_the_pool_serves_directly_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = model()
    devices, probes = make_devices(config(tmp_path, m), [], [])
    plan = await devices.prepare(threads=1)
    assert plan == {"m": [1, 2, 4, 8, 16, 32]}
    pool = FakePool({"m": line(0.1e-3, 0.1e-3, plan["m"])})
    with caplog.at_level(logging.INFO):
        await devices.start(pool, infos(m))  # type: ignore[arg-type]
    assert caplog.text.count("no CUDA GPU found; running CPU-only") == 1
    assert probes == [1]
    assert devices.dispatcher_for("m") is pool  # no router in the path: nothing changes
    shown = describe_routing(devices, "m")
    assert shown["devices"] == ["cpu"] and shown["crossover_batch_size"] is None
    assert shown["costs"]["cpu"]["fixed_ms"] == pytest.approx(0.1)
    assert shown["costs"]["cpu"]["per_sample_ms"] == pytest.approx(0.1)
    # Cached: the next start needs no profile, unless asked to measure again.
    again, _ = make_devices(config(tmp_path, m), [], [])
    assert await again.prepare(threads=1) == {}
    forced, _ = make_devices(config(tmp_path, m, recalibrate=True), [], [])
    assert await forced.prepare(threads=1) == plan
    other_threads, _ = make_devices(config(tmp_path, m), [], [])
    assert await other_threads.prepare(threads=2) == plan  # another device key


async def test_cpu_only_routing_never_probes(tmp_path: Path) -> None:
    m = model(routing="cpu")
    made: list[FakeGpu] = []
    devices, probes = make_devices(config(tmp_path, m), ["Fake GPU"], made)
    await devices.prepare(threads=1)
    await devices.start(FakePool({}), infos(m))  # type: ignore[arg-type]
    assert probes == [] and made == []


async def test_a_gpu_joins_the_router_with_its_own_calibration(tmp_path: Path) -> None:
    auto, cpu_only, cuda_only = model("a"), model("c", routing="cpu"), model("g", routing="cuda")
    made: list[FakeGpu] = []
    devices, _ = make_devices(config(tmp_path, auto, cpu_only, cuda_only), ["Fake GPU"], made)
    plan = await devices.prepare(threads=1)
    pool = FakePool({n: line(0.1e-3, 0.1e-3, sizes) for n, sizes in plan.items()})
    await devices.start(pool, infos(auto, cpu_only, cuda_only))  # type: ignore[arg-type]
    assert [m.name for m in made[0].models] == ["a", "g"]  # routing = "cpu" stays off the GPU
    assert isinstance(devices.dispatcher_for("a"), Router)
    assert isinstance(devices.dispatcher_for("c"), Router)  # its CPU backlog counts for others
    assert describe_routing(devices, "a")["devices"] == ["cpu", "cuda:0"]
    assert describe_routing(devices, "c")["devices"] == ["cpu"]
    assert describe_routing(devices, "g")["devices"] == ["cuda:0"]
    # 0.1 + 0.1 n against 0.5 + 0.01 n: the GPU wins from n = 5 (4.4 rounded up).
    assert describe_routing(devices, "a")["crossover_batch_size"] == 5
    cached = cal.load_cache_blocking(str(tmp_path / "cal.json"))
    assert sum("cuda/Fake GPU" in k for k in cached) == 2 and len(cached) == 5
    metrics = Metrics()
    register_cost_gauges(metrics, devices)
    text = metrics.render().decode()
    assert 'microbatch_cost_fixed_seconds{device="cuda:0",kind="current",model="a"} 0.0005' in text
    assert 'microbatch_batch_cap{device="cuda:0",model="g"} 32.0' in text
    await devices.stop()
    assert made[0].stopped


async def test_a_gpu_that_fails_to_start_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = model()
    made: list[FakeGpu] = []
    devices, _ = make_devices(config(tmp_path, m), ["Fake GPU"], made, fail=True)
    await devices.prepare(threads=1)
    pool = FakePool({"m": line(0.1e-3, 0.1e-3, [1, 2])})
    await devices.start(pool, infos(m))  # type: ignore[arg-type]
    assert made[0].stopped and devices.gpus == []
    assert devices.dispatcher_for("m") is pool
    assert "cuda:0 could not start (no such CUDA device)" in caplog.text


async def test_bad_calibrations_are_logged_and_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = model()
    devices, _ = make_devices(config(tmp_path, m), [], [])
    await devices.prepare(threads=1)
    await devices.start(FakePool({"m": [(1, 4e-3), (2, 1e-3)]}), infos(m))  # type: ignore[arg-type]
    assert "batch 2 measured at under half the time of batch 1" in caplog.text
    assert cal.load_cache_blocking(str(tmp_path / "cal.json")) == {}


async def test_a_probe_that_breaks_means_no_gpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def probe() -> list[str]:
        raise ValueError("garbled output")

    m = model()
    pool = FakePool({"m": line(0.1e-3, 0.1e-3, [1, 2])})
    devices = Devices(config(tmp_path, m), Clock(), probe)
    await devices.prepare(threads=1)
    with caplog.at_level(logging.INFO):
        await devices.start(pool, infos(m))  # type: ignore[arg-type]
    assert "the CUDA probe failed" in caplog.text
    assert devices.dispatcher_for("m") is pool


async def test_a_gpu_that_sees_other_tensors_is_left_out_for_that_model(tmp_path: Path) -> None:
    m = model()
    made: list[FakeGpu] = []
    devices, _ = make_devices(config(tmp_path, m), ["Fake GPU"], made)
    await devices.prepare(threads=1)
    other = {"m": ModelInfo("m", SPEC_OUT, SPEC_OUT, m.batching)}  # the CPU saw other inputs
    await devices.start(FakePool({"m": line(0.1e-3, 0.1e-3, [1, 2])}), other)  # type: ignore[arg-type]
    assert describe_routing(devices, "m")["devices"] == ["cpu"]


def wild(sizes: Sequence[int]) -> list[tuple[int, float]]:
    """A profile no line comes within 2x of: bursts of other load took every other size."""
    return [(n, 10e-3 if i % 2 else 0.1e-3) for i, n in enumerate(sizes)]


async def test_a_rejected_gpu_calibration_keeps_its_model_on_the_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    auto, forced = model("a"), model("g", routing="cuda")
    made: list[FakeGpu] = []
    devices, _ = make_devices(config(tmp_path, auto, forced), ["Fake GPU"], made, profile=wild)
    plan = await devices.prepare(threads=1)
    pool = FakePool({n: line(0.1e-3, 0.1e-3, sizes) for n, sizes in plan.items()})
    await devices.start(pool, infos(auto, forced))  # type: ignore[arg-type]
    # Routing on that fit would send batches wherever its errors point: the safe default is
    # the CPU alone, as without a GPU. A user who forced the GPU keeps it.
    assert describe_routing(devices, "a")["devices"] == ["cpu"]
    assert describe_routing(devices, "g")["devices"] == ["cuda:0"]
    assert "calibration of 'a' on cuda/Fake GPU rejected: its fit is" in caplog.text
    assert "model 'a' runs on the CPU only: its calibration on cuda/Fake GPU was rejected" in (
        caplog.text
    )
    assert "model 'g' keeps routing = 'cuda' despite its rejected calibration" in caplog.text
    cached = cal.load_cache_blocking(str(tmp_path / "cal.json"))
    assert not any("cuda/" in key for key in cached)  # measured again at the next start
    assert sum("cpu/" in key for key in cached) == 2


async def test_a_calibration_with_an_outlier_is_refitted_without_it_and_not_cached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = model()
    devices, _ = make_devices(config(tmp_path, m), [], [])
    plan = await devices.prepare(threads=1)
    points = line(0.1e-3, 0.1e-3, plan["m"])
    points[3] = (8, 0.1e-3)  # a size that ran 9x too fast: it would pull the fit to itself
    await devices.start(FakePool({"m": points}), infos(m))  # type: ignore[arg-type]
    assert "refitted without the outlier(s) (8, 0.000100)" in caplog.text
    costs = describe_routing(devices, "m")["costs"]["cpu"]
    assert costs["calibrated_fixed_ms"] == pytest.approx(0.1)
    assert costs["calibrated_per_sample_ms"] == pytest.approx(0.1)
    assert cal.load_cache_blocking(str(tmp_path / "cal.json")) == {}


async def test_metrics_show_the_calibrated_and_the_current_costs(tmp_path: Path) -> None:
    m = model()
    made: list[FakeGpu] = []
    devices, _ = make_devices(config(tmp_path, m), ["Fake GPU"], made)
    plan = await devices.prepare(threads=1)
    await devices.start(FakePool({"m": line(0.1e-3, 0.1e-3, plan["m"])}), infos(m))  # type: ignore[arg-type]
    router = devices.router
    assert router is not None
    for _ in range(30):  # what the router's finished batches feed it: 2 ms per full batch
        router._costs[("m", "cuda:0")].observe(32, 2e-3)
    metrics = Metrics()
    register_cost_gauges(metrics, devices)
    text = metrics.render().decode()

    def gauge(name: str, device: str, kind: str) -> float:
        labels = f'{{device="{device}",kind="{kind}",model="m"}}'
        (value,) = [
            line.split()[-1] for line in text.splitlines() if line.startswith(name + labels)
        ]
        return float(value)

    fixed, per_sample = "microbatch_cost_fixed_seconds", "microbatch_cost_per_sample_seconds"
    assert gauge(fixed, "cuda:0", "calibrated") == pytest.approx(0.5e-3)
    assert gauge(per_sample, "cuda:0", "calibrated") == pytest.approx(0.01e-3)
    current = CostFit(gauge(fixed, "cuda:0", "current"), gauge(per_sample, "cuda:0", "current"))
    assert current.cost_s(32) == pytest.approx(2e-3, rel=0.1)  # corrected toward what it saw
    assert gauge(fixed, "cpu", "calibrated") == gauge(fixed, "cpu", "current")  # nothing seen
    assert gauge(per_sample, "cpu", "calibrated") == pytest.approx(0.1e-3)
    await devices.stop()
