"""Faults against real server processes: a poisoned request fails alone while its batch-mates
get their answers; killed workers (SIGKILL) under load lose no request, the batch each held
re-run elsewhere; a request that kills every worker it touches gets 500 after one retry; a
client that leaves is never computed; and a model that fails to load or warm up is named, then
either stops start-up or is left out.

Each test starts its own `microbatch serve` on 127.0.0.1:0 (tests/server_process.py) and waits
on conditions with bounded timeouts. SIGSTOP on the worker holds batches in place so that which
requests share a batch is certain, not a matter of timing. Figures are printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from server.executors.cpu_pool import SLOTS_PER_WORKER
from tests import fault_models
from tests.conftest import infer_msgpack, request, tensor
from tests.probes import Answer, metric, queued, send, tally, wait_for, work, worker_pids
from tests.server_process import ServerProcess, start_server

BUSY = "microbatch_busy_workers"
FAILED = 'microbatch_batches_total{device="cpu",model="work",outcome="failed"}'
COMPUTED = 'microbatch_batch_samples_total{device="cpu",model="work"}'


def serve_work(directory: Path, *args: str) -> ServerProcess:
    path = fault_models.save(fault_models.Work(), directory / "work.pt")
    return start_server("--model", f"work={path}:float32[2]", "--max-batch-size", "8", *args)


@pytest.fixture(scope="module")
def work_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve_work(tmp_path_factory.mktemp("work"), "--cpu-workers", "1") as server:
        yield server


async def until(condition: Callable[[], object], what: str) -> None:
    await asyncio.to_thread(wait_for, condition, 60.0, what)


async def until_queued(server: ServerProcess, samples: int) -> None:
    """Two readings in a row: the second request reaches the server after any pump that the
    first may have raced with, so the queue is settled, not caught between arrival and pump."""
    readings: list[float] = []

    def settled() -> bool:
        readings.append(queued(server, "work"))
        return readings[-2:] == [samples, samples]

    await until(settled, f"{samples} samples queued")


async def hold(session: aiohttp.ClientSession, server: ServerProcess) -> list[asyncio.Task[Answer]]:
    """With the worker stopped (SIGSTOP, by the caller): one request in each of its slots and one
    full batch queued, so that whatever is sent next waits in the queue behind it, together."""
    url = server.url
    blockers = [asyncio.create_task(send(session, url, "work", work(1.0)))]
    await until(lambda: metric(server, BUSY) >= 1, "the first batch in a slot")
    blockers += [
        asyncio.create_task(send(session, url, "work", work(2.0, samples=8)))
        for _ in range(SLOTS_PER_WORKER)  # full batches: the slots left, then one queued
    ]
    await until_queued(server, 8)
    return blockers


async def test_poisoned_request_fails_alone_and_its_batch_mates_get_their_answers(
    work_server: ServerProcess,
) -> None:
    url, failed_before = work_server.url, metric(work_server, FAILED)
    (pid,) = worker_pids(work_server)
    values = [10.0, 11.0, fault_models.POISON, 13.0, 14.0, 15.0]
    async with aiohttp.ClientSession() as session:
        os.kill(pid, signal.SIGSTOP)
        try:
            blockers = await hold(session, work_server)
            group = [asyncio.create_task(send(session, url, "work", work(v))) for v in values]
            await until_queued(work_server, 8 + 6)
        finally:
            os.kill(pid, signal.SIGCONT)
        answers = await asyncio.gather(*blockers, *group)
    print(f"\npoisoned batch: {len(answers)} requests sent, answered {tally(answers)}, lost 0")
    poisoned = answers[len(blockers) + values.index(fault_models.POISON)]
    others = [a for a in answers if a is not poisoned]
    assert poisoned.status == 500 and poisoned.code == "model_error"
    assert "poisoned input 666" in poisoned.body["error"]["message"]
    for answer, value in zip(answers[len(blockers) :], values, strict=True):
        if value != fault_models.POISON:
            out = answer.body["outputs"]["output"]
            got = np.frombuffer(out["data"], np.float32)
            np.testing.assert_array_equal(got, [2 * value, 0.0])
            assert answer.body["batch_size"] < 6  # from a half, not the batch of six
    assert all(a.status == 200 for a in others)
    # 6 -> [3 | 3]; [0..2] fails -> [0 | 1, 2]; [1, 2] fails -> [1 | 2]; [2] fails alone.
    assert metric(work_server, FAILED) == failed_before + 4
    assert request(url, "GET", "/readyz")[0] == 200


async def test_a_client_that_leaves_is_dropped_from_the_queue_and_never_computed(
    work_server: ServerProcess,
) -> None:
    url = work_server.url
    gone_metric = 'microbatch_dropped_requests_total{model="work",reason="client_gone"}'
    dropped, computed = metric(work_server, gone_metric), metric(work_server, COMPUTED)
    (pid,) = worker_pids(work_server)
    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as leaver:
        os.kill(pid, signal.SIGSTOP)
        try:
            blockers = await hold(session, work_server)
            gone = asyncio.create_task(send(leaver, url, "work", work(3.0)))
            await until_queued(work_server, 9)
            gone.cancel()  # the client hangs up: its connection closes
            await leaver.close()
            metric(work_server, BUSY)  # one round trip: the server has seen the hang-up
        finally:
            os.kill(pid, signal.SIGCONT)
        answers = await asyncio.gather(*blockers)
    assert all(a.status == 200 for a in answers)
    await until(lambda: metric(work_server, gone_metric) == dropped + 1, "the drop counted")
    computed_now = computed + 1 + 8 * SLOTS_PER_WORKER  # not the leaver's sample
    assert metric(work_server, COMPUTED) == computed_now


async def test_a_request_that_kills_every_worker_it_touches_gets_500_after_one_retry(
    tmp_path: Path,
) -> None:
    with serve_work(tmp_path, "--cpu-workers", "1") as server:
        (first,) = worker_pids(server)
        restarts = metric(server, "microbatch_worker_restarts_total")
        retries = metric(server, "microbatch_batch_retries_total")
        async with aiohttp.ClientSession() as session:
            # About 3 s of compute: long enough to be seen running, twice.
            doomed = asyncio.ensure_future(send(session, server.url, "work", work(1.0, 1500)))
            await until(lambda: metric(server, BUSY) >= 1, "the batch running")
            os.kill(first, signal.SIGKILL)

            def retried() -> bool:
                pids = worker_pids(server)
                return bool(pids) and pids[0] != first and metric(server, BUSY) >= 1

            await until(retried, "the retry running on the replacement")
            (second,) = worker_pids(server)
            os.kill(second, signal.SIGKILL)
            answer = await doomed
            assert request(server.url, "GET", "/healthz")[0] == 200
            await until(lambda: worker_pids(server) not in ([], [second]), "a second replacement")
            after = await send(session, server.url, "work", work(4.0))
        print(f"\nkill twice: 2 requests sent, answered {tally([answer, after])}, lost 0")
        assert answer.status == 500 and answer.code == "model_error"
        assert "again on retry" in answer.body["error"]["message"]
        assert after.status == 200 and request(server.url, "GET", "/readyz")[0] == 200
        assert metric(server, "microbatch_worker_restarts_total") == restarts + 2
        # One retry, after the first kill; the second kill fails the batch.
        assert metric(server, "microbatch_batch_retries_total") == retries + 1


OVERTAKEN = 32  # answers to later requests that show an earlier one is held by a worker


async def test_killing_workers_under_load_loses_no_request(tmp_path: Path) -> None:
    """Each kill hits a worker with a batch in flight, and that batch is run again: the worker
    is stopped (SIGSTOP) first, and killed only once some request sent before many answered
    ones is still unanswered. Requests are never overtaken in the queue, so such a request is
    in the stopped worker's batch; it is then answered, correctly, by another worker."""
    total, concurrency = 600, 16
    with serve_work(tmp_path, "--cpu-workers", "2") as server:
        pids = worker_pids(server)
        assert len(pids) == 2
        order: list[int] = []  # request indices in the order their answers came
        answers: dict[int, Answer] = {}
        sent_after: dict[int, int] = {}  # request index -> answers received before it was sent
        held: list[set[int]] = []  # per kill: the requests in the killed worker's batch
        values = iter(range(total))

        async def client(session: aiohttp.ClientSession) -> None:
            for i in values:
                sent_after[i] = len(order)
                answers[i] = await send(session, server.url, "work", work(float(i), 3))
                order.append(i)

        def stuck() -> set[int]:
            return {
                i for i, n in sent_after.items() if i not in answers and len(order) - n > OVERTAKEN
            }

        async def kill(pid: int, after: int) -> None:
            await until_async(lambda: len(order) >= after, f"{after} answers")
            os.kill(pid, signal.SIGSTOP)
            await until_async(lambda: bool(stuck()), "a batch held by the stopped worker")
            held.append(stuck())
            os.kill(pid, signal.SIGKILL)

        async def killer() -> None:
            await kill(pids[0], 150)
            await kill(pids[1], 400)

        async with aiohttp.ClientSession() as session:
            await asyncio.gather(killer(), *(client(session) for _ in range(concurrency)))
        restarts = metric(server, "microbatch_worker_restarts_total")
    results = [answers[i] for i in order]
    lost = sum(1 for a in results if a.status != 200)
    print(
        f"\nkill under load: {total} requests sent, answered {tally(results)}, lost {lost}, "
        f"workers killed 2, each with a batch in flight (requests seen held there: "
        f"{[len(h) for h in held]}, all re-run and answered), restarts {restarts:.0f}"
    )
    assert len(results) == total and lost == 0
    for i, answer in answers.items():
        out = np.frombuffer(answer.body["outputs"]["output"]["data"], np.float32)
        np.testing.assert_array_equal(out, [2.0 * i, 6.0])
    assert restarts == 2
    # The batch in flight on each killed worker really was re-run: its requests were held
    # there when it died, and each got its own answer.
    assert len(held) == 2 and all(held)
    # (Their outputs were checked above with all the others; a killed worker computes none.)


