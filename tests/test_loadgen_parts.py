"""The generator's small parts: URLs, the model listing, request bodies, wrk's report, the
bench's medians and ratios. Pure; no server, no wrk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.loadgen.errors import LoadGenError
from bench.loadgen.payload import build_body
from bench.loadgen.target import infer_path, parse_target, specs_of
from bench.suite.runner import half_load_processes
from bench.suite.summary import Measurement, bench_markdown, medians, ratios
from bench.suite.wrk import LUA, parse_report
from server.config import ConfigError
from server.models.spec import TensorSpec
from server.protocol.codec import MSGPACK, Limits, decode_request

WRK_OK = """Running 2s test @ http://127.0.0.1:35641/v1/models/linear/infer
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    11.91ms    6.69ms 134.47ms   98.02%
    Req/Sec     5.59k   654.54     6.43k    75.00%
  Latency Distribution
     50%  910.00us
     75%   12.06ms
     90%   14.94ms
     99%    1.20s
  11122 requests in 2.00s, 3.33MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
Requests/sec:   5549.53
Transfer/sec:      1.66MB
"""


def test_urls_for_tcp_and_unix_sockets() -> None:
    tcp = parse_target("http://127.0.0.1:8000/")
    assert tcp.base_url == "http://127.0.0.1:8000" and tcp.socket_path is None
    assert tcp.base_url + infer_path("mlp") == "http://127.0.0.1:8000/v1/models/mlp/infer"
    uds = parse_target("unix:///tmp/mb.sock")
    assert uds.socket_path == "/tmp/mb.sock" and uds.base_url == "http://localhost"
    for bad in ("127.0.0.1:8000", "https://x:1", "http://x:1/v1", "unix://rel.sock"):
        with pytest.raises(ConfigError, match="--url"):
            parse_target(bad)


def test_the_model_listing_gives_the_inputs_or_names_the_models() -> None:
    listing = {
        "models": [
            {"name": "a", "inputs": [{"name": "x", "dtype": "int64", "shape": [2, 3]}]},
            {"name": "b", "inputs": []},
        ]
    }
    assert specs_of(listing, "a") == (TensorSpec("x", "int64", (2, 3)),)
    with pytest.raises(LoadGenError, match="serves: a, b"):
        specs_of(listing, "c")
    with pytest.raises(LoadGenError, match="no inputs"):
        specs_of(listing, "b")
    with pytest.raises(LoadGenError):
        specs_of(["not", "a", "map"], "a")


def _decoded(body: bytes) -> dict[str, np.ndarray]:
    return decode_request(body, MSGPACK, Limits()).inputs


def test_random_bodies_have_the_model_shape_and_dtype() -> None:
    specs = (TensorSpec("a", "float32", (4,)), TensorSpec("b", "int64", (2, 2)))
    inputs = _decoded(build_body(specs, 3, None, 250.0, seed=1))
    assert inputs["a"].shape == (3, 4) and inputs["a"].dtype == np.float32
    assert inputs["b"].shape == (3, 2, 2) and inputs["b"].dtype == np.int64


def test_bodies_from_a_file_repeat_its_rows(tmp_path: Path) -> None:
    spec = (TensorSpec("input", "float32", (2,)),)
    np.save(tmp_path / "one.npy", np.array([1.0, 2.0]))
    np.save(tmp_path / "two.npy", np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.save(tmp_path / "bad.npy", np.zeros(3))
    one = _decoded(build_body(spec, 3, str(tmp_path / "one.npy"), None, 0))["input"]
    assert one.tolist() == [[1, 2]] * 3
    two = _decoded(build_body(spec, 3, str(tmp_path / "two.npy"), None, 0))["input"]
    assert two.tolist() == [[1, 2], [3, 4], [1, 2]]
    with pytest.raises(LoadGenError, match="needs"):
        build_body(spec, 1, str(tmp_path / "bad.npy"), None, 0)
    with pytest.raises(LoadGenError, match="cannot read"):
        build_body(spec, 1, str(tmp_path / "missing.npy"), None, 0)


def test_wrk_reports_are_read_with_their_units() -> None:
    report = parse_report(WRK_OK)
    assert (report.requests, report.duration_s, report.rps) == (11122, 2.0, 5549.53)
    assert report.latency_ms == pytest.approx(
        {"p50": 0.91, "p75": 12.06, "p90": 14.94, "p99": 1200}
    )
    assert (report.non_2xx, report.socket_errors) == (0, 3)
    bad = WRK_OK.replace("Socket errors", "  Non-2xx or 3xx responses: 17\n  Socket errors")
    assert parse_report(bad).non_2xx == 17
    with pytest.raises(LoadGenError):
        parse_report("unable to connect to 127.0.0.1:1 Connection refused")
    assert "[==[/tmp/b.msgpack]==]" in LUA.format(path="/tmp/b.msgpack")


def _m(r: int, config: str, sat: float, lone: float, behind: bool = False) -> Measurement:
    return Measurement(
        r, "mlp", config, sat, 0, sat / 2, 1, 2.0, 4.0, sat / 2, 0, behind, 1.5, lone
    )


def test_bench_medians_ratios_and_tables() -> None:
    rounds = [
        _m(0, "echo", 5000, 0.5),
        _m(1, "echo", 4000, 0.7),
        _m(2, "echo", 4500, 0.6),
        _m(0, "app_echo", 3000, 0.6),
        _m(1, "app_echo", 3200, 0.6),
        _m(2, "app_echo", 2800, 0.6),
        _m(0, "unbatched", 500, 2.0),
        _m(1, "unbatched", 600, 2.2, behind=True),
        _m(2, "unbatched", 400, 2.1),
        _m(0, "default", 3000, 2.5),
        _m(1, "default", 2000, 2.4),
        _m(2, "default", 2400, 2.3),
    ]
    summary = medians(rounds)
    mlp = summary["mlp"]
    assert mlp["echo"]["saturation_rps"] == 4500 and mlp["echo"]["lone_p50_ms"] == 0.6
    assert mlp["default"]["saturation_rps_range"] == [2000, 3000]
    assert mlp["unbatched"]["half_behind_rounds"] == 1 and mlp["unbatched"]["rounds"] == 3
    loop = {"mlp": [{"batch_size": 1, "batch_ms": 1.0, "samples_per_s": 1000.0},
                    {"batch_size": 32, "batch_ms": 8.0, "samples_per_s": 4000.0}]}  # fmt: skip
    r = ratios(summary, loop)["mlp"]
    assert r["default_vs_model_ceiling"] == pytest.approx(2400 / 4000)
    assert r["default_vs_http_ceiling"] == pytest.approx(2400 / 4500)
    assert r["default_vs_app_echo"] == pytest.approx(2400 / 3000)
    assert r["unbatched_vs_model_batch1"] == pytest.approx(500 / 1000)
    assert r["batched_vs_unbatched"] == pytest.approx(2400 / 500)
    assert r["added_latency_unbatched_ms"] == pytest.approx(2.1 - (0.6 + 1.0))
    assert r["added_latency_default_ms"] == pytest.approx(2.4 - (0.6 + 1.0))
    meta = {"driver": "wrk", "cpu": "x", "cores": 2, "platform": "p", "python": "3",
            "versions": {"torch": "2"}, "wrk": None, "torch_threads": 1,
            "server_cpu_workers": 1}  # fmt: skip
    result = {"meta": meta, "settings": {"rounds": 3, "connections": 64}, "summary": summary,
              "model_loop": loop, "ratios": ratios(summary, loop)}  # fmt: skip
    text = bench_markdown(result)
    assert "| mlp | server, default config | 2,400 | 2,000 - 3,000 | 2.00 | 4.00 | 2.400 |" in text
    assert "| mlp | 0.60x | 0.53x | 0.80x | 0.50x | 0.11x | 4.80x | 0.500 | 0.800 |" in text
    assert "fell behind" in text


def test_a_second_generator_process_only_for_high_rates_on_several_cores() -> None:
    assert half_load_processes(500, 8) == 1
    assert half_load_processes(3000, 8) == 2
    assert half_load_processes(3000, 2) == 1
