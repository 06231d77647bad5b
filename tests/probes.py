"""What the reliability tests read from a running server, and the bounded loopback load they
send: conditions waited on with a timeout (never a fixed sleep), metrics, worker pids, RSS, and
a tally of answers by status.

Runs in the test process, against servers started by tests/server_process.py on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import numpy as np

from tests.conftest import request, tensor
from tests.server_process import ServerProcess

MSGPACK = {"Content-Type": "application/msgpack"}


def wait_for(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")


def metric(server: ServerProcess, prefix: str, headers: dict[str, str] | None = None) -> float:
    """The sum of every sample whose line starts with `prefix` (name and any labels)."""
    text = request(server.url, "GET", "/metrics", headers=headers)[2].decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def worker_pids(server: ServerProcess) -> list[int]:
    body = json.loads(request(server.url, "GET", "/v1/models")[2])
    return [pid for ex in body["executors"] if ex["device"] == "cpu" for pid in ex["pids"]]


def queued(server: ServerProcess, model: str) -> float:
    return metric(server, f'microbatch_queue_depth{{model="{model}"}}')


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory now (VmRSS), or the most it ever held (field="VmHWM")."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for pid {pid}")


def peak_rss_bytes(pid: int) -> int:
    """The high-water mark of a process's resident memory: a peak between two readings of
    VmRSS shows here, though both readings miss it."""
    return rss_bytes(pid, "VmHWM")


def work(value: float, rounds: int = 0, samples: int | None = None) -> np.ndarray:
    """An input of tests/fault_models.Work: first value `value`, `rounds` of burn."""
    row = np.array([value, rounds], np.float32)
    return row if samples is None else np.tile(row, (samples, 1))


@dataclass
class Answer:
    status: int  # -1: no HTTP answer (connection refused or dropped)
    code: str = ""
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""
    latency_s: float = 0.0  # as the client saw it: from sending to the whole answer read


async def send(
    session: aiohttp.ClientSession, url: str, model: str, x: np.ndarray, **extra: object
) -> Answer:
    payload = msgpack.packb({"inputs": {"x": tensor(x)}, **extra})
    started = time.monotonic()
    try:
        async with session.post(
            f"{url}/v1/models/{model}/infer", data=payload, headers=MSGPACK
        ) as response:
            raw = await response.read()
            headers = dict(response.headers)
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return Answer(-1, error=type(exc).__name__, latency_s=time.monotonic() - started)
    latency_s = time.monotonic() - started
    body = msgpack.unpackb(raw)
    code = body["error"]["code"] if "error" in body else "ok"
    return Answer(status, code, body, headers, latency_s=latency_s)


def tally(answers: list[Answer]) -> dict[str, int]:
    """Answers by status and code, e.g. {"200 ok": 90, "503 overloaded": 10}."""
    counts = Counter(f"{a.status} {a.code or a.error}" for a in answers)
    return dict(sorted(counts.items()))
