"""Calibration bookkeeping: the cache key of one (model, device) profile, and the JSON cache
file on disk (the sizes profiled, and the timing itself, are executors/profiling.py's).

Main process. The key and plan functions are pure; the `_blocking` ones read or write the
cache file and hash model files, and run in a thread (asyncio.to_thread), never on the loop.
No torch: the torch version comes from the package metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import ModelConfig
from server.routing.cost import Point

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: points may carry a length; keys name max_length
Points = list[Point]


@dataclass(frozen=True)
class Identity:
    """What a profile depends on, besides the model and device names."""

    model_digest: str  # sha256 of the model file, or the built-in's name
    torch_version: str


def cache_key(cfg: ModelConfig, ident: Identity, device: str) -> str:
    """device: "cpu/<cpu name>/<threads>t" or "cuda/<gpu name>"; GPU settings are part of it."""
    parts = [cfg.name, ident.model_digest, device, f"torch {ident.torch_version}"]
    parts.append(f"max {cfg.batching.max_batch_size} length {cfg.batching.max_length}")
    if device.startswith("cuda"):
        placement = cfg.placement
        parts.append(f"half {placement.half_precision} compile {placement.compile}")
    return " | ".join(parts)


def cpu_device_id(threads: int) -> str:
    return f"cpu/{_cpu_name()}/{threads}t"


def cuda_device_id(gpu_name: str) -> str:
    return f"cuda/{gpu_name}"


def identify_blocking(cfg: ModelConfig) -> Identity:
    return Identity(_model_digest(cfg), _torch_version())


def load_cache_blocking(path: str | None) -> dict[str, Points]:
    """key -> points; an absent, unreadable or foreign file reads as empty (and is logged)."""
    if not path or not os.path.exists(path):
        return {}
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if doc.get("version") != CACHE_VERSION:
            return {}
        return {str(k): _points(v["points"]) for k, v in doc["entries"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring the calibration cache %s: %s", path, exc)
        return {}


def save_cache_blocking(path: str | None, fresh: Mapping[str, Sequence[Point]]) -> None:
    """Merges fresh entries into the file (atomically replaced); failures are logged only."""
    if not path or not fresh:
        return
    try:
        entries: dict[str, Any] = {}
        if os.path.exists(path):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
                old = json.loads(Path(path).read_text(encoding="utf-8"))
                if old.get("version") == CACHE_VERSION:
                    entries = dict(old["entries"])
        for key, points in fresh.items():
            entries[key] = {"points": [_to_json(p) for p in points]}
        _write_atomically(Path(path), {"version": CACHE_VERSION, "entries": entries})
    except OSError as exc:
        log.warning("could not write the calibration cache %s: %s", path, exc)


def _write_atomically(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _to_json(point: Point) -> list[float]:
    """[samples, seconds], or [samples, length, seconds] where a length varies."""
    if len(point) == 2:
        return [int(point[0]), float(point[1])]
    return [int(point[0]), int(point[1]), float(point[2])]


def _point(raw: Any) -> Point:
    if len(raw) == 2:
        return int(raw[0]), float(raw[1])
    n, length, seconds = raw
    return int(n), int(length), float(seconds)


def _points(raw: Any) -> Points:
    points = [_point(p) for p in raw]
    if not points:
        raise ValueError("an entry without points")
    return points


def _model_digest(cfg: ModelConfig) -> str:
    if cfg.format == "builtin":
        return cfg.path
    digest = hashlib.sha256()
    try:
        with open(cfg.path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:  # the load will fail and say why; the cache key just never matches
        return f"unreadable ({exc.strerror})"
    return "sha256:" + digest.hexdigest()[:16]


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown cpu"
