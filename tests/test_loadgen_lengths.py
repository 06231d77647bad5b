"""The load generator's length distributions and body pools, for models that take inputs of
any length: parsing `--lengths`, drawing lengths, and one body per drawn length."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from bench.loadgen.errors import LoadGenError
from bench.loadgen.lengths import LengthDist, draw_lengths, parse_lengths
from bench.loadgen.payload import POOL, build_bodies
from server.models.spec import TensorSpec

IDS = TensorSpec("ids", "int64", (-1,))
FIXED = TensorSpec("x", "float32", (10,))


def test_length_specs_parse_and_describe_themselves() -> None:
    assert parse_lengths("fixed:64") == LengthDist("fixed", 64, 64)
    assert parse_lengths("uniform:8:512") == LengthDist("uniform", 8, 512)
    assert parse_lengths("pareto:8:512") == LengthDist("pareto", 8, 512, 1.2)
    assert parse_lengths("pareto:8:512:2").describe() == "pareto:8:512:2"


@pytest.mark.parametrize(
    "text", ["zipf:8:512", "uniform:8", "fixed:0", "uniform:9:8", "pareto:8:x", "fixed:1.5"]
)
def test_bad_length_specs_say_how_to_write_them(text: str) -> None:
    with pytest.raises(LoadGenError, match="--lengths"):
        parse_lengths(text)


def test_a_long_tailed_distribution_stays_in_range_and_is_mostly_short() -> None:
    lengths = draw_lengths(LengthDist("pareto", 8, 512), 20_000, np.random.default_rng(0))
    assert lengths.min() == 8 and lengths.max() == 512
    assert np.median(lengths) < 16 and np.percentile(lengths, 99) > 100


def test_a_dynamic_model_gets_a_pool_of_bodies_of_the_drawn_lengths() -> None:
    bodies = build_bodies((IDS,), 2, None, 500.0, 0, LengthDist("uniform", 8, 64))
    assert len(bodies) == POOL
    shapes = {tuple(msgpack.unpackb(b)["inputs"]["ids"]["shape"]) for b in bodies}
    assert all(n == 2 and 8 <= length <= 64 for n, length in shapes) and len(shapes) > 10
    assert msgpack.unpackb(bodies[0])["timeout_ms"] == 500.0


def test_lengths_and_fixed_shapes_do_not_mix() -> None:
    assert len(build_bodies((FIXED,), 1, None, None, 0, None)) == 1
    with pytest.raises(LoadGenError, match="dynamic length"):
        build_bodies((FIXED,), 1, None, None, 0, LengthDist("fixed", 8, 8))
    with pytest.raises(LoadGenError, match="give --lengths"):
        build_bodies((IDS,), 1, None, None, 0, None)
