"""Optional bearer-token auth (server.auth_token): every endpoint but the liveness probes
(/healthz, and /v2/health/live for OIP) then needs `Authorization: Bearer <token>`; without it,
401 unauthorized with `WWW-Authenticate: Bearer`. One exception for probes: /readyz without any
Authorization header answers its status code and phase only (a kubelet's httpGet probe cannot
send a secret); the details stay behind the token.

Event loop only. The path table (app.py) checks the token only when one is configured, so that
without one the hot infer path pays nothing for it. The comparison is constant-time.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from server.errors import Unauthorized
from server.http.handlers import error_response, reply_encoding
from server.http.incoming import Incoming

# Liveness probes (/v1 and OIP) must work without the secret; they say nothing but "alive".
OPEN_PATHS = frozenset(("/healthz", "/v2/health/live"))
# A readiness probe must too. Asked without any Authorization header, these answer the status
# code and the phase (what a load balancer sees anyway), never the failure reason or the
# missing models' names and errors; a wrong token still gets 401, so a misconfigured client
# notices.
PROBE_PATHS = frozenset(("/readyz",))
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="microbatch"'}


def unauthorized(request: Incoming) -> web.Response:
    error = Unauthorized("this server needs a bearer token: Authorization: Bearer <token>")
    return error_response(error, reply_encoding(request), CHALLENGE)


def authorized(header: str | None, expected: bytes) -> bool:
    """Whether an Authorization header carries the token (scheme case-insensitive)."""
    if header is None:
        return False
    scheme, _, presented = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest takes as long whatever the first differing byte: no timing oracle.
    return hmac.compare_digest(presented.strip().encode("utf-8", "replace"), expected)
