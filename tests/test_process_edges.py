"""What a server process leaves behind and warns about, against real server processes: a
listener others can reach without an auth token is warned about at start-up, the Unix socket
file is removed on a clean exit, and a worker that is killed and replaced leaves no zombie.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.probes import wait_for, worker_pids
from tests.raw_http import connect, head, read_answer
from tests.server_process import start_server

EXPOSED = "which others can reach, with no auth token"


def start_log(*args: str, env: dict[str, str] | None = None) -> str:
    """What a server logs up to and including its listening line (then it is stopped); the
    warning comes before that line."""
    with start_server(*args, "--model", "linear", env=env, wait_ready=False) as server:
        wait_for(lambda: "listening on" in server.log(), 60, "the listener")
        return server.log()


def test_listening_beyond_loopback_without_a_token_is_warned_about() -> None:
    # Port 0 on every interface for a moment; nothing but the log is looked at.
    assert EXPOSED in start_log("--host", "0.0.0.0")
    token = {"MICROBATCH_SERVER_AUTH_TOKEN": "a-token"}
    assert EXPOSED not in start_log("--host", "0.0.0.0", env=token)
    assert EXPOSED not in start_log()


def test_the_unix_socket_file_is_removed_on_a_clean_exit(tmp_path: Path) -> None:
    path = tmp_path / "mb.sock"
    server = start_server("--uds", str(path), "--model", "linear", "--cpu-workers", "1")
    with server, connect(server) as sock:
        sock.sendall(head("GET", "/healthz"))
        assert read_answer(sock)[0] == 200
        assert path.is_socket()
    assert server.process.returncode == 0, server.log()[-2000:]
    assert not path.exists()


def zombies_of(pid: int) -> list[int]:
    """Child processes of `pid` that have exited and whose status nobody collected."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        state, ppid = text[text.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state == "Z":
            found.append(int(entry))
    return found


def test_a_killed_worker_is_reaped_once_replaced() -> None:
    with start_server("--model", "linear", "--cpu-workers", "1") as server:
        old = worker_pids(server)
        os.kill(old[0], signal.SIGKILL)
        wait_for(lambda: worker_pids(server) not in ([], old), 60, "a new worker")
        wait_for(lambda: not zombies_of(server.process.pid), 30, "the dead worker reaped")
        assert server.stop() == 0
