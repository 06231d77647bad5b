"""The batcher deployment's replica: one microbatch engine (server/engine.py) per Ray Serve
replica, answering `Call`s from the front through the same path table as the aiohttp server
(server/http/exchange.py), and drained and stopped when Serve stops the replica.

Runs in a Ray Serve replica process, on Serve's user-code event loop (the constructor, every
method and `__del__` run there, as the engine's queues and pool need one loop). Its CPU
workers are child processes of the replica. No starlette: the front owns HTTP.
"""

from __future__ import annotations

import logging

from ray import serve

from server.config import Config
from server.engine import Engine
from server.http.exchange import Answer, Call, Exchange
from server.http.handlers import readiness
from server.ray_serve.logs import log_through_serve

log = logging.getLogger(__name__)
REPLICA_HEADER = "X-Microbatch-Replica"  # which replica answered, for operators and tests


class Batcher:
    # Serve awaits an async constructor (Ray actors allow one); type checkers want None.
    async def __init__(self, config: Config) -> None:  # type: ignore[misc]
        log_through_serve(config.server.log_level)
        self._engine = Engine(config)
        self._exchange = Exchange(self._engine.state)
        self._replica = serve.get_replica_context().replica_id.unique_id
        if not await self._engine.start():
            failure = self._engine.state.failure
            await self._engine.stop()
            # Serve reports the constructor's error and retries the replica.
            raise RuntimeError(f"microbatch could not start: {failure}")

    async def exchange(self, call: Call) -> Answer:
        """One /v1 or /v2 request, answered as the standalone server would answer it."""
        answer = await self._exchange(call)
        return Answer(
            answer.status, (*answer.headers, (REPLICA_HEADER, self._replica)), answer.body
        )

    async def check_health(self) -> None:
        """Serve's health check: it fails while /readyz would answer 503 (a model that no
        worker can run, a replica that is draining); Serve replaces a replica after three
        failures in a row (health_check_period_s apart), so a worker restart passes."""
        status, body = readiness(self._engine.state)
        if status != 200:
            raise RuntimeError(f"microbatch is not ready: {body}")

    async def __del__(self) -> None:
        """Serve calls this once it has stopped routing to the replica and its ongoing
        requests are answered: drain what is left (bounded), then stop the workers."""
        await self._engine.drain(self._engine.state.config.server.drain_timeout_s)
        await self._engine.stop()
        log.info("replica %s stopped", self._replica)
