"""The front deployment: Serve's HTTP proxy hands it each request; it forwards the request as
plain data (a `Call`) to a batcher replica through a deployment handle and turns the `Answer`
back into HTTP. Going through a handle matters when a batcher replica dies: Ray re-sends a handle
call whose replica died before answering to another replica (a request the proxy streams to the
replica itself would get Serve's bare 500). What Ray fails instead, the front answers 503
shutting_down (retryable, Retry-After: 1) in the request's own protocol and encoding, as a
draining server would, so that clients and proxies that retry 503s lose nothing.

Runs in a Ray Serve replica process (no engine, no torch, no CPU workers); crosses to the
batcher only through the handle, with plain data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from server.errors import ShuttingDown
from server.http.exchange import Answer, Call, error_answer
from server.ray_serve.logs import log_through_serve

log = logging.getLogger(__name__)


class Front:
    def __init__(self, batcher: DeploymentHandle[Any], log_level: str = "info") -> None:
        log_through_serve(log_level)
        self._batcher = batcher

    async def __call__(self, request: Request) -> Response:
        call = Call.of(
            request.method, path_of(request.scope), request.headers.items(), await request.body()
        )
        try:
            answer: Answer = await self._batcher.exchange.remote(call)
        except RayActorError as exc:  # ActorDiedError, ActorUnavailableError
            log.warning("a batcher replica was lost with a request in flight: %s", exc)
            lost = ShuttingDown("the replica serving this request stopped; retry")
            answer = error_answer(call, lost)
        return Response(answer.body, status_code=answer.status, headers=dict(answer.headers))


def path_of(scope: Mapping[str, Any]) -> str:
    """The request's path below the application's route prefix (Serve mounts the application
    at route_prefix; the path table knows only /v1, /v2 and the probes)."""
    path = str(scope["path"])
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"
