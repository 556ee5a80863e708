"""Every Prometheus metric of the runtime, in one place.

One module so names, labels and buckets stay consistent across roles and so a
dashboard author finds them all here. Each role has its own section; every
metric says which SageMaker CloudWatch metric it stands in for.

Hot paths must not call ``.labels(...)`` per request (it hashes the label
values and takes a lock): bind the children once at startup, e.g. with
:class:`ModelServerMetrics`, and only ``inc``/``observe`` per request.

With several uvicorn workers each worker has its own registry and a scrape sees
one worker; run one worker per pod and scale with replicas (the default).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Summary,
)
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

#: How prometheus_client itself writes ``le`` (untyped upstream, typed here).
_go_float: Callable[[float], str] = floatToGoString

#: Latency buckets from 50 µs (a small model in-process) to 60 s (SageMaker's
#: real-time timeout).
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Model download/load time: from a small local file to a multi-GB download.
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_MODEL_LABELS = ("endpoint", "variant", "model")

# ============================================================ event-loop metrics
# prometheus_client's Counter/Histogram take a lock and do several calls per
# update: about 1.3 µs per inc and 2.8 µs per observe here, which is a
# measurable share of a request to a 6 µs model. The model server's hot path
# updates its per-request metrics only on the event-loop thread, so it uses
# these lock-free families instead: plain ints and one bisect per observation,
# read by a collector at scrape time (the scrape runs on the same loop). Use
# them only from one thread; anything updated from other threads (model
# loading) uses the ordinary prometheus_client classes.


class LoopCounter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LoopHistogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        #: Non-cumulative counts per bucket, the last one for +Inf.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le).
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class _LoopFamily(Collector):
    """A labelled family of loop counters or histograms, exported as one metric."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...] | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.buckets = buckets
        self._children: dict[tuple[str, ...], LoopCounter | LoopHistogram] = {}
        REGISTRY.register(self)

    def _child(self, values: tuple[str, ...]) -> LoopCounter | LoopHistogram:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
        child = self._children.get(values)
        if child is None:
            child = LoopCounter() if self.buckets is None else LoopHistogram(self.buckets)
            self._children[values] = child
        return child

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        if self.buckets is None:
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            if isinstance(child, LoopCounter):
                assert isinstance(family, CounterMetricFamily)
                family.add_metric(list(values), child.value)
            else:
                assert isinstance(family, HistogramMetricFamily)
                cumulative, buckets = 0, []
                for bound, n in zip((*child.bounds, float("inf")), child.counts, strict=True):
                    cumulative += n
                    buckets.append((_go_float(bound), float(cumulative)))
                family.add_metric(list(values), buckets, child.sum)
        yield family


class LoopCounterFamily(_LoopFamily):
    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        super().__init__(name, documentation, labelnames)

    def labels(self, *values: str) -> LoopCounter:
        child = self._child(values)
        assert isinstance(child, LoopCounter)
        return child


class LoopHistogramFamily(_LoopFamily):
    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        super().__init__(name, documentation, labelnames, tuple(sorted(buckets)))

    def labels(self, *values: str) -> LoopHistogram:
        child = self._child(values)
        assert isinstance(child, LoopHistogram)
        return child


# ============================================================ model server role
# Per-request metrics are loop metrics (see above); load metrics are ordinary.

