"""The worker's end of its link to the server: contract messages over the Connection it was
spawned with, and the serve loop that every worker runs.

Runs in the worker processes, CPU and GPU; no torch. Sends are locked, since a GPU worker answers
from several threads; a send to a server that is gone is dropped (nobody is left to answer).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from server.executors.contract import (
    Run,
    ServerMessage,
    WorkerMessage,
    decode_from_server,
    encode,
)


class Channel:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def send(self, message: WorkerMessage) -> None:
        payload = encode(message)
        with self._lock:
            try:
                self._conn.send_bytes(payload)
            except OSError:  # the server is gone: recv_blocking says so (a try, as cheaper
                return  # than contextlib.suppress on this per-batch path)

    def recv_blocking(self) -> ServerMessage | None:
        """The server's next message; None once the server is gone."""
        try:
            return decode_from_server(self._conn.recv_bytes())
        except (EOFError, OSError):
            return None

    def serve_blocking(self, run: Callable[[Run], None]) -> None:
        """Hands each Run to `run`, in order, until Stop or until the server is gone."""
        while isinstance(message := self.recv_blocking(), Run):
            run(message)
