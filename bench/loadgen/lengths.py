"""Length distributions for models that take inputs of any length (`--lengths`): fixed,
uniform, or long-tailed (a Pareto tail clipped to a range, as real text lengths are).

Pure: a spec string parsed into a LengthDist, lengths drawn from a numpy Generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.loadgen.errors import LoadGenError

KINDS = ("fixed", "uniform", "pareto")
USAGE = "fixed:L, uniform:LO:HI or pareto:LO:HI[:ALPHA] (long-tailed, ALPHA default 1.2)"


@dataclass(frozen=True)
class LengthDist:
    kind: str
    low: int
    high: int
    alpha: float = 1.2

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.low}"
        tail = f":{self.alpha:g}" if self.kind == "pareto" else ""
        return f"{self.kind}:{self.low}:{self.high}{tail}"


def parse_lengths(text: str) -> LengthDist:
    kind, *parts = text.split(":")
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise LoadGenError(f"--lengths {text!r}: write {USAGE}") from None
    if kind not in KINDS or len(numbers) != {"fixed": 1, "uniform": 2}.get(kind, len(numbers)):
        raise LoadGenError(f"--lengths {text!r}: write {USAGE}")
    if kind == "pareto" and len(numbers) not in (2, 3):
        raise LoadGenError(f"--lengths {text!r}: write {USAGE}")
    low = int(numbers[0])
    high = int(numbers[1]) if kind != "fixed" else low
    alpha = numbers[2] if len(numbers) == 3 else 1.2
    if not (1 <= low <= high) or alpha <= 0 or any(n != int(n) for n in numbers[:2]):
        raise LoadGenError(f"--lengths {text!r}: lengths are integers with 1 <= LO <= HI")
    return LengthDist(kind, low, high, alpha)


def draw_lengths(dist: LengthDist, count: int, rng: np.random.Generator) -> np.ndarray:
    if dist.kind == "fixed":
        return np.full(count, dist.low, dtype=np.int64)
    if dist.kind == "uniform":
        return rng.integers(dist.low, dist.high + 1, size=count)
    # Pareto from LO: most lengths short, a long tail up to HI (clipped there).
    draws = dist.low * (1.0 + rng.pareto(dist.alpha, size=count))
    return np.clip(np.floor(draws), dist.low, dist.high).astype(np.int64)