#: CloudWatch ``Invocations``: requests that reached the model server
#: (``/invocations`` and V2 ``infer``), successful or not.
INVOCATIONS = LoopCounterFamily(
    "kubeinfer_invocations", "Inference requests received by the model server",
    _MODEL_LABELS,
)
#: CloudWatch ``Invocation4XXErrors`` / ``Invocation5XXErrors`` (and
#: ``ModelError`` counts for 424), split by HTTP status code.
INVOCATION_ERRORS = LoopCounterFamily(
    "kubeinfer_invocation_errors", "Inference requests answered with an error, by status code",
    (*_MODEL_LABELS, "code"),
)
#: CloudWatch ``ModelLatency``: time spent inside the model (backend predict).
MODEL_LATENCY = LoopHistogramFamily(
    "kubeinfer_model_latency_seconds", "Time the model took to predict", _MODEL_LABELS,
)
#: CloudWatch ``OverheadLatency``: request time minus model time (reading,
#: decoding, encoding, queueing for an inference thread).
OVERHEAD_LATENCY = LoopHistogramFamily(
    "kubeinfer_overhead_latency_seconds", "Request time spent outside the model",
    _MODEL_LABELS,
)
#: No direct CloudWatch metric (the closest is the endpoint's InService status
#: and, for multi-model endpoints, ``LoadedModelCount``): 1 when ready.
MODEL_LOADED = Gauge(
    "kubeinfer_model_loaded", "1 when the model is loaded and serving, else 0",
    _MODEL_LABELS,
)
#: No direct CloudWatch metric (SageMaker fails the endpoint's update instead):
#: models that failed to load (stage="load") or loaded and then failed their
#: warm-up inference (stage="warmup"); the server stays up, not ready, with
#: ``kubeinfer_model_loaded`` at 0.
MODEL_LOAD_FAILURES = Counter(
    "kubeinfer_model_load_failures", "Models that failed to load or failed their warm-up "
    "inference, by stage", (*_MODEL_LABELS, "stage"),
)
#: CloudWatch ``ModelDownloadingTime`` (phase="download") and
#: ``ModelLoadingTime`` (phase="load", including warm-up).
MODEL_LOAD_SECONDS = Histogram(
    "kubeinfer_model_load_seconds", "Time to download and to load a model",
    (*_MODEL_LABELS, "phase"), buckets=LOAD_BUCKETS,
)


class ModelServerMetrics:
    """The model server's metric children, bound once to its endpoint/variant/model.

    ``invocations``, ``model_latency``, ``overhead_latency`` and :meth:`error`
    are loop metrics: touch them only from the event-loop thread.
    """

    def __init__(self, endpoint: str, variant: str, model: str) -> None:
        self._labels = (endpoint, variant, model)
        self.invocations = INVOCATIONS.labels(*self._labels)
        self.model_latency = MODEL_LATENCY.labels(*self._labels)
        self.overhead_latency = OVERHEAD_LATENCY.labels(*self._labels)
        self.loaded = MODEL_LOADED.labels(*self._labels)
        self.download_seconds = MODEL_LOAD_SECONDS.labels(*self._labels, "download")
        self.load_seconds = MODEL_LOAD_SECONDS.labels(*self._labels, "load")
        self._errors: dict[int, LoopCounter] = {}

    def load_failed(self, stage: str) -> None:
        """Count a model that failed to load (``load``) or to warm up (``warmup``)."""
        MODEL_LOAD_FAILURES.labels(*self._labels, stage).inc()

    def error(self, status: int) -> None:
        """Count one error response; children are bound on the first error per code."""
        child = self._errors.get(status)
        if child is None:
            child = self._errors[status] = INVOCATION_ERRORS.labels(*self._labels, str(status))
        child.value += 1

    def errors_total(self) -> int:
        """Error responses counted so far, every status code together (V2 statistics)."""
        return sum(c.value for c in self._errors.values())


# ============================================================ multi-model cache
# The cache lives on the event loop and counts in plain ints (``CacheStats``);
# this collector reads every registered cache at scrape time. Model names are
# never labels (thousands of models would be thousands of series).

_MME_LABELS = ("endpoint", "variant")

#: CloudWatch ``ModelDownloadingTime`` / ``ModelLoadingTime`` of multi-model
#: endpoints: per model load, download and load (+warm-up) phases.
MULTI_MODEL_LOAD_SECONDS = Histogram(
    "kubeinfer_multimodel_load_seconds", "Time to download and to load one model of a "
    "multi-model endpoint", (*_MME_LABELS, "phase"), buckets=LOAD_BUCKETS,
)


class _CacheSource:
    """What the collector needs from one cache (duck-typed: ``stats``, bytes, ``loaded()``)."""

    def __init__(self, labels: tuple[str, str], cache: object) -> None:
        self.labels = labels
        self.cache = cache


