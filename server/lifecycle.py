"""Server start-up and shutdown: listen -> load and warm the models in the pool -> start any GPUs
and the router over them (server/routing/devices.py) -> ready; and on SIGTERM/SIGINT: the drain
(server/drain.py: not ready -> refuse new requests -> finish what was admitted -> close the
connections, then the listener) -> stop workers.

Event loop (main process). /healthz answers from the first moment; /readyz only once every
model is loaded and warmed up in every worker (or, with server.on_model_failure = serve_others,
every model that could be, the others listed as missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping

from server.batching.queue import BatchQueue
from server.clock import MonotonicClock
from server.config import Config
from server.cost_gauges import register_cost_gauges
from server.drain import drain, stop_serving
from server.executors.cpu_pool import CpuPool, PoolStartError
from server.http.app import create_server
from server.http.connections import ConnectionMetrics
from server.http.listener import Listener
from server.http.state import Endpoint, Phase, ServerState
from server.metrics import Metrics
from server.protocol.codec import Limits
from server.routing.devices import Devices

log = logging.getLogger(__name__)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the process exit code (0 after a clean drain)."""
    settings = config.server
    state = _new_state(config)
    devices = state.devices = Devices(config, state.clock)
    access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
    server = create_server(state, access_log=access_log)
    async with contextlib.AsyncExitStack() as cleanup:
        # Undone in reverse on every way out: the connections and the listener (a no-op after
        # the drain), then the GPUs and the probe, then the CPU workers.
        cleanup.push_async_callback(_stop_pool, state)
        cleanup.push_async_callback(devices.stop)
        try:
            listener = await Listener.open(server, settings)
        except OSError as exc:  # address in use, a stale path, no permission: say so and stop
            log.error("cannot listen: %s", exc)
            return 1
        cleanup.push_async_callback(stop_serving, server, listener)
        _warn_if_exposed(listener, config)
        for url in listener.urls():
            log.info("listening on %s", url)
        state.metrics.registry.register(ConnectionMetrics(server))
        stop = _stop_signal()
        pool = state.pool = await _new_pool(state, devices)
        if not await _start_pool(state, pool, stop, devices):
            return 0 if stop.is_set() and state.phase is not Phase.FAILED else 1
        _register_gauges(state, pool)
        register_cost_gauges(state.metrics, devices)
        devices.watch_batches(state.metrics)
        state.phase = Phase.READY
        log.info("ready: serving %s", ", ".join(state.endpoints))
        await stop.wait()
        await drain(state, server, listener)
    log.info("stopped")
    return 0


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


def _stop_signal() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _new_pool(state: ServerState, devices: Devices) -> CpuPool:
    workers, cores = state.config.workers, os.cpu_count() or 1
    return CpuPool(
        state.config.models,
        workers.resolved_cpu_workers(cores),
        workers.resolved_threads(cores),
        state.metrics,
        calibrate=await devices.prepare(workers.resolved_threads(cores)),
    )


async def _stop_pool(state: ServerState) -> None:
    if state.pool is not None:
        await state.pool.stop()


def _warn_if_exposed(listener: Listener, config: Config) -> None:
    exposed = listener.exposed()
    if exposed and config.server.auth_token is None:
        log.warning(
            "listening on %s, which others can reach, with no auth token: anyone who reaches "
            "it can run the models. Set MICROBATCH_SERVER_AUTH_TOKEN (or "
            "server.auth_token_file), or listen on 127.0.0.1",
            ", ".join(exposed),
        )


async def _start_pool(
    state: ServerState, pool: CpuPool, stop: asyncio.Event, devices: Devices
) -> bool:
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
        log.error("not serving model %r (server.on_model_failure = serve_others): %s", name, why)
    state.missing = dict(pool.missing)
    await devices.start(pool, models)
    loop = asyncio.get_running_loop()
    for name, info in models.items():
        dispatcher = devices.dispatcher_for(name)
        queue = BatchQueue(
            name,
            info.batching,
            dispatcher,
            state.clock,
            loop,
            state.metrics,
            calibrated=devices.calibrated_cost(name),
        )
        state.endpoints[name] = Endpoint(info, queue)
    return True


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
