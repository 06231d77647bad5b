"""The start-up route decision (server/routing/routes.py): which executors a model may use, from
its configured routing, the GPUs that run it and the rejected calibrations. Pure data in, pure
data out."""

from __future__ import annotations

import pytest

from server.routing.routes import Route, route

GPUS = ("cuda:0", "cuda:1")
REJECTED = ("cuda/Fake GPU",)


@pytest.mark.parametrize(
    ("routing", "gpus", "rejected", "devices"),
    [
        ("auto", GPUS, (), ("cpu", "cuda:0", "cuda:1")),  # the router chooses per batch
        ("auto", (), (), ("cpu",)),  # no GPU runs it: as without a GPU
        ("auto", GPUS, REJECTED, ("cpu",)),  # costs nobody can trust: the CPU alone
        ("cpu", GPUS, (), ("cpu",)),
        ("cpu", GPUS, REJECTED, ("cpu",)),
        ("cuda", GPUS, (), GPUS),
        ("cuda", GPUS, REJECTED, GPUS),  # forced: kept despite the rejected calibration
        ("cuda", (), (), ("cpu",)),  # forced, but no GPU runs it
    ],
)
def test_each_routing_gives_its_devices(
    routing: str, gpus: tuple[str, ...], rejected: tuple[str, ...], devices: tuple[str, ...]
) -> None:
    assert route("m", routing, gpus, rejected).devices == devices


def test_what_the_config_asked_for_is_silent() -> None:
    assert route("m", "auto", GPUS, ()) == Route(("cpu", *GPUS))
    assert route("m", "cpu", GPUS, REJECTED) == Route(("cpu",))
    assert route("m", "cuda", GPUS, ()) == Route(GPUS)


def test_every_departure_from_the_config_says_why() -> None:
    no_gpu = route("m", "cuda", (), ())
    assert no_gpu.note == "model 'm' has routing = 'cuda' but no GPU runs it: CPU"
    assert not no_gpu.severe
    kept = route("m", "cuda", GPUS, REJECTED)
    assert kept.note == "model 'm' keeps routing = 'cuda' despite its rejected calibration"
    assert not kept.severe
    dropped = route("m", "auto", GPUS, REJECTED)
    assert dropped.severe and dropped.note.startswith(
        "model 'm' runs on the CPU only: its calibration on cuda/Fake GPU was rejected"
    )
