"""Where the load goes: the URL (TCP or `unix:///path`) as the client's Address, the path of a
model's infer endpoint, and the model's input specs read from GET /v1/models.

Event loop of a generator process (or the CLI process before the run). HTTP goes through the
client's transport (client/transport.py), the one HTTP client of the project.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from bench.loadgen.errors import LoadGenError
from client.errors import InvalidResponse, TransportError
from client.transport import Address, Transport
from client.wire import ACCEPT_MSGPACK, decode_body
from server.config import ConfigError
from server.models.spec import TensorSpec

LISTING_TIMEOUT_S = 10.0


def parse_target(url: str) -> Address:
    """`http://host:port` (a trailing slash allowed) or `unix:///path/to/socket`."""
    if url.startswith("unix://"):
        if not url.removeprefix("unix://").startswith("/"):
            raise ConfigError(f"--url unix:// needs an absolute socket path, got {url!r}")
        return Address.parse(url)
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.netloc:
        raise ConfigError(f"--url must be http://HOST:PORT or unix:///PATH, got {url!r}")
    if parts.path.strip("/") or parts.query:
        raise ConfigError(f"--url must have no path or query (the tool adds them), got {url!r}")
    return Address.parse(url)


def infer_path(model: str) -> str:
    return f"/v1/models/{model}/infer"


async def fetch_input_specs(target: Address, model: str) -> tuple[TensorSpec, ...]:
    """The model's inputs as the server lists them; LoadGenError if it is absent or unreachable."""
    transport = Transport(max_connections=1)
    try:
        reply = await transport.request(
            target, "GET", "/v1/models", headers=ACCEPT_MSGPACK, timeout_s=LISTING_TIMEOUT_S
        )
    except TransportError as exc:
        raise LoadGenError(f"cannot reach {target.socket_path or target.base_url}: {exc}") from None
    finally:
        await transport.close()
    if reply.status != 200:
        raise LoadGenError(f"GET /v1/models answered {reply.status}")
    try:
        listing = decode_body(reply.body, reply.content_type, "GET /v1/models")
    except InvalidResponse as exc:
        raise LoadGenError(str(exc)) from None
    return specs_of(listing, model)


def specs_of(listing: Any, model: str) -> tuple[TensorSpec, ...]:
    """The input specs of `model` in a /v1/models answer (narrowed from the msgpack boundary)."""
    models = listing.get("models") if isinstance(listing, dict) else None
    if not isinstance(models, list):
        raise LoadGenError("GET /v1/models did not answer a map with a list of models")
    names = []
    for entry in models:
        if not isinstance(entry, dict):
            continue
        names.append(str(entry.get("name")))
        if entry.get("name") == model:
            inputs = entry.get("inputs")
            if not isinstance(inputs, list) or not inputs:
                raise LoadGenError(f"model {model!r} lists no inputs (is it ready?)")
            return tuple(TensorSpec.from_wire(spec) for spec in inputs)
    raise LoadGenError(f"the server has no model {model!r}; it serves: {', '.join(names)}")
