"""What GET /v1/models shows of where the models run: per model, the devices its batches may use,
each device's calibrated and current cost, and the batch size from which a GPU is cheaper (the
crossover; for a model with a dynamic dimension at a typical length, max_length // 4, which it
names); and the executors themselves (CPU workers and their pids, each GPU and its caps).

Event loop; plain data read from Devices, its router and the CPU pool. No torch.
"""

from __future__ import annotations

from typing import Any

from server.executors.cpu_pool import CpuPool
from server.models.spec import is_dynamic
from server.routing.cost import UNKNOWN_COST, CostFit
from server.routing.devices import Devices
from server.routing.policy import crossover
from server.routing.routes import CPU


def describe_routing(devices: Devices, model: str) -> dict[str, Any]:
    """Plain data: devices, the calibrated and current costs, the crossover."""
    out: dict[str, Any] = {"devices": devices.devices_of(model), "costs": {}}
    router = devices.router
    if router is None:
        return out
    length = typical_length(devices, model)
    for (name, device), (calibrated, current, observed) in router.costs().items():
        if name == model:
            out["costs"][device] = _costs(calibrated, current, observed, length is not None)
    out["crossover_batch_size"] = crossover_batch_size(devices, model, length or 1)
    if length is not None:
        out["crossover_length"] = length
    return out


def _costs(calibrated: CostFit, current: CostFit, observed: int, dynamic: bool) -> dict[str, Any]:
    """In ms; per_sample is per token where the length varies, and `per_sample_length2_ms`
    (per sample and squared length) is shown for those models only."""
    measured = calibrated is not UNKNOWN_COST
    shown: dict[str, Any] = {
        "calibrated_fixed_ms": calibrated.fixed_s * 1e3 if measured else None,
        "calibrated_per_sample_ms": calibrated.per_sample_s * 1e3 if measured else None,
        "fixed_ms": current.fixed_s * 1e3,
        "per_sample_ms": current.per_sample_s * 1e3,
        "observed_batches": observed,
    }
    if dynamic:
        shown["calibrated_per_sample_length2_ms"] = (
            calibrated.quadratic_s * 1e3 if measured else None
        )
        shown["per_sample_length2_ms"] = current.quadratic_s * 1e3
    return shown


def typical_length(devices: Devices, model: str) -> int | None:
    """The length a crossover is shown at: max_length // 4 for a model with a dynamic
    dimension (requests are mostly well below the cap); None for a fixed shape."""
    info = devices.infos.get(model)
    if info is None or not is_dynamic(info.inputs):
        return None
    return max(1, devices.max_length(model) // 4)


def crossover_batch_size(devices: Devices, model: str, length: int = 1) -> int | None:
    """From which batch size the model's cheapest GPU beats the CPU at this padded length
    (None: it never does)."""
    router, info = devices.router, devices.infos.get(model)
    if router is None or info is None:
        return None
    gpus = [router.cost(model, g.device) for g in devices.gpus if model in g.specs]
    best = min(gpus, key=lambda fit: fit.cost_s(1, length), default=None)
    if best is None:
        return None
    return crossover(router.cost(model, CPU), best, info.batching.max_batch_size, length)


def describe_executors(pool: CpuPool | None, devices: Devices | None) -> list[dict[str, Any]]:
    """The CPU pool's workers, then each GPU: its name, whether it is alive, its caps."""
    executors = []
    if pool is not None:
        executors.append(
            {
                "device": pool.device,
                "workers": pool.live_workers(),
                "busy_workers": pool.busy_workers(),
                "pids": pool.worker_pids(),
            }
        )
    for gpu in devices.gpus if devices else []:
        executors.append(
            {
                "device": gpu.device,
                "name": gpu.gpu_name,
                "alive": gpu.alive(),
                "in_flight_batches": gpu.in_flight(),
                "batch_caps": dict(gpu.caps),
            }
        )
    return executors
