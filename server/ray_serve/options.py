"""How the two deployments of the Ray Serve application are sized and scaled, as plain data:
`ServeOptions` (replicas, autoscaling on ongoing requests, CPUs and GPUs per replica) and the
Serve options dicts derived from it and from the microbatch Config.

Pure Python (no ray import), so the defaults are tested without a cluster; app.py applies them.
Where Ray itself has a default we do not want (max_ongoing_requests = 5 starves a batcher of
batch-mates), the reason is beside the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.config import Config, ConfigError

# Executors' stop after the drain: the CPU pool's 10 s join plus one (as in docs/deploy.md).
_STOP_S = 11.0


@dataclass(frozen=True)
class ServeOptions:
    """The knobs a Ray user turns; every other Serve option keeps Serve's default."""

    num_replicas: int | None = None  # a fixed count; None: autoscale between min and max
    min_replicas: int = 1
    max_replicas: int = 4
    # Requests in flight per batcher replica that autoscaling aims at; None: the largest
    # model's max_batch_size times the replica's CPU workers (a full batch per worker).
    target_ongoing_requests: float | None = None
    # In flight per batcher replica before Serve queues in front of it; None: the largest
    # model's max_queue_size, so that microbatch's own admission (503 overloaded with
    # Retry-After, deadline shedding) decides, not a queue outside it.
    max_ongoing_requests: int | None = None
    upscale_delay_s: float = 10.0  # a new replica is useful only once warm: start it early
    downscale_delay_s: float = 300.0
    num_cpus: float | None = None  # Ray CPUs per batcher replica; None: its CPU workers
    num_gpus: float = 0.0  # GPUs per batcher replica (the CUDA executor uses what Ray gives)
    front_num_cpus: float = 0.25  # the front only forwards bytes
    front_replicas: int | None = None  # a fixed count; None: autoscale from 1

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_replicas", "front_replicas"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            problems.append(
                "need 0 <= min_replicas <= max_replicas and max_replicas >= 1, got "
                f"{self.min_replicas} and {self.max_replicas}"
            )
        for name in ("target_ongoing_requests", "max_ongoing_requests", "num_cpus"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be > 0, got {value}")
        for name in ("upscale_delay_s", "downscale_delay_s", "num_gpus", "front_num_cpus"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise ConfigError("; ".join(problems))

    @staticmethod
    def from_args(args: Mapping[str, str]) -> ServeOptions:
        """From `serve run ... key=value` arguments (strings); unknown keys are refused."""
        fields = {f.name: f for f in dataclasses.fields(ServeOptions)}
        unknown = sorted(set(args) - set(fields) - {"config"})
        if unknown:
            raise ConfigError(f"unknown argument(s) {unknown}; known: config, {sorted(fields)}")
        values: dict[str, Any] = {}
        for name, text in args.items():
            if name == "config":
                continue
            kind = int if "int" in str(fields[name].type) else float
            try:
                values[name] = kind(text)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {text!r}") from None
        return ServeOptions(**values)


def replica_workers(config: Config, options: ServeOptions) -> Config:
    """The config each batcher replica runs: an automatic worker count (workers.cpu_workers =
    0) becomes the replica's Ray CPUs, one torch thread each, since a node's core count says
    nothing about the share Ray gave this replica."""
    workers = config.workers
    cpu_workers = workers.cpu_workers or max(1, int(options.num_cpus or 1))
    threads = workers.threads_per_worker or 1
    return dataclasses.replace(
        config,
        workers=dataclasses.replace(workers, cpu_workers=cpu_workers, threads_per_worker=threads),
    )


def batcher_options(config: Config, options: ServeOptions) -> dict[str, Any]:
    """`Deployment.options(...)` of the batcher; `config` as replica_workers made it."""
    workers = config.workers.cpu_workers
    longest_queue = max(m.batching.max_queue_size for m in config.models)
    return {
        **_scaling(options, _batcher_target(config, options)),
        "max_ongoing_requests": options.max_ongoing_requests or longest_queue,
        "ray_actor_options": {
            "num_cpus": options.num_cpus if options.num_cpus is not None else float(workers),
            "num_gpus": options.num_gpus,
        },
        # Serve waits for the replica's ongoing requests, then calls its __del__: our drain and
        # the executors' stop must fit in what Serve allows before it kills the process.
        "graceful_shutdown_timeout_s": config.server.drain_timeout_s + _STOP_S,
    }


def front_options(config: Config, options: ServeOptions) -> dict[str, Any]:
    """The front holds a request only while its batcher computes: it scales on four batchers'
    worth of requests in flight (from 1 up to as many replicas as the batcher may have), and
    never queues before the batcher's own admission."""
    batcher = batcher_options(config, options)
    if options.front_replicas is not None:
        scaling: dict[str, Any] = {"num_replicas": options.front_replicas}
    else:
        most = max(options.max_replicas, options.num_replicas or 1)
        target = _batcher_target(config, options)
        scaling = _scaling(
            dataclasses.replace(options, num_replicas=None, min_replicas=1, max_replicas=most),
            4.0 * target,
        )
    return {
        **scaling,
        "max_ongoing_requests": 4 * int(batcher["max_ongoing_requests"]),
        "ray_actor_options": {"num_cpus": options.front_num_cpus},
    }


def _batcher_target(config: Config, options: ServeOptions) -> float:
    biggest_batch = max(m.batching.max_batch_size for m in config.models)
    return options.target_ongoing_requests or float(biggest_batch * config.workers.cpu_workers)


def _scaling(options: ServeOptions, target: float) -> dict[str, Any]:
    if options.num_replicas is not None:
        return {"num_replicas": options.num_replicas}
    return {
        "autoscaling_config": {
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": target,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
        }
    }
