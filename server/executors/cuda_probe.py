"""Finds the visible CUDA devices, in a subprocess, so that the server process never imports
torch; [] at once where the installed torch has no CUDA library at all.

A blocking call, meant for a thread (asyncio.to_thread) at start-up; no torch here.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)
_PROBE = (
    "import json, torch\n"
    "n = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
    "print(json.dumps([torch.cuda.get_device_name(i) for i in range(n)]))"
)


def probe_cuda_blocking(timeout_s: float = 120.0) -> list[str]:
    """Names of the visible CUDA devices, found in a subprocess so that this process never
    imports torch; [] at once where the installed torch has no CUDA library at all."""
    if not _torch_has_gpu_library():
        return []
    try:
        result = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the CUDA probe failed: %s", exc)
        return []
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        error = result.stderr.strip().splitlines()
        log.warning("the CUDA probe failed: %s", error[-1] if error else result.returncode)
        return []
    return [str(name) for name in json.loads(lines[-1])]


def _torch_has_gpu_library() -> bool:
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib"
        if any(lib.glob("*torch_cuda*")) or any(lib.glob("*torch_hip*")):
            return True
    return False
