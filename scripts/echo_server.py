"""The HTTP ceiling: a bare aiohttp + uvloop server that decodes the msgpack body and answers
with it, no model, no batching. `python scripts/echo_server.py --port 8200`.
"""

from __future__ import annotations

import argparse

import msgpack
import uvloop
from aiohttp import web


async def infer(request: web.Request) -> web.Response:
    body = msgpack.unpackb(await request.read(), raw=False)
    answer = {"outputs": body["inputs"], "id": body.get("id"), "model": "echo"}
    return web.Response(
        body=msgpack.packb(answer, use_bin_type=True), content_type="application/msgpack"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8200)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/v1/models/{model}/infer", infer)
    uvloop.run(web._run_app(app, host=args.host, port=args.port, access_log=None, print=None))


if __name__ == "__main__":
    main()
