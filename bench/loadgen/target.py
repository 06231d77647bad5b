"""Where the load goes: the URL (TCP or `unix:///path`), the HTTP client session for it, and the
model's input specs read from GET /v1/models.

Event loop of a generator process (or the CLI process before the run). aiohttp's client only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgpack

from bench.loadgen.errors import LoadGenError
from server.config import ConfigError
from server.models.spec import TensorSpec

MSGPACK_HEADERS = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}


@dataclass(frozen=True)
class Target:
    base_url: str  # what goes before the path in each request
    uds: str | None = None  # the Unix socket the connection goes to, if any

    def infer_url(self, model: str) -> str:
        return f"{self.base_url}/v1/models/{model}/infer"


def parse_target(url: str) -> Target:
    """`http://host:port` (a trailing slash allowed) or `unix:///path/to/socket`."""
    if url.startswith("unix://"):
        path = url.removeprefix("unix://")
        if not path.startswith("/"):
            raise ConfigError(f"--url unix:// needs an absolute socket path, got {url!r}")
        return Target("http://localhost", path)
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.netloc:
        raise ConfigError(f"--url must be http://HOST:PORT or unix:///PATH, got {url!r}")
    if parts.path.strip("/") or parts.query:
        raise ConfigError(f"--url must have no path or query (the tool adds them), got {url!r}")
    return Target(f"http://{parts.netloc}")


def open_session(
    target: Target, connections: int, client_timeout_s: float
) -> aiohttp.ClientSession:
    """One keep-alive session; at most `connections` sockets (further requests wait for one,
    and that wait counts in their latency)."""
    connector: aiohttp.BaseConnector
    if target.uds:
        connector = aiohttp.UnixConnector(path=target.uds, limit=connections)
    else:
        connector = aiohttp.TCPConnector(limit=connections, use_dns_cache=True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=client_timeout_s),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )


async def fetch_input_specs(target: Target, model: str) -> tuple[TensorSpec, ...]:
    """The model's inputs as the server lists them; LoadGenError if it is absent or unreachable."""
    async with open_session(target, 1, 10.0) as session:
        try:
            async with session.get(
                f"{target.base_url}/v1/models", headers=MSGPACK_HEADERS
            ) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
            raise LoadGenError(f"cannot reach {target.uds or target.base_url}: {exc}") from None
    if status != 200:
        raise LoadGenError(f"GET /v1/models answered {status}")
    return specs_of(msgpack.unpackb(body, raw=False), model)


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
