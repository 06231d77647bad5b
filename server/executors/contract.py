"""What crosses the boundary between the server and its worker processes, CPU and GPU alike: the
setups a worker is spawned with, every message either side sends, and the kinds of failure.

Both sides import this module and neither imports the other; no torch, no asyncio. A message
is a msgpack array of plain values, [tag, *fields], written and read only here (slotted, not
frozen: Run and Done are built twice per batch each, and a frozen one costs four times as much):
    worker -> server   Loaded | LoadFailed          (the models loaded and warmed up, or not)
    server -> worker   Attach                       (the shared segment; sizes to time)
    worker -> server   Ready                        (the timings)
    server -> worker   Run ... | Stop
    worker -> server   Done | Failed                (one per Run, by its seq)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import msgpack

from server.config import ModelConfig
from server.models.spec import TensorSpec

# In a GPU worker, slot s of a model belongs to its instance s // SLOTS_PER_INSTANCE: one batch
# computing, the next one copying in.
SLOTS_PER_INSTANCE = 2


@dataclass(frozen=True)
class WorkerSetup:
    """A CPU worker's arguments (pickled by multiprocessing when it is spawned)."""

    index: int
    models: tuple[ModelConfig, ...]
    threads: int


@dataclass(frozen=True)
class CudaSetup:
    """A GPU worker's arguments: one worker per CUDA device."""

    device_index: int
    models: tuple[ModelConfig, ...]
    threads: int = 1  # torch CPU threads in the GPU worker (staging copies only)


class FailureKind(str, Enum):
    """Why a batch failed: what the batcher and the router make of it depends on this alone."""

    MODEL = "model"  # the model raised on these inputs: smaller batches may isolate the culprit
    OUT_OF_MEMORY = "out_of_memory"  # even at one sample; as MODEL, and another executor may try
    DEVICE = "device"  # the device failed under it (a sticky CUDA error): run it elsewhere
    WORKER = "worker"  # its worker process died, or was killed for running past its time limit
    STOPPED = "stopped"  # the server stopped before it was answered
    OTHER = "other"  # none of these (an executor with no free slot)


ModelSpecs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]  # (inputs, outputs)
# A calibration: (samples, seconds) per timed size; (samples, length, seconds) per timed point
# of a model with a dynamic dimension. On the wire a list of 2 or 3 numbers each.
Points = list[tuple[int, float] | tuple[int, int, float]]


def _specs(raw: list[Any]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec.from_wire(s) for s in raw)


@dataclass(slots=True)
class Loaded:
    """Every model that loaded and warmed up, with its tensors; a CPU worker also names those
    that failed (the pool decides whether to serve without them)."""

    TAG: ClassVar[str] = "loaded"
    device_name: str  # the GPU's name; "" from a CPU worker
    models: dict[str, ModelSpecs]
    failed: dict[str, str]  # model -> why it did not load

    def to_wire(self) -> list[Any]:
        specs = [
            [name, [s.to_wire() for s in inputs], [s.to_wire() for s in outputs]]
            for name, (inputs, outputs) in self.models.items()
        ]
        return [self.TAG, self.device_name, specs, [[n, why] for n, why in self.failed.items()]]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> Loaded:
        _, device_name, specs, failed = fields
        models = {str(name): (_specs(i), _specs(o)) for name, i, o in specs}
        return cls(str(device_name), models, {str(n): str(why) for n, why in failed})


@dataclass(slots=True)
class LoadFailed:
    """No model could be loaded (or a GPU's warm-up failed); the worker then exits."""

    TAG: ClassVar[str] = "load_failed"
    message: str

    def to_wire(self) -> list[Any]:
        return [self.TAG, self.message]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> LoadFailed:
        return cls(str(fields[1]))


