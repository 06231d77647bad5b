"""The Ray Serve application's sizing (server/ray_serve/options.py), pure: the defaults follow
the microbatch config (a full batch per worker in flight as the autoscaling target, the longest
queue as Serve's cap so microbatch's own admission decides), fixed counts replace autoscaling,
and bad values are refused with their names.
"""

from __future__ import annotations

import dataclasses

import pytest

from server.config import ConfigError, Flags, load_config
from server.ray_serve.options import (
    ServeOptions,
    batcher_options,
    front_options,
    replica_workers,
)


def test_defaults_autoscale_on_ongoing_requests() -> None:
    options = ServeOptions(num_cpus=2)
    config = replica_workers(load_config(None, {}, Flags()), options)
    assert (config.workers.cpu_workers, config.workers.threads_per_worker) == (2, 1)
    batcher = batcher_options(config, options)
    assert batcher["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 64.0,  # max_batch_size 32 x 2 workers
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 300.0,
    }
    assert batcher["max_ongoing_requests"] == 2048  # batching.max_queue_size
    assert batcher["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.0}
    assert batcher["graceful_shutdown_timeout_s"] == 30.0 + 11.0  # drain, then the pool's stop
    front = front_options(config, options)
    assert front["autoscaling_config"]["target_ongoing_requests"] == 4 * 64.0
    assert front["max_ongoing_requests"] == 4 * 2048
    assert front["ray_actor_options"] == {"num_cpus": 0.25}


def test_fixed_counts_and_explicit_workers() -> None:
    base = load_config(None, {"MICROBATCH_WORKERS_CPU_WORKERS": "3"}, Flags())
    options = ServeOptions(num_replicas=2, front_replicas=1, target_ongoing_requests=8)
    config = replica_workers(base, options)
    assert config.workers.cpu_workers == 3  # set in the config: kept
    batcher = batcher_options(config, options)
    assert batcher["num_replicas"] == 2 and "autoscaling_config" not in batcher
    assert batcher["ray_actor_options"]["num_cpus"] == 3.0
    assert front_options(config, options)["num_replicas"] == 1


def test_from_serve_run_arguments() -> None:
    options = ServeOptions.from_args({"config": "x.toml", "num_replicas": "2", "num_cpus": "0.5"})
    assert options == dataclasses.replace(ServeOptions(), num_replicas=2, num_cpus=0.5)
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['replicas'\]"):
        ServeOptions.from_args({"replicas": "2"})
    with pytest.raises(ConfigError, match="num_replicas must be a number, got 'two'"):
        ServeOptions.from_args({"num_replicas": "two"})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"num_replicas": 0}, "num_replicas must be >= 1, got 0"),
        ({"min_replicas": 5, "max_replicas": 2}, "min_replicas <= max_replicas"),
        ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
        ({"upscale_delay_s": -1}, "upscale_delay_s must be >= 0"),
    ],
)
def test_bad_values_are_refused_by_name(fields: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServeOptions(**fields)  # type: ignore[arg-type]
