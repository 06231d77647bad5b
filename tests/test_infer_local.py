"""In-process `microbatch infer` and scripts/inference.py, run as real subprocesses on the CPU:
the three lines they print, the GPU fallback, and one clear error line (exit 2) for bad input.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from server.models.builtin import reference_forward

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
_PREDICTION = re.compile(r"^Prediction: (.+)$", re.MULTILINE)
_TIME = re.compile(r"^Inference time: \d+(\.\d+)? ms$", re.MULTILINE)


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def _infer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "server.cli", "infer", *args, env=env)


def _prediction(stdout: str) -> str:
    match = _PREDICTION.search(stdout)
    assert match, stdout
    return match.group(1)


def _expected(path: Path) -> np.ndarray:
    return reference_forward("linear", np.load(path)).reshape(-1)


def test_one_sample_prints_the_three_lines_with_a_scalar() -> None:
    result = _infer("--device", "cpu", "--input", "data/sample1.npy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Processing input on CPU...\n")
    assert _TIME.search(result.stdout), result.stdout
    value = float(_prediction(result.stdout))  # a bare number, not a list
    np.testing.assert_allclose(value, _expected(DATA / "sample1.npy")[0], rtol=1e-3, atol=1e-4)


def test_a_batch_file_prints_a_list_of_one_prediction_per_sample() -> None:
    result = _infer("--device", "cpu", "--input", "data/batch_samples.npy")
    assert result.returncode == 0, result.stderr
    text = _prediction(result.stdout)
    assert text.startswith("[") and text.endswith("]")
    values = [float(v) for v in text[1:-1].split(",")]
    assert len(values) == 4
    np.testing.assert_allclose(values, _expected(DATA / "batch_samples.npy"), rtol=1e-3, atol=1e-4)


def test_device_gpu_without_cuda_warns_and_runs_on_the_cpu() -> None:
    # No visible device, whatever the machine has: the fallback path runs everywhere.
    result = _infer(
        "--device", "gpu", "--input", "data/sample1.npy", env={"CUDA_VISIBLE_DEVICES": ""}
    )
    assert result.returncode == 0, result.stderr
    assert "--device gpu asked for, but no CUDA GPU is available; running on the CPU" in (
        result.stderr
    )
    assert "Processing input on CPU..." in result.stdout and _TIME.search(result.stdout)


def test_the_inference_script_runs_on_the_cpu() -> None:
    result = _run(
        sys.executable, "scripts/inference.py", "--device", "cpu", "--input", "data/sample1.npy"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Processing input on CPU...\n")
    float(_prediction(result.stdout))
    assert _TIME.search(result.stdout), result.stdout


def _assert_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("microbatch: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_a_missing_input_file_is_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.npy"
    result = _infer("--device", "cpu", "--input", str(missing))
    _assert_one_error_line(result, f"cannot read --input {missing}", "No such file")


def test_a_wrong_shaped_input_is_one_error_line(tmp_path: Path) -> None:
    path = tmp_path / "wide.npy"
    np.save(path, np.zeros((3, 7), np.float32))
    result = _infer("--device", "cpu", "--input", str(path))
    _assert_one_error_line(result, f"--input {path} has shape [3, 7]", "shape [10]")


def test_the_encoder_takes_token_ids_of_any_length_by_its_built_in_name(tmp_path: Path) -> None:
    import torch

    from server.models.encoder import build_encoder

    ids = np.arange(1, 13, dtype=np.int64)
    np.save(tmp_path / "ids.npy", ids)
    result = _infer("--device", "cpu", "--model", "encoder", "--input", str(tmp_path / "ids.npy"))
    assert result.returncode == 0, result.stderr
    printed = np.array(json_numbers(_prediction(result.stdout)))
    with torch.inference_mode():
        alone = build_encoder()(torch.from_numpy(ids[None]), torch.zeros((1, 12), dtype=torch.bool))
    np.testing.assert_allclose(printed, alone[0].numpy(), rtol=1e-3, atol=1e-3)


def json_numbers(text: str) -> list[float]:
    return [float(x) for x in text.strip("[]").split(",")]
