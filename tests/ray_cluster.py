"""A local Ray instance with microbatch's Serve application, for the Ray tests: started in its own
process (`python -m tests.ray_cluster CONFIG PORT TEMP_DIR`), told what to do on stdin, one JSON
line of answer each on stdout:

    status  -> {"batcher": {"RUNNING": 2}, "front": {"RUNNING": 1}, "replicas": [NAME, ...]}
    kill    -> {"killed": "SERVE_REPLICA::microbatch#MicrobatchBatcher#..."} (ray.kill: no drain)
    EOF     -> Serve and Ray shut down, exit 0

Ray lives in this process, not in pytest's, so that its settings (read from the environment at
import) and its background threads stay out of the test process. Everything listens on and
talks to 127.0.0.1 only (ENVIRONMENT below). `RayCluster` starts and stops it from the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
APP = "microbatch"

# Ray reads these at import. Tuned for a busy 2-core machine (docs/deploy.md, "Ray Serve").
ENVIRONMENT = {
    # Single-machine mode: the node's address is 127.0.0.1 (Ray otherwise picks the address of
    # the default route's interface, and talks to itself through it).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report leaves the machine
    # A node is declared dead after timeout x threshold without a health check answer: with two
    # CPU hogs beside it, a raylet may not answer for seconds.
    "RAY_health_check_timeout_ms": "30000",
    "RAY_health_check_failure_threshold": "10",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    # Serve gives a new proxy 5 s (then 10, 15) to say it is ready, and replaces it after three
    # misses, which fails serve.start: under load, starting uvicorn in a new worker took longer.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_DEDUP_LOGS": "0",  # every warning of the front reaches our log (tests count them)
}


def main(config_path: str, port: int, temp_dir: str) -> int:
    # Answers go to the real stdout; whatever Ray prints (the replicas' logs) goes to stderr,
    # the log file, so that an unread pipe never blocks Ray's log thread.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions
    from ray.serve.schema import LoggingConfig

    from server.config import Flags, load_config
    from server.ray_serve.app import build_app
    from server.ray_serve.options import ServeOptions

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=80 * 1024 * 1024,  # the answers are small; Ray's floor is 75 MiB
        _temp_dir=temp_dir,
        log_to_driver=True,
    )
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    options = ServeOptions(num_replicas=2, num_cpus=0.5, front_replicas=1, front_num_cpus=0.25)
    config = load_config(config_path, {}, Flags())
    # No access log line per request (it costs the replicas CPU; microbatch's default too).
    quiet = LoggingConfig(enable_access_log=False)
    serve.run(build_app(config, options), name=APP, route_prefix="/", logging_config=quiet)
    _say(answers, {"ready": f"http://127.0.0.1:{port}"})
    prefix = f"SERVE_REPLICA::{APP}#{_DEPLOYMENTS['batcher']}#"
    for line in sys.stdin:
        command = line.strip()
        replicas = sorted(
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)
        )
        if command == "status":
            deployments = serve.status().applications[APP].deployments
            states = {k: dict(deployments[v].replica_states) for k, v in _DEPLOYMENTS.items()}
            _say(answers, {**states, "replicas": replicas})
        elif command == "kill":
            ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
            _say(answers, {"killed": replicas[0]})
    serve.shutdown()
    ray.shutdown()
    return 0


_DEPLOYMENTS = {"batcher": "MicrobatchBatcher", "front": "MicrobatchFront"}


def _say(answers: IO[str], message: dict[str, Any]) -> None:
    answers.write("@" + json.dumps(message) + "\n")
    answers.flush()


class RayCluster:
    """The process above, seen from a test: its answers, its log, and a bounded stop."""

    def __init__(self, config_path: Path, port: int, timeout_s: float = 600.0) -> None:
        self.temp_dir = tempfile.mkdtemp(prefix="mb-ray-")  # short: Ray's socket paths must fit
        self.log_path = Path(self.temp_dir) / "driver.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.ray_cluster", str(config_path), str(port), self.temp_dir],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **ENVIRONMENT},
        )
        self.url = str(self._answer(timeout_s)["ready"])

    def ask(self, command: str, timeout_s: float = 60.0) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()
        return self._answer(timeout_s)

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        stdout: IO[bytes] | None = self.process.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = stdout.readline()  # the driver prints other lines too; ours start with @
            if not line:
                raise AssertionError(f"the Ray driver exited:\n{self.log()}")
            if line.startswith(b"@"):
                answer: dict[str, Any] = json.loads(line[1:])
                return answer
        raise AssertionError(f"no answer from the Ray driver in {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
            raise AssertionError(f"the Ray driver did not stop in {timeout_s} s") from None
        finally:
            self._log.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
