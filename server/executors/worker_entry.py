"""The worker processes' entry points as the executors name them when they spawn one, kept free
of torch so that the server process, which must import them, never loads torch itself.
"""

from __future__ import annotations

from multiprocessing.connection import Connection

from server.executors.contract import CudaSetup, WorkerSetup


def run_cpu_worker(conn: Connection, setup: WorkerSetup) -> None:
    from server.executors.cpu_worker import worker_main  # imports torch, in the worker only

    worker_main(conn, setup)


def run_cuda_worker(conn: Connection, setup: CudaSetup) -> None:
    from server.executors.cuda_worker import cuda_worker_main  # torch: in the worker only

    cuda_worker_main(conn, setup)
