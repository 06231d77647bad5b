"""`microbatch serve`: parse the flags, load the config, run the server on uvloop.

Main process; the server itself lives in lifecycle.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any

from server.config import Flags, load_config

log = logging.getLogger("microbatch")


DESCRIPTION = (
    "Run the server. With no arguments it serves the built-in models linear and "
    "mlp on http://127.0.0.1:8000. Settings come from defaults < --config TOML < "
    "MICROBATCH_* variables < these flags (see docs/configuration.md)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (see configs/default.toml)")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME[=PATH[:SPEC]]",
        help="serve a model (repeatable): a built-in name (linear, mlp, encoder), NAME=model.pt2, "
        "or NAME=model.pt:float32[16] for TorchScript (several inputs: "
        "NAME=m.pt:a=float32[3];b=int64[2])",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--uds", metavar="PATH", help="listen on this Unix socket instead of TCP")
    p.add_argument("--max-batch-size", type=int, help="samples per batch, every model")
    p.add_argument(
        "--max-delay-ms", type=float, help="longest a request is held for batch-mates, every model"
    )
    p.add_argument(
        "--max-queue-size", type=int, help="samples that may wait per model before 503 overloaded"
    )
    p.add_argument("--timeout-ms", type=float, help="default request deadline, every model")
    p.add_argument("--cpu-workers", type=int, help="CPU worker processes (0 = cores - 1)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    flags = Flags(
        host=args.host,
        port=args.port,
        uds=args.uds,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        max_queue_size=args.max_queue_size,
        timeout_ms=args.timeout_ms,
        cpu_workers=args.cpu_workers,
        models=tuple(args.model),
    )
    config = load_config(args.config, os.environ, flags)
    level = args.log_level or config.server.log_level
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log.info("effective config: %s", config.redacted())
    from server.lifecycle import serve

    return run_event_loop(lambda: serve(config))


def run_event_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; running on the slower asyncio event loop")
        return asyncio.run(main())
    return int(uvloop.run(main()))
