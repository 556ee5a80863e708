"""Entry point of the Kubernetes operator: ``run(settings)`` (``kubeinfer operator``).

Builds a kopf registry with the login, start-up, Endpoint, TransformJob, CompilationJob,
RecommendationJob and EdgeFleet handlers and runs kopf in the current thread until
SIGTERM/SIGINT. Tests use ``operate()`` to run the same operator inside their own event loop
with stop/ready flags.

HA: with ``standalone=False`` (the default) kopf uses the KopfPeering
(namespaced) or ClusterKopfPeering (cluster-wide) object named
``peering_name``, which the Helm chart installs. Each process takes a distinct
priority (random unless configured), so of N replicas the one of highest
priority acts and the others stand by, paused by kopf; a standby resumes
``peering_lifetime_s`` after the active one dies without a goodbye, at once
after a clean stop. The scaler's HTTP endpoint is outside kopf's pause and asks
``k8s.peering`` instead (a standby answers 503, and gateways retry).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, cast

import kopf
from pydantic import SecretStr

from kubeinfer_operator.errors import ClusterError
from kubeinfer_operator.handlers import compilation_job as compile_handlers
from kubeinfer_operator.handlers import edge_fleet as edge_handlers
from kubeinfer_operator.handlers import endpoint as endpoint_handlers
from kubeinfer_operator.handlers import recommendation_job as recommend_handlers
from kubeinfer_operator.handlers import transform_job as transform_handlers
from kubeinfer_operator.handlers.compile_sync import CompileSync
from kubeinfer_operator.handlers.edge_sync import EdgeSync
from kubeinfer_operator.handlers.recommend_sync import RecommendSync
from kubeinfer_operator.handlers.sync import EndpointSync
from kubeinfer_operator.handlers.transform_sync import TransformSync
from kubeinfer_operator.k8s.client import KubeClient
from kubeinfer_operator.k8s.login import login_handler
from kubeinfer_operator.k8s.peering import Peering
from kubeinfer_operator.observability import MetricsServer, OperatorMetrics
from kubeinfer_operator.render import k8s_secrets
from kubeinfer_operator.scaling.cluster import ClusterScaler
from kubeinfer_operator.settings import OperatorSettings


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: OperatorSettings) -> None:
    """kopf behaviour kubeinfer relies on (applied at start-up)."""
    prefix = settings.kopf_state_prefix
    # Handler progress and the last handled spec live in annotations under our
    # prefix; nothing is written into .status (the CRD schema owns it).
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=prefix)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=prefix, key="last-handled-configuration")
    kopf_settings.persistence.finalizer = f"{prefix}/finalizer"
    # Events only for problems: a status refresh must not post an Event every few seconds.
    kopf_settings.posting.level = logging.WARNING
    # HA: a replica that died without a goodbye is presumed dead after this long, and
    # the standby of highest priority resumes (kopf renews the heartbeat well before).
    kopf_settings.peering.lifetime = settings.peering_lifetime_s
    # Re-open watches regularly so a silently dropped connection cannot stall us.
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330


def with_signing_key(settings: OperatorSettings) -> OperatorSettings:
    """``settings`` with a scaler signing key: the chart's, else a random one for this process
    (its tokens change when the operator restarts; the gateways then roll to get new ones)."""
    if settings.scaler_signing_key is not None or settings.scaler_port is None:
        return settings
    logging.getLogger(__name__).warning(
        "No KUBEINFER_SCALER_SIGNING_KEY: scaler tokens are derived from a random key that "
        "changes when the operator restarts (every gateway then rolls); the Helm chart sets "
        "a stable one")
    return settings.model_copy(update={"scaler_signing_key": SecretStr(secrets.token_urlsafe(32))})


def own_identity() -> str:
    """This replica's peering identity: the pod name where the chart sets POD_ID (so a
    restart is recognisable), else host, process and a random tail."""
    return os.environ.get("POD_ID") or (
        f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}")


def peering_of(settings: OperatorSettings, kube: KubeClient | None) -> Peering:
    """Who this replica is among its peers. Without a configured priority each process
    draws a random one, so replicas never tie (kopf pauses every replica of a tie)."""
    priority = settings.peering_priority
    if priority is None:
        priority = secrets.randbelow(2**31 - 1) + 1
    return Peering(None if settings.standalone else kube, name=settings.peering_name,
                   identity=own_identity(), priority=priority,
                   clusterwide=not settings.namespaces)


#: Seconds between updates of the ``kubeinfer_operator_active`` gauge.
ROLE_POLL_S = 2.0


async def _follow_role(peering: Peering, metrics: OperatorMetrics,
                       settings: OperatorSettings) -> None:
    """Keep ``kubeinfer_operator_active`` at this replica's role (kopf's pause is not
    observable from outside it, so the gauge reads the same peering object)."""
    namespace = settings.namespaces[0] if settings.namespaces else ""
    failing = False
    while True:
        # Nothing may end this loop but cancellation: the gauge would stay at whatever
        # role it last read, for the replica's whole life.
        try:
            metrics.set_active(await peering.active(namespace))
            failing = False
        except Exception:
            if not failing:
                logging.getLogger("kubeinfer.operator").exception(
                    "Reading this replica's role failed; retrying every %.0f s", ROLE_POLL_S)
            failing = True
        await asyncio.sleep(ROLE_POLL_S)


def build_registry(settings: OperatorSettings, client: KubeClient | None = None,
                   peering: Peering | None = None,
                   metrics: OperatorMetrics | None = None,
                   fleet_url: Callable[[str, str], str] | None = None
                   ) -> kopf.OperatorRegistry:
    """``fleet_url``: (namespace, name) → the one URL to poll an EdgeFleet's fleet server
    at (tests: a fake fleet server); default: its ready pods, listed from the API."""
    registry = kopf.OperatorRegistry()
    kube = client or KubeClient()
    ours = with_signing_key(settings)
    # The operator's /metrics (observability): reconciles, scale decisions, HA role.
    metrics = metrics if metrics is not None else OperatorMetrics()
    metrics_server = MetricsServer(metrics, ours.operator_metrics_port)

    kopf.on.login(registry=registry)(login_handler(kube))
    outbound = ours.outbound_policy()
    scaler = ClusterScaler(port=ours.scaler_port, redis_url=ours.redis_url, outbound=outbound,
                           signing_key=k8s_secrets.signing_key(ours), kube=kube,
                           metrics_port=ours.metrics_port,
                           promql_label=ours.promql_namespace_label)
    scaler.on_change = metrics.scale_decision
    sync = EndpointSync(kube, ours, scaler=scaler, outbound=outbound, metrics=metrics)

    async def scale_now(namespace: str, name: str) -> None:
        try:
            await sync.autoscale(namespace, name)
        except ClusterError as exc:
            logging.getLogger(__name__).warning("Scale-up of %s/%s failed: %s; the refresh "
                                                "retries", namespace, name, exc)

    scaler.on_request = metrics.counting_pending(scale_now)
    scaler.peering = peering
    role: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, ours)
        await metrics_server.start()
        if ours.standalone or peering is None:
            metrics.set_active(True)  # no peers: this replica always acts
        else:
            role.append(asyncio.create_task(_follow_role(peering, metrics, ours)))
        await scaler.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        for task in role:
            task.cancel()
        await scaler.close()
        if sync.redis_users is not None:
            await sync.redis_users.close()
        await metrics_server.close()
        await kube.close()

    endpoint_handlers.register(registry, sync, ours.status_interval_s,
                               ours.resync_interval_s)
    transform_handlers.register(registry, TransformSync(kube, ours, metrics=metrics),
                                ours.status_interval_s)
    compile_handlers.register(registry, CompileSync(kube, ours, metrics=metrics),
                              ours.status_interval_s)
    recommend_handlers.register(registry, RecommendSync(kube, ours, metrics=metrics),
                                ours.status_interval_s)
    edge_handlers.register(registry, EdgeSync(kube, ours, server_url=fleet_url,
                                              metrics=metrics), ours.status_interval_s)
    return registry


def _scope(settings: OperatorSettings) -> dict[str, Any]:
    if settings.namespaces:
        return {"namespaces": list(settings.namespaces), "clusterwide": False}
    return {"clusterwide": True}


async def operate(settings: OperatorSettings, *, stop_flag: Any = None,
                  ready_flag: Any = None,
                  fleet_url: Callable[[str, str], str] | None = None) -> None:
    """Run the operator in the current event loop until ``stop_flag`` is set."""
    kube = KubeClient()
    peering = peering_of(settings, kube)
    await kopf.operator(
        registry=build_registry(settings, kube, peering, fleet_url=fleet_url),
        standalone=settings.standalone,
        # kopf types the identity as its private NewType of str.
        identity=cast(Any, peering.identity),
        priority=peering.priority,
        peering_name=None if settings.standalone else settings.peering_name,
        liveness_endpoint=settings.liveness_endpoint,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        **_scope(settings),
    )


def run(settings: OperatorSettings) -> None:
    """Run the operator until it is signalled to stop (the ``kubeinfer operator`` command)."""
    kopf.configure(verbose=False)
    asyncio.run(operate(settings))
