"""Coverage-guided fuzz target (atheris, i.e. libFuzzer) for the request decoder and validation:
any input must end in a decoded, matched request or a 4xx ServingError; anything else (another
exception, a 5xx, a hang, a crash) is a finding, saved by libFuzzer as crash-<hash>.

Runs in its own process, never imported by pytest (atheris owns the process and instruments
our modules as it imports them). tests/test_fuzz_decoder.py runs 200,000 inputs in CI (about
10 s) from a seed corpus it writes; a longer run (docs/operations.md) keeps its corpus:
    python tests/fuzz/fuzz_decoder.py -max_total_time=3600 -jobs=2 -workers=2 CORPUS_DIR
The first byte of an input picks its form: raw msgpack, raw JSON, or a request built from the
remaining bytes (dtype, shape, data), so that the fuzzer reaches the tensor checks quickly.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris
import msgpack
import numpy  # noqa: F401  imported first so that only our own modules are instrumented

with atheris.instrument_imports():
    from server.errors import ServingError
    from server.models.matching import match_inputs
    from server.models.spec import SUPPORTED_DTYPES, TensorSpec
    from server.protocol.codec import JSON, MSGPACK, Limits, decode_request

LIMITS = Limits(max_elements=1 << 20, max_dims=8)
SPECS = (TensorSpec("x", "float32", (4,)),)
DTYPES = [*SUPPORTED_DTYPES, "bfloat16", ""]


def check(body: bytes, encoding: str) -> None:
    try:
        decoded = decode_request(body, encoding, LIMITS)
        match_inputs("m", SPECS, decoded.inputs, max_batch=64)
    except ServingError as error:
        if not 400 <= error.http_status < 500:
            raise AssertionError(
                f"{error.http_status} {error.code.value}: {error.message}"
            ) from error


def built_request(data: bytes) -> bytes:
    fdp = atheris.FuzzedDataProvider(data)
    shape = [fdp.ConsumeIntInRange(-2, 1 << 40) for _ in range(fdp.ConsumeIntInRange(0, 10))]
    tensor: dict[str, Any] = {
        "dtype": fdp.PickValueInList(DTYPES),
        "shape": shape,
        "data": fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096)),
    }
    body: dict[str, Any] = {"inputs": {fdp.ConsumeUnicodeNoSurrogates(4): tensor}}
    if fdp.ConsumeBool():
        body["timeout_ms"] = fdp.ConsumeRegularFloat()
    if fdp.ConsumeBool():
        body["id"] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    return msgpack.packb(body)  # type: ignore[no-any-return]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    form, rest = data[0] % 3, data[1:]
    if form == 0:
        check(rest, MSGPACK)
    elif form == 1:
        check(rest, JSON)
    else:
        check(built_request(rest), MSGPACK)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
