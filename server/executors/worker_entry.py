"""The worker process's entry point as the pool names it, kept free of torch so that the server
process, which must import it to spawn workers, never loads torch itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from multiprocessing.connection import Connection

from server.config import ModelConfig


@dataclass(frozen=True)
class WorkerSetup:
    index: int
    models: tuple[ModelConfig, ...]
    threads: int


def run_worker(conn: Connection, setup: WorkerSetup) -> None:
    from server.executors.cpu_worker import worker_main  # imports torch, in the worker only

    worker_main(conn, setup)
