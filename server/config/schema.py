"""The configuration's schema: frozen dataclasses, one per TOML table, and the choices their
keys take. Built once by loading.py at start-up and passed down explicitly.

Pure data: no I/O, no environment. Must not import torch or aiohttp (the CLI and the tests load
it cheaply).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from server.models.spec import TensorSpec

BUILTIN_MODELS: tuple[str, ...] = ("linear", "mlp")
FORMATS: tuple[str, ...] = ("builtin", "torchscript", "export")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
ROUTINGS: tuple[str, ...] = ("auto", "cpu", "cuda")
HALF_PRECISIONS: tuple[str, ...] = ("off", "fp16", "bf16")
ON_MODEL_FAILURE: tuple[str, ...] = ("exit", "serve_others")
_SECRET_WORDS = ("token", "secret", "password")


class ConfigError(ValueError):
    """A bad setting; the message names it (dotted TOML key, variable or flag)."""


@dataclass(frozen=True)
class BatchingConfig:
    """How one model's requests are grouped: [batching] gives defaults, a model may override."""

    max_batch_size: int = 32
    max_delay_ms: float = 5.0
    max_queue_size: int = 2048
    timeout_ms: float = 10000.0


@dataclass(frozen=True)
class ServerSettings:
    """The [server] table: where and how the HTTP server listens."""

    host: str = "127.0.0.1"
    port: int = 8000
    uds: str | None = None
    uds_mode: int = 0o600
    max_body_bytes: int = 64 * 1024 * 1024
    max_json_body_bytes: int = 1024 * 1024  # JSON parses at ~25x its size: msgpack for more
    max_elements: int = 16 * 1024 * 1024
    max_dims: int = 8
    access_log: bool = False
    drain_timeout_s: float = 30.0
    log_level: str = "info"
    max_msgpack_depth: int = 16  # containers within containers in a msgpack body
    max_msgpack_items: int = 1024  # entries of one msgpack array or map
    max_msgpack_str_bytes: int = 4096  # bytes of one msgpack string
    on_model_failure: str = "exit"  # a model fails to load: exit | serve_others
    auth_token: str | None = None  # bearer token required on every endpoint but /healthz
    auth_token_file: str | None = None  # or read it from this file at start-up
    head_timeout_s: float = 10.0  # a new connection's first request head must arrive in this
    body_timeout_s: float = 30.0  # longest pause between two reads of a request body
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    max_connections: int = 1000  # open connections; beyond it new ones are closed at once
    max_decompressed_bytes: int = 64 * 1024 * 1024  # a gzip/deflate/br body, once decompressed
    drain_delay_s: float = 0.0  # on SIGTERM, serve on this long while /readyz answers 503


@dataclass(frozen=True)
class WorkersConfig:
    """The [workers] table: the CPU process pool; 0 means "choose from the core count"."""

    cpu_workers: int = 0
    threads_per_worker: int = 0
    start_timeout_s: float = 120.0
    # A batch running longer has its worker killed and replaced (0: 50x the calibrated cost of
    # a full batch, at least 5 s).
    batch_timeout_s: float = 0.0

    def resolved_cpu_workers(self, cores: int) -> int:
        # One core is left to the event loop process.
        return self.cpu_workers or max(1, cores - 1)

    def resolved_threads(self, cores: int) -> int:
        return self.threads_per_worker or max(1, (cores - 1) // self.resolved_cpu_workers(cores))


@dataclass(frozen=True)
class Placement:
    """Where one model's batches may run and how its GPU copies are built."""

    routing: str = "auto"  # auto: the router picks per batch; cpu or cuda: always there
    cuda_instances: int = 1  # model copies per CUDA device, each with its own streams
    half_precision: str = "off"  # off | fp16 | bf16: autocast on the GPU
    compile: bool = False  # torch.compile the GPU copies


@dataclass(frozen=True)
class DevicesConfig:
    """The [devices] table: defaults of every model's Placement, and the calibration cache."""

    routing: str = "auto"
    cuda_instances: int = 1
    half_precision: str = "off"
    compile: bool = False
    calibration_cache: str = "~/.cache/microbatch/calibration.json"  # "" = no cache
    recalibrate: bool = False  # profile again at start-up and overwrite the cached costs

    def placement(self) -> Placement:
        return Placement(self.routing, self.cuda_instances, self.half_precision, self.compile)

    def resolved_calibration_cache(self) -> str | None:
        return os.path.expanduser(self.calibration_cache) if self.calibration_cache else None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str
    format: str
    inputs: tuple[TensorSpec, ...]
    batching: BatchingConfig
    placement: Placement = Placement()
    max_length: int = 512  # the longest dynamic dimension a request may carry


@dataclass(frozen=True)
class Flags:
    """CLI overrides; None means the flag was not given."""

    host: str | None = None
    port: int | None = None
    uds: str | None = None
    max_batch_size: int | None = None
    max_delay_ms: float | None = None
    max_queue_size: int | None = None
    timeout_ms: float | None = None
    cpu_workers: int | None = None
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerSettings
    batching: BatchingConfig
    workers: WorkersConfig
    models: tuple[ModelConfig, ...]
    devices: DevicesConfig = DevicesConfig()

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    def redacted(self) -> dict[str, object]:
        """The effective settings as plain data for the start-up log, secrets masked."""
        return {k: _redact(k, v) for k, v in asdict(self).items()}


def _redact(key: str, value: object) -> object:
    if value not in (None, "") and any(word in key.lower() for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, dict):
        return {k: _redact(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact("", v) for v in value]
    return value
