"""The listening sockets: TCP on server.host and server.port, or a Unix socket at server.uds.
At the end of a drain they are closed only after every connection already waiting in the
kernel's backlog has been accepted, and the Unix socket file is removed.

Event loop (main process). Accepting the backlog and closing happen in one synchronous step,
so the event loop cannot interleave: the only connection that can still be reset is one whose
handshake completes in the few microseconds between the last accept and the close.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections.abc import Callable

from server.config import ServerSettings
from server.http.unix_socket import bind_unix_socket

BACKLOG = 128  # aiohttp's default for its sites


class Listener:
    def __init__(self, servers: list[asyncio.Server], uds: str | None) -> None:
        self._servers = servers
        self._uds = uds
        self._uds_id = _file_id(uds) if uds else None

    @classmethod
    async def open(
        cls, factory: Callable[[], asyncio.Protocol], settings: ServerSettings
    ) -> Listener:
        """Listen (OSError if the address is taken, the path stale or not ours, ...)."""
        loop = asyncio.get_running_loop()
        if settings.uds:
            sock = bind_unix_socket(settings.uds, settings.uds_mode)
            try:
                server = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
            except OSError:
                sock.close()
                raise
            return cls([server], settings.uds)
        server = await loop.create_server(factory, settings.host, settings.port, backlog=BACKLOG)
        return cls([server], None)

    def urls(self) -> list[str]:
        if self._uds:
            return [f"unix://{self._uds}"]
        urls = []
        for host, port in self._tcp_addresses():
            shown = f"[{host}]" if ":" in host else host
            urls.append(f"http://{shown}:{port}")
        return urls

    def exposed(self) -> list[str]:
        """The addresses listened on that are not loopback (others may reach them)."""
        return [host for host, _ in self._tcp_addresses() if not _is_loopback(host)]

    def close(self) -> list[socket.socket]:
        """Stop listening; the connections that were waiting in the backlog, for the caller
        to serve. Idempotent."""
        listening = [
            socket.socket(fileno=os.dup(sock.fileno()))
            for server in self._servers
            for sock in server.sockets
        ]
        waiting = [conn for sock in listening for conn in _accept_all(sock)]
        # The event loop's copy first, then ours: the kernel stops listening at the last close.
        for server in self._servers:
            server.close()
        for sock in listening:
            sock.close()
        self._servers = []
        self._remove_socket_file()
        return waiting

    def _tcp_addresses(self) -> list[tuple[str, int]]:
        return [
            (str(name[0]), int(name[1]))
            for server in self._servers
            for name in (sock.getsockname() for sock in server.sockets)
            if isinstance(name, tuple)
        ]

    def _remove_socket_file(self) -> None:
        # Only the file this server bound: another server may have replaced it since.
        if self._uds and self._uds_id is not None and _file_id(self._uds) == self._uds_id:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._uds)
        self._uds_id = None


def _accept_all(listening: socket.socket) -> list[socket.socket]:
    listening.setblocking(False)
    accepted: list[socket.socket] = []
    while True:
        try:
            conn, _ = listening.accept()
        except (BlockingIOError, InterruptedError):
            return accepted
        except ConnectionAbortedError:  # that client gave up; the next may be waiting
            continue
        except OSError:  # out of file descriptors: what is left is reset at the close
            return accepted
        conn.setblocking(False)
        accepted.append(conn)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
