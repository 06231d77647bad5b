"""The Ray Serve application: a front deployment (Serve's HTTP ingress) over a batcher
deployment, sized by options.py. `serve run server.ray_serve.app:app_builder config=FILE.toml
num_replicas=2`, a Serve config file's `import_path: server.ray_serve.app:app_builder`, or
`serve.run(build_app(config))` from Python.

Runs in the process that deploys (the Serve driver); the Config is loaded there, once, and
shipped to every replica with the deployment.
"""

from __future__ import annotations

import os

from ray import serve
from ray.serve import Application

from server.config import Config, Flags, load_config
from server.ray_serve.front import Front
from server.ray_serve.options import (
    ServeOptions,
    batcher_options,
    front_options,
    replica_workers,
)
from server.ray_serve.replica import Batcher

BATCHER = "MicrobatchBatcher"  # deployment names, as Serve's status and config files show them
FRONT = "MicrobatchFront"


def build_app(config: Config, options: ServeOptions | None = None) -> Application:
    options = options or ServeOptions()
    config = replica_workers(config, options)
    batcher = serve.deployment(name=BATCHER, **batcher_options(config, options))(Batcher)
    front = serve.deployment(name=FRONT, **front_options(config, options))(Front)
    return front.bind(batcher.bind(config), config.server.log_level)


def app_builder(args: dict[str, str]) -> Application:
    """For `serve run` and Serve config files: `config` is a microbatch TOML file (MICROBATCH_*
    variables of the driver's environment apply as for `microbatch serve`); every other
    argument is a ServeOptions field."""
    config = load_config(args.get("config"), os.environ, Flags())
    return build_app(config, ServeOptions.from_args(args))
