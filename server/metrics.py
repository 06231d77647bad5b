"""Server metrics: typed events from the hot path, exported as Prometheus text.

Event loop only. Hot-path events append plain floats to lists; they are bucketed with numpy
only when /metrics is scraped, so a request pays a list append rather than a locked
prometheus_client Histogram.observe. Rendering uses prometheus_client's own exposition.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from server.executors.base import Batch

LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
BATCH_LENGTH_BUCKETS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Observations held back before bucketing; bounds memory between scrapes.
_FLUSH_AT = 4096
LabelledGauge = tuple[str, str, tuple[str, ...], Callable[[], dict[tuple[str, ...], float]]]


class _LazyHistogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every bucket
        self.total = 0.0
        self._held: list[float] = []

    def observe(self, value: float) -> None:
        self._held.append(value)
        if len(self._held) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self._held:
            return
        values = np.asarray(self._held, dtype=np.float64)
        self._held = []
        # Prometheus buckets are "less than or equal to" the bound.
        index = np.searchsorted(self.buckets, values, side="left")
        self.counts += np.bincount(index, minlength=len(self.counts))
        self.total += float(values.sum())

    def cumulative(self) -> list[tuple[str, float]]:
        self.flush()
        running = np.cumsum(self.counts)
        pairs = [(_bound(b), float(c)) for b, c in zip(self.buckets, running[:-1], strict=True)]
        pairs.append(("+Inf", float(running[-1])))
        return pairs


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and value >= 1 else repr(float(value))


@dataclass(frozen=True)
class ModelTotals:
    """One model's totals since start-up, for the /v2 statistics extension (seconds and counts)."""

    ok_requests: int
    ok_latency_s: float
    failed_requests: int
    failed_latency_s: float
    queued_requests: int
    queue_s: float
    samples: int  # computed in batches that succeeded
    batches: int
    compute_s: float
    by_batch_size: dict[int, tuple[int, float]]  # samples -> (batches, compute seconds)
    last_batch_at: float  # wall-clock time of the last successful batch (time.time()), or 0