class MultiModelCollector(Collector):
    """Exports every registered multi-model cache's counters and gauges."""

    def __init__(self) -> None:
        self.sources: list[_CacheSource] = []
        REGISTRY.register(self)

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

        counters = {
            # CloudWatch ModelCacheHit (hits / invocations).
            "hits": CounterMetricFamily("kubeinfer_multimodel_cache_hits",
                                        "Requests whose model was already loaded",
                                        labels=_MME_LABELS),
            "misses": CounterMetricFamily("kubeinfer_multimodel_cache_misses",
                                          "Requests that waited for their model to load",
                                          labels=_MME_LABELS),
            "loads": CounterMetricFamily("kubeinfer_multimodel_loads",
                                         "Models loaded into the cache", labels=_MME_LABELS),
            "load_failures": CounterMetricFamily("kubeinfer_multimodel_load_failures",
                                                 "Model loads that failed", labels=_MME_LABELS),
            "evictions": CounterMetricFamily("kubeinfer_multimodel_evictions",
                                             "Models evicted to make room", labels=_MME_LABELS),
        }
        # CloudWatch ModelLoadingWaitTime: how long requests waited for a load.
        wait = SummaryMetricFamily("kubeinfer_multimodel_wait_seconds",
                                   "Time requests waited for their model to load",
                                   labels=_MME_LABELS)
        resident = GaugeMetricFamily("kubeinfer_multimodel_resident_bytes",
                                     "Bytes of loaded (and reserved) models", labels=_MME_LABELS)
        budget = GaugeMetricFamily("kubeinfer_multimodel_budget_bytes",
                                   "The in-memory budget of the cache", labels=_MME_LABELS)
        # CloudWatch LoadedModelCount.
        count = GaugeMetricFamily("kubeinfer_multimodel_loaded_models",
                                  "Models loaded in memory", labels=_MME_LABELS)
        for src in self.sources:
            cache = src.cache
            stats = cache.stats  # type: ignore[attr-defined]
            labels = list(src.labels)
            for key, family in counters.items():
                family.add_metric(labels, getattr(stats, key))
            wait.add_metric(labels, stats.wait_count, stats.wait_seconds_sum)
            resident.add_metric(labels, cache.resident_bytes)  # type: ignore[attr-defined]
            budget.add_metric(labels, cache.budget_bytes)  # type: ignore[attr-defined]
            count.add_metric(labels, len(cache.loaded()))  # type: ignore[attr-defined]
        yield from counters.values()
        yield from (wait, resident, budget, count)


MULTI_MODEL = MultiModelCollector()


class MultiModelMetrics:
    """A multi-model server's load histograms, bound to its endpoint/variant."""

    def __init__(self, endpoint: str, variant: str) -> None:
        self.labels = (endpoint, variant)
        self.download_seconds = MULTI_MODEL_LOAD_SECONDS.labels(*self.labels, "download")
        self.load_seconds = MULTI_MODEL_LOAD_SECONDS.labels(*self.labels, "load")

    def watch(self, cache: object) -> None:
        """Export ``cache`` (a ``models.cache.ModelCache``) from now on."""
        MULTI_MODEL.sources.append(_CacheSource(self.labels, cache))


# ============================================================ gateway role
# Bound to label children by ``kubeinfer_runtime.gateway.recorder`` (cached per
# endpoint/variant). An unknown endpoint is labelled "(unknown)", never with the
# name the client sent, so clients cannot create series.

_GATEWAY_LABELS = ("endpoint", "variant")

