"""Raw sockets to a test server, for what an HTTP library hides: a connection that sends half
a head or nothing at all, whether the server has closed a connection, an answer's own headers.

Runs in the test process, against servers from tests/server_process.py on 127.0.0.1 (or a Unix
socket). Every wait is bounded.
"""

from __future__ import annotations

import select
import socket
import time
import urllib.parse

from tests.server_process import ServerProcess


def connect(server: ServerProcess, timeout_s: float = 10.0) -> socket.socket:
    if server.uds:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        sock.connect(server.uds)
        return sock
    parts = urllib.parse.urlsplit(server.url)
    assert parts.hostname is not None and parts.port is not None
    return socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)


def head(method: str, path: str, **headers: str | int) -> bytes:
    """A request head; header names are written with '-' for '_' (Content_Length=3)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket, timeout_s: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """One whole answer (status, headers with lower-case names, body; Content-Length only)."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a whole answer head: {data!r}")
        data += chunk
    raw_head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside an answer body")
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket, timeout_s: float) -> bool:
    """True once the server has closed the connection (EOF or reset) within `timeout_s`; what
    it sent before closing is read and dropped."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            return False
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True


def still_open(sock: socket.socket) -> bool:
    """True if the server has not closed the connection (and sent nothing since)."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return bool(sock.recv(65536, socket.MSG_PEEK))
    except (ConnectionResetError, BrokenPipeError):
        return False
