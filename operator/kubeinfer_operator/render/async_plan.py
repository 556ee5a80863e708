"""The plan of an async endpoint's queue and workers: PURE, no I/O.

``type: Async`` turns the variant's replicas into async workers (runtime role
``async-worker``) reading the endpoint's Redis Stream; the gateway only
enqueues. This module turns ``spec.async`` into what both backends need: the
gateway's ``AsyncRoute``, the workers' ``KUBEINFER_*`` env and the backlog
scaling policy. The Redis URL is the backend's business (the operator's
settings, or local mode's private redis-server) and is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubeinfer_operator.api.endpoint import Endpoint, EndpointType
from kubeinfer_operator.reconcile.async_scaling import BacklogPolicy
from kubeinfer_runtime.contract import ASYNC_DEFAULT_MAX_QUEUED, AsyncRoute
from kubeinfer_runtime.contract.async_paths import (
    FORMER_PATHS_ENV,
    FormerAsyncPaths,
    render_former_paths,
)

#: Every name ``AsyncPlan.worker_env`` renders (the backends add the Redis URL, the
#: outbound allow-list and, locally, the drain timeout): an Async endpoint's variant env
#: may not set them (``api.env_policy``).
WORKER_ENV = frozenset({
    "KUBEINFER_QUEUE", "KUBEINFER_OUTPUT_PATH", "KUBEINFER_FAILURE_PATH",
    "KUBEINFER_MAX_CONCURRENCY", "KUBEINFER_MAX_RETRIES", "KUBEINFER_VISIBILITY_TIMEOUT_S",
    "KUBEINFER_INVOCATION_TIMEOUT_S", "KUBEINFER_INPUT_PATHS", "KUBEINFER_MAX_INPUT_BYTES",
    "KUBEINFER_MAX_PAYLOAD_BYTES", "KUBEINFER_TRANSIENT_BUDGET_S", "KUBEINFER_REDIS_URL",
    "KUBEINFER_SUCCESS_URL", "KUBEINFER_ERROR_URL", FORMER_PATHS_ENV,
})



def queue_name(namespace: str | None, endpoint: str) -> str:
    """The queue of an async Endpoint: unique per Redis (``<namespace>.<name>`` on
    Kubernetes; a local endpoint's own Redis needs only the name)."""
    return f"{namespace}.{endpoint}" if namespace else endpoint

@dataclass(frozen=True)
class AsyncPlan:
    #: Unique per Redis: ``<namespace>.<name>`` on Kubernetes, the name locally.
    queue: str
    output_path: str
    failure_path: str
    success_url: str | None
    error_url: str | None
    max_concurrency: int
    max_retries: int
    request_ttl_s: int
    invocation_timeout_s: int
    visibility_timeout_s: float
    policy: BacklogPolicy
    #: Folders InputLocation may name (normalized, default applied).
    input_paths: tuple[str, ...] = ()
    max_input_bytes: int = 1 << 30
    transient_budget_s: float = 600.0
    max_queued: int = ASYNC_DEFAULT_MAX_QUEUED
    #: The outputPath/failurePath pairs the endpoint had before (``contract.async_paths``):
    #: the backends carry them from the workers they run (``reconcile.async_paths``).
    former_paths: tuple[FormerAsyncPaths, ...] = ()

    def route(self, redis_url: str | None) -> AsyncRoute:
        return AsyncRoute(queue=self.queue, redis_url=redis_url, output_path=self.output_path,
                          failure_path=self.failure_path, input_paths=list(self.input_paths),
                          request_ttl_s=self.request_ttl_s,
                          invocation_timeout_s=self.invocation_timeout_s,
                          max_queued=self.max_queued)

    def worker_env(self, redis_url: str | None) -> dict[str, str]:
        """The async-worker settings beyond the model server's (``AsyncWorkerSettings``).

        ``redis_url`` None leaves ``KUBEINFER_REDIS_URL`` to the caller (a Secret).
        """
        env = {
            "KUBEINFER_QUEUE": self.queue,
            "KUBEINFER_OUTPUT_PATH": self.output_path,
            "KUBEINFER_FAILURE_PATH": self.failure_path,
            "KUBEINFER_MAX_CONCURRENCY": str(self.max_concurrency),
            "KUBEINFER_MAX_RETRIES": str(self.max_retries),
            "KUBEINFER_VISIBILITY_TIMEOUT_S": str(self.visibility_timeout_s),
            "KUBEINFER_INVOCATION_TIMEOUT_S": str(self.invocation_timeout_s),
            "KUBEINFER_INPUT_PATHS": ",".join(self.input_paths),
            "KUBEINFER_MAX_INPUT_BYTES": str(self.max_input_bytes),
            # An input is one request body: decoding bounds derive from it (4x), not
            # from the 6 MB real-time payload limit.
            "KUBEINFER_MAX_PAYLOAD_BYTES": str(self.max_input_bytes),
            "KUBEINFER_TRANSIENT_BUDGET_S": str(self.transient_budget_s),
        }
        if redis_url:
            env["KUBEINFER_REDIS_URL"] = redis_url
        if self.success_url:
            env["KUBEINFER_SUCCESS_URL"] = self.success_url
        if self.error_url:
            env["KUBEINFER_ERROR_URL"] = self.error_url
        if self.former_paths:
            env[FORMER_PATHS_ENV] = render_former_paths(list(self.former_paths))
        return env

    def initial_replicas(self, replicas: int) -> int:
        """The spec's replicas kept inside the scaling bounds."""
        return min(max(replicas, self.policy.min_replicas), self.policy.max_replicas)


def plan_async(endpoint: Endpoint) -> AsyncPlan | None:
    """The async plan of ``endpoint``, or None when it is not ``type: Async``."""
    spec = endpoint.spec
    cfg = spec.async_
    if spec.type is not EndpointType.ASYNC or cfg is None:
        return None
    ns = endpoint.metadata.namespace
    scaling = cfg.scaling
    return AsyncPlan(
        queue=queue_name(ns, endpoint.name),
        output_path=cfg.outputPath.rstrip("/"),
        failure_path=cfg.failure_path.rstrip("/"),
        success_url=cfg.notification.successUrl,
        error_url=cfg.notification.errorUrl,
        max_concurrency=cfg.maxConcurrentInvocationsPerReplica,
        max_retries=cfg.maxRetries,
        request_ttl_s=cfg.requestTTL,
        invocation_timeout_s=cfg.invocationTimeout,
        visibility_timeout_s=cfg.visibilityTimeout,
        input_paths=tuple(cfg.input_paths),
        max_input_bytes=cfg.maxInputBytes,
        transient_budget_s=cfg.transientRetryBudget,
        max_queued=cfg.maxQueuedRequests,
        policy=BacklogPolicy(target_per_replica=scaling.targetBacklogPerReplica,
                             min_replicas=scaling.minReplicas,
                             max_replicas=scaling.maxReplicas,
                             scale_out_cooldown_s=scaling.scaleOutCooldown,
                             scale_in_cooldown_s=scaling.scaleInCooldown),
    )