@dataclass(slots=True)
class Attach:
    """The worker's shared-memory segment (laid out by shm_layout.plan_layout for these models
    and `slots`), and the batch sizes to time per model before it reports ready (a model with
    a dynamic dimension at lengths up to its max_length: profiling.calibration_points)."""

    TAG: ClassVar[str] = "attach"
    segment: str
    slots: int
    plan: dict[str, list[int]]

    def to_wire(self) -> list[Any]:
        return [self.TAG, self.segment, self.slots, self.plan]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> Attach:
        _, segment, slots, plan = fields
        return cls(str(segment), int(slots), {str(k): [int(n) for n in v] for k, v in plan.items()})


@dataclass(slots=True)
class Ready:
    """Attached and timed: each planned model's points; a GPU's batch caps and log notes."""

    TAG: ClassVar[str] = "ready"
    timings: dict[str, Points]
    caps: dict[str, int]
    notes: list[str]

    def to_wire(self) -> list[Any]:
        timings = {name: [list(p) for p in points] for name, points in self.timings.items()}
        return [self.TAG, timings, self.caps, self.notes]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> Ready:
        _, timings, caps, notes = fields
        return cls(
            {str(k): [_point(p) for p in v] for k, v in timings.items()},
            {str(k): int(v) for k, v in caps.items()},
            [str(note) for note in notes],
        )


def _point(raw: list[Any]) -> tuple[int, float] | tuple[int, int, float]:
    if len(raw) == 2:
        return int(raw[0]), float(raw[1])
    n, length, seconds = raw
    return int(n), int(length), float(seconds)


@dataclass(slots=True)
class Run:
    """Run the batch staged in `slot`: its first `samples` rows of the model's inputs, padded
    to `length` where the model has a dynamic dimension (1 otherwise)."""

    TAG: ClassVar[str] = "run"
    seq: int
    slot: int
    model: str
    samples: int
    length: int = 1

    def to_wire(self) -> list[Any]:
        return [self.TAG, self.seq, self.slot, self.model, self.samples, self.length]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> Run:
        return cls(fields[1], fields[2], fields[3], fields[4], fields[5])  # hot: no conversions


@dataclass(slots=True)
class Done:
    """The batch's outputs are in its slot. `cap`: the largest batch the device now runs in
    one go (a GPU lowers it after running out of memory); 0 from a CPU worker."""

    TAG: ClassVar[str] = "done"
    seq: int
    compute_s: float
    cap: int = 0

    def to_wire(self) -> list[Any]:
        return [self.TAG, self.seq, self.compute_s, self.cap]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> Done:
        return cls(fields[1], fields[2], fields[3])


@dataclass(slots=True)
class Failed:
    """The batch failed, and why. After FailureKind.DEVICE the worker exits."""

    TAG: ClassVar[str] = "failed"
    seq: int
    kind: FailureKind
    message: str

    def to_wire(self) -> list[Any]:
        return [self.TAG, self.seq, self.kind.value, self.message]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> Failed:
        return cls(int(fields[1]), FailureKind(fields[2]), str(fields[3]))


@dataclass(slots=True)
class Stop:
    """Finish and exit (a GPU worker first lets its batches in flight complete)."""

    TAG: ClassVar[str] = "stop"

    def to_wire(self) -> list[Any]:
        return [self.TAG]

    @classmethod
    def from_wire(cls, fields: list[Any]) -> Stop:
        return cls()


WorkerMessage = Loaded | LoadFailed | Ready | Done | Failed
ServerMessage = Attach | Run | Stop
_FROM_WORKER: dict[str, Any] = {c.TAG: c for c in (Loaded, LoadFailed, Ready, Done, Failed)}
_FROM_SERVER: dict[str, Any] = {c.TAG: c for c in (Attach, Run, Stop)}


def encode(message: WorkerMessage | ServerMessage) -> bytes:
    payload: bytes = msgpack.packb(message.to_wire(), use_bin_type=True)
    return payload


def decode_from_worker(payload: bytes) -> WorkerMessage:
    fields = msgpack.unpackb(payload, raw=False)
    message: WorkerMessage = _FROM_WORKER[fields[0]].from_wire(fields)
    return message


def decode_from_server(payload: bytes) -> ServerMessage:
    fields = msgpack.unpackb(payload, raw=False)
    message: ServerMessage = _FROM_SERVER[fields[0]].from_wire(fields)
    return message
