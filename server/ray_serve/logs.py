"""microbatch's log lines in a Ray Serve replica: Serve writes what its "ray.serve" logger gets
to the replica's log file (and to the driver); microbatch logs under "server", so that logger
gets the same handlers, at server.log_level.

Runs in a replica process, once, from a deployment's constructor.
"""

from __future__ import annotations

import logging


def log_through_serve(level: str) -> None:
    ours = logging.getLogger("server")
    ours.setLevel(level.upper())
    for handler in logging.getLogger("ray.serve").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False  # Serve's handlers have it; the root logger would print it twice