async def until_async(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Waits on a condition that the event loop's own tasks change, without blocking them."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.005)


def test_serve_others_leaves_out_models_that_failed_and_readyz_names_them(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torchscript file")
    cold = fault_models.save(fault_models.FailsWarmUp(), tmp_path / "cold.pt")
    with start_server(
        "--model",
        "linear",
        "--model",
        f"bad={broken}:float32[4]",
        "--model",
        f"cold={cold}:float32[3]",
        "--max-batch-size",
        "4",
        env={"MICROBATCH_SERVER_ON_MODEL_FAILURE": "serve_others"},
    ) as server:
        status, _, raw = request(server.url, "GET", "/readyz")
        ready = json.loads(raw)
        assert status == 200 and ready["status"] == "ready"
        assert set(ready["missing"]) == {"bad", "cold"}
        assert "'bad' failed to load" in ready["missing"]["bad"]
        assert "'cold' failed to warm up at batch size 4" in ready["missing"]["cold"]
        x = np.zeros(10, np.float32)
        assert infer_msgpack(server.url, "linear", {"inputs": {"x": tensor(x)}})[0] == 200
        status, _, body = infer_msgpack(server.url, "bad", {"inputs": {"x": tensor(x[:4])}})
        assert status == 404 and body["error"]["code"] == "unknown_model"
        assert "failed to load" in body["error"]["message"]
        listed = json.loads(request(server.url, "GET", "/v1/models")[2])["models"]
        assert {m["name"]: m["ready"] for m in listed} == {
            "linear": True,
            "bad": False,
            "cold": False,
        }


def test_a_model_that_fails_warm_up_stops_start_up_naming_it(tmp_path: Path) -> None:
    cold = fault_models.save(fault_models.FailsWarmUp(), tmp_path / "cold.pt")
    server = start_server(
        "--model", "linear", "--model", f"cold={cold}:float32[3]", "--max-batch-size", "4"
    )
    assert server.process.wait(120) == 1
    log = server.log()
    assert "model(s) cold failed to load" in log
    assert "'cold' failed to warm up at batch size 4" in log
    assert "this model only takes batches of one" in log
    assert "serve_others" in log
