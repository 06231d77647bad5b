"""Configuration loading: the one Config from defaults < TOML < `MICROBATCH_*` variables < CLI
flags, every value checked once with a message that names it (the dotted TOML key, the variable
or the flag).

Runs on the main thread at start-up, before any event loop or worker exists. The only module that
reads environment variables, and only from the `env` mapping its caller hands in. Must not import
torch or aiohttp.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, get_type_hints

from server.config.checks import (
    check_name,
    from_env,
    is_int,
    reject_unknown,
    setting,
    show,
    table_of,
    typed,
)
from server.config.schema import (
    BUILTIN_MODELS,
    DEFAULT_MODELS,
    FORMATS,
    BatchingConfig,
    Config,
    ConfigError,
    DevicesConfig,
    Flags,
    ModelConfig,
    Placement,
    ServerSettings,
    WorkersConfig,
)
from server.models.spec import DYNAMIC, FILLS, SUPPORTED_DTYPES, TensorSpec, is_dynamic, sent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_SPEC_ITEM = re.compile(r"(?:([A-Za-z0-9_.-]+)=)?(\w+)\[([^\]]*)\]")
_DTYPES = ", ".join(SUPPORTED_DTYPES)
_Values = Mapping[str, Any]  # checked settings, ready for a dataclass constructor
_Tables = Mapping[str, _Values]  # table name -> its checked settings

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


def load_config(config_path: str | None, env: Mapping[str, str], flags: Flags) -> Config:
    """Builds the one Config: defaults < TOML file < MICROBATCH_* variables < CLI flags."""
    path = config_path or env.get("MICROBATCH_CONFIG") or None
    doc = _read_toml(path) if path else {}
    reject_unknown(doc, (*_TABLES, "models"), "")
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
    check_name(where, name)
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
    raw = table_of(table, doc.get(table, {}))
    reject_unknown(raw, _HINTS[table], table)
    return {k: setting(f"{table}.{k}", k, _HINTS[table][k], v) for k, v in raw.items()}


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
    reject_unknown(ours, [*_ENV_NAMES, "MICROBATCH_CONFIG"], "")  # a typo must not pass silently
    ours.pop("MICROBATCH_CONFIG", None)
    out: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    for name, text in ours.items():
        table, key = _ENV_NAMES[name]
        hint = _HINTS[table][key]
        out[table][key] = setting(name, key, hint, from_env(name, key, hint, text))
    return out


def _flag_settings(flags: Flags) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {t: {} for t in _TABLES}
    for key, value in vars(flags).items():
        if key in _TABLE_OF and value is not None:
            table = _TABLE_OF[key]
            out[table][key] = setting("--" + key.replace("_", "-"), key, _HINTS[table][key], value)
    return out


_Bases = tuple[BatchingConfig, Placement]  # what a model inherits from [batching], [devices]


def _models(
    doc: Mapping[str, Any], base_dir: Path, flags: Flags, bases: _Bases, operator: _Tables
) -> tuple[ModelConfig, ...]:
    raw_models = table_of("models", doc.get("models", {}))
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
            for n in DEFAULT_MODELS
        }
    return tuple(models.values())


def _toml_model(
    name: str, raw: object, base_dir: Path, bases: _Bases, operator: _Tables
) -> ModelConfig:
    where = f"models.{name}"
    check_name(where, name)
    table = table_of(where, raw)
    reject_unknown(table, _MODEL_KEYS, where)
    if "path" not in table:
        raise ConfigError(f"{where}.path is required")
    raw_path = typed(f"{where}.path", "", str, table["path"])
    path = _resolve_path(f"{where}.path", str(raw_path), base_dir)
    fmt = str(typed(f"{where}.format", "", str, table["format"])) if "format" in table else None
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
        k: setting(f"{where}.{k}", k, _HINTS[_TABLE_OF[k]][k], v)
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
    raw = table_of(f"{where}.inputs", table.get("inputs", {}))
    inputs = tuple(_tensor(f"{where}.inputs.{n}", n, t) for n, t in raw.items())
    if any(s.fill for s in inputs) and not is_dynamic(sent(inputs)):
        raise ConfigError(
            f"{where}: an input with `fill` needs another input with a dynamic dimension (-1) "
            "whose length it describes"
        )
    return inputs


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
    return {"dtype": dtype, "shape": [int(p) if re.fullmatch(r"-?[0-9]+", p) else p for p in parts]}


def _tensor(where: str, name: str, raw: object) -> TensorSpec:
    check_name(where, name)
    table = table_of(where, raw)
    reject_unknown(table, ("dtype", "shape", "pad", "fill"), where)
    dtype, shape = table.get("dtype"), table.get("shape")
    pad, fill = table.get("pad", 0), table.get("fill", "")
    if not isinstance(dtype, str) or dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"{where}.dtype must be one of {_DTYPES}, got {show(dtype)}")
    if (
        not isinstance(shape, list)
        or not all(is_int(d) and (d >= 1 or d == DYNAMIC) for d in shape)
        or shape.count(DYNAMIC) > 1
    ):
        raise ConfigError(
            f"{where}.shape must be a list of integers >= 1 and at most one -1 (a length), "
            f"got {show(shape)}"
        )
    if isinstance(pad, bool) or not isinstance(pad, int | float):
        raise ConfigError(f"{where}.pad must be a number (the padding value), got {show(pad)}")
    if fill not in ("", *FILLS):
        raise ConfigError(f"{where}.fill must be one of {', '.join(FILLS)}, got {show(fill)}")
    if fill and shape != ([] if fill == "lengths" else [DYNAMIC]):
        want = "[]" if fill == "lengths" else "[-1]"
        raise ConfigError(f"{where}: an input with fill = {fill!r} has shape {want}")
    return TensorSpec(name, dtype, tuple(shape), pad, fill)
