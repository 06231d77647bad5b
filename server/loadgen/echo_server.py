"""The HTTP ceiling, and the generator's test target: a bare aiohttp + uvloop server that decodes
the msgpack body and answers it back, with no model and no batching. --delay-ms holds each
request that long and --slots limits how many are held at once (a server of known latency and
capacity). `python -m server.loadgen.echo_server --port 0`; logs "listening on URL" when up.

Its own process, one event loop; imports no torch. GET /stats counts the answers given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
from aiohttp import web

from server.models.builtin import LAYERS, builtin_input_spec

log = logging.getLogger("microbatch.echo")


@dataclass
class EchoState:
    delay_s: float
    slots: asyncio.Semaphore | None
    answered: int = 0


ECHO: web.AppKey[EchoState] = web.AppKey("echo", EchoState)


async def infer(request: web.Request) -> web.Response:
    state = request.app[ECHO]
    arrived = time.monotonic()
    body = msgpack.unpackb(await request.read(), raw=False)
    queue_ms = compute_ms = 0.0
    if state.slots is not None:
        async with state.slots:
            started = time.monotonic()
            queue_ms = (started - arrived) * 1000.0
            await asyncio.sleep(state.delay_s)
            compute_ms = (time.monotonic() - started) * 1000.0
    elif state.delay_s > 0:
        await asyncio.sleep(state.delay_s)
        compute_ms = (time.monotonic() - arrived) * 1000.0
    answer = {
        "outputs": body["inputs"],
        "id": body.get("id"),
        "model": request.match_info["model"],
        "batch_size": 1,
        "device": "echo",
        "queue_ms": queue_ms,
        "compute_ms": compute_ms,
    }
    state.answered += 1
    return web.Response(
        body=msgpack.packb(answer, use_bin_type=True), content_type="application/msgpack"
    )


async def list_models(request: web.Request) -> web.Response:
    """The built-in models' inputs, so that a load generator can make bodies of their shape."""
    models = [
        {"name": name, "inputs": [s.to_wire() for s in builtin_input_spec(name)]} for name in LAYERS
    ]
    return _msgpack({"models": models})


async def stats(request: web.Request) -> web.Response:
    return _msgpack({"answered": request.app[ECHO].answered})


def _msgpack(obj: object) -> web.Response:
    return web.Response(
        body=msgpack.packb(obj, use_bin_type=True), content_type="application/msgpack"
    )


def create_app(delay_ms: float, slots: int) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[ECHO] = EchoState(delay_ms / 1000.0, asyncio.Semaphore(slots) if slots > 0 else None)
    app.router.add_post("/v1/models/{model}/infer", infer)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/stats", stats)
    return app


async def serve(args: argparse.Namespace) -> int:
    runner = web.AppRunner(create_app(args.delay_ms, args.slots), access_log=None)
    await runner.setup()
    if args.uds:
        await web.UnixSite(runner, args.uds).start()
        log.info("listening on unix://%s", args.uds)
    else:
        await web.TCPSite(runner, args.host, args.port).start()
        for address in runner.addresses:
            log.info("listening on http://%s:%d", address[0], address[1])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200, help="0 picks a free port")
    parser.add_argument("--uds", metavar="PATH", help="listen on this Unix socket instead")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="hold each request this long")
    parser.add_argument("--slots", type=int, default=0, help="requests held at once (0 = any)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.slots < 0:
        parser.error("--delay-ms and --slots must be >= 0")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.loadgen.fanout import run_on_loop

    return run_on_loop(lambda: serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
