"""`microbatch infer --url` and `microbatch models --url` against a real server (the session's
shared default server: built-in models, max_batch_size 32), run through the CLI's own main().
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest

from server.cli import main
from server.models.builtin import reference_forward
from tests.server_process import ServerProcess

DATA = Path(__file__).resolve().parent.parent / "data"


def numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?", text)]


def test_infer_url_one_sample(
    default_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    path = DATA / "sample1.npy"
    assert main(["infer", "--url", default_server.url, "--input", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Processing input on CPU (server {default_server.url}, device cpu)..."
    assert lines[1].startswith("Prediction: ") and "[" not in lines[1]
    expected = reference_forward("linear", np.load(path)[None])[0, 0]
    assert numbers(lines[1]) == pytest.approx([expected], rel=1e-3)
    assert re.fullmatch(
        r"Inference time: \d+\.\d{3} ms \(round trip; server: queue \d+\.\d{3} ms, "
        r"compute \d+\.\d{3} ms, batch size \d+\)",
        lines[2],
    )


def test_infer_url_batch_file_and_split(
    default_server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    batch = np.load(DATA / "batch_samples.npy")
    assert (
        main(["infer", "--url", default_server.url, "--input", str(DATA / "batch_samples.npy")])
        == 0
    )
    prediction = capsys.readouterr().out.splitlines()[1]
    assert numbers(prediction) == pytest.approx(reference_forward("linear", batch)[:, 0], rel=1e-3)

    big = np.random.default_rng(7).standard_normal((70, 10)).astype(np.float32)
    np.save(tmp_path / "big.npy", big)
    assert main(["infer", "--url", default_server.url, "--input", str(tmp_path / "big.npy")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert numbers(lines[1]) == pytest.approx(reference_forward("linear", big)[:, 0], rel=1e-3)
    assert "round trip over 3 requests" in lines[2]  # 70 samples at 32 per request


def test_models_url_lists_specs_and_batching(
    default_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--url", default_server.url]) == 0
    out = capsys.readouterr().out
    assert "linear (ready)\n  inputs:   input float32[10]\n  outputs:  output float32[1]\n" in out
    assert "mlp (ready)\n  inputs:   input float32[256]\n  outputs:  output float32[10]\n" in out
    assert "  batching: max_batch_size=32, max_delay_ms=5.0, max_queue_size=2048, " in out


def test_cli_errors_are_one_line_and_a_nonzero_status(
    default_server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = str(DATA / "sample1.npy")
    assert main(["infer", "--url", default_server.url, "--model", "nope", "--input", sample]) == 1
    assert capsys.readouterr().err.startswith("microbatch: unknown_model: no model named 'nope'")
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert main(["models", "--url", url, "--timeout-s", "2"]) == 1
    assert "cannot connect" in capsys.readouterr().err
    assert main(["infer", "--url", default_server.url, "--input", "/nonexistent.npy"]) == 2
    assert "cannot read --input" in capsys.readouterr().err
