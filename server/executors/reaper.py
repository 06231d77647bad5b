"""Collects the exit status of a worker process that died, so that it leaves no zombie behind
while the server runs on (its replacement, or the other executors, take over its work).

Event loop (main process), called by the worker link when its worker is gone. A dead worker's
pipe can read as closed a moment before the kernel has made it a zombie, so the check is
repeated on a loop timer until its status is collected; never a blocking wait on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from multiprocessing.process import BaseProcess

log = logging.getLogger(__name__)

_RETRY_S = 0.1
_KILL_AFTER = 50  # checks (5 s): a worker that closed its pipe but lives on is killed


def reap(process: BaseProcess, checks: int = 0) -> None:
    process.join(0)  # collects the exit status if the process has exited; never blocks
    if process.exitcode is not None:
        return
    if checks == _KILL_AFTER:
        log.warning("worker pid %s lost its pipe but is still running; killing it", process.pid)
        process.kill()
    asyncio.get_running_loop().call_later(_RETRY_S, reap, process, checks + 1)
