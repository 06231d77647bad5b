"""Everything beside the CPU pool: the CUDA probe, one GPU executor per device, the calibrations
(fresh or from the cache), the router over them all; and what lifecycle, the queues and /readyz
read of them (calibrated costs, the batch time limits, availability). /v1/models describes them
in http/model_listing.py, /metrics in cost_gauges.py.

Event loop (main process); hashing, cache files and the probe subprocess run in threads. No
torch here. Without a GPU the queues get the CPU pool itself: nothing changes per batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

import numpy as np

from server.clock import Clock
from server.config import Config, ModelConfig
from server.executors.base import BatchFailed, Dispatcher
from server.executors.contract import FailureKind
from server.executors.cpu_pool import CpuPool
from server.executors.cuda import CudaExecutor, CudaStartError
from server.executors.cuda_probe import probe_cuda_blocking
from server.executors.profiling import calibration_sizes
from server.executors.watchdog import batch_timeout_s
from server.metrics import Metrics
from server.models.info import ModelInfo
from server.models.spec import is_dynamic
from server.routing import calibration as cal
from server.routing.cost import MAX_MISFIT, UNKNOWN_COST, Point, Vetted, vet_points
from server.routing.cost_fit import CostFit
from server.routing.router import Router, Target
from server.routing.routes import CPU, route

log = logging.getLogger(__name__)
ExecutorFactory = Callable[[int, tuple[ModelConfig, ...]], CudaExecutor]


class Devices:
    def __init__(
        self,
        config: Config,
        clock: Clock,
        probe: Callable[[], list[str]] = probe_cuda_blocking,
        executor: ExecutorFactory = CudaExecutor,
    ) -> None:
        self._config = config
        self._clock = clock
        self._probe = probe
        self._make_executor = executor
        self._cache_path = config.devices.resolved_calibration_cache()
        self._cached: dict[str, cal.Points] = {}
        self._idents: dict[str, cal.Identity] = {}
        self._probing: asyncio.Task[list[str]] | None = None
        self._cpu_id = ""
        self._pool: CpuPool | None = None
        self.infos: dict[str, ModelInfo] = {}  # the models the CPU pool serves (from start)
        self.gpus: list[CudaExecutor] = []
        self.router: Router | None = None
        self._rejected: dict[str, list[str]] = {}  # model -> devices whose calibration failed
        self._untrusted: set[tuple[str, str]] = set()  # the same as (model, device name)

    async def prepare(self, threads: int) -> dict[str, list[int]]:
        """Starts the CUDA probe and reads the cache; returns what the CPU pool should time."""
        if any(m.placement.routing != CPU for m in self._config.models):
            self._probing = asyncio.create_task(asyncio.to_thread(self._probe))
        self._cpu_id, self._idents, self._cached = await asyncio.to_thread(
            self._read_blocking, threads
        )
        return {
            m.name: calibration_sizes(m.batching.max_batch_size)
            for m in self._config.models
            if self._stale(m, self._cpu_id)
        }

    def _read_blocking(
        self, threads: int
    ) -> tuple[str, dict[str, cal.Identity], dict[str, cal.Points]]:
        idents = {m.name: cal.identify_blocking(m) for m in self._config.models}
        return cal.cpu_device_id(threads), idents, cal.load_cache_blocking(self._cache_path)

    def _key(self, cfg: ModelConfig, device_id: str) -> str:
        return cal.cache_key(cfg, self._idents[cfg.name], device_id)

    def _stale(self, cfg: ModelConfig, device_id: str) -> bool:
        return self._config.devices.recalibrate or self._key(cfg, device_id) not in self._cached

    async def start(self, pool: CpuPool, infos: Mapping[str, ModelInfo]) -> None:
        """After the pool: GPU executors, then the router over everything that started."""
        self._pool, self.infos = pool, dict(infos)
        names = await self._probed()
        wanted = tuple(
            m for m in self._config.models if m.placement.routing != CPU and m.name in infos
        )
        if self._probing is not None and not names:
            log.info("no CUDA GPU found; running CPU-only")
        for index in range(len(names)) if wanted else ():
            await self._start_gpu(index, wanted)
        fresh: dict[str, cal.Points] = {}
        costs = {
            (name, CPU): self._points(name, self._cpu_id, pool.calibration, fresh) for name in infos
        }
        for gpu in self.gpus:
            gpu_id = cal.cuda_device_id(gpu.gpu_name)
            for name in gpu.specs:
                costs[(name, gpu.device)] = self._points(name, gpu_id, gpu.calibration, fresh)
        ids = {CPU: self._cpu_id, **{g.device: cal.cuda_device_id(g.gpu_name) for g in self.gpus}}
        self._untrusted = {(m, d) for m, d in costs if ids[d] in self._rejected.get(m, ())}
        if fresh:
            log.info("calibrated: %s", "; ".join(sorted(fresh)))
        await asyncio.to_thread(cal.save_cache_blocking, self._cache_path, fresh)
        self.router = Router(self._targets(pool), self._routes(), costs, self._clock, CPU)

    async def _probed(self) -> list[str]:
        if self._probing is None:
            return []
        try:
            return await self._probing
        except Exception:  # a boundary: a probe that breaks means no GPU, not no server
            log.exception("the CUDA probe failed")
            return []

    async def _start_gpu(self, index: int, wanted: tuple[ModelConfig, ...]) -> None:
        gpu = self._make_executor(index, wanted)
        plan = {m.name: calibration_sizes(m.batching.max_batch_size) for m in wanted}
        try:
            await gpu.start(self._config.workers.start_timeout_s, plan)
        except (CudaStartError, asyncio.TimeoutError, OSError) as exc:
            log.error("cuda:%d could not start (%s); it is left out", index, exc or "timed out")
            await gpu.stop()
            return
        except Exception:  # a boundary: a GPU that fails to start must not stop the server
            log.exception("cuda:%d could not start; it is left out", index)
            await gpu.stop()
            return
        for name, specs in list(gpu.specs.items()):
            info = self.infos[name]
            if specs != (info.inputs, info.outputs):
                log.error(
                    "cuda:%d sees other tensors for model %r than the CPU; left out", index, name
                )
                del gpu.specs[name]
        if not gpu.specs:
            await gpu.stop()
            return
        self.gpus.append(gpu)

    def _points(
        self,
        model: str,
        device_id: str,
        measured: Mapping[str, cal.Points],
        fresh: dict[str, cal.Points],
    ) -> cal.Points:
        """The points the router fits, vetted: a calibration that fails its check is refitted
        without its outliers, and one that still misses its points by too much is rejected
        (its model then stays on the CPU, see _routes). Neither is cached: the next start
        measures again."""
        cfg = self._config.model(model)
        key = self._key(cfg, device_id)
        points = measured.get(model) or self._cached.get(key) or []
        vetted = vet_points(points)
        _log_vetted(model, device_id, vetted)
        if vetted.rejected:
            self._rejected.setdefault(model, []).append(device_id)
        if model in measured and not vetted.problems and not vetted.dropped:
            fresh[key] = points
        return list(vetted.points)

    def _targets(self, pool: CpuPool) -> list[Target]:
        targets = [
            Target(
                CPU,
                pool,
                lambda model: max(1, pool.live_workers()),
                lambda model: self.infos[model].batching.max_batch_size,
                lambda: pool.ready,
            )
        ]
        targets += [Target(g.device, g, g.lanes, g.cap, g.alive, _out_of_memory) for g in self.gpus]
        return targets

    def _routes(self) -> dict[str, tuple[str, ...]]:
        routes = {}
        for cfg in self._config.models:
            gpus = [g.device for g in self.gpus if cfg.name in g.specs]
            decided = route(cfg.name, cfg.placement.routing, gpus, self._rejected.get(cfg.name, []))
            if decided.note:
                log.log(logging.ERROR if decided.severe else logging.WARNING, "%s", decided.note)
            routes[cfg.name] = decided.devices
        return routes

    def dispatcher_for(self, model: str) -> Dispatcher:
        """The router where there is a choice to make, else the pool itself (no cost per batch)."""
        if self.router is None or not self.gpus:
            assert self._pool is not None
            return self._pool
        return self.router

    async def stop(self) -> None:
        if self._probing is not None and not self._probing.done():
            self._probing.cancel()
        for gpu in self.gpus:
            await gpu.stop()

    def calibrated_cost(self, model: str) -> Callable[[int, int], float] | None:
        """The model's calibrated batch cost, seconds for n samples padded to length L (1 for a
        fixed shape), at its cheapest among the devices it may use (a batch goes where it
        finishes first); None where nothing usable was measured (the calibration failed its
        check, or no executor timed it)."""
        fits = self._calibrated_fits(model)
        if not fits:
            return None
        if len(fits) == 1:
            return fits[0].cost_s
        return lambda samples, length: min(fit.cost_s(samples, length) for fit in fits)

    def batch_cost(self, model: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """calibrated_cost over numpy arrays of (samples, length): the length-aware formation
        scores all its candidate batches at once."""
        fits = self._calibrated_fits(model)
        if not fits:
            return None

        def cost(samples: np.ndarray, length: np.ndarray) -> np.ndarray:
            tokens = samples * length
            each = [f.fixed_s + (f.per_sample_s + f.quadratic_s * length) * tokens for f in fits]
            return np.asarray(np.min(each, axis=0), dtype=np.float64)

        return cost

    def _calibrated_fits(self, model: str) -> list[CostFit]:
        if self.router is None:
            return []
        return [
            calibrated
            for (name, device), (calibrated, _, _) in self.router.costs().items()
            if name == model
            and device in self.router.route(model)
            and calibrated is not UNKNOWN_COST
            and (name, device) not in self._untrusted
        ]

    def watch_batches(self, metrics: Metrics) -> None:
        """Starts the stuck-batch watchdogs: each executor gets every model's time limit there
        (workers.batch_timeout_s, or derived from that device's calibrated cost)."""
        configured = self._config.workers.batch_timeout_s
        executors: list[tuple[str, CpuPool | CudaExecutor]] = []
        if self._pool is not None:
            executors.append((CPU, self._pool))
        executors += [(g.device, g) for g in self.gpus]
        for device, executor in executors:
            limits = {
                name: batch_timeout_s(configured, self._full_batch_s(name, device))
                for name in self.infos
            }

            def count(model: str, device: str = device) -> None:
                metrics.batch_timeout(model, device)

            executor.set_batch_timeouts(limits, count)

    def _full_batch_s(self, model: str, device: str) -> float | None:
        if self.router is None or (model, device) in self._untrusted:
            return None
        calibrated = self.router.costs().get((model, device), (UNKNOWN_COST,))[0]
        if calibrated is UNKNOWN_COST:
            return None
        info = self.infos[model]
        # The longest batch a dynamic model may form: a batch of the longest requests must not
        # trip the watchdog.
        length = self.max_length(model) if is_dynamic(info.inputs) else 1
        return calibrated.cost_s(info.batching.max_batch_size, length)

    def max_length(self, model: str) -> int:
        """The longest padded length a batch of this model may have (config; dynamic models)."""
        return self._config.model(model).batching.max_length

    def unavailable(self, model: str) -> str | None:
        """Why no executor can run this model's batches now, or None if one can."""
        reasons = []
        for device in self.devices_of(model):
            executor = self._pool if device == CPU else self._gpu(device)
            if executor is None:
                continue
            why = executor.unavailable()
            if why is None:
                return None
            reasons.append(why)
        return "; ".join(reasons) or None

    def _gpu(self, device: str) -> CudaExecutor | None:
        return next((g for g in self.gpus if g.device == device), None)

    def devices_of(self, model: str) -> list[str]:
        """The executors this model may use, as configured (the dead ones included)."""
        if self.router is None:
            return [CPU]
        return list(self.router.route(model))


def _log_vetted(model: str, device_id: str, vetted: Vetted) -> None:
    if vetted.problems:
        log.warning("calibration of %r on %s: %s", model, device_id, "; ".join(vetted.problems))
    if vetted.dropped:
        log.warning(
            "calibration of %r on %s: refitted without the outlier(s) %s (samples, %sseconds)",
            model,
            device_id,
            ", ".join(_describe(p) for p in vetted.dropped),
            "length, " if any(len(p) == 3 for p in vetted.dropped) else "",
        )
    if vetted.points and vetted.rejected:
        log.error(
            "calibration of %r on %s rejected: its fit is %.1fx off at a measured batch size "
            "(more than %.1fx)",
            model,
            device_id,
            1.0 + vetted.misfit,
            1.0 + MAX_MISFIT,
        )


def _describe(point: Point) -> str:
    *ints, seconds = point
    return "(" + ", ".join([*(str(i) for i in ints), f"{seconds:.6f}"]) + ")"


def _out_of_memory(failure: BatchFailed) -> bool:
    return failure.kind is FailureKind.OUT_OF_MEMORY