class Metrics(Collector):
    """Every metric the server exports; one instance per server, with its own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._requests: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self._dropped: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self._batches: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self._samples: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self._timeouts: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self._non_finite: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self._latency: defaultdict[str, _LazyHistogram] = defaultdict(
            lambda: _LazyHistogram(LATENCY_BUCKETS_S)
        )
        self._queue_delay: defaultdict[str, _LazyHistogram] = defaultdict(
            lambda: _LazyHistogram(LATENCY_BUCKETS_S)
        )
        self._compute: defaultdict[tuple[str, ...], _LazyHistogram] = defaultdict(
            lambda: _LazyHistogram(LATENCY_BUCKETS_S)
        )
        self._batch_size: defaultdict[tuple[str, ...], _LazyHistogram] = defaultdict(
            lambda: _LazyHistogram(BATCH_SIZE_BUCKETS)
        )
        self._tokens: defaultdict[tuple[str, ...], int] = defaultdict(int)
        self._batch_length: defaultdict[tuple[str, ...], _LazyHistogram] = defaultdict(
            lambda: _LazyHistogram(BATCH_LENGTH_BUCKETS)
        )
        self._latency_sum: defaultdict[tuple[str, ...], float] = defaultdict(float)
        self._by_batch_size: dict[tuple[str, int], tuple[int, float]] = {}
        self._last_batch_at: dict[str, float] = {}
        self.worker_restarts = 0
        self.batch_retries = 0  # batches run again because their worker died
        self._gauges: list[tuple[str, str, str, Callable[[], dict[str, float]]]] = []
        self._labelled_gauges: list[LabelledGauge] = []
        self.registry.register(self)

    # Events -------------------------------------------------------------------------------
    def request_done(self, model: str, code: str, latency_s: float) -> None:
        key = (model, code)
        self._requests[key] += 1
        self._latency_sum[key] += latency_s
        self._latency[model].observe(latency_s)

    def request_dropped(self, model: str, reason: str) -> None:
        self._dropped[(model, reason)] += 1

    def batch_done(self, model: str, device: str, batch: Batch, compute_s: float) -> None:
        self._batches[(model, device, "ok")] += 1
        self._samples[(model, device)] += batch.samples
        self._batch_size[(model, device)].observe(batch.samples)
        self._compute[(model, device)].observe(compute_s)
        delays = self._queue_delay[model]
        for request in batch.requests:
            delays.observe(request.dispatched_at - request.arrived_at)
        count, seconds = self._by_batch_size.get((model, batch.samples), (0, 0.0))
        self._by_batch_size[(model, batch.samples)] = (count + 1, seconds + compute_s)
        self._last_batch_at[model] = time.time()  # a timestamp for reports, never a duration

    def padded_batch(self, model: str, batch: Batch) -> None:
        """A batch of a model with a dynamic dimension: the positions its requests hold, the
        positions computed (padded to the batch's length), and that length."""
        self._tokens[(model, "requested")] += sum(r.samples * r.length for r in batch.requests)
        self._tokens[(model, "computed")] += batch.samples * batch.length
        self._batch_length[(model,)].observe(batch.length)

    def batch_failed(self, model: str, device: str, samples: int) -> None:
        self._batches[(model, device, "failed")] += 1

    def batch_timeout(self, model: str, device: str) -> None:
        self._timeouts[(model, device)] += 1

    def non_finite_outputs(self, model: str, samples: int) -> None:
        self._non_finite[(model,)] += samples

    def add_gauge(
        self, name: str, doc: str, label: str, read: Callable[[], dict[str, float]]
    ) -> None:
        """A gauge read at scrape time: `read` returns {label value: gauge value}."""
        self._gauges.append((name, doc, label, read))

    def add_labelled_gauge(
        self,
        name: str,
        doc: str,
        labels: tuple[str, ...],
        read: Callable[[], dict[tuple[str, ...], float]],
    ) -> None:
        """A gauge with several labels, read at scrape time: {label values: gauge value}."""
        self._labelled_gauges.append((name, doc, labels, read))

    # Export -------------------------------------------------------------------------------
    def model_totals(self, model: str) -> ModelTotals:
        """Read at request time by /v2/models/.../stats (not on the infer path)."""
        ok_key = (model, "ok")
        failed = [k for k in self._requests if k[0] == model and k != ok_key]
        queue = self._queue_delay.get(model)
        if queue is not None:
            queue.flush()
        computes = [h for (m, _), h in self._compute.items() if m == model]
        for hist in computes:
            hist.flush()
        return ModelTotals(
            ok_requests=self._requests.get(ok_key, 0),
            ok_latency_s=self._latency_sum.get(ok_key, 0.0),
            failed_requests=sum(self._requests[k] for k in failed),
            failed_latency_s=sum(self._latency_sum[k] for k in failed),
            queued_requests=int(queue.counts.sum()) if queue else 0,
            queue_s=queue.total if queue else 0.0,
            samples=sum(n for (m, _), n in self._samples.items() if m == model),
            batches=sum(n for (m, _, o), n in self._batches.items() if m == model and o == "ok"),
            compute_s=sum(h.total for h in computes),
            by_batch_size={n: v for (m, n), v in sorted(self._by_batch_size.items()) if m == model},
            last_batch_at=self._last_batch_at.get(model, 0.0),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        yield _counter(
            "microbatch_requests",
            "Requests answered, by model and code.",
            ["model", "code"],
            self._requests,
        )
        yield _counter(
            "microbatch_dropped_requests",
            "Admitted requests never computed (deadline passed, client gone).",
            ["model", "reason"],
            self._dropped,
        )
        yield _counter(
            "microbatch_batches",
            "Batches run, by model, device and outcome.",
            ["model", "device", "outcome"],
            self._batches,
        )
        yield _counter(
            "microbatch_batch_samples",
            "Samples computed, by model and device.",
            ["model", "device"],
            self._samples,
        )
        restarts = CounterMetricFamily(
            "microbatch_worker_restarts", "Worker processes replaced after dying."
        )
        restarts.add_metric([], self.worker_restarts)
        yield restarts
        yield _counter(
            "microbatch_batch_timeouts",
            "Batches that ran past workers.batch_timeout_s: their worker was killed.",
            ["model", "device"],
            self._timeouts,
        )
        yield _counter(
            "microbatch_non_finite_outputs",
            "Samples answered with NaN or infinity in an output (JSON writes them as strings).",
            ["model"],
            self._non_finite,
        )
        retries = CounterMetricFamily(
            "microbatch_batch_retries",
            "Batches run again because their worker died or was killed by the watchdog.",
        )
        retries.add_metric([], self.batch_retries)
        yield retries
        yield _histogram(
            "microbatch_request_latency_seconds",
            "Time from a request's admission to its answer.",
            ["model"],
            {(k,): v for k, v in self._latency.items()},
        )
        yield _histogram(
            "microbatch_queue_delay_seconds",
            "Time a request waited in the queue before its batch was dispatched.",
            ["model"],
            {(k,): v for k, v in self._queue_delay.items()},
        )
        yield _histogram(
            "microbatch_batch_size",
            "Samples per dispatched batch.",
            ["model", "device"],
            self._batch_size,
        )
        yield _counter(
            "microbatch_tokens",
            "Positions of the dynamic dimension, by model: requested (the requests' own lengths) "
            "and computed (padded to each batch's length); the difference is padding.",
            ["model", "kind"],
            self._tokens,
        )
        yield _histogram(
            "microbatch_batch_length",
            "The padded length of each batch of a model with a dynamic dimension.",
            ["model"],
            self._batch_length,
        )
        yield _histogram(
            "microbatch_batch_compute_seconds",
            "Model time per batch, measured where it ran.",
            ["model", "device"],
            self._compute,
        )
        for name, doc, label, read in self._gauges:
            gauge = GaugeMetricFamily(name, doc, labels=[label])
            for key, value in read().items():
                gauge.add_metric([key], value)
            yield gauge
        for name, doc, labels, read_labelled in self._labelled_gauges:
            gauge = GaugeMetricFamily(name, doc, labels=list(labels))
            for keys, value in read_labelled().items():
                gauge.add_metric(list(keys), value)
            yield gauge


def _counter(
    name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), value)
    return family


def _histogram(
    name: str, doc: str, labels: list[str], hists: Mapping[tuple[str, ...], _LazyHistogram]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, hist in hists.items():
        buckets = hist.cumulative()
        family.add_metric(list(key), buckets, sum_value=hist.total)
    return family
