"""Entry point of the Kubernetes operator: ``run(settings)`` (``kubeinfer operator``).

Builds a kopf registry with the login, start-up, Endpoint, TransformJob and CompilationJob
handlers and runs kopf in the current thread until SIGTERM/SIGINT. Tests use ``operate()`` to
run the same operator inside their own event loop with stop/ready flags.

Peering: with ``standalone=False`` (the default) kopf uses the KopfPeering
(namespaced) or ClusterKopfPeering (cluster-wide) object named
``peering_name``, which the Helm chart installs, so of two operator replicas
only one acts at a time.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import kopf
from pydantic import SecretStr

from kubeinfer_operator.errors import ClusterError
from kubeinfer_operator.handlers import compilation_job as compile_handlers
from kubeinfer_operator.handlers import endpoint as endpoint_handlers
from kubeinfer_operator.handlers import transform_job as transform_handlers
from kubeinfer_operator.handlers.compile_sync import CompileSync
from kubeinfer_operator.handlers.sync import EndpointSync
from kubeinfer_operator.handlers.transform_sync import TransformSync
from kubeinfer_operator.k8s.client import KubeClient
from kubeinfer_operator.k8s.login import login_handler
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


def build_registry(settings: OperatorSettings,
                   client: KubeClient | None = None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    kube = client or KubeClient()
    ours = with_signing_key(settings)

    kopf.on.login(registry=registry)(login_handler(kube))
    outbound = ours.outbound_policy()
    scaler = ClusterScaler(port=ours.scaler_port, redis_url=ours.redis_url, outbound=outbound,
                           signing_key=k8s_secrets.signing_key(ours))
    sync = EndpointSync(kube, ours, scaler=scaler, outbound=outbound)

    async def scale_now(namespace: str, name: str) -> None:
        try:
            await sync.autoscale(namespace, name)
        except ClusterError as exc:
            logging.getLogger(__name__).warning("Scale-up of %s/%s failed: %s; the refresh "
                                                "retries", namespace, name, exc)

    scaler.on_request = scale_now

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure_kopf(settings, ours)
        await scaler.start()

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await scaler.close()
        await kube.close()

    endpoint_handlers.register(registry, sync, ours.status_interval_s,
                               ours.resync_interval_s)
    transform_handlers.register(registry, TransformSync(kube, ours), ours.status_interval_s)
    compile_handlers.register(registry, CompileSync(kube, ours), ours.status_interval_s)
    return registry


def _scope(settings: OperatorSettings) -> dict[str, Any]:
    if settings.namespaces:
        return {"namespaces": list(settings.namespaces), "clusterwide": False}
    return {"clusterwide": True}


async def operate(settings: OperatorSettings, *, stop_flag: Any = None,
                  ready_flag: Any = None) -> None:
    """Run the operator in the current event loop until ``stop_flag`` is set."""
    await kopf.operator(
        registry=build_registry(settings),
        standalone=settings.standalone,
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
