"""Binds the Unix socket the server listens on, never more open than server.uds_mode.

Main process, at start-up, before anything is served. The file appears at bind(); a umask that
clears every bit the mode lacks means it is not open to others even for an instant before the
chmod (the umask is the process's, restored at once; nothing else runs yet at this point).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """A bound (not yet listening) socket at `path` with exactly `mode`; a stale socket file
    left by a server that died is replaced, a live one or any other file is an error."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
    except OSError:
        sock.close()
        raise
    return sock


def _remove_stale(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise OSError(f"server.uds: {path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: left by a server that died
        return
    finally:
        probe.close()
    raise OSError(f"server.uds: another server is listening on {path}")
