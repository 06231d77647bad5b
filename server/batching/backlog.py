"""One model's admitted and unanswered work, queued and in an executor, counted twice: in samples
(the queue limit, the release policy) and in tokens, each sample times its own length (what
the backlog drains in: a sample of 500 tokens takes longer than one of 8). For a fixed shape a
sample is one token, and the two counts are equal.

Event loop only; plain integers. The queue owns one and tells it every move.
"""

from __future__ import annotations

from collections.abc import Iterable

from server.batching.pending import PendingRequest


class Backlog:
    __slots__ = ("in_flight", "in_flight_tokens", "queued", "queued_tokens")

    def __init__(self) -> None:
        self.queued = self.queued_tokens = 0
        self.in_flight = self.in_flight_tokens = 0

    @property
    def outstanding(self) -> int:
        """Samples admitted and not yet answered."""
        return self.queued + self.in_flight

    def enqueue(self, request: PendingRequest) -> None:
        self.queued += request.samples
        self.queued_tokens += request.samples * request.length

    def dequeue(self, request: PendingRequest) -> None:
        """Taken from the queue: into a batch (then `start`), or dropped."""
        self.queued -= request.samples
        self.queued_tokens -= request.samples * request.length

    def clear_queue(self) -> None:
        self.queued = self.queued_tokens = 0

    def start(self, requests: Iterable[PendingRequest]) -> None:
        """In an executor, or waiting to be retried there."""
        for request in requests:
            self.in_flight += request.samples
            self.in_flight_tokens += request.samples * request.length

    def end(self, requests: Iterable[PendingRequest]) -> int:
        """No longer in flight; returns their tokens."""
        tokens = 0
        for request in requests:
            self.in_flight -= request.samples
            tokens += request.samples * request.length
        self.in_flight_tokens -= tokens
        return tokens
