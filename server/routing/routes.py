"""Which executors each model may use, decided once at start-up from its configured routing,
the GPUs that run it and the calibrations that were rejected. Pure: names in, names out, plus a
note for the log where the result is not what the config asked for.

Event loop (main process), called by devices.py; no clock, no I/O, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

CPU = "cpu"


@dataclass(frozen=True)
class Route:
    devices: tuple[str, ...]  # in preference order, the CPU first
    note: str = ""  # for the log: why this is not (quite) what the config asked for
    severe: bool = False  # the note is an error: a GPU the model could use is left unused


def route(model: str, routing: str, gpus: Sequence[str], rejected: Sequence[str]) -> Route:
    """routing: "auto", "cpu" or "cuda"; gpus: the devices that run the model; rejected: the
    device ids whose calibration of it was rejected."""
    if routing == "cuda" and not gpus:
        return Route((CPU,), f"model {model!r} has routing = 'cuda' but no GPU runs it: CPU")
    if routing == "cuda":
        kept = f"model {model!r} keeps routing = 'cuda' despite its rejected calibration"
        return Route(tuple(gpus), kept if rejected else "")
    if routing == "auto" and gpus and rejected:
        # A choice made on costs nobody can trust could send every batch to the wrong side;
        # the CPU alone is what the server does without a GPU, a known quantity.
        return Route(
            (CPU,),
            f"model {model!r} runs on the CPU only: its calibration on {', '.join(rejected)} "
            "was rejected; set routing = 'cuda' to use the GPU anyway, or recalibrate on a "
            "quieter machine",
            severe=True,
        )
    if routing == "auto":
        return Route((CPU, *gpus))
    return Route((CPU,))
