"""One setting's value checked: its type (from the dataclass field's hint), its bounds (the same
for every source: TOML, variable or flag), names and tables; each message starts with the name
the user wrote (the dotted TOML key, the variable or the flag).

Pure; used by loading.py at start-up. No torch, no aiohttp.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeGuard

from server.config.schema import (
    HALF_PRECISIONS,
    LOG_LEVELS,
    ON_MODEL_FAILURE,
    ROUTINGS,
    ConfigError,
)

NAME = re.compile(r"[A-Za-z0-9_.-]+")
BOOL_WORDS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
KINDS: dict[object, str] = {int: "an integer", float: "a number", bool: "a boolean", str: "text"}
# What every value must satisfy, whatever its source: key -> (requirement, test of a typed value).
BOUNDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
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
    "max_length": ("be >= 1", lambda v: v >= 1),
    "timeout_ms": ("be > 0", lambda v: v > 0),
    "log_level": (f"be one of {', '.join(LOG_LEVELS)}", lambda v: v in LOG_LEVELS),
    "routing": (f"be one of {', '.join(ROUTINGS)}", lambda v: v in ROUTINGS),
    "cuda_instances": ("be >= 1", lambda v: v >= 1),
    "half_precision": (f"be one of {', '.join(HALF_PRECISIONS)}", lambda v: v in HALF_PRECISIONS),
}


def setting(label: str, key: str, hint: object, value: object) -> object:
    """Type-checks then bounds-checks one value; every message starts with `label`."""
    value = typed(label, key, hint, value)
    rule = BOUNDS.get(key)
    if rule is not None and not rule[1](value):  # value has its field's type by now
        raise ConfigError(f"{label} must {rule[0]}, got {show(value)}")
    return value


def typed(label: str, key: str, hint: object, value: object) -> object:
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
    if hint is float and is_int(value):
        value = float(value)
    if type(value) is not hint or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{label} must be {KINDS[hint]}, got {show(value)}")
    return value


def from_env(name: str, key: str, hint: object, text: str) -> object:
    try:
        if hint is bool:
            return BOOL_WORDS[text.strip().lower()]
        if hint is int and key != "uds_mode":
            return int(text)
        if hint is float:
            return float(text)
    except (KeyError, ValueError):
        raise ConfigError(f"{name} must be {KINDS[hint]}, got {text!r}") from None
    return text


def reject_unknown(table: Mapping[str, object], names: Collection[str], prefix: str) -> None:
    dot = f"{prefix}." if prefix else ""
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {dot}{close[0]}?" if close else f"known: {', '.join(names)}"
            raise ConfigError(f"{dot}{key} is not a setting; {hint}")


def check_name(where: str, name: str) -> None:
    if not NAME.fullmatch(name):
        raise ConfigError(f"{where}: name {name!r} may use only letters, digits, '_', '.', '-'")


def table_of(label: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{label} must be a table, got {show(value)}")
    return value


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def show(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value)
