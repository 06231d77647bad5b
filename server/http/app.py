"""The aiohttp application factory: routes and the error middleware, nothing else.

Event loop only. Start-up and shutdown of the pool live in lifecycle.py.
"""

from __future__ import annotations

from aiohttp import web

from server.http import handlers
from server.http.auth import bearer_auth
from server.http.state import ServerState


def create_app(state: ServerState) -> web.Application:
    token = state.config.server.auth_token
    # Only with a token: without one, the hot infer path passes through no middleware.
    middlewares = [bearer_auth(token)] if token else []
    app = web.Application(
        client_max_size=state.config.server.max_body_bytes, middlewares=middlewares
    )
    app[handlers.STATE] = state
    app.router.add_post("/v1/models/{model}/infer", handlers.infer)
    app.router.add_get("/v1/models", handlers.list_models)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_get("/metrics", handlers.metrics)
    # Catch-alls, added last: other methods on known paths, then unknown paths.
    for path in ("/v1/models/{model}/infer", "/v1/models", "/healthz", "/readyz", "/metrics"):
        app.router.add_route("*", path, handlers.method_not_allowed)
    app.router.add_route("*", "/{tail:.*}", handlers.not_found)
    return app
