"""A short run of the coverage-guided decoder fuzzer (tests/fuzz/fuzz_decoder.py) in CI.

The target runs in a child process (atheris owns its process), bounded by a number of inputs.
Skipped where atheris has no wheel (it needs Linux x86-64 and Python 3.11+); the Hypothesis
properties in test_decoder_properties.py cover the same ground everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

TARGET = Path(__file__).resolve().parent / "fuzz" / "fuzz_decoder.py"
RUNS = 200_000


def seeds() -> list[bytes]:
    """Valid requests in each of the target's forms (first byte), for it to mutate."""
    tensor = {"dtype": "float32", "shape": [2, 4], "data": bytes(32)}
    listed = {"dtype": "float32", "shape": [4], "data": [1, 2, 3, 4]}
    return [
        b"\x00" + msgpack.packb({"inputs": {"x": tensor}, "id": "a", "timeout_ms": 5}),
        b"\x01" + json.dumps({"inputs": {"x": listed}, "id": "b"}).encode(),
        b"\x02" + bytes(range(64)),
    ]


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_decoder_survives_a_short_fuzzing_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    result = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-runs={RUNS}",
            f"-artifact_prefix={tmp_path}/",
            "-seed=1",
            str(corpus),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    log = result.stderr[-4000:]
    assert result.returncode == 0, log
    assert re.search(rf"Done {RUNS} runs", result.stderr), log
    assert not list(tmp_path.glob("crash-*")), log
