"""The serving core without a transport: the CPU pool, any GPUs and the router (Devices), one
BatchQueue per model and the ServerState the handlers read; started, drained and stopped here.

Event loop (the process that owns the queues). Every front uses it the same way: the aiohttp
server (lifecycle.py) and a Ray Serve replica (server/ray_serve/) build an Engine,
`start()` it, answer requests through the path table (http/app.py, http/exchange.py), and
`drain()` and `stop()` it. No listener, no signals and no aiohttp here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from server.batching.lengths import Lengths
from server.batching.queue import BatchQueue
from server.clock import MonotonicClock
from server.config import Config
from server.cost_gauges import register_cost_gauges
from server.errors import ShuttingDown
from server.executors.cpu_pool import CpuPool, PoolStartError
from server.http.state import Endpoint, Phase, ServerState
from server.metrics import Metrics
from server.models.spec import is_dynamic
from server.protocol.codec import Limits
from server.routing.devices import Devices

log = logging.getLogger(__name__)

_RUNNING_S = 60.0  # how long batches already in an executor may still take after a drain


class Engine:
    """Owns the core's start order (load and warm the models in the pool -> GPUs and the
    router -> one queue per model -> ready) and its way out (drain -> stop)."""

    def __init__(self, config: Config) -> None:
        self.state = _new_state(config)
        self._devices = self.state.devices = Devices(config, self.state.clock)

    async def start(self, stop: asyncio.Event | None = None) -> bool:
        """Start everything and set the phase to READY; False (phase FAILED, or STARTING when
        `stop` was set first) when it cannot serve. Call `stop()` on every way out."""
        state, devices = self.state, self._devices
        workers, cores = state.config.workers, os.cpu_count() or 1
        pool = state.pool = CpuPool(
            state.config.models,
            workers.resolved_cpu_workers(cores),
            workers.resolved_threads(cores),
            state.metrics,
            calibrate=await devices.prepare(workers.resolved_threads(cores)),
        )
        if not await self._start_pool(pool, stop or asyncio.Event()):
            return False
        _register_gauges(state, pool)
        register_cost_gauges(state.metrics, devices)
        devices.watch_batches(state.metrics)
        state.phase = Phase.READY
        log.info("ready: serving %s", ", ".join(state.endpoints))
        return True

    async def _start_pool(self, pool: CpuPool, stop: asyncio.Event) -> bool:
        state = self.state
        start = asyncio.ensure_future(pool.start(state.config.workers.start_timeout_s))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not start.done():
            start.cancel()
            log.info("stopped during start-up")
            return False
        try:
            models = start.result()
        except PoolStartError as exc:
            state.phase, state.failure = Phase.FAILED, str(exc)
            log.error("start-up failed: %s", exc)
            return False
        failure = start_failure(pool.missing, state.config.server.on_model_failure)
        if failure:
            state.phase, state.failure = Phase.FAILED, failure
            log.error("start-up failed: %s", failure)
            return False
        for name, why in pool.missing.items():
            log.error(
                "not serving model %r (server.on_model_failure = serve_others): %s", name, why
            )
        state.missing = dict(pool.missing)
        await self._devices.start(pool, models)
        loop = asyncio.get_running_loop()
        for name, info in models.items():
            queue = BatchQueue(
                name,
                info.batching,
                self._devices.dispatcher_for(name),
                state.clock,
                loop,
                state.metrics,
                calibrated=self._devices.calibrated_cost(name),
                lengths=(
                    Lengths.of(
                        info.outputs, info.batching.length_aware, self._devices.batch_cost(name)
                    )
                    if is_dynamic(info.inputs)
                    else None
                ),
            )
            state.endpoints[name] = Endpoint(info, queue)
        return True

    def stop_readiness(self) -> None:
        """Not ready from now on (/readyz 503), though requests are still served."""
        self.state.stopping = True

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests (503 shutting_down) and wait, at most `timeout_s`, until every
        admitted request has its answer; past that, what is still queued gets a 503."""
        state = self.state
        state.stopping = True
        state.phase = Phase.DRAINING
        for endpoint in state.endpoints.values():
            endpoint.queue.close()
        log.info(
            "draining: %d samples outstanding, up to %.0f s", state.outstanding_samples(), timeout_s
        )
        if await self._all_answered(timeout_s):
            return
        log.warning("drain timed out with %d samples outstanding", state.outstanding_samples())
        late = ShuttingDown("the server stopped before this request ran (server.drain_timeout_s)")
        for endpoint in state.endpoints.values():
            endpoint.queue.abort(late)
        # A batch already in an executor still runs to its end, and its requests get its answers.
        if not await self._all_answered(_RUNNING_S):
            log.warning("%d samples still running after the drain", state.outstanding_samples())

    async def _all_answered(self, timeout_s: float) -> bool:
        idle = [endpoint.queue.wait_idle() for endpoint in self.state.endpoints.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*idle), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop the GPUs and the probe, then the CPU workers (safe at any phase, and twice)."""
        await self._devices.stop()
        if self.state.pool is not None:
            await self.state.pool.stop()


def _new_state(config: Config) -> ServerState:
    settings = config.server
    limits = Limits(
        max_elements=settings.max_elements,
        max_json_bytes=min(settings.max_json_body_bytes, settings.max_body_bytes),
        max_dims=settings.max_dims,
        max_depth=settings.max_msgpack_depth,
        max_items=settings.max_msgpack_items,
        max_str_bytes=settings.max_msgpack_str_bytes,
    )
    return ServerState(config, MonotonicClock(), Metrics(), limits)


def _register_gauges(state: ServerState, pool: CpuPool) -> None:
    metrics = state.metrics
    metrics.add_gauge(
        "microbatch_queue_depth",
        "Samples waiting in each model's queue.",
        "model",
        lambda: {name: float(e.queue.queued_samples) for name, e in state.endpoints.items()},
    )
    metrics.add_gauge(
        "microbatch_busy_workers",
        "Workers running a batch, by device.",
        "device",
        lambda: {pool.device: float(pool.busy_workers())},
    )
    metrics.add_gauge(
        "microbatch_workers",
        "Live workers, by device.",
        "device",
        lambda: {pool.device: float(pool.live_workers())},
    )


def start_failure(missing: Mapping[str, str], on_model_failure: str) -> str | None:
    """What start-up does when some models failed to load or warm up: None to go on (nothing
    missing, or server.on_model_failure = serve_others); else why start-up stops."""
    if not missing or on_model_failure == "serve_others":
        return None
    names = ", ".join(sorted(missing))
    reasons = "; ".join(missing[name] for name in sorted(missing))
    return (
        f"model(s) {names} failed to load: {reasons} "
        '(server.on_model_failure = "serve_others" serves the other models)'
    )
