"""Variable-length inputs through real `microbatch serve` processes: the built-in encoder over
random mixes of lengths gives each request the answer of the model run alone on it; a model
with a per-position output gets it cut back to each request's length, with the padding value
and the lengths the server fills; a request over max_length is a 400 that harms no other; the
listing, /metrics and the Open Inference Protocol show the dynamic dimension."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import AsyncClient, BadRequest, Client
from tests.conftest import request
from tests.server_process import ServerProcess, start_server

MAX_LENGTH = 64
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def encoder() -> Iterator[ServerProcess]:
    env = {"MICROBATCH_BATCHING_MAX_LENGTH": str(MAX_LENGTH)}
    with start_server("--model", "encoder", "--cpu-workers", "1", env=env) as server:
        assert server.url, server.log()
        yield server


def alone(ids: np.ndarray) -> np.ndarray:
    """The encoder run on each sample by itself, in this process: no padding at all."""
    import torch

    from server.models.encoder import build_encoder

    model = build_encoder()
    with torch.inference_mode():
        rows = [
            model(torch.from_numpy(row[None]), torch.zeros((1, len(row)), dtype=torch.bool))
            for row in ids
        ]
    return torch.cat(rows).numpy()


def test_each_answer_in_a_random_mix_of_lengths_equals_the_model_alone(
    encoder: ServerProcess,
) -> None:
    rng = np.random.default_rng(13)
    lengths = np.minimum(rng.pareto(1.2, 96) * 4 + 1, MAX_LENGTH).astype(int)
    batches = [rng.integers(0, 30_000, size=(int(rng.integers(1, 3)), int(n))) for n in lengths]

    async def send_all() -> list[np.ndarray]:
        async with AsyncClient(encoder.url) as client:
            return list(await asyncio.gather(*(client.predict("encoder", b) for b in batches)))

    answers = asyncio.run(send_all())
    for ids, answer in zip(batches, answers, strict=True):
        assert answer.shape == (len(ids), 128)
        np.testing.assert_allclose(answer, alone(ids), rtol=RTOL, atol=ATOL)
    metrics = _metrics(encoder)
    batches_run = _value(metrics, r'microbatch_batch_size_count\{device="cpu",model="encoder"\}')
    assert batches_run < len(batches)  # they shared batches: padded, not run one by one
    requested = _value(metrics, r'microbatch_tokens_total\{kind="requested",model="encoder"\}')
    computed = _value(metrics, r'microbatch_tokens_total\{kind="computed",model="encoder"\}')
    assert requested >= sum(len(b) * b.shape[1] for b in batches)  # warm-up batches excepted
    assert computed >= requested


def test_a_request_over_max_length_is_a_400_naming_both_and_others_are_answered(
    encoder: ServerProcess,
) -> None:
    rng = np.random.default_rng(5)
    good = [rng.integers(0, 30_000, size=(1, n)) for n in (3, 40, 64)]
    long = rng.integers(0, 30_000, size=(1, MAX_LENGTH + 1))

    async def send() -> list[object]:
        async with AsyncClient(encoder.url) as client:
            calls = [client.predict("encoder", x) for x in (*good, long)]
            return list(await asyncio.gather(*calls, return_exceptions=True))

    *answers, refused = asyncio.run(send())
    assert isinstance(refused, BadRequest), refused
    assert f"length {MAX_LENGTH + 1}" in str(refused) and f"at most {MAX_LENGTH}" in str(refused)
    for ids, answer in zip(good, answers, strict=True):
        np.testing.assert_allclose(answer, alone(ids), rtol=RTOL, atol=ATOL)


def test_the_listing_shows_the_dynamic_dimension_and_what_the_server_fills(
    encoder: ServerProcess,
) -> None:
    with Client(encoder.url) as client:
        (info,) = client.models()
    ids, mask = info.inputs
    assert (ids.name, ids.shape, ids.fill) == ("ids", (-1,), "")
    assert (mask.name, mask.shape, mask.fill) == ("padding_mask", (-1,), "padding_mask")
    assert info.outputs[0].shape == (128,)
    assert info.batching["max_length"] == MAX_LENGTH


def test_the_open_inference_protocol_takes_one_length_per_request(encoder: ServerProcess) -> None:
    status, _, body = request(encoder.url, "GET", "/v2/models/encoder")
    assert status == 200
    assert json.loads(body)["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": [-1, -1]}]
    ids = np.arange(1, 15, dtype=np.int64).reshape(2, 7)
    payload = {
        "inputs": [
            {"name": "ids", "datatype": "INT64", "shape": [2, 7], "data": ids.ravel().tolist()}
        ]
    }
    status, _, body = request(
        encoder.url,
        "POST",
        "/v2/models/encoder/infer",
        json.dumps(payload).encode(),
        "application/json",
    )
    assert status == 200, body
    (output,) = json.loads(body)["outputs"]
    assert output["shape"] == [2, 128]
    got = np.array(output["data"], dtype=np.float32).reshape(2, 128)
    np.testing.assert_allclose(got, alone(ids), rtol=RTOL, atol=ATOL)


PER_POSITION_TOML = """
[models.positions]
path = "positions.pt"
max_length = 40

