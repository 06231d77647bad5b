"""Server start-up and shutdown around the serving core (server/engine.py): listen -> start the
engine (load and warm the models in the pool, any GPUs and the router, the queues) -> ready; and
on SIGTERM/SIGINT: the drain (server/drain.py: not ready -> refuse new requests -> finish what
was admitted -> close the connections, then the listener) -> stop the engine.

Event loop (main process). /healthz answers from the first moment; /readyz only once every
model is loaded and warmed up in every worker (or, with server.on_model_failure = serve_others,
every model that could be, the others listed as missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from server.config import Config
from server.drain import drain, stop_serving
from server.engine import Engine
from server.http.app import create_server
from server.http.connections import ConnectionMetrics
from server.http.listener import Listener
from server.http.state import Phase

log = logging.getLogger(__name__)


async def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the process exit code (0 after a clean drain)."""
    settings = config.server
    engine = Engine(config)
    state = engine.state
    access_log = logging.getLogger("aiohttp.access") if settings.access_log else None
    server = create_server(state, access_log=access_log)
    async with contextlib.AsyncExitStack() as cleanup:
        # Undone in reverse on every way out: the connections and the listener (a no-op after
        # the drain), then the engine (the GPUs and the probe, then the CPU workers).
        cleanup.push_async_callback(engine.stop)
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
        if not await engine.start(stop):
            return 0 if stop.is_set() and state.phase is not Phase.FAILED else 1
        await stop.wait()
        await drain(engine, server, listener)
    log.info("stopped")
    return 0


def _stop_signal() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _warn_if_exposed(listener: Listener, config: Config) -> None:
    exposed = listener.exposed()
    if exposed and config.server.auth_token is None:
        log.warning(
            "listening on %s, which others can reach, with no auth token: anyone who reaches "
            "it can run the models. Set MICROBATCH_SERVER_AUTH_TOKEN (or "
            "server.auth_token_file), or listen on 127.0.0.1",
            ", ".join(exposed),
        )
