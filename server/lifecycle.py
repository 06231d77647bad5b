"""Server start-up and shutdown: listen -> load and warm the models in the pool -> start any GPUs
and the router over them (server/routing/devices.py) -> ready; and on SIGTERM/SIGINT: not ready
-> refuse new requests -> finish what was admitted -> stop workers.

Event loop (main process). /healthz answers from the first moment; /readyz only once every
model is loaded and warmed up in every worker (or, with server.on_model_failure = serve_others,
every model that could be, the others listed as missing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from server.batching.queue import BatchQueue
from server.clock import MonotonicClock
from server.config import Config
from server.errors import ShuttingDown
from server.executors.cpu_pool import CpuPool, PoolStartError
from server.http.app import create_server
from server.http.state import Endpoint, Phase, ServerState
from server.http.unix_socket import bind_unix_socket
from server.metrics import Metrics
from server.protocol.codec import Limits
from server.routing.devices import Devices
from server.startup_policy import start_failure

log = logging.getLogger(__name__)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the process exit code (0 after a clean drain)."""
    loop = asyncio.get_running_loop()
    settings = config.server
    state = ServerState(
        config,
        MonotonicClock(),
        Metrics(),
        Limits(
            max_elements=settings.max_elements,
            max_json_bytes=min(settings.max_json_body_bytes, settings.max_body_bytes),
            max_dims=settings.max_dims,
            max_depth=settings.max_msgpack_depth,
            max_items=settings.max_msgpack_items,
            max_str_bytes=settings.max_msgpack_str_bytes,
        ),
    )
    devices = state.devices = Devices(config, state.clock)
    access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
    server = create_server(state, access_log=access_log)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    try:
        await _listen(runner, config)
    except OSError as exc:  # address in use, a stale path, no permission: say so and stop
        log.error("cannot listen: %s", exc)
        await runner.cleanup()
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    cores = os.cpu_count() or 1
    pool = CpuPool(
        config.models,
        config.workers.resolved_cpu_workers(cores),
        config.workers.resolved_threads(cores),
        state.metrics,
        calibrate=await devices.prepare(config.workers.resolved_threads(cores)),
    )
    state.pool = pool
    if not await _start_pool(state, pool, stop, devices):
        await runner.cleanup()
        await devices.stop()
        await pool.stop()
        return 0 if stop.is_set() and state.phase is not Phase.FAILED else 1
    _register_gauges(state, pool)
    devices.register_gauges(state.metrics)
    devices.watch_batches(state.metrics)
    state.phase = Phase.READY
    log.info("ready: serving %s", ", ".join(state.endpoints))

    await stop.wait()
    await _drain(state)
    await runner.cleanup()
    await devices.stop()
    await pool.stop()
    log.info("stopped")
    return 0


async def _listen(runner: web.ServerRunner, config: Config) -> None:
    settings = config.server
    site: web.BaseSite
    if settings.uds:
        site = web.SockSite(runner, bind_unix_socket(settings.uds, settings.uds_mode))
        await site.start()
        log.info("listening on unix://%s", settings.uds)
        return
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    for address in runner.addresses:
        host, port = address[0], address[1]
        shown = f"[{host}]" if ":" in host else host
        log.info("listening on http://%s:%d", shown, port)


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


async def _drain(state: ServerState) -> None:
    """Stop admitting; wait (bounded) until every admitted request has its answer."""
    state.phase = Phase.DRAINING
    for endpoint in state.endpoints.values():
        endpoint.queue.close()
    timeout_s = state.config.server.drain_timeout_s
    log.info(
        "draining: %d samples outstanding, up to %.0f s", state.outstanding_samples(), timeout_s
    )
    idle = [endpoint.queue.wait_idle() for endpoint in state.endpoints.values()]
    try:
        await asyncio.wait_for(asyncio.gather(*idle), timeout_s)
    except asyncio.TimeoutError:
        log.warning("drain timed out with %d samples outstanding", state.outstanding_samples())
        late = ShuttingDown("the server stopped before this request ran (server.drain_timeout_s)")
        for endpoint in state.endpoints.values():
            endpoint.queue.abort(late)