[models.positions.inputs]
x = {{ dtype = "float32", shape = [-1, 3], pad = {pad} }}
lengths = {{ dtype = "int64", shape = [], fill = "lengths" }}
"""
PAD = -7.0


def make_positions_model(path: Path) -> None:
    """scaled: 2x + 1 at every position (follows the length); mean: over the sample's own
    positions, from the lengths the server fills (the padding must not leak into it)."""
    import torch

    class Positions(torch.nn.Module):
        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
            keep = torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            total = (x * keep.unsqueeze(-1).to(x.dtype)).sum(1)
            return {"scaled": x * 2 + 1, "mean": total / lengths.unsqueeze(1).to(x.dtype)}

    torch.jit.save(torch.jit.script(Positions()), str(path))


def test_outputs_that_follow_the_length_are_cut_back_to_each_request(tmp_path: Path) -> None:
    make_positions_model(tmp_path / "positions.pt")
    config = tmp_path / "positions.toml"
    config.write_text(PER_POSITION_TOML.format(pad=PAD))
    rng = np.random.default_rng(3)
    xs = [
        rng.normal(size=(int(rng.integers(1, 3)), int(n), 3)).astype(np.float32)
        for n in rng.integers(1, 41, 40)
    ]

    async def send_all(url: str) -> list[dict[str, np.ndarray]]:
        async with AsyncClient(url) as client:
            return list(await asyncio.gather(*(client.predict("positions", {"x": x}) for x in xs)))

    with start_server("--config", str(config), "--cpu-workers", "1") as server:
        with Client(server.url) as client:
            (info,) = client.models()
        assert {s.name: s.shape for s in info.outputs} == {"scaled": (-1, 3), "mean": (3,)}
        answers = asyncio.run(send_all(server.url))
        single = Client(server.url).predict("positions", {"x": xs[0][0]})
        metrics = _metrics(server)
    for x, answer in zip(xs, answers, strict=True):
        np.testing.assert_allclose(answer["scaled"], 2 * x + 1, rtol=1e-6)  # its own length
        np.testing.assert_allclose(answer["mean"], x.mean(axis=1), rtol=1e-5, atol=1e-6)
    assert single["scaled"].shape == xs[0][0].shape  # one sample: no batch dimension
    assert _value(metrics, r'microbatch_batch_size_count\{device="cpu",model="positions"\}') < 40


def _metrics(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        return str(response.read().decode())


def _value(text: str, pattern: str) -> float:
    match = re.search(pattern + r" ([0-9.e+]+)", text)
    assert match, pattern
    return float(match.group(1))


def test_loadtest_sends_a_length_distribution_and_every_request_succeeds(
    encoder: ServerProcess, tmp_path: Path
) -> None:
    import subprocess
    import sys

    out = tmp_path / "report.json"
    argv = [sys.executable, "-m", "server.cli", "loadtest", "--url", encoder.url]
    argv += ["--model", "encoder", "--concurrency", "4", "--duration", "1", "--warmup", "0"]
    argv += ["--lengths", f"pareto:8:{MAX_LENGTH}", "--no-progress", "--json", str(out)]
    subprocess.run(argv, check=True, timeout=120, capture_output=True)
    report = json.loads(out.read_text())
    assert report["meta"]["lengths"] == f"pareto:8:{MAX_LENGTH}:1.2"
    assert report["summary"]["ok"] > 0 and report["summary"]["errors_by_code"] == {}
