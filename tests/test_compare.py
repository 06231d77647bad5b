"""`microbatch compare`: the summary from known measurements (winners, crossover,
recommendation, table, JSON), the batch-size syntax, and one real run on this machine's CPU
(with a GPU where there is one) writing its JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.comparison import (
    Measurement,
    format_table,
    parse_sizes,
    summarize,
    to_json,
)

REPO = Path(__file__).resolve().parents[1]


def measured(device: str, fixed_ms: float, per_sample_ms: float) -> list[Measurement]:
    out = []
    for n in (1, 2, 4, 8, 16, 32):
        ms = fixed_ms + per_sample_ms * n
        out.append(Measurement(device, n, ms / 1e3, 0.9 * ms / 1e3, 1.1 * ms / 1e3, 10))
    return out


def test_the_crossover_is_the_first_size_from_which_the_gpu_always_wins() -> None:
    # CPU 0.1 + 0.1 n ms, GPU 1 + 0.01 n ms: the GPU wins from n = 11 on; measured 16.
    summary = summarize(measured("cpu", 0.1, 0.1) + measured("cuda:0", 1.0, 0.01))
    assert [r.winner for r in summary.rows] == ["cpu"] * 4 + ["cuda:0"] * 2
    assert summary.crossover == 16
    assert "batches of 16 samples or more finish sooner on cuda:0" in summary.recommendation
    assert 'keep routing = "auto"' in summary.recommendation


def test_a_gpu_that_wins_only_in_the_middle_has_no_crossover() -> None:
    cpu = measured("cpu", 0.1, 0.1)
    gpu = [
        m if m.samples != 32 else Measurement("cuda:0", 32, 1.0, 1.0, 1.0, 3)
        for m in measured("cuda:0", 0.2, 0.01)
    ]
    summary = summarize(cpu + gpu)
    assert summary.rows[3].winner == "cuda:0" and summary.rows[-1].winner == "cpu"
    assert summary.crossover is None
    assert 'routing = "cpu" suits this model' in summary.recommendation


def test_a_gpu_that_always_wins() -> None:
    summary = summarize(measured("cpu", 1.0, 0.1) + measured("cuda:0", 0.1, 0.01))
    assert summary.crossover == 1
    assert summary.recommendation.startswith("cuda:0 wins at every measured batch size")


def test_every_gpu_counts_not_only_the_first() -> None:
    # cuda:0 never beats the CPU; cuda:1 does from 16 on (1 + 0.01 n against 0.1 + 0.1 n).
    cpu, slow, fast = (
        measured("cpu", 0.1, 0.1),
        measured("cuda:0", 5.0, 0.1),
        measured("cuda:1", 1.0, 0.01),
    )
    summary = summarize(cpu + slow + fast)
    assert summary.devices == ["cpu", "cuda:0", "cuda:1"]
    assert [r.winner for r in summary.rows] == ["cpu"] * 4 + ["cuda:1"] * 2
    assert summary.crossover == 16
    assert summary.crossovers == {"cuda:0": None, "cuda:1": 16}
    assert "finish sooner on cuda:1" in summary.recommendation
    header = format_table(summary)[0].split()
    assert [word for word in header if word.startswith(("cpu", "cuda"))] == list(summary.devices)
    assert to_json(summary, {})["crossover_batch_size_by_device"] == summary.crossovers


def test_the_crossover_follows_the_fastest_gpu_at_each_size() -> None:
    # cuda:0 wins from 4 to 16 but not at 32; cuda:1 only at 32: neither alone beats the CPU
    # from 4 on, the two together do.
    cpu = measured("cpu", 0.1, 0.1)
    first = [
        m if m.samples != 32 else Measurement("cuda:0", 32, 10.0, 10.0, 10.0, 3)
        for m in measured("cuda:0", 0.35, 0.02)
    ]
    second = measured("cuda:1", 2.0, 0.01)
    summary = summarize(cpu + first + second)
    winners = ["cpu", "cpu", "cuda:0", "cuda:0", "cuda:0", "cuda:1"]
    assert [r.winner for r in summary.rows] == winners
    assert summary.crossover == 4
    assert summary.crossovers == {"cuda:0": None, "cuda:1": 32}


def test_without_a_gpu_the_table_is_the_cpu_and_says_so() -> None:
    summary = summarize(measured("cpu", 0.1, 0.1))
    assert summary.devices == ["cpu"] and summary.crossover is None
    assert summary.recommendation.startswith("no CUDA GPU found")
    lines = format_table(summary)
    assert lines[0].split() == ["batch", "cpu", "ms", "p25-p75", "samples/s", "winner"]
    assert lines[2].split() == ["1", "0.200", "0.180-0.220", "5000", "cpu"]
    assert len(lines) == 2 + 6


def test_json_has_every_measurement() -> None:
    summary = summarize(measured("cpu", 0.1, 0.1) + measured("cuda:0", 1.0, 0.01))
    doc = to_json(summary, {"model": "mlp"})
    json.dumps(doc)
    assert doc["model"] == "mlp" and doc["crossover_batch_size"] == 16
    assert doc["rows"][0]["cpu"] == {
        "median_ms": pytest.approx(0.2),
        "p25_ms": pytest.approx(0.18),
        "p75_ms": pytest.approx(0.22),
        "runs": 10,
        "samples_per_s": pytest.approx(5000),
    }


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("1,2,4,...,1024", [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]),
        ("1,2,4,...,100", [1, 2, 4, 8, 16, 32, 64, 100]),
        ("3,9,...,81", [3, 9, 27, 81]),
        ("8, 1, 8", [1, 8]),
    ],
)
def test_batch_sizes(text: str, sizes: list[int]) -> None:
    assert parse_sizes(text) == sizes


@pytest.mark.parametrize("text", ["", "0,1", "1,...,8", "4,2,...,8", "1,2,...", "a,b"])
def test_bad_batch_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_sizes(text)


def test_compare_runs_here_and_writes_json_and_a_plot(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    sample = tmp_path / "x.npy"
    subprocess.run(
        [sys.executable, "-c", f"import numpy as np; np.save({str(sample)!r}, np.ones(10, 'f4'))"],
        check=True,
    )
    args = ["--model", "linear", "--batch-sizes", "1,2,...,8", "--repeats", "3", "--warmup", "1"]
    args += ["--input", str(sample), "--json", str(out_json), "--plot", str(out_png)]
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "compare", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(out_json.read_text())
    assert [r["batch_size"] for r in doc["rows"]] == [1, 2, 4, 8]
    assert all(r["cpu"]["runs"] == 3 and r["cpu"]["median_ms"] > 0 for r in doc["rows"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if torch.cuda.is_available():
        visible = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        assert doc["devices"] == ["cpu", *visible]  # every visible GPU, not only the first
        assert list(doc["gpus"]) == visible
    else:
        assert doc["devices"] == ["cpu"] and doc["gpu"] is None and doc["gpus"] == {}
        assert "GPU: none found" in result.stdout
        assert "no CUDA GPU found" in result.stdout


def test_compare_names_an_unknown_model() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "compare", "--model", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--model 'nope' is not configured" in result.stderr
