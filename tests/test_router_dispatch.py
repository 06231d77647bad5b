"""The router against simulated executors with known costs on a clock that moves only when the
test says: shallow queues to the CPU, deep ones to the GPU, backlog-aware choices, batches held
for a busy but better executor, online correction of a wrong calibration, no starvation, and
retries when a GPU dies, loses its device or runs out of memory. Nothing sleeps; everything is
numbers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from server.batching.pending import PendingRequest
from server.executors.base import Batch, BatchDone, BatchFailed, BatchOutcome
from server.routing.cost import CostFit
from server.routing.policy import EXPLORE_EVERY
from server.routing.router import Router, Target

CPU_COST = CostFit(0.1e-3, 0.1e-3)  # crosses GPU_COST at 10 samples
GPU_COST = CostFit(1.0e-3, 0.01e-3)
SIZES = (1, 2, 4, 8, 16, 32)


class Sim:
    """A fake clock plus the executors whose batches finish as it advances."""

    def __init__(self) -> None:
        self.t = 100.0
        self.executors: list[SimExecutor] = []

    def now(self) -> float:
        return self.t

    def run_until(self, end: float) -> None:
        while True:
            due = min((e.next_finish() for e in self.executors), default=math.inf)
            if due > end:
                break
            self.t = due
            for executor in self.executors:
                executor.complete_due(due)
        self.t = end

    def drain(self) -> None:
        self.run_until(self.t + 10.0)


@dataclass(eq=False)
class SimExecutor:
    """A Dispatcher whose batch of n takes cost(n) s of sim time; `lanes` run at once and
    `slots` batches may be in it in all."""

    sim: Sim
    name: str
    cost: CostFit
    lanes: int = 1
    slots: int = 2
    alive: bool = True
    fail_with: str | None = None
    running: list[tuple[float, Batch, Callable[[Batch, BatchOutcome], None]]] = field(
        default_factory=list
    )
    waiting: list[tuple[Batch, Callable[[Batch, BatchOutcome], None]]] = field(default_factory=list)
    ran: list[int] = field(default_factory=list)
    listeners: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sim.executors.append(self)

    def target(self) -> Target:
        return Target(
            self.name,
            self,
            lambda model: self.lanes,
            lambda model: 1024,
            lambda: self.alive,
            lambda failure: failure.message.startswith("CUDA out of memory"),
        )

    def free_slots(self, model: str) -> int:
        return 0 if not self.alive else self.slots - len(self.running) - len(self.waiting)

    def hold_for_fill(self, model: str) -> bool:
        return False

    def add_capacity_listener(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def dispatch(self, batch: Batch, done: Callable[[Batch, BatchOutcome], None]) -> None:
        assert self.alive and self.free_slots(batch.model) > 0, "sent to a full executor"
        batch.attempts += 1
        self.ran.append(batch.samples)
        if len(self.running) < self.lanes:
            self.running.append((self.sim.t + self.cost.cost_s(batch.samples), batch, done))
        else:
            self.waiting.append((batch, done))

    def next_finish(self) -> float:
        return min((f for f, _, _ in self.running), default=math.inf)

    def complete_due(self, now: float) -> None:
        for item in [r for r in self.running if r[0] <= now]:
            self.running.remove(item)
            _, batch, done = item
            if self.waiting:
                nxt, nxt_done = self.waiting.pop(0)
                self.running.append((now + self.cost.cost_s(nxt.samples), nxt, nxt_done))
            if self.fail_with:
                done(batch, BatchFailed("model_error", self.fail_with))
            else:
                out = {"output": np.zeros((batch.samples, 1), np.float32)}
                done(batch, BatchDone(out, self.cost.cost_s(batch.samples), self.name))
            self.notify()

    def die(self) -> None:
        self.alive = False
        items = [(b, d) for _, b, d in self.running] + self.waiting
        self.running, self.waiting = [], []
        for batch, done in items:
            done(batch, BatchFailed("model_error", f"the {self.name} worker died"))
        self.notify()

    def lose_device(self) -> None:
        """A sticky CUDA error: the worker reports its batches as device-lost and exits."""
        self.alive = False
        items = [(b, d) for _, b, d in self.running] + self.waiting
        self.running, self.waiting = [], []
        for batch, done in items:
            done(batch, BatchFailed("model_error", f"{self.name} failed", device_lost=True))
        self.notify()

    def notify(self) -> None:
        for listener in self.listeners:
            listener()


@dataclass
class Harness:
    sim: Sim
    cpu: SimExecutor
    gpu: SimExecutor
    router: Router
    answers: list[tuple[Batch, BatchOutcome]] = field(default_factory=list)

    def send(self, samples: int) -> Batch:
        batch = Batch("m", [_request(samples)], samples)
        self.router.dispatch(batch, lambda b, o: self.answers.append((b, o)))
        return batch

    def devices(self) -> list[str]:
        return [o.device for _, o in self.answers if isinstance(o, BatchDone)]


def _request(samples: int) -> PendingRequest:
    return PendingRequest({}, samples, False, 0.0, 1.0, None)  # type: ignore[arg-type]


def make(
    cpu_cost: CostFit = CPU_COST,
    gpu_cost: CostFit = GPU_COST,
    calibrated_gpu: CostFit | None = None,
    routing: tuple[str, ...] = ("cpu", "cuda:0"),
    cpu_lanes: int = 1,
) -> Harness:
    sim = Sim()
    cpu = SimExecutor(sim, "cpu", cpu_cost, lanes=cpu_lanes, slots=2 * cpu_lanes)
    gpu = SimExecutor(sim, "cuda:0", gpu_cost)
    calibration = {
        ("m", "cpu"): [(n, cpu_cost.cost_s(n)) for n in SIZES],
        ("m", "cuda:0"): [(n, (calibrated_gpu or gpu_cost).cost_s(n)) for n in SIZES],
    }
    router = Router([cpu.target(), gpu.target()], {"m": routing}, calibration, sim)
    return Harness(sim, cpu, gpu, router)


def test_a_shallow_queue_goes_to_the_cpu() -> None:
    h = make()
    for _ in range(200):  # one sample at a time, each done before the next arrives
        h.send(1)
        h.sim.run_until(h.sim.t + 1e-3)
    assert h.devices() == ["cpu"] * 200
    assert h.gpu.ran == []


def test_a_deep_queue_goes_to_the_gpu() -> None:
    h = make()
    h.send(32)
    h.sim.drain()
    assert h.devices() == ["cuda:0"]


@pytest.mark.parametrize(
    ("gpu_fixed_s", "expected_crossover"), [(1.05e-3, 11), (0.5e-3, 5), (2.0e-3, 22)]
)
def test_the_crossover_batch_size_is_where_the_measurements_put_it(
    gpu_fixed_s: float, expected_crossover: int
) -> None:
    # The lines cross at n = (gpu fixed - cpu fixed) / (cpu slope - gpu slope): 10.6, 4.4, 21.1.
    went_to_gpu = []
    for n in range(1, 33):
        h = make(gpu_cost=CostFit(gpu_fixed_s, 0.01e-3))
        h.send(n)
        h.sim.drain()
        if h.devices() == ["cuda:0"]:
            went_to_gpu.append(n)
    assert went_to_gpu == list(range(expected_crossover, 33))


def test_a_busy_gpu_sends_the_overflow_to_the_cpu() -> None:
    h = make()
    batches = [h.send(32) for _ in range(4)]
    # GPU: 1.32 ms each, one lane. The 1st and 2nd fill its slots; the 3rd would finish at
    # 3.96 ms there against 3.3 ms on the idle CPU; the 4th, behind 3.3 ms of CPU work, is
    # still better off waiting for the GPU (3.96 ms against 6.6 ms) and is held for it.
    assert h.gpu.ran == [32, 32] and h.cpu.ran == [32]
    assert h.router.free_slots("m") == 0  # 1 free CPU slot, 1 batch held for the GPU
    h.sim.drain()
    assert sorted(b.samples for b, _ in h.answers) == [32] * 4
    assert {id(b) for b, _ in h.answers} == {id(b) for b in batches}  # each answered once


def test_a_held_batch_goes_out_when_its_executor_frees_a_slot() -> None:
    # A GPU 10x faster than the CPU at 32: worth waiting for even when both its slots are used.
    h = make(gpu_cost=CostFit(0.1e-3, 0.001e-3))
    for _ in range(3):
        h.send(32)
    assert len(h.gpu.ran) == 2 and h.cpu.ran == []
    assert h.router.free_slots("m") == 1  # 2 CPU slots, one taken by the held batch
    h.sim.drain()
    assert h.devices() == ["cuda:0"] * 3


def test_a_queue_that_keeps_sending_full_batches_keeps_both_busy() -> None:
    h = make()
    sent = 0
    for _step in range(400):  # a deep queue: a full batch whenever the router takes one
        while h.router.free_slots("m") > 0:
            h.send(32)
            sent += 1
        h.sim.run_until(h.sim.t + 0.5e-3)
    h.sim.drain()
    gpu, cpu = h.devices().count("cuda:0"), h.devices().count("cpu")
    assert gpu + cpu == sent
    # Throughputs 32/1.32 ms and 32/3.3 ms: the GPU should take about 5/7 of the batches.
    assert 0.6 < gpu / sent < 0.85
    assert cpu > 0.15 * sent  # neither side starves


def test_online_correction_moves_traffic_when_the_calibration_was_wrong() -> None:
    # Calibration says the GPU costs 1 ms + 0.01 ms/sample; it really costs 10x that.
    h = make(gpu_cost=CostFit(10e-3, 0.1e-3), calibrated_gpu=GPU_COST)
    for _ in range(3):
        h.send(32)  # believed 1.32 ms on the GPU against 3.3 on the CPU
        h.sim.drain()
    assert h.devices()[0] == "cuda:0"
    fit = h.router.cost("m", "cuda:0")
    assert fit.cost_s(32) == pytest.approx(13.2e-3, rel=0.2)  # learnt from the first batches
    h.answers.clear()
    for _ in range(20):
        h.send(32)
        h.sim.drain()
    assert h.devices() == ["cpu"] * 20
    calibrated, _current, observed = h.router.costs()[("m", "cuda:0")]
    assert calibrated.cost_s(32) == pytest.approx(1.32e-3) and observed >= 1


def test_an_idle_gpu_is_tried_now_and_then_so_its_cost_stays_checked() -> None:
    # Calibrated a little too slow for single samples to go there (0.5 ms against 0.2 ms)...
    h = make(gpu_cost=CostFit(0.05e-3, 0.0), calibrated_gpu=CostFit(0.5e-3, 0.0))
    for _ in range(3 * EXPLORE_EVERY):
        h.send(1)
        h.sim.drain()
    # ... it gets one after EXPLORE_EVERY batches, and after a second look it keeps them.
    devices = h.devices()
    assert devices[:EXPLORE_EVERY] == ["cpu"] * EXPLORE_EVERY
    assert devices[EXPLORE_EVERY] == "cuda:0"
    assert devices[2 * EXPLORE_EVERY + 2 :] == ["cuda:0"] * (EXPLORE_EVERY - 2)


def test_backlog_counts_every_model_in_flight_on_an_executor() -> None:
    sim = Sim()
    cpu, gpu = SimExecutor(sim, "cpu", CPU_COST), SimExecutor(sim, "cuda:0", GPU_COST)
    both = ("cpu", "cuda:0")
    costs = {
        (model, ex.name): [(n, ex.cost.cost_s(n)) for n in SIZES]
        for model in ("m", "other")
        for ex in (cpu, gpu)
    }
    router = Router([cpu.target(), gpu.target()], {"m": both, "other": both}, costs, sim)
    for _ in range(2):
        router.dispatch(Batch("other", [_request(32)], 32), lambda b, o: None)
    assert gpu.ran == [32, 32]
    # The GPU has 2.64 ms of the other model's work: 16 samples of "m" finish sooner on the CPU.
    router.dispatch(Batch("m", [_request(16)], 16), lambda b, o: None)
    assert cpu.ran == [16]


def test_routing_cpu_or_cuda_overrides_the_choice() -> None:
    cpu_only = make(routing=("cpu",))
    cpu_only.send(32)
    assert cpu_only.cpu.ran == [32] and cpu_only.gpu.ran == []
    gpu_only = make(routing=("cuda:0",))
    gpu_only.send(1)
    assert gpu_only.gpu.ran == [1] and gpu_only.cpu.ran == []
    assert gpu_only.router.hold_for_fill("m") and not cpu_only.router.hold_for_fill("m")
    assert not make().router.hold_for_fill("m")  # with the CPU in the choice: never hold


def test_a_dead_gpu_hands_its_batches_to_the_cpu_and_is_left_out() -> None:
    h = make()
    first, second = h.send(32), h.send(32)
    h.gpu.die()
    assert h.cpu.ran == [32, 32]  # both retried on the CPU
    h.sim.drain()
    assert [b for b, _ in h.answers] == [first, second]
    assert h.devices() == ["cpu", "cpu"]
    h.send(32)
    assert h.gpu.ran == [32, 32]  # nothing more goes there
    assert h.router.free_slots("m") == h.cpu.free_slots("m")


def test_a_gpu_that_loses_its_device_hands_every_batch_to_the_cpu_whatever_its_attempts() -> None:
    h = make()
    fresh, spent = h.send(32), Batch("m", [_request(32)], 32, attempts=1)
    h.router.dispatch(spent, lambda b, o: h.answers.append((b, o)))
    assert h.gpu.ran == [32, 32]
    h.gpu.lose_device()
    # Both on the CPU: `spent` used its one retry on the GPU, yet a lost device is no fault
    # of the batch's own.
    assert h.cpu.ran == [32, 32]
    h.sim.drain()
    assert [b for b, _ in h.answers] == [fresh, spent] and h.devices() == ["cpu", "cpu"]
    h.send(32)
    assert h.gpu.ran == [32, 32]  # nothing more goes there


def test_a_dead_gpu_still_retries_a_batch_only_once() -> None:
    h = make()
    spent = Batch("m", [_request(32)], 32, attempts=1)
    h.router.dispatch(spent, lambda b, o: h.answers.append((b, o)))
    h.gpu.die()  # died without saying why: the batch may have killed it
    assert h.cpu.ran == []
    assert [o for _, o in h.answers] == [BatchFailed("model_error", "the cuda:0 worker died")]


def test_a_gpu_out_of_memory_at_one_sample_is_answered_by_the_cpu() -> None:
    h = make()
    h.gpu.fail_with = "CUDA out of memory for model 'm' even at one sample"
    h.send(32)
    h.sim.drain()
    assert h.gpu.ran == [32] and h.cpu.ran == [32]
    assert h.devices() == ["cpu"]


def test_a_model_error_on_the_gpu_is_not_retried() -> None:
    h = make()
    h.gpu.fail_with = "model 'm' raised ValueError: bad"
    h.send(32)
    h.sim.drain()
    assert h.cpu.ran == []
    assert [o for _, o in h.answers] == [
        BatchFailed("model_error", "model 'm' raised ValueError: bad")
    ]


def test_capacity_events_reach_the_queue() -> None:
    h = make()
    woken = []
    h.router.add_capacity_listener(lambda: woken.append(h.sim.t))
    h.send(1)
    h.sim.drain()
    assert len(woken) == 1
