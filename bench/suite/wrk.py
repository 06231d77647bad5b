"""wrk as the bench's saturation driver: a Lua script that POSTs one fixed msgpack body over
keep-alive connections, and a parser for wrk's text report.

`parse_report` is pure; `run_wrk_blocking` runs wrk as a subprocess (CLI process, main thread),
bounded by a timeout. wrk is optional: the bench falls back to the Python generator without it.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen.errors import LoadGenError

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TIME = r"([\d.]+)(us|ms|s|m|h)"
_REQUESTS = re.compile(rf"(\d+) requests in {_TIME}")
_PERCENTILE = re.compile(rf"^\s*(50|75|90|99)%\s+{_TIME}\s*$", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/msgpack"
local f = assert(io.open([==[{path}]==], "rb"))
wrk.body = f:read("*a")
f:close()
"""


@dataclass(frozen=True)
class WrkReport:
    requests: int
    duration_s: float
    rps: float
    non_2xx: int
    socket_errors: int
    latency_ms: dict[str, float]  # p50, p75, p90, p99 as wrk measures them (closed loop)


def wrk_path() -> str | None:
    return shutil.which("wrk")


def wrk_version(path: str) -> str:
    done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stdout + done.stderr).splitlines()[0].strip() if done.stdout + done.stderr else ""


def parse_report(text: str) -> WrkReport:
    requests = _REQUESTS.search(text)
    rps = _RPS.search(text)
    if not requests or not rps:
        raise LoadGenError(f"cannot read wrk's report:\n{text[-1000:]}")
    non_2xx = _NON_2XX.search(text)
    socket_errors = _SOCKET_ERRORS.search(text)
    return WrkReport(
        requests=int(requests.group(1)),
        duration_s=float(requests.group(2)) * _UNITS_S[requests.group(3)],
        rps=float(rps.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(map(int, socket_errors.groups())) if socket_errors else 0,
        latency_ms={
            f"p{m.group(1)}": float(m.group(2)) * _UNITS_S[m.group(3)] * 1000.0
            for m in _PERCENTILE.finditer(text)
        },
    )


def run_wrk_blocking(
    wrk: str, url: str, body: bytes, connections: int, duration_s: float, threads: int = 1
) -> WrkReport:
    """wrk -t THREADS -c CONNECTIONS -d SECONDS against url (wrk counts whole seconds)."""
    seconds = max(1, math.ceil(duration_s))
    with tempfile.TemporaryDirectory(prefix="microbatch-wrk-") as tmp:
        body_path = Path(tmp) / "body.msgpack"
        body_path.write_bytes(body)
        script = Path(tmp) / "post.lua"
        script.write_text(LUA.format(path=body_path))
        argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
        argv += ["--timeout", "10s", "-s", str(script), url]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=seconds + 30, check=False
            )
        except subprocess.TimeoutExpired:
            raise LoadGenError(f"wrk did not finish within {seconds + 30} s") from None
    if done.returncode != 0:
        raise LoadGenError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return parse_report(done.stdout)
