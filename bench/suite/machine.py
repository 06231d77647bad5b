"""What a benchmark ran on: the machine, the CPU, the versions of Python, the libraries and wrk.

CLI process; reads /proc/cpuinfo and package metadata (no library is imported for its version).
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.suite.wrk import wrk_path, wrk_version

PACKAGES = ("microbatch", "torch", "numpy", "aiohttp", "uvloop", "msgpack")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_meta(driver: str) -> dict[str, Any]:
    wrk = wrk_path()
    return {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in PACKAGES},
        "wrk": wrk_version(wrk) if wrk else None,
        "driver": driver,
    }
