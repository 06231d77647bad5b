"""`microbatch infer`: run a model in this process on a .npy file (the classic CPU/GPU demo).

Main process; imports torch only when it runs.
"""

from __future__ import annotations

import argparse
import os

from server.commands import remote
from server.config import Flags, load_config

DESCRIPTION = (
    "Run a built-in (or configured) model in-process on the samples of a .npy "
    "file and print the device, the prediction and the inference time."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help=".npy file: one sample or a batch")
    p.add_argument("--model", default="linear", help="model name (default linear)")
    p.add_argument(
        "--device",
        choices=["cpu", "gpu", "auto"],
        default="auto",
        help="where to run; gpu falls back to the CPU with a warning where there is none",
    )
    p.add_argument("--config", help="TOML config that names the model, for user models")
    remote.add_url_flags(p, default=None)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.url:
        return remote.run_infer(args)
    from server.infer_local import run_infer

    config = load_config(args.config, os.environ, Flags())
    return run_infer(config, args.model, args.input, args.device, print)
