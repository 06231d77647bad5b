"""Which queued requests ride together in a batch of a model with a dynamic length (token ids,
frames): a pure function of a snapshot of the queue, so that little compute goes to padding.

No asyncio, no clock: the queue passes the snapshot in, and the rules are tested with numbers.
The oldest request is always in the batch (so its delay bound holds and nothing starves: every
request becomes the oldest in time); the others are picked by length. For every padded length
M the oldest allows, the candidates are the oldest plus the k longest requests no longer than
M, for every k that fits (k = 0: the oldest alone). Each is scored by its efficiency: what its
requests would cost in an ideal world (each at its own length, the fixed cost shared by a full
batch) over what the padded batch costs; the most efficient wins, among those that waste no
larger a share on padding than the batch of arrival order would. (Tokens per second would be
greedy: a short oldest padded to ride with the longest looks cheap per token, and leaves the
other short ones a batch of their own; full batches only would pad a long oldest with every
short one.) Arrival order is a candidate, so the choice is never worse on padding nor on
efficiency.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# Seconds for batches of (samples, padded length), elementwise over numpy arrays (a + b*n*L +
# c*n*L*L is): the policy compares candidates with it.
BatchCost = Callable[[np.ndarray, np.ndarray], np.ndarray]
# Without a measured cost: a batch's fixed cost counts as this many padded tokens, so that
# a full batch beats a lone request without waste (a batch of one is never "cheapest").
FIXED_TOKENS = 512
# Requests looked at, in arrival order: bounds the policy's time per batch; those behind the
# window move into it as the older ones leave.
WINDOW_BATCHES = 8


@dataclass(frozen=True, slots=True)
class Waiting:
    """One queued request as the policy sees it."""

    samples: int
    length: int


@dataclass(frozen=True, slots=True)
class Choice:
    picked: tuple[int, ...]  # indices into the snapshot, in arrival order
    samples: int
    length: int  # the padded length: the longest picked
    tokens: int  # real tokens: sum of samples x length

    @property
    def padded_tokens(self) -> int:
        return self.samples * self.length

    @property
    def waste(self) -> float:
        """The share of computed tokens that are padding."""
        padded = self.padded_tokens
        return 0.0 if padded == 0 else 1.0 - self.tokens / padded


def default_cost(samples: np.ndarray, length: np.ndarray) -> np.ndarray:
    return np.asarray(FIXED_TOKENS + samples * length, dtype=np.float64)


def arrival_order(waiting: Sequence[Waiting], max_batch: int) -> Choice:
    """The batch a queue that ignores lengths would form: the oldest requests that fit."""
    picked: list[int] = []
    samples = 0
    for i, w in enumerate(waiting):
        if samples + w.samples > max_batch:
            break
        picked.append(i)
        samples += w.samples
    return _choice(waiting, picked)


def by_length(waiting: Sequence[Waiting], max_batch: int, cost: BatchCost = default_cost) -> Choice:
    """The batch to release now: see the module's docstring. `waiting` is in arrival order
    (index 0 the oldest) and should be at most WINDOW_BATCHES * max_batch long. Every
    candidate is scored at once with prefix sums: a few numpy calls, not a loop over the
    queue per candidate."""
    fifo = arrival_order(waiting, max_batch)
    if len(waiting) <= 1:
        return fifo
    oldest = waiting[0]
    room = max_batch - oldest.samples
    # The others by length (ties: the older first, so that the longer-waiting ride sooner).
    order = np.array(sorted(range(1, len(waiting)), key=lambda i: (waiting[i].length, -i)))
    lengths = np.array([waiting[i].length for i in order], dtype=np.int64)
    samples = np.array([waiting[i].samples for i in order], dtype=np.int64)
    below = np.concatenate(([0], np.cumsum(samples)))  # samples at positions < p
    tokens_below = np.concatenate(([0], np.cumsum(samples * lengths)))
    # Candidates: for each padded length M >= the oldest's, the others from the longest <= M
    # downward (positions start..end), k of them for every k that fits beside the oldest; k = 0
    # is the oldest alone. (Only full batches would pad a long oldest with every short one.)
    first_end = int(np.searchsorted(lengths, oldest.length, side="right")) - 1
    later = np.arange(first_end + 1, len(order))
    later = later[np.append(lengths[1:] != lengths[:-1], True)[later]]  # last of each length
    ends_1d = np.concatenate(([first_end], later))
    counts = np.arange(min(room, len(order)) + 1)
    ends = np.repeat(ends_1d, len(counts))
    starts = ends + 1 - np.tile(counts, len(ends_1d))
    fits = (starts >= 0) & (below[ends + 1] - below[np.maximum(starts, 0)] <= room)
    ends, starts = ends[fits], starts[fits]
    n = oldest.samples + below[ends + 1] - below[starts]
    longest = np.where(starts <= ends, lengths[np.maximum(ends, 0)], 0)
    padded = np.maximum(longest, oldest.length)
    real = oldest.samples * oldest.length + tokens_below[ends + 1] - tokens_below[starts]
    waste = 1.0 - real / (n * padded)
    fixed = _fixed(cost)
    own = cost(samples, lengths) - fixed  # each request's cost at its own length, unshared
    own_below = np.concatenate(([0.0], np.cumsum(own)))
    oldest_own = float(cost(np.array([oldest.samples]), np.array([oldest.length]))[0]) - fixed
    ideal = fixed * n / max_batch + oldest_own + own_below[ends + 1] - own_below[starts]
    rate = ideal / np.maximum(cost(n, padded), 1e-12)
    rate[waste > fifo.waste + 1e-12] = -1.0  # never more padding than arrival order
    best = int(np.argmax(rate))
    if rate[best] <= efficiency(waiting, fifo, max_batch, cost):
        return fifo
    picked = [0, *(int(i) for i in order[starts[best] : ends[best] + 1])]
    return _choice(waiting, sorted(picked))


def _choice(waiting: Sequence[Waiting], picked: Sequence[int]) -> Choice:
    samples = sum(waiting[i].samples for i in picked)
    length = max((waiting[i].length for i in picked), default=0)
    tokens = sum(waiting[i].samples * waiting[i].length for i in picked)
    return Choice(tuple(picked), samples, length, tokens)


def efficiency(
    waiting: Sequence[Waiting], choice: Choice, max_batch: int, cost: BatchCost = default_cost
) -> float:
    """What the chosen requests would cost alone at their own lengths, with the fixed cost
    shared as in a full batch, over what their padded batch costs: 1.0 is a full batch of equal
    lengths; padding and a part-filled batch bring it down."""
    if choice.samples == 0:
        return 0.0
    fixed = _fixed(cost)
    picked = [waiting[i] for i in choice.picked]
    own = cost(np.array([w.samples for w in picked]), np.array([w.length for w in picked]))
    ideal = fixed * choice.samples / max_batch + float(np.sum(own - fixed))
    spent = cost(np.array([choice.samples]), np.array([choice.length]))
    return ideal / max(float(spent[0]), 1e-12)


def _fixed(cost: BatchCost) -> float:
    """The cost's fixed part: a batch of nothing."""
    return float(cost(np.array([0]), np.array([0]))[0])


def window(max_batch: int) -> int:
    return WINDOW_BATCHES * max_batch