#: CloudWatch ``Invocations`` (endpoint and variant dimensions): requests the
#: gateway forwarded and a model server answered, whatever the status.
GATEWAY_INVOCATIONS = Counter(
    "kubeinfer_gateway_invocations", "Requests forwarded to a variant and answered by it",
    _GATEWAY_LABELS,
)
#: CloudWatch ``Invocation4XXErrors`` / ``Invocation5XXErrors`` / ``ModelError``
#: counts, by SageMaker error code (``ValidationError``, ``ModelError``,
#: ``ServiceUnavailable``, ...; ``HTTP<status>`` when the model server sent
#: none). ``variant`` is empty when the error came before a variant was chosen.
GATEWAY_ERRORS = Counter(
    "kubeinfer_gateway_errors", "Error answers, from the gateway or passed through, by code",
    (*_GATEWAY_LABELS, "code"),
)
#: CloudWatch ``OverheadLatency``: time in the gateway minus the upstream call.
GATEWAY_OVERHEAD_SECONDS = Histogram(
    "kubeinfer_gateway_overhead_seconds", "Time a request spent in the gateway itself",
    _GATEWAY_LABELS, buckets=LATENCY_BUCKETS,
)
#: CloudWatch ``ModelLatency`` as the gateway sees it: the upstream round trip
#: (model server time plus the network hop).
GATEWAY_MODEL_LATENCY_SECONDS = Histogram(
    "kubeinfer_gateway_upstream_latency_seconds", "Round trip to the variant's model server",
    _GATEWAY_LABELS, buckets=LATENCY_BUCKETS,
)
#: No CloudWatch counterpart (SageMaker hides instance health): 1 while an
#: upstream model server URL is in rotation, 0 while out.
GATEWAY_UPSTREAM_UP = Gauge(
    "kubeinfer_gateway_upstream_up", "1 while the upstream is in rotation, 0 while out",
    ("upstream",),
)
#: Revision (Endpoint generation) of the route table in force.
GATEWAY_ROUTE_TABLE_REVISION = Gauge(
    "kubeinfer_gateway_route_table_revision", "Revision of the route table in force",
)
#: Route-table files rejected as invalid (the last good table stays in force).
GATEWAY_ROUTE_TABLE_REJECTED = Counter(
    "kubeinfer_gateway_route_table_rejected", "Route-table files rejected as invalid",
)

# Serverless activator (``gateway.activator``). The scaler reads these to tell
# an idle variant from a busy one.

#: CloudWatch ``ConcurrentExecutions`` (serverless): requests in flight,
#: held ones included.
GATEWAY_IN_FLIGHT = Gauge(
    "kubeinfer_gateway_in_flight_requests", "Serverless requests in flight (held included)",
    ("endpoint",),
)
#: Requests held while a variant has no ready replica.
GATEWAY_HELD = Gauge(
    "kubeinfer_gateway_held_requests", "Requests held waiting for a replica (cold start)",
    _GATEWAY_LABELS,
)
#: CloudWatch ``ModelSetupTime`` as a client sees it: how long held requests waited.
GATEWAY_COLD_START_WAIT_SECONDS = Histogram(
    "kubeinfer_gateway_cold_start_wait_seconds", "Time a request was held for a replica",
    _GATEWAY_LABELS, buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
)


# Data capture (``gateway.capture_writer``). No CloudWatch counterpart: SageMaker
# does not count captured records.

#: Records of sampled-in requests written to the destination (``written``), dropped
#: because the buffer was full while the store was slow or down (``dropped``), or
#: requests not drawn by the sampling rate (``sampled_out``).
CAPTURE_RECORDS = Counter(
    "kubeinfer_capture_records", "Data capture records by outcome: written, dropped, "
    "sampled_out", (*_GATEWAY_LABELS, "result"),
)
#: Bytes of captured records held in memory waiting for upload (within
#: KUBEINFER_CAPTURE_BUFFER_BYTES).
CAPTURE_BUFFER_BYTES = Gauge(
    "kubeinfer_capture_buffer_bytes", "Captured bytes held in memory waiting for upload",
    ("endpoint",),
)
#: Uploads of capture objects that failed (they are retried; see ``dropped``).
CAPTURE_UPLOAD_FAILURES = Counter(
    "kubeinfer_capture_upload_failures", "Failed uploads of capture objects (retried)",
    ("endpoint",),
)


# Shadow variants and mirrors (``gateway.shadow``; names in ``contract.shadow``). No
# CloudWatch counterpart beyond the shadow variant's own Invocations/ModelLatency.
# ``variant`` is the production variant that answered the client, ``peer`` the shadow
# (or the mirror's peer variant): both come from the route table, never from a client.

_PAIR_LABELS = ("endpoint", "variant", "peer")

