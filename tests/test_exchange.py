"""The transport-free seam (server/engine.py, server/http/exchange.py): an Engine started in this
process answers every case of tests/exchange_cases.py as a standalone `microbatch serve` with the
same config answers it over HTTP; it drains like the server; a front that lost its engine
renders the error in the request's own protocol.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest

from server.config import Flags, load_config
from server.engine import Engine
from server.errors import ShuttingDown
from server.http.exchange import Call, Exchange, error_answer
from tests.conftest import request
from tests.exchange_cases import CONFIG_TOML, JSON, MSGPACK, cases, comparable
from tests.server_process import ServerProcess, start_server


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("exchange") / "microbatch.toml"
    path.write_text(CONFIG_TOML)
    return path


@pytest.fixture(scope="module")
def standalone(config_path: Path) -> Iterator[ServerProcess]:
    with start_server("--config", str(config_path)) as server:
        yield server


@pytest.fixture
async def engine(config_path: Path) -> AsyncIterator[Engine]:
    engine = Engine(load_config(str(config_path), {}, Flags()))
    try:
        assert await engine.start(), engine.state.failure
        yield engine
    finally:
        await engine.stop()


async def test_every_case_answered_as_the_server_answers_it(
    standalone: ServerProcess, engine: Engine
) -> None:
    exchange = Exchange(engine.state)
    for case in cases():
        ours = await exchange(Call.of(case.method, case.path, case.headers, case.body))
        theirs = await asyncio.to_thread(
            request,
            standalone.url,
            case.method,
            case.path,
            case.body or None,
            headers=dict(case.headers),
        )
        assert comparable(ours.status, dict(ours.headers), ours.body) == comparable(*theirs), (
            case.name
        )


async def test_a_drained_engine_refuses_with_a_retryable_503(engine: Engine) -> None:
    exchange = Exchange(engine.state)
    call = next(c for c in cases() if c.name == "v1 msgpack")
    assert (await exchange(Call.of(call.method, call.path, call.headers, call.body))).status == 200
    engine.stop_readiness()
    readyz = await exchange(Call.of("GET", "/readyz", (), b""))
    assert readyz.status == 503 and json.loads(readyz.body) == {"status": "shutting_down"}
    await engine.drain(5.0)
    answer = await exchange(Call.of(call.method, call.path, call.headers, call.body))
    assert answer.status == 503 and answer.header("Retry-After") == "1"
    assert msgpack.unpackb(answer.body)["error"]["code"] == "shutting_down"


def test_error_answer_speaks_the_calls_protocol() -> None:
    lost = ShuttingDown("the replica stopped; retry")
    v1 = error_answer(Call.of("POST", "/v1/models/linear/infer", MSGPACK, b""), lost)
    assert v1.status == 503 and v1.header("Content-Type") == "application/msgpack"
    assert v1.header("Retry-After") == "1"
    assert msgpack.unpackb(v1.body) == {
        "error": {"code": "shutting_down", "message": "the replica stopped; retry"}
    }
    v1_json = error_answer(Call.of("POST", "/v1/models/linear/infer", JSON, b""), lost)
    assert json.loads(v1_json.body)["error"]["code"] == "shutting_down"
    v2 = error_answer(Call.of("POST", "/v2/models/linear/infer", MSGPACK, b""), lost)
    assert v2.header("Content-Type") == "application/json"
    assert json.loads(v2.body) == {"error": "the replica stopped; retry"}
