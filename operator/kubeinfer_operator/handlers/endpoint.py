"""kopf handlers of the ``Endpoint`` kind: thin triggers around ``EndpointSync.sync``.

* create / update (of ``spec``) / resume → one reconcile; errors map to kopf's:
  a bad spec → ``kopf.PermanentError`` (the status says InvalidSpec; nothing is
  retried until the spec changes), a cluster hiccup → ``kopf.TemporaryError``
  with exponential backoff (1 s, 2 s, 4 s … 60 s), never a hot loop.
* a watch on the Deployments the operator manages (label
  ``kubeinfer.io/endpoint``): any change of one (its status as pods come and
  go, an edit, a deletion) re-evaluates its Endpoint at once, coalesced per
  Endpoint (``EndpointSync.resync``). Status follows rollouts within one
  reconcile, and an idle Endpoint costs no API request.
* a daemon per Endpoint: for scaled Endpoints the scaler's round every
  ``status_interval_s`` (and a reconcile at that pace while a variant compiles:
  its pods' compile reports are not watched); for all, a full reconcile every
  ``resync_interval_s`` as a safety net (a missed event, a Service or
  ConfigMap deleted by hand). It writes nothing when nothing changed.
* deletion: children carry an ownerReference to the Endpoint, so the cluster's
  garbage collector removes them. An async Endpoint's queue, and the namespace's
  Redis user, live in Redis, outside the cluster: an optional delete handler
  removes the queue, and the user with the namespace's last Endpoint (kopf puts its
  finalizer on Endpoints anyway, to stop the daemon before the object goes away;
  a Redis that cannot be reached is logged and does not hold the deletion).

kopf filters the Deployment watch by label on the client side (it lists every
Deployment in the watched namespaces), the price of the event-driven status.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

from kubeinfer_operator.api import endpoint as ep
from kubeinfer_operator.errors import ClusterError, SpecError

# MAX_BACKOFF_S and backoff_delay are re-exported ("as"): they were defined here first,
# and callers still import them from here.
from kubeinfer_operator.handlers.retry import MAX_BACKOFF_S as MAX_BACKOFF_S
from kubeinfer_operator.handlers.retry import Logger, on_reconcile, reconcile_or_raise
from kubeinfer_operator.handlers.retry import backoff_delay as backoff_delay
from kubeinfer_operator.handlers.sync import EndpointSync
from kubeinfer_operator.render import k8s_meta as meta


def scaled(spec: Any) -> bool:
    """Whether an Endpoint spec asks for the scaler: serverless, async (backlog) or any
    autoscaling block."""
    if not isinstance(spec, dict):
        return False
    variants = spec.get("variants")
    return spec.get("type") in (ep.EndpointType.SERVERLESS.value,
                                ep.EndpointType.ASYNC.value) or (
        isinstance(variants, list)
        and any(isinstance(v, dict) and v.get("autoscaling") for v in variants))


def compiling(spec: Any) -> bool:
    """Whether a variant compiles its model before serving: its pods' compile reports
    reach status by polling (pods are not watched)."""
    variants = spec.get("variants") if isinstance(spec, dict) else None
    return isinstance(variants, list) and any(
        isinstance(v, dict) and isinstance(v.get("model"), dict) and v["model"].get("compile")
        for v in variants)


def guarded(spec: Any) -> bool:
    """Whether an Endpoint has deployment guardrails (its rollouts advance on the clock)."""
    return isinstance(spec, dict) and bool(spec.get("deploymentConfig"))


def shadowed(spec: Any) -> bool:
    """Whether an Endpoint has shadow variants (status.shadow is read at the scaler's pace)."""
    return isinstance(spec, dict) and bool(spec.get("shadowVariants"))


def register(registry: kopf.OperatorRegistry, sync: EndpointSync, interval_s: float,
             resync_s: float | None = None) -> None:
    """Register the Endpoint handlers on ``registry`` (no module-level global state)."""
    resource = (ep.GROUP, ep.VERSION, ep.PLURAL)
    resync_s = interval_s if resync_s is None else resync_s

    @on_reconcile(registry, resource)
    async def reconcile_endpoint(*, namespace: str | None, name: str, retry: int,
                                 body: kopf.Body, logger: Logger, **_: Any) -> None:
        await reconcile_or_raise(sync.sync(namespace or "", name), body=body, retry=retry,
                                 logger=logger)

    @kopf.on.event("apps", "v1", "deployments", id="child-changed", registry=registry,
                   labels={meta.LABEL_MANAGED_BY: meta.MANAGED_BY,
                           meta.LABEL_ENDPOINT: kopf.PRESENT})
    async def deployment_changed(*, namespace: str | None, labels: kopf.Labels,
                                 logger: Logger, **_: Any) -> None:
        try:
            await sync.resync(namespace or "", labels[meta.LABEL_ENDPOINT])
        except SpecError:
            pass  # already in the Endpoint's status.conditions
        except ClusterError as exc:
            logger.warning("Re-evaluating Endpoint %s after a Deployment change failed: %s; "
                           "the next change or the resync retries",
                           labels[meta.LABEL_ENDPOINT], exc)

    @kopf.on.delete(*resource, id="queue", registry=registry, optional=True)
    async def endpoint_deleted(*, namespace: str | None, name: str, spec: kopf.Spec,
                               **_: Any) -> None:
        await sync.deleted(namespace or "", name,
                           asynchronous=spec.get("type") == ep.EndpointType.ASYNC.value)

    @kopf.daemon(*resource, id="refresh", registry=registry,
                 initial_delay=min(interval_s, resync_s), cancellation_timeout=5.0)
    async def refresh_endpoint(*, namespace: str | None, name: str, stopped: kopf.DaemonStopped,
                               body: kopf.Body, logger: Logger, **_: Any) -> None:
        # A daemon looping on its own clock rather than a kopf timer: same
        # effect, without kopf logging "Timer succeeded" for every Endpoint
        # every few seconds.
        loop = asyncio.get_running_loop()
        next_resync = loop.time()
        while not stopped:
            # kopf keeps a daemon's body current: only scaled Endpoints pay for
            # the scaler's reads.
            is_scaled = scaled(body.get("spec"))
            # Compiling variants, and guarded rollouts (deploymentConfig: steps, bakes and
            # alarms advance on the clock), are followed at the scaler's pace.
            polled = (compiling(body.get("spec")) or guarded(body.get("spec"))
                      or shadowed(body.get("spec")))  # status.shadow follows the gateways
            try:
                if is_scaled:
                    await sync.autoscale(namespace or "", name)
                if polled or loop.time() >= next_resync:
                    next_resync = loop.time() + resync_s
                    await sync.sync(namespace or "", name)
            except SpecError:
                pass  # already in status.conditions; waiting for the spec to change
            except ClusterError as exc:
                logger.warning("Status refresh failed: %s; next try in %.0f s", exc,
                               interval_s if is_scaled or polled else resync_s)
            await stopped.wait(interval_s if is_scaled or polled
                               else max(0.0, next_resync - loop.time()))
