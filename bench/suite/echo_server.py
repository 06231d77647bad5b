"""The HTTP ceiling, and the generator's test target: a bare aiohttp + uvloop server that decodes
the msgpack body and answers it back, with no model and no batching. It runs on aiohttp's
low-level server, as microbatch does (server/http/app.py), so that the ceiling is the HTTP stack
microbatch itself runs on; `--app` serves the same through aiohttp's Application and router,
the usual way to write an aiohttp server (about a third slower per request). --delay-ms holds each
request that long and --slots limits how many are held at once (a server of known latency and
capacity). `python -m bench.suite.echo_server --port 0`; logs "listening on URL" when up.

Its own process, one event loop; imports no torch. GET /stats counts the answers given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from aiohttp import web

from server.http.app import infer_model
from server.models.builtin import LAYERS, builtin_input_spec

log = logging.getLogger("microbatch.echo")
MAX_BODY_BYTES = 64 * 1024 * 1024


@dataclass
class EchoState:
    delay_s: float
    slots: asyncio.Semaphore | None
    answered: int = 0


async def infer(state: EchoState, request: web.BaseRequest, model: str) -> web.Response:
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
        "model": model,
        "batch_size": 1,
        "device": "echo",
        "queue_ms": queue_ms,
        "compute_ms": compute_ms,
    }
    state.answered += 1
    return _msgpack(answer)


def list_models() -> web.Response:
    """The built-in models' inputs, so that a load generator can make bodies of their shape."""
    models = [
        {"name": name, "inputs": [s.to_wire() for s in builtin_input_spec(name)]} for name in LAYERS
    ]
    return _msgpack({"models": models})


def _msgpack(obj: object) -> web.Response:
    return web.Response(
        body=msgpack.packb(obj, use_bin_type=True), content_type="application/msgpack"
    )


def low_level_handler(state: EchoState) -> Callable[[web.BaseRequest], Awaitable[web.Response]]:
    async def handle(request: web.BaseRequest) -> web.Response:
        model = infer_model(request.path)
        if model is not None and request.method == "POST":
            return await infer(state, request, model)
        if request.path == "/v1/models":
            return list_models()
        if request.path == "/stats":
            return _msgpack({"answered": state.answered})
        return web.Response(status=404)

    return handle


_STATE: web.AppKey[EchoState] = web.AppKey("echo", EchoState)


def create_app(state: EchoState) -> web.Application:
    async def app_infer(request: web.Request) -> web.Response:
        return await infer(request.app[_STATE], request, request.match_info["model"])

    async def app_models(request: web.Request) -> web.Response:
        return list_models()

    async def app_stats(request: web.Request) -> web.Response:
        return _msgpack({"answered": request.app[_STATE].answered})

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_STATE] = state
    app.router.add_post("/v1/models/{model}/infer", app_infer)
    app.router.add_get("/v1/models", app_models)
    app.router.add_get("/stats", app_stats)
    return app


async def serve(args: argparse.Namespace) -> int:
    state = EchoState(args.delay_ms / 1000.0, asyncio.Semaphore(args.slots) if args.slots else None)
    runner: web.BaseRunner
    if args.app:
        runner = web.AppRunner(create_app(state), access_log=None)
    else:
        loop = asyncio.get_running_loop()

        def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any) -> Any:
            return web.BaseRequest(
                message, payload, protocol, writer, task, loop, client_max_size=MAX_BODY_BYTES
            )

        server = web.Server(low_level_handler(state), request_factory=make_request, access_log=None)
        runner = web.ServerRunner(server)
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
    parser.add_argument(
        "--app",
        action="store_true",
        help="serve through aiohttp's Application and router instead of its low-level server",
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0 or args.slots < 0:
        parser.error("--delay-ms and --slots must be >= 0")
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bench.loadgen.fanout import run_on_loop

    return run_on_loop(lambda: serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
