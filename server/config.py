"""Configuration: frozen dataclasses built once from defaults < TOML < `MICROBATCH_*` < CLI flags.

Runs on the main thread at start-up, before any event loop or worker exists; the result is passed
down explicitly. The only module that reads environment variables, and only from the `env` mapping
its caller hands in. Must not import torch or aiohttp: the CLI and the tests load it cheaply.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeGuard, get_type_hints

from server.models.spec import SUPPORTED_DTYPES, TensorSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

BUILTIN_MODELS: tuple[str, ...] = ("linear", "mlp")
FORMATS: tuple[str, ...] = ("builtin", "torchscript", "export")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
ROUTINGS: tuple[str, ...] = ("auto", "cpu", "cuda")
HALF_PRECISIONS: tuple[str, ...] = ("off", "fp16", "bf16")
ON_MODEL_FAILURE: tuple[str, ...] = ("exit", "serve_others")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SPEC_ITEM = re.compile(r"(?:([A-Za-z0-9_.-]+)=)?(\w+)\[([^\]]*)\]")
_DTYPES = ", ".join(SUPPORTED_DTYPES)
_SECRET_WORDS = ("token", "secret", "password")
_Values = Mapping[str, Any]  # checked settings, ready for a dataclass constructor
_Tables = Mapping[str, _Values]  # table name -> its checked settings
_BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


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


_TABLES = {
    "server": ServerSettings,
    "batching": BatchingConfig,
    "workers": WorkersConfig,
    "devices": DevicesConfig,
}
_HINTS: dict[str, dict[str, object]] = {t: get_type_hints(cls) for t, cls in _TABLES.items()}
_ENV_NAMES = {f"MICROBATCH_{t.upper()}_{k.upper()}": (t, k) for t in _TABLES for k in _HINTS[t]}
_TABLE_OF = {k: t for t in _TABLES for k in _HINTS[t]}
_PLACEMENT_KEYS = tuple(get_type_hints(Placement))
_MODEL_KEYS = ("path", "format", "input", "inputs", *_HINTS["batching"], *_PLACEMENT_KEYS)
_KINDS: dict[object, str] = {int: "an integer", float: "a number", bool: "a boolean", str: "text"}
# What every value must satisfy, whatever its source: key -> (requirement, test of a typed value).
_BOUNDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "port": ("be in 0..65535", lambda v: 0 <= v <= 65535),
    "uds_mode": ("be a mode in 0o000..0o777 (write 0o600 or '0600')", lambda v: 0 <= v <= 0o777),
    "max_body_bytes": ("be >= 1", lambda v: v >= 1),
    "max_json_body_bytes": ("be >= 1", lambda v: v >= 1),
    "max_elements": ("be >= 1", lambda v: v >= 1),
    "max_dims": ("be >= 1", lambda v: v >= 1),
    "drain_timeout_s": ("be >= 0", lambda v: v >= 0),
    "drain_delay_s": ("be >= 0", lambda v: v >= 0),
    "head_timeout_s": ("be > 0", lambda v: v > 0),
    "body_timeout_s": ("be > 0", lambda v: v > 0),
    "keepalive_timeout_s": ("be > 0", lambda v: v > 0),
    "max_connections": ("be >= 1", lambda v: v >= 1),
    "max_decompressed_bytes": ("be >= 1", lambda v: v >= 1),
    "max_msgpack_depth": ("be >= 1", lambda v: v >= 1),
    "max_msgpack_items": ("be >= 1", lambda v: v >= 1),
    "max_msgpack_str_bytes": ("be >= 1", lambda v: v >= 1),
    "on_model_failure": (
        f"be one of {', '.join(ON_MODEL_FAILURE)}",
        lambda v: v in ON_MODEL_FAILURE,
    ),
    "cpu_workers": ("be >= 0", lambda v: v >= 0),
    "threads_per_worker": ("be >= 0", lambda v: v >= 0),
    "start_timeout_s": ("be > 0", lambda v: v > 0),
    "batch_timeout_s": ("be >= 0 (0: derived from the model's cost)", lambda v: v >= 0),
    "max_batch_size": ("be >= 1", lambda v: v >= 1),
    "max_delay_ms": ("be >= 0", lambda v: v >= 0),
    "max_queue_size": ("be >= 1", lambda v: v >= 1),
    "timeout_ms": ("be > 0", lambda v: v > 0),
    "log_level": (f"be one of {', '.join(LOG_LEVELS)}", lambda v: v in LOG_LEVELS),
    "routing": (f"be one of {', '.join(ROUTINGS)}", lambda v: v in ROUTINGS),
    "cuda_instances": ("be >= 1", lambda v: v >= 1),
    "half_precision": (f"be one of {', '.join(HALF_PRECISIONS)}", lambda v: v in HALF_PRECISIONS),
}


def load_config(config_path: str | None, env: Mapping[str, str], flags: Flags) -> Config:
    """Builds the one Config: defaults < TOML file < MICROBATCH_* variables < CLI flags."""
    path = config_path or env.get("MICROBATCH_CONFIG") or None
    doc = _read_toml(path) if path else {}
    _reject_unknown(doc, (*_TABLES, "models"), "")
    env_values, flag_values = _env_settings(env), _flag_settings(flags)
    merged = {t: {**_toml_settings(t, doc), **env_values[t], **flag_values[t]} for t in _TABLES}
    # Variables and flags are the operator's last word, over per-model TOML overrides too.
    operator = {t: {**env_values[t], **flag_values[t]} for t in ("batching", "devices")}
    operator["devices"] = {
        k: operator["devices"][k] for k in _PLACEMENT_KEYS if k in operator["devices"]
    }
    base_dir = Path(os.path.abspath(path)).parent if path else Path.cwd()
    batching = BatchingConfig(**merged["batching"])
    devices = DevicesConfig(**merged["devices"])
    _check_queue_fits_batch("batching", batching)
    models = _models(doc, base_dir, flags, (batching, devices.placement()), operator)
    for model in models:
        _check_queue_fits_batch(f"models.{model.name}", model.batching)
    return Config(
        server=_with_auth_token(ServerSettings(**merged["server"])),
        batching=batching,
        workers=WorkersConfig(**merged["workers"]),
        models=models,
        devices=devices,
    )


def _check_queue_fits_batch(where: str, batching: BatchingConfig) -> None:
    """A request of max_batch_size samples must fit the queue, or it could never be admitted
    (and would get a retryable 503 for ever)."""
    if batching.max_queue_size < batching.max_batch_size:
        raise ConfigError(
            f"{where}.max_queue_size ({batching.max_queue_size}) must be >= "
            f"{where}.max_batch_size ({batching.max_batch_size}): a request of a full batch "
            "must fit in the queue"
        )


def _with_auth_token(server: ServerSettings) -> ServerSettings:
    """Reads server.auth_token_file once, here, so that a missing or empty file stops start-up."""
    path = server.auth_token_file
    if path is None:
        return server
    if server.auth_token is not None:
        raise ConfigError("server.auth_token and server.auth_token_file are both set; give one")
    try:
        token = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"server.auth_token_file: cannot read {path}: {exc}") from None
    if not token:
        raise ConfigError(f"server.auth_token_file: {path} is empty")
    return replace(server, auth_token=token)


def parse_model_flag(text: str) -> tuple[str, str, tuple[TensorSpec, ...]]:
    """`NAME` (a built-in), `NAME=PATH` or `NAME=PATH:SPEC`; SPEC is `[iname=]DTYPE[d0,...]`s
    joined by `;`. PATH is returned as written (load_config resolves and checks it)."""
    where = f"--model {text!r}"
    name, eq, rest = text.partition("=")
    _check_name(where, name)
    if not eq:
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"{where}: {name!r} is not one of {BUILTIN_MODELS}; use NAME=PATH")
        return name, f"builtin:{name}", ()
    path, colon, spec = rest.rpartition(":")
    first_dtype = spec.split(";")[0].rpartition("=")[2]
    if not colon or ("[" not in spec and first_dtype not in SUPPORTED_DTYPES):
        path, spec = rest, ""  # a colon of the path itself, as in builtin:mlp
    if not path:
        raise ConfigError(f"{where}: PATH is empty")
    return name, path, _flag_inputs(where, spec) if spec else ()


def _read_toml(path: str) -> dict[str, Any]:
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from None


def _toml_settings(table: str, doc: Mapping[str, Any]) -> dict[str, Any]:
    raw = _table(table, doc.get(table, {}))
    _reject_unknown(raw, _HINTS[table], table)
    return {k: _setting(f"{table}.{k}", k, _HINTS[table][k], v) for k, v in raw.items()}


# What Kubernetes sets in every pod for a Service named `microbatch` or `microbatch-*`
# (MICROBATCH_SERVICE_HOST, MICROBATCH_PREDICTOR_PORT_80_TCP_ADDR, ...): not settings of ours.
_SERVICE_LINK = re.compile(
    r"MICROBATCH_(\w+_)?(SERVICE_(HOST|PORT(_\w+)?)|PORT(_\d+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)?)"
)


def _env_settings(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    ours = {
        n: text
        for n, text in env.items()
        if n.startswith("MICROBATCH_") and (n in _ENV_NAMES or not _SERVICE_LINK.fullmatch(n))
    }
    _reject_unknown(ours, [*_ENV_NAMES, "MICROBATCH_CONFIG"], "")  # a typo must not pass silently
    ours.pop("MICROBATCH_CONFIG", None)
    out: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    for name, text in ours.items():
        table, key = _ENV_NAMES[name]
        hint = _HINTS[table][key]
        out[table][key] = _setting(name, key, hint, _from_env(name, key, hint, text))
    return out


def _flag_settings(flags: Flags) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    for key, value in vars(flags).items():
        if key in _TABLE_OF and value is not None:
            table = _TABLE_OF[key]
            out[table][key] = _setting("--" + key.replace("_", "-"), key, _HINTS[table][key], value)
    return out


_Bases = tuple[BatchingConfig, Placement]  # what a model inherits from [batching], [devices]


def _models(
    doc: Mapping[str, Any], base_dir: Path, flags: Flags, bases: _Bases, operator: _Tables
) -> tuple[ModelConfig, ...]:
    raw_models = _table("models", doc.get("models", {}))
    models = {n: _toml_model(n, raw, base_dir, bases, operator) for n, raw in raw_models.items()}
    base, placement = bases
    for text in flags.models:  # a later --model replaces a same-named model
        where = f"--model {text!r}"
        name, path, inputs = parse_model_flag(text)
        path = _resolve_path(where, path, Path.cwd())
        fmt = _format(where, path, None, inputs)
        models[name] = ModelConfig(name, path, fmt, inputs, base, placement)
    if not models:
        models = {
            n: ModelConfig(n, f"builtin:{n}", "builtin", (), base, placement)
            for n in BUILTIN_MODELS
        }
    return tuple(models.values())


def _toml_model(
    name: str, raw: object, base_dir: Path, bases: _Bases, operator: _Tables
) -> ModelConfig:
    where = f"models.{name}"
    _check_name(where, name)
    table = _table(where, raw)
    _reject_unknown(table, _MODEL_KEYS, where)
    if "path" not in table:
        raise ConfigError(f"{where}.path is required")
    raw_path = _typed(f"{where}.path", "", str, table["path"])
    path = _resolve_path(f"{where}.path", str(raw_path), base_dir)
    fmt = str(_typed(f"{where}.format", "", str, table["format"])) if "format" in table else None
    inputs = _toml_inputs(where, table)
    own = _own(where, table, _HINTS["batching"])
    batching = replace(bases[0], **{**own, **operator["batching"]})
    own = _own(where, table, _PLACEMENT_KEYS)
    placement = replace(bases[1], **{**own, **operator["devices"]})
    fmt = _format(where, path, fmt, inputs)
    return ModelConfig(name, path, fmt, inputs, batching, placement)


def _own(where: str, table: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """A model table's own values for the keys of one inherited table, checked."""
    return {
        k: _setting(f"{where}.{k}", k, _HINTS[_TABLE_OF[k]][k], v)
        for k, v in table.items()
        if k in keys
    }


