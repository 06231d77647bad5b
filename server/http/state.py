"""What the HTTP handlers read: the served models, their queues, the pool and the server phase.

Event loop only; built by the engine (server/engine.py) and handed to the path table (app.py),
which passes it to every handler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from server.batching.queue import BatchQueue
from server.clock import Clock
from server.config import Config
from server.executors.cpu_pool import CpuPool
from server.metrics import Metrics
from server.models.info import ModelInfo
from server.protocol.codec import Limits
from server.routing.devices import Devices


class Phase(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "shutting_down"
    FAILED = "failed"


@dataclass(eq=False)
class Endpoint:
    info: ModelInfo
    queue: BatchQueue


@dataclass(eq=False)
class ServerState:
    config: Config
    clock: Clock
    metrics: Metrics
    limits: Limits
    pool: CpuPool | None = None
    devices: Devices | None = None  # the GPUs, if any, and the router
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    phase: Phase = Phase.STARTING
    stopping: bool = False  # a stop signal came: not ready, though still serving (drain.py)
    failure: str = ""
    missing: dict[str, str] = field(default_factory=dict)  # model -> why it failed to load

    def outstanding_samples(self) -> int:
        return sum(e.queue.outstanding_samples for e in self.endpoints.values())