#: Copies by ``result``: sent (answered), failed (no answer in time, refused), dropped
#: (the peer's bounded queue was full).
SHADOW_COPIES = Counter(
    "kubeinfer_shadow_copies", "Sampled copies of production requests by outcome: sent, "
    "failed, dropped", (*_PAIR_LABELS, "result"),
)
SHADOW_COMPARED = Counter(
    "kubeinfer_shadow_compared", "Pairs of 2xx answers compared", _PAIR_LABELS,
)
#: Pairs of 2xx answers too large to compare (over ``compare.MAX_COMPARE_VALUES``
#: values) that were not byte for byte equal: neither agreed nor disagreed.
SHADOW_UNCOMPARED = Counter(
    "kubeinfer_shadow_uncompared", "Pairs of 2xx answers too large to compare that were not "
    "byte for byte equal", _PAIR_LABELS,
)
SHADOW_AGREED = Counter(
    "kubeinfer_shadow_agreed", "Compared pairs that agreed (labels, argmax or within "
    "tolerance)", _PAIR_LABELS,
)
SHADOW_DISAGREED = Counter(
    "kubeinfer_shadow_disagreed", "Compared pairs that did not agree", _PAIR_LABELS,
)
#: Error answers of sampled requests, by ``side``: production or peer.
SHADOW_ERRORS = Counter(
    "kubeinfer_shadow_errors", "Error answers of sampled requests by side", (*_PAIR_LABELS,
                                                                            "side"),
)
SHADOW_LATENCY_SECONDS = Histogram(
    "kubeinfer_shadow_latency_seconds", "Upstream latency of sampled requests by side",
    (*_PAIR_LABELS, "side"), buckets=LATENCY_BUCKETS,
)
SHADOW_ABS_DIFF = Summary(
    "kubeinfer_shadow_abs_diff", "Largest absolute difference of each numeric pair",
    _PAIR_LABELS,
)
SHADOW_REL_DIFF = Summary(
    "kubeinfer_shadow_rel_diff", "Largest relative difference of each numeric pair",
    _PAIR_LABELS,
)


# ============================================================ asynchronous inference
# The gateway exports the backlog (it knows every async endpoint it serves and
# runs even while the workers are scaled to zero); workers export outcomes.

#: CloudWatch ``ApproximateBacklogSize``: requests queued or in flight.
ASYNC_BACKLOG = Gauge(
    "kubeinfer_async_backlog_size", "Async requests not yet finished (queued + in flight)",
    ("endpoint",),
)
#: CloudWatch ``ApproximateBacklogSizePerInstance``: backlog / live workers
#: (the whole backlog while no worker runs).
ASYNC_BACKLOG_PER_INSTANCE = Gauge(
    "kubeinfer_async_backlog_size_per_instance", "Async backlog divided by live workers",
    ("endpoint",),
)
#: CloudWatch ``ApproximateAgeOfOldestRequest``, seconds.
ASYNC_OLDEST_AGE_SECONDS = Gauge(
    "kubeinfer_async_oldest_request_age_seconds", "Age of the oldest unfinished async request",
    ("endpoint",),
)
#: CloudWatch ``InvocationsProcesssed`` / ``InvocationFailures``: finished
#: requests by outcome (``success``, ``failure``, ``dead_letter``, ``expired``).
ASYNC_REQUESTS = Counter(
    "kubeinfer_async_requests", "Async requests finished by this worker, by outcome",
    ("endpoint", "outcome"),
)
#: New requests the gateway refused (429) because the queue held maxQueuedRequests.
ASYNC_REFUSED = Counter(
    "kubeinfer_async_refused", "Async requests refused: the queue was full",
    ("endpoint",),
)
#: Attempts given back to the queue (an error with retries left, or a drain).
ASYNC_RETRIES = Counter(
    "kubeinfer_async_retries", "Async request attempts re-queued for another try",
    ("endpoint",),
)
#: CloudWatch ``ModelLatency`` of async requests: input read to output written.
ASYNC_PROCESSING_SECONDS = Histogram(
    "kubeinfer_async_processing_seconds", "Read input, infer and write output, per request",
    ("endpoint",), buckets=LATENCY_BUCKETS,
)
#: Notification POSTs that failed (each is retried with backoff).
ASYNC_NOTIFY_FAILURES = Counter(
    "kubeinfer_async_notification_failures", "Failed notification deliveries (retried)",
    ("endpoint",),
)


# ============================================================ edge fleet server
# ``kubeinfer_runtime.edge``. SageMaker Edge Manager publishes no CloudWatch metrics for
# the fleet itself (its console shows device counts and deployment status): these stand
# in for that view. ``fleet`` is the EdgeFleet's name from the fleet config, never a
# value a device sends; ``reason`` and ``state`` are fixed sets.