def _format(where: str, path: str, fmt: str | None, inputs: tuple[TensorSpec, ...]) -> str:
    """The model's format, given or inferred from its path, checked against path and inputs."""
    builtin = path.startswith("builtin:")
    fmt = fmt or ("builtin" if builtin else "export" if path.endswith(".pt2") else "torchscript")
    if fmt not in FORMATS:
        raise ConfigError(f"{where}.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (fmt == "builtin") != builtin:
        raise ConfigError(f"{where}.format {fmt!r} does not fit path {path!r} (builtin:NAME)")
    if fmt == "torchscript" and not inputs:
        raise ConfigError(
            f"{where}: a TorchScript model needs `input` or `inputs` (with --model, a :SPEC such"
            " as :float32[16]); its input shapes cannot be read from the file"
        )
    return fmt


def _resolve_path(label: str, raw: str, base_dir: Path) -> str:
    if raw.startswith("builtin:"):
        if raw.removeprefix("builtin:") not in BUILTIN_MODELS:
            known = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
            raise ConfigError(f"{label}: unknown built-in model {raw!r}; known: {known}")
        return raw
    path = os.path.normpath(base_dir / Path(raw).expanduser())
    if not os.path.isfile(path):
        raise ConfigError(f"{label}: no such file: {path}")
    return path


def _toml_inputs(where: str, table: Mapping[str, Any]) -> tuple[TensorSpec, ...]:
    if "input" in table and "inputs" in table:
        raise ConfigError(f"{where}: give `input` or `inputs`, not both")
    if "input" in table:
        return (_tensor(f"{where}.input", "input", table["input"]),)
    inputs = _table(f"{where}.inputs", table.get("inputs", {}))
    return tuple(_tensor(f"{where}.inputs.{n}", n, t) for n, t in inputs.items())


def _flag_inputs(where: str, spec: str) -> tuple[TensorSpec, ...]:
    items = [_SPEC_ITEM.fullmatch(item.strip()) for item in spec.split(";")]
    if not all(items):
        raise ConfigError(f"{where}: bad input spec; write [NAME=]DTYPE[d0,d1,...] joined by ';'")
    groups = [m.groups(default="") for m in items if m]
    if len(groups) > 1 and not all(name for name, _, _ in groups):
        raise ConfigError(f"{where}: name each of several inputs, e.g. a=float32[3];b=int64[2]")
    specs = tuple(
        _tensor(f"{where}: {n or 'input'}", n or "input", _flag_table(t, d)) for n, t, d in groups
    )
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError(f"{where}: an input name is repeated")
    return specs


def _flag_table(dtype: str, dims: str) -> dict[str, object]:
    """A SPEC item in the TOML table shape, so that one check serves both."""
    parts = [d.strip() for d in dims.split(",")] if dims.strip() else []
    return {"dtype": dtype, "shape": [int(p) if p.isascii() and p.isdigit() else p for p in parts]}


def _tensor(where: str, name: str, raw: object) -> TensorSpec:
    _check_name(where, name)
    table = _table(where, raw)
    _reject_unknown(table, ("dtype", "shape"), where)
    dtype, shape = table.get("dtype"), table.get("shape")
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"{where}.dtype must be one of {_DTYPES}, got {_show(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 1 for d in shape):
        raise ConfigError(f"{where}.shape must be a list of integers >= 1, got {_show(shape)}")
    return TensorSpec(name, dtype, tuple(shape))


def _setting(label: str, key: str, hint: object, value: object) -> object:
    """Type-checks then bounds-checks one value; every message starts with `label`."""
    value = _typed(label, key, hint, value)
    rule = _BOUNDS.get(key)
    if rule is not None and not rule[1](value):  # value has its field's type by now
        raise ConfigError(f"{label} must {rule[0]}, got {_show(value)}")
    return value


def _typed(label: str, key: str, hint: object, value: object) -> object:
    """Checks a TOML, flag or parsed variable value: ints pass as floats, bools never as ints."""
    if key == "uds_mode" and isinstance(value, str):
        try:
            return int(value, 8)
        except ValueError:
            raise ConfigError(f"{label} must be an octal mode like '0600', got {value!r}") from None
    if hint == str | None:
        if value == "":
            return None  # TOML has no null: "" clears an optional string
        hint = str
    if hint is float and _is_int(value):
        value = float(value)
    if type(value) is not hint or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{label} must be {_KINDS[hint]}, got {_show(value)}")
    return value


def _from_env(name: str, key: str, hint: object, text: str) -> object:
    try:
        if hint is bool:
            return _BOOL_WORDS[text.strip().lower()]
        if hint is int and key != "uds_mode":
            return int(text)
        if hint is float:
            return float(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{name} must be {_KINDS[hint]}, got {text!r}") from None
    return text


def _reject_unknown(table: Mapping[str, object], names: Collection[str], prefix: str) -> None:
    dot = f"{prefix}." if prefix else ""
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {dot}{close[0]}?" if close else f"known: {', '.join(names)}"
            raise ConfigError(f"{dot}{key} is not a setting; {hint}")


def _check_name(where: str, name: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r} may use only letters, digits, '_', '.', '-'")


def _table(label: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{label} must be a table, got {_show(value)}")
    return value


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)


def _redact(key: str, value: object) -> object:
    if value not in (None, "") and any(word in key.lower() for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, dict):
        return {k: _redact(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact("", v) for v in value]
    return value
