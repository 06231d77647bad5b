"""Optional bearer-token auth (server.auth_token): every endpoint but /healthz then needs
`Authorization: Bearer <token>`; without it, 401 unauthorized with `WWW-Authenticate: Bearer`.

Event loop only. The middleware is added only when a token is configured, so that without one
the hot infer path passes through no middleware at all. The comparison is constant-time.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from server.errors import Unauthorized
from server.http.handlers import error_response, reply_encoding

# A liveness probe must work without the secret; it says nothing but "alive".
OPEN_PATHS = frozenset(("/healthz",))
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="microbatch"'}


def bearer_auth(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or authorized(request.headers.get("Authorization"), expected):
            return await handler(request)
        error = Unauthorized("this server needs a bearer token: Authorization: Bearer <token>")
        return error_response(error, reply_encoding(request), CHALLENGE)

    return check_token


def authorized(header: str | None, expected: bytes) -> bool:
    """Whether an Authorization header carries the token (scheme case-insensitive)."""
    if header is None:
        return False
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest takes as long whatever the first differing byte: no timing oracle.
    return hmac.compare_digest(presented.strip().encode("utf-8", "replace"), expected)
