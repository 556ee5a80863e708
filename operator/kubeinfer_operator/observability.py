"""The operator's own Prometheus metrics and the ``GET /metrics`` listener that serves them.

Every metric lives in one :class:`OperatorMetrics`, on its own ``CollectorRegistry``
(not prometheus_client's global one: tests run several operators in one process,
and the runtime's metrics never mix in). ``main.build_registry`` makes one per
operator, hands it to the syncs and the scaler, and serves it on
``KUBEINFER_OPERATOR_METRICS_PORT`` (the chart's ``operator.metricsPort``; unset: no
listener) with :class:`MetricsServer`.

=============================================== ======== ==================================
metric                                          type     labels
=============================================== ======== ==================================
kubeinfer_operator_reconciles_total             counter  kind (Endpoint, TransformJob,
                                                         CompilationJob), result (ok,
                                                         invalid, conflict, error)
kubeinfer_operator_reconcile_duration_seconds   histo.   kind
kubeinfer_operator_scale_decisions_total        counter  direction (up, down, from_zero,
                                                         to_zero), reason (autoscaling,
                                                         serverless, async_backlog)
kubeinfer_operator_pending_scale_requests       gauge    (none): scaling rounds gateways'
                                                         scale requests started, not yet
                                                         done (an Endpoint's requests
                                                         share one)
kubeinfer_operator_active                       gauge    (none): 1 on the replica that
                                                         acts, 0 on a standby
=============================================== ======== ==================================

Labels are bounded on purpose: no namespace or Endpoint name (a cluster with
thousands of Endpoints would make thousands of series); per-Endpoint detail is in
the Endpoint's status and Events. A reconcile is one full pass of a kind's sync
(kopf's create/update/resume handler, a child's change, the periodic refresh);
``result`` sorts its outcome: ``invalid`` a spec that cannot run (InvalidSpec,
rejected by the API), ``conflict`` a child name taken by another owner,
``error`` anything else that failed (retried with backoff).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from kubeinfer_operator.errors import ConflictError, SpecError
from kubeinfer_operator.http_bounds import BoundedListener
from kubeinfer_operator.reconcile.cluster_scaling import ScaleChange

log = logging.getLogger(__name__)

KIND_ENDPOINT = "Endpoint"
KIND_TRANSFORM_JOB = "TransformJob"
KIND_COMPILATION_JOB = "CompilationJob"
KINDS = (KIND_ENDPOINT, KIND_TRANSFORM_JOB, KIND_COMPILATION_JOB)

RESULT_OK = "ok"
RESULT_INVALID = "invalid"
RESULT_CONFLICT = "conflict"
RESULT_ERROR = "error"

#: Seconds; a reconcile is a handful of API calls, a slow one waits on a slow API server.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

T = TypeVar("T")


def reconcile_result(exc: BaseException | None) -> str:
    """The ``result`` label of a reconcile that raised ``exc`` (None: it succeeded)."""
    if exc is None:
        return RESULT_OK
    if isinstance(exc, SpecError):
        return RESULT_INVALID
    if isinstance(exc, ConflictError):
        return RESULT_CONFLICT
    return RESULT_ERROR


class OperatorMetrics:
    """The operator's metrics on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "kubeinfer_operator_reconciles", "Reconciles by kind and result (ok, invalid, "
            "conflict, error)", ["kind", "result"], registry=self.registry)
        self.reconcile_duration = Histogram(
            "kubeinfer_operator_reconcile_duration_seconds", "Time one reconcile took, "
            "by kind", ["kind"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.scale_decisions = Counter(
            "kubeinfer_operator_scale_decisions", "Replica changes the scaler decided, by "
            "direction (up, down, from_zero, to_zero) and reason (the policy: autoscaling, "
            "serverless, async_backlog)", ["direction", "reason"], registry=self.registry)
        self.pending_scale_requests = Gauge(
            "kubeinfer_operator_pending_scale_requests", "Scaling rounds gateways' scale "
            "requests started and not yet done (an Endpoint's requests share one)",
            registry=self.registry)
        self.active = Gauge(
            "kubeinfer_operator_active", "1 on the operator replica that acts, 0 on a "
            "standby", registry=self.registry)
        for kind in KINDS:  # the series exist (at 0) before the first reconcile
            self.reconciles.labels(kind, RESULT_OK)
            self.reconcile_duration.labels(kind)

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Count and time the reconcile in the ``with`` block (a cancelled one is not
        counted: the operator is stopping or the object went away)."""
        started = time.perf_counter()
        result: str | None = RESULT_OK
        try:
            yield
        except Exception as exc:
            result = reconcile_result(exc)
            raise
        except BaseException:
            result = None
            raise
        finally:
            if result is not None:
                self.reconciles.labels(kind, result).inc()
                self.reconcile_duration.labels(kind).observe(time.perf_counter() - started)

    def scale_decision(self, change: ScaleChange) -> None:
        """Count a replica change (the scaler's ``on_change``)."""
        self.scale_decisions.labels(change.direction, change.policy).inc()

    def set_active(self, active: bool) -> None:
        """Whether this replica is the one acting (the HA code calls it on every change)."""
        self.active.set(1 if active else 0)

    def counting_pending(
            self, handle: Callable[[str, str], Coroutine[Any, Any, T]],
    ) -> Callable[[str, str], Coroutine[Any, Any, T]]:
        """``handle`` (the scaler's ``on_request``, one call per coalesced round) counted in
        ``pending_scale_requests`` while it waits for and runs its Endpoint's round."""
        async def counted(namespace: str, endpoint: str) -> T:
            with self.pending_scale_requests.track_inprogress():
                return await handle(namespace, endpoint)
        return counted

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class MetricsServer:
    """``GET /metrics`` on ``port`` (None: no listener), for the operator's lifetime.

    Connections are bounded in count and lifetime like the scaler's
    (``http_bounds.BoundedListener``): the metrics port is open to any scraper.
    """

    def __init__(self, metrics: OperatorMetrics, port: int | None,
                 host: str = "0.0.0.0") -> None:
        self.metrics = metrics
        self.port = port
        self.host = host
        self._listener: BoundedListener | None = None

    async def start(self) -> None:
        if self.port is None:
            return
        app = web.Application()
        app.router.add_get("/metrics", self._serve)
        self._listener = BoundedListener(app, self.host, self.port)
        await self._listener.start()
        log.info("Operator metrics on :%d/metrics", self.port)

    async def close(self) -> None:
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    async def _serve(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
