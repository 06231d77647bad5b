"""The drain on SIGTERM/SIGINT, in the order that gives every request reaching the server an
HTTP answer:

1. not ready: /readyz answers 503 while requests are served as usual for server.drain_delay_s,
   so that load balancers notice and stop sending (the Kubernetes pre-stop pattern);
2. draining: new requests get 503 shutting_down, every answer carries `Connection: close`, and
   what was admitted is finished (for at most server.drain_timeout_s; then answered with 503);
3. each connection closes after its next answer, or once it has had no request head for
   IDLE_GRACE_S (its client may be sending one right now: closing at once would drop it);
4. the listener closes last, after accepting the connections waiting in its backlog, which are
   answered too.

Event loop (main process); called by lifecycle.py once the stop signal came. Steps 1 and 2 are
the engine's (server/engine.py, shared with other fronts); the connections are this module's.
"""

from __future__ import annotations

import asyncio
import logging

from server.engine import Engine
from server.http.connections import ConnectionServer
from server.http.listener import Listener

log = logging.getLogger(__name__)

IDLE_GRACE_S = 1.0  # how long an idle connection may still bring a request once draining
_FORCE_CLOSE_S = 1.0  # what a connection left at the very end gets before it is cut


async def drain(engine: Engine, server: ConnectionServer, listener: Listener) -> None:
    loop = asyncio.get_running_loop()
    settings = engine.state.config.server
    engine.stop_readiness()
    if settings.drain_delay_s > 0:
        log.info("not ready; serving on for %.1f s (server.drain_delay_s)", settings.drain_delay_s)
        await asyncio.sleep(settings.drain_delay_s)
    deadline = loop.time() + settings.drain_timeout_s
    server.close_after_answers()
    await engine.drain(settings.drain_timeout_s)
    # Connections get at least the grace and one second more, at most what is left of the
    # drain's time beyond that.
    patience_s = max(deadline - loop.time(), IDLE_GRACE_S + 1.0)
    settled = await server.wait_closed(server.close_idle(IDLE_GRACE_S), patience_s)
    for sock in listener.close():
        await server.adopt(sock)
    settled = await server.wait_closed(list(server.open), IDLE_GRACE_S + 1.0) and settled
    if not settled:
        log.warning("%d connections open at the end of the drain; closing them", len(server.open))
    await stop_serving(server, listener)


async def stop_serving(server: ConnectionServer, listener: Listener) -> None:
    """Close the listener and whatever connections are left, now (start-up failed, or the
    drain is over)."""
    for sock in listener.close():
        sock.close()
    server.pre_shutdown()
    await server.shutdown(_FORCE_CLOSE_S)
