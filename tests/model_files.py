"""Small user models written to disk for tests: TorchScript and torch.export programs.

Runs in the test process (imports torch); the server loads the files in its workers.
"""

from __future__ import annotations

from pathlib import Path

import torch


class Affine(torch.nn.Module):
    """y = 3x + 1 on float32[16]; answers are checkable from the input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3.0 * x + 1.0


class TwoInOut(torch.nn.Module):
    """Two inputs, two outputs: sum = a + b.sum(-1, keepdim), prod = a * 2."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": a + b.sum(dim=1, keepdim=True).to(a.dtype), "twice": a * 2.0}


class RaisesOnNegative(torch.nn.Module):
    """Raises when any sample's first value is negative: a poisoned input fails its batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x[:, 0] < 0).any()):
            raise ValueError("negative input rejected by the model")
        return x * 2.0


class Log(torch.nn.Module):
    """y = log(x) on float32[3]: 0 gives -inf, a negative gives nan (non-finite outputs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x)


class Slow(torch.nn.Module):
    """Burns CPU for a while per batch (a chain of matrix products); output = x + 1."""

    def __init__(self, rounds: int) -> None:
        super().__init__()
        self.rounds = rounds
        self.register_buffer("m", torch.full((384, 384), 1.0 / 384))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = self.m
        for _ in range(self.rounds):
            acc = acc @ self.m
        return x + 1.0 + 0.0 * acc[0, 0]


class EveryDtype(torch.nn.Module):
    """One input per wire dtype, each answered in its own dtype: `{name}_out` is the input
    negated for bool, plus one for integers, times two for floats."""

    def forward(
        self,
        b: torch.Tensor,
        u8: torch.Tensor,
        i8: torch.Tensor,
        i16: torch.Tensor,
        i32: torch.Tensor,
        i64: torch.Tensor,
        f16: torch.Tensor,
        f32: torch.Tensor,
        f64: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        return {
            "b_out": ~b,
            "u8_out": u8 + 1,
            "i8_out": i8 + 1,
            "i16_out": i16 + 1,
            "i32_out": i32 + 1,
            "i64_out": i64 + 1,
            "f16_out": f16 * 2.0,
            "f32_out": f32 * 2.0,
            "f64_out": f64 * 2.0,
        }


# The `--model` spec of EveryDtype: each input per sample of shape [3].
EVERY_DTYPE_INPUTS = {
    "b": "bool",
    "u8": "uint8",
    "i8": "int8",
    "i16": "int16",
    "i32": "int32",
    "i64": "int64",
    "f16": "float16",
    "f32": "float32",
    "f64": "float64",
}


def save_script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


def save_export(path: Path) -> Path:
    """A .pt2 of Affine over float32[16] with a dynamic batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(Affine(), (torch.zeros(2, 16),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    return path
