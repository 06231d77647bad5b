"""What GET /v1/models shows of where the models run: per model, the devices its batches may use,
each device's calibrated and current cost, and the batch size from which a GPU is cheaper (the
crossover); and the executors themselves (CPU workers and their pids, each GPU and its caps).

Event loop; plain data read from Devices, its router and the CPU pool. No torch.
"""

from __future__ import annotations

from typing import Any

from server.executors.cpu_pool import CpuPool
from server.routing.cost import UNKNOWN_COST
from server.routing.devices import Devices
from server.routing.policy import crossover
from server.routing.routes import CPU


def describe_routing(devices: Devices, model: str) -> dict[str, Any]:
    """Plain data: devices, the calibrated and current costs, the crossover."""
    out: dict[str, Any] = {"devices": devices.devices_of(model), "costs": {}}
    router = devices.router
    if router is None:
        return out
    for (name, device), (calibrated, current, observed) in router.costs().items():
        if name == model:
            measured = calibrated is not UNKNOWN_COST
            out["costs"][device] = {
                "calibrated_fixed_ms": calibrated.fixed_s * 1e3 if measured else None,
                "calibrated_per_sample_ms": calibrated.per_sample_s * 1e3 if measured else None,
                "fixed_ms": current.fixed_s * 1e3,
                "per_sample_ms": current.per_sample_s * 1e3,
                "observed_batches": observed,
            }
    out["crossover_batch_size"] = crossover_batch_size(devices, model)
    return out


def crossover_batch_size(devices: Devices, model: str) -> int | None:
    """From which batch size the model's cheapest GPU beats the CPU (None: it never does)."""
    router, info = devices.router, devices.infos.get(model)
    if router is None or info is None:
        return None
    gpus = [router.cost(model, g.device) for g in devices.gpus if model in g.specs]
    best = min(gpus, key=lambda fit: fit.cost_s(1), default=None)
    if best is None:
        return None
    return crossover(router.cost(model, CPU), best, info.batching.max_batch_size)


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
