"""The /metrics gauges of where batches run: each (model, device)'s expected cost of a batch
(its three terms: fixed, per sample or token, per sample and length squared), as calibrated at
start-up and as the router now estimates it, and each GPU's batch cap.

Event loop: read at each scrape from Devices and its router (plain numbers). No torch.
"""

from __future__ import annotations

from server.metrics import Metrics
from server.routing.cost import UNKNOWN_COST, CostFit
from server.routing.devices import Devices


def register_cost_gauges(metrics: Metrics, devices: Devices) -> None:
    def costs(term: int) -> dict[tuple[str, ...], float]:
        """kind="calibrated": what start-up measured (absent where nothing was);
        kind="current": what the router routes on now, corrected by observed batches. The
        two side by side show how far the calibration was off, and whether it drifts."""
        out: dict[tuple[str, ...], float] = {}
        router = devices.router
        for (model, device), (calibrated, current, _) in (router.costs() if router else {}).items():
            if calibrated is not UNKNOWN_COST:
                out[(model, device, "calibrated")] = _term(calibrated, term)
            out[(model, device, "current")] = _term(current, term)
        return out

    metrics.add_labelled_gauge(
        "microbatch_cost_fixed_seconds",
        "Expected fixed cost of one batch, by model and device; kind: calibrated at "
        "start-up, or current (corrected online).",
        ("model", "device", "kind"),
        lambda: costs(0),
    )
    metrics.add_labelled_gauge(
        "microbatch_cost_per_sample_seconds",
        "Expected cost per sample of a batch (per token, sample x padded length, for a model "
        "with a dynamic dimension); kind: calibrated, or current (corrected online).",
        ("model", "device", "kind"),
        lambda: costs(1),
    )
    metrics.add_labelled_gauge(
        "microbatch_cost_per_sample_length_squared_seconds",
        "Expected cost per sample and squared padded length of a batch (attention; 0 for a "
        "fixed shape); kind: calibrated, or current (corrected online).",
        ("model", "device", "kind"),
        lambda: costs(2),
    )
    metrics.add_labelled_gauge(
        "microbatch_batch_cap",
        "Largest batch an executor runs in one go (lowered after a CUDA out-of-memory).",
        ("model", "device"),
        lambda: {(m, g.device): float(g.cap(m)) for g in devices.gpus for m in g.specs},
    )


def _term(fit: CostFit, term: int) -> float:
    return (fit.fixed_s, fit.per_sample_s, fit.quadratic_s)[term]
