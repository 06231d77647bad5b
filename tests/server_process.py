"""Starts a real `microbatch serve` process for tests and tools, and waits until it is ready.

Runs in the test process; the server is a separate process on an ephemeral port (or a Unix
socket). Readiness is a condition waited on with a bounded timeout, never a fixed sleep.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on (http://\S+|unix://\S+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    uds: str | None = None
    _log_offset: int = field(default=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(
                f"server did not stop within {timeout_s} s:\n{self.log()}"
            ) from None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.stop()


def start_server(
    *args: str,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    timeout_s: float = 120.0,
) -> ServerProcess:
    """`microbatch serve --port 0 ARGS...`; returns once /readyz answers 200 (or on exit)."""
    fd, log_name = tempfile.mkstemp(prefix="microbatch-", suffix=".log")
    argv = [sys.executable, "-m", "server.cli", "serve"]
    if "--uds" not in args and "--port" not in args:
        argv += ["--port", "0"]
    # Calibrations go to a per-run folder: tests never read or write the user's cache.
    cache = Path(tempfile.gettempdir()) / f"microbatch-test-cache-{os.getpid()}"
    full_env = {
        **os.environ,
        "MICROBATCH_DEVICES_CALIBRATION_CACHE": str(cache / "calibration.json"),
        **(env or {}),
    }
    with open(fd, "wb", closefd=True) as log_file:
        process = subprocess.Popen(
            [*argv, *args], cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=full_env
        )
    server = ServerProcess(process, Path(log_name))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return server  # exited: the caller inspects returncode and log
        match = _LISTENING.search(server.log())
        if match:
            address = match.group(1)
            if address.startswith("unix://"):
                server.uds = address.removeprefix("unix://")
                server.url = "http://localhost"
            else:
                server.url = address
            if not wait_ready or _ready(server):
                return server
        time.sleep(0.05)
    server.stop(signal.SIGKILL)
    raise AssertionError(f"server not ready within {timeout_s} s:\n{server.log()}")


def _ready(server: ServerProcess) -> bool:
    if server.uds:
        return "ready: serving" in server.log()
    try:
        with urllib.request.urlopen(server.url + "/readyz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False
