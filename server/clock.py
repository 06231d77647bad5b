"""The clock the batcher and the deadlines read; tests inject a fake one.

Monotonic seconds as floats; nothing in deadline logic calls time.* directly.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()
