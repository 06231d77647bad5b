"""How long one model's batch takes from dispatch to answer, and how fast its backlog drains:
learned from finished batches, but describing the model, not the accident.

Pure: the queue passes `now` in, so the rules are tested with numbers and a fake clock. Three
rules keep one stall (a stopped or restarted worker) from locking a model out, where nothing
would be computed again to bring a too-high estimate down:
- a batch that was retried (its worker died under it) is no evidence at all, and any one
  observation counts at most CLAMP times what the estimate expected;
- evidence ages: its pull halves every HALF_LIFE_S (or two batch times, if longer), back
  toward the calibrated cost (or, with no calibration, toward knowing nothing, where
  everything is admitted and measured again);
- an idle model (nothing in flight) never expects more than IDLE_MARGIN times its calibrated
  cost (nothing, without a calibration), so a lone request with a deadline beyond that is
  always tried.
For a model with a dynamic dimension every estimate is at a padded length: the calibrated cost
at that length, or (without a calibration) a time per unit of length; a fixed shape is at 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

# Weight of the newest observation in the moving averages: adapts within a few batches.
WEIGHT = 0.2
# One observation counts at most this many times the expected batch time: a real slowdown still
# raises the estimate 1.6x per batch, a five-second stall no more than that.
CLAMP = 4.0
# Evidence this old pulls half as hard; twice as old, a quarter.
HALF_LIFE_S = 5.0
# An idle model expects a batch to take at most this many times its calibrated cost.
IDLE_MARGIN = 3.0

Prior = Callable[[int, int], float]  # (samples, padded length) -> calibrated batch seconds


class BatchTime:
    """`prior`: the calibrated cost of a batch, if the model has one (a seam filled from the
    router's calibration); the estimate is then a factor on it, else raw seconds per batch
    and unit of length (per batch, for a fixed shape)."""

    def __init__(self, prior: Prior | None = None) -> None:
        # The calibration is fixed while serving, and admission asks it for the same batch
        # on every request: remembered (at most a model's batch sizes times its lengths).
        self._prior = None if prior is None else functools.lru_cache(maxsize=4096)(prior)
        # With a prior: observed / calibrated, averaged. Without one: seconds per batch and
        # unit of padded length.
        self._level = 1.0 if prior is not None else 0.0
        self._rate = 0.0  # tokens answered per second of busy time
        self._evidence_at = -math.inf
        self._half_life_s = HALF_LIFE_S
        self._last_done_at: float | None = None

    def batch_s(self, now: float, samples: int, length: int = 1, *, idle: bool = False) -> float:
        """Expected seconds from dispatch to answer of a batch of `samples` padded to `length`;
        0 when unknown."""
        kept = self._kept(now)
        if self._prior is None:
            # Nothing calibrated to bound it by: an idle model tries what comes (a miss is then
            # a 504 at the deadline, on capacity that was free anyway).
            return 0.0 if idle else self._level * kept * length
        calibrated = self._prior(max(1, samples), length)
        level = 1.0 + (self._level - 1.0) * kept
        if idle:
            level = min(level, IDLE_MARGIN)
        return calibrated * level

    def rate(self, now: float) -> float:
        """Tokens (backlog.py) answered per second of busy time; 0 (unknown) once its evidence
        is stale."""
        # Stale once kept below a half: older than one half-life (no power taken per request).
        return self._rate if now - self._evidence_at <= self._half_life_s else 0.0

    def record(
        self,
        now: float,
        dispatched_at: float,
        samples: int,
        length: int = 1,
        tokens: int | None = None,
        *,
        clean: bool = True,
    ) -> None:
        """A batch answered at `now`: `samples` padded to `length`, `tokens` of them requested
        (each sample's own length; `samples` for a fixed shape). Not clean: it was retried after
        its worker died, so its time spans a restart, not the model's work; it still ends the
        busy period."""
        last = self._last_done_at
        start = dispatched_at if last is None else max(dispatched_at, last)
        self._last_done_at = now
        if not clean or now <= dispatched_at:
            return
        expected = self.batch_s(now, samples, length)
        took = now - dispatched_at
        if expected > 0.0:
            took = min(took, CLAMP * expected)
        busy = min(now - start, took)
        if busy > 0.0:
            self._rate = _average(self._rate, (samples if tokens is None else tokens) / busy)
        self._learn(now, samples, length, took)
        self._evidence_at = now
        # A model whose batches take long has long gaps between pieces of evidence: those
        # gaps must not read as stale evidence.
        self._half_life_s = max(HALF_LIFE_S, 2.0 * took)

    def _learn(self, now: float, samples: int, length: int, took: float) -> None:
        kept = self._kept(now)
        if self._prior is None:
            self._level = _average(self._level * kept, took / length)
            return
        level = 1.0 + (self._level - 1.0) * kept
        calibrated = self._prior(max(1, samples), length)
        self._level = (1.0 - WEIGHT) * level + WEIGHT * took / calibrated

    def _kept(self, now: float) -> float:
        """How much of the learned estimate still stands: 1 when fresh, halving per half-life."""
        age = now - self._evidence_at
        if age <= 0.0:
            return 1.0
        return float(0.5 ** (age / self._half_life_s))


def _average(old: float, new: float) -> float:
    return new if old == 0.0 else (1.0 - WEIGHT) * old + WEIGHT * new
