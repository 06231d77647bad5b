"""What one load-test run does: the single explicit settings object of the generator.

Plain frozen data, built in the CLI process and pickled to every generator process.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bench.loadgen.lengths import LengthDist
from bench.loadgen.schedule import Phase

OPEN = "open"
CLOSED = "closed"


@dataclass(frozen=True)
class LoadPlan:
    url: str  # http://host:port or unix:///path
    model: str
    mode: str  # OPEN (a schedule of sends) or CLOSED (a number of clients)
    phases: tuple[Phase, ...]
    arrivals: str = "poisson"  # open loop: "poisson" or "constant"
    concurrency: int = 0  # closed loop: clients in all processes together
    samples_per_request: int = 1
    timeout_ms: float | None = None  # sent in each request body; None = the server's default
    client_timeout_s: float = 30.0  # the generator gives up on a request after this
    processes: int = 1
    connections: int = 256  # keep-alive connections per generator process, at most
    input_path: str | None = None  # a .npy file; None = random inputs of the model's shape
    lengths: LengthDist | None = None  # a dynamic-length model: the lengths sent
    seed: int = 0
    lag_threshold_ms: float = 10.0

    @property
    def total_s(self) -> float:
        return sum(p.duration_s for p in self.phases)

    @property
    def warmup_s(self) -> float:
        return sum(p.duration_s for p in self.phases if p.warmup)

    def to_json(self) -> dict[str, Any]:
        settings = asdict(self)
        settings["phases"] = [asdict(p) for p in self.phases]
        return settings
