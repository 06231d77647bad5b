"""TorchScript models for the reliability tests, written to disk by the tests.

Runs in the test process (imports torch); the server loads the files in its workers.
"""

from __future__ import annotations

from pathlib import Path

import torch

POISON = 666.0  # a sample whose first value is this makes the model raise


class Work(torch.nn.Module):
    """y = 2x on float32[2]. Burns max(x[:, 1]) rounds of 384x384 matrix products first (about
    2 ms each on one core), so a test sets a batch's cost from its inputs, and raises when any
    sample's first value is POISON: a poisoned request fails whatever batch it is in."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("m", torch.full((384, 384), 1.0 / 384))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rounds = min(max(int(x[:, 1].max().item()), 0), 5000)
        acc = self.m
        for _ in range(rounds):
            acc = acc @ self.m
        if bool((x[:, 0] == 666.0).any()):  # POISON
            raise ValueError("poisoned input 666")
        return x * 2.0 + 0.0 * acc[0, 0]


class Burn(torch.nn.Module):
    """y = 2x on float32[2], after `rounds` 256x256 matrix products per sample of the batch:
    a model whose cost per request is set when it is saved (a slow replica: more rounds)."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds = rounds
        self.register_buffer("m", torch.full((256, 256), 1.0 / 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.m
        for _ in range(self.rounds * x.shape[0]):
            acc = acc @ self.m
        return x * 2.0 + 0.0 * acc[0, 0]


class FailsWarmUp(torch.nn.Module):
    """Answers one sample (so it loads) and raises on any larger batch (so its warm-up fails)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            raise RuntimeError("this model only takes batches of one")
        return x


ONE_ROW = 555.0  # a batch holding a sample whose first value is this gets one output row


class OneRow(torch.nn.Module):
    """y = 2x on float32[2], except that a batch holding a sample whose first value is ONE_ROW
    gets only its first row back (shape [1, 2] for a batch of n): the model that, unchecked,
    would broadcast one answer to every request of its batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] == 555.0).any()):  # ONE_ROW
            return x[:1] * 2.0
        return x * 2.0


def save(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path