#: Heartbeats answered (a device's DescribeDevice "LatestHeartbeat" updates).
EDGE_HEARTBEATS = Counter(
    "kubeinfer_edge_heartbeats", "Device heartbeats answered", ("fleet",),
)
#: Registrations accepted (RegisterDevices), re-registrations included.
EDGE_REGISTRATIONS = Counter(
    "kubeinfer_edge_registrations", "Device registrations accepted (credential issued)",
    ("fleet",),
)
#: Device API requests refused, by ``reason``: unauthorized, invalid, too_large,
#: not_found, unavailable.
EDGE_REFUSED = Counter(
    "kubeinfer_edge_refused_requests", "Device API requests refused, by reason",
    ("fleet", "reason"),
)
#: Capture uploads being received and written (one per device at a time, a bound per
#: process: the server answers 429 beyond).
EDGE_CAPTURE_UPLOADS = Gauge(
    "kubeinfer_edge_capture_uploads_in_flight", "Capture uploads in flight", ("fleet",),
)
#: Devices by state (Online, Offline, Updating, Stalled, Failed), as in GET /v1/fleet.
EDGE_DEVICES = Gauge(
    "kubeinfer_edge_devices", "Registered devices by state", ("fleet", "state"),
)
#: Index of the rollout's wave in progress (== waves once every wave passed).
EDGE_ROLLOUT_WAVE = Gauge(
    "kubeinfer_edge_rollout_wave", "Wave in progress of the fleet's rollout", ("fleet",),
)
#: 1 for the rollout's phase (Progressing, Complete, RolledBack, Paused), 0 for the others.
EDGE_ROLLOUT_PHASE = Gauge(
    "kubeinfer_edge_rollout_phase", "The fleet's rollout phase (1 for the phase in force)",
    ("fleet", "phase"),
)
#: Capture records uploaded by devices and written to the fleet's destination.
EDGE_CAPTURE_RECORDS = Counter(
    "kubeinfer_edge_capture_records", "Capture records uploaded by devices and written",
    ("fleet",),
)
#: 1 while this replica holds the rollout controller's lease.
EDGE_CONTROLLER_LEADER = Gauge(
    "kubeinfer_edge_controller_leader", "1 while this replica runs the rollout controller",
    ("fleet",),
)


# ============================================================ HTTP bounds (every role)


class _HttpBoundsCollector(Collector):
    """What ``http_limits`` holds against its per-process bounds, read at scrape time.

    Read through ``sys.modules``, not imported: a process that never served HTTP (a
    batch step, the CLI) exports nothing and pays no uvicorn import for it.
    """

    def describe(self) -> Iterator[Metric]:
        return iter(())  # what collect yields depends on the process: not described

    def collect(self) -> Iterator[Metric]:
        import sys

        from prometheus_client.core import GaugeMetricFamily

        limits = sys.modules.get("kubeinfer_runtime.http_limits")
        if limits is None or limits.body_budget.cache_info().currsize == 0:
            return
        budget = limits.body_budget()
        yield GaugeMetricFamily(
            "kubeinfer_http_request_bytes_held",
            "Bytes of requests received whose answer is not yet sent, in this process",
            value=budget.held)
        yield GaugeMetricFamily(
            "kubeinfer_http_request_bytes_held_limit",
            "The bound on them (KUBEINFER_HTTP_MAX_BODY_BYTES_HELD)", value=budget.limit)
        for name, documentation, value in (
                ("kubeinfer_http_uploads_refused", "Uploads answered 503 because the process "
                 "held its bound of request bytes", budget.refused),
                ("kubeinfer_http_send_stalled_connections", "Connections cut because their "
                 "peer took none of its answer for KUBEINFER_HTTP_SEND_TIMEOUT_S",
                 budget.send_stalled),
                ("kubeinfer_http_answers_cut", "Connections cut because answers waiting to be "
                 "sent and requests held exceeded KUBEINFER_HTTP_MAX_BODY_BYTES_HELD",
                 budget.answers_cut)):
            counter = CounterMetricFamily(name, documentation, labels=())
            counter.add_metric([], value)
            yield counter


REGISTRY.register(_HttpBoundsCollector())


# ============================================================ exposition


def render_latest() -> tuple[bytes, str]:
    """``(body, content_type)`` of the Prometheus text exposition for ``/metrics``."""
    return _generate_latest(REGISTRY), CONTENT_TYPE_LATEST
