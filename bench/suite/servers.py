"""Starts the servers a benchmark (or a test) measures as subprocesses on an ephemeral port, and
waits, bounded, until each has logged "listening on URL" (and its ready line, where it has one).

Runs in the CLI or test process; the servers are separate processes, stopped with SIGTERM (then
SIGKILL after a bounded wait) by their own Popen handle.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen.errors import LoadGenError

ROOT = Path(__file__).resolve().parent.parent.parent
_LISTENING = re.compile(r"listening on (http://\S+|unix://\S+)")
MICROBATCH_READY = "ready: serving"
POLL_S = 0.05


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def pin(self, cpus: set[int]) -> None:
        """Pin the server's main process (not its children) to these CPUs, where Linux allows."""
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self.process.pid, cpus)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5.0)
        self.log_path.unlink(missing_ok=True)


def microbatch_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", "--port", "0", *flags]


def echo_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "bench.suite.echo_server", "--port", "0", *flags]


def clean_env(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment without MICROBATCH_* settings (so servers run on defaults), with
    this checkout first on the import path."""
    kept = {k: v for k, v in env.items() if not k.startswith("MICROBATCH_")}
    kept["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return kept


def spawn(name: str, argv: Sequence[str], env: Mapping[str, str]) -> ServerProcess:
    with tempfile.NamedTemporaryFile(
        prefix=f"microbatch-{name}-", suffix=".log", delete=False
    ) as f:
        process = subprocess.Popen(
            list(argv), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=dict(env)
        )
    return ServerProcess(name, process, Path(f.name))


def wait_listening(server: ServerProcess, ready_text: str | None, timeout_s: float) -> str:
    """The server's URL once it listens (and has logged ready_text); LoadGenError otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = server.log()
        if server.process.poll() is not None:
            raise LoadGenError(f"{server.name} server exited at start-up:\n{text[-2000:]}")
        match = _LISTENING.search(text)
        if match and (ready_text is None or ready_text in text):
            server.url = match.group(1)
            return server.url
        time.sleep(POLL_S)
    server.stop()
    raise LoadGenError(f"{server.name} server not ready within {timeout_s:.0f} s")


def start_server(
    name: str,
    argv: Sequence[str],
    ready_text: str | None = None,
    timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    server = spawn(name, argv, clean_env(os.environ if env is None else env))
    wait_listening(server, ready_text, timeout_s)
    return server
