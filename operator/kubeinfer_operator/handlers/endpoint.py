"""kopf handlers of the ``Endpoint`` kind: thin triggers around ``EndpointSync.sync``.

* create / update (of ``spec``) / resume → one reconcile; errors map to kopf's:
  a bad spec → ``kopf.PermanentError`` (the status says InvalidSpec; nothing is
  retried until the spec changes), a cluster hiccup → ``kopf.TemporaryError``
  with exponential backoff (1 s, 2 s, 4 s … 60 s), never a hot loop.
* a daemon per Endpoint re-runs the same reconcile every ``status_interval_s``
  (a status timer): it re-reads Deployment availability, so status and the
  route table follow pods as they come and go, and re-creates a child someone
  deleted. It writes nothing when nothing changed.
* deletion: no handler. Children carry an ownerReference to the Endpoint, so
  the cluster's garbage collector removes them. (kopf still puts its finalizer
  on Endpoints, to stop the daemon before the object goes away.)
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from kubeinfer_operator.api import endpoint as ep
from kubeinfer_operator.errors import ClusterError, SpecError
from kubeinfer_operator.handlers.sync import EndpointSync

MAX_BACKOFF_S = 60.0

#: What kopf passes as ``logger``.
Logger = logging.Logger | logging.LoggerAdapter[Any]


def backoff_delay(retry: int) -> float:
    """Seconds before retry number ``retry`` (0-based): 1, 2, 4, … capped at a minute."""
    return float(min(MAX_BACKOFF_S, 2.0 ** max(0, retry)))


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


def register(registry: kopf.OperatorRegistry, sync: EndpointSync, interval_s: float) -> None:
    """Register the Endpoint handlers on ``registry`` (no module-level global state)."""
    resource = (ep.GROUP, ep.VERSION, ep.PLURAL)

    @kopf.on.create(*resource, id="reconcile", registry=registry, backoff=MAX_BACKOFF_S)
    @kopf.on.update(*resource, id="reconcile", registry=registry, field="spec",
                    backoff=MAX_BACKOFF_S)
    @kopf.on.resume(*resource, id="reconcile", registry=registry, backoff=MAX_BACKOFF_S)
    async def reconcile_endpoint(*, namespace: str | None, name: str, retry: int,
                                 body: kopf.Body, logger: Logger, **_: Any) -> None:
        try:
            await sync.sync(namespace or "", name)
        except SpecError as exc:
            # A Warning Event too, so `kubectl describe endpoint` shows why.
            kopf.warn(body, reason=getattr(exc, "reason", "InvalidSpec"), message=str(exc))
            raise kopf.PermanentError(str(exc)) from exc
        except ClusterError as exc:
            delay = backoff_delay(retry)
            logger.warning("%s; retrying in %.0f s", exc, delay)
            raise kopf.TemporaryError(str(exc), delay=delay) from exc

    @kopf.daemon(*resource, id="refresh", registry=registry, initial_delay=interval_s,
                 cancellation_timeout=5.0)
    async def refresh_endpoint(*, namespace: str | None, name: str, stopped: kopf.DaemonStopped,
                               body: kopf.Body, logger: Logger, **_: Any) -> None:
        # A daemon looping on its own clock rather than a kopf timer: same
        # effect, without kopf logging "Timer succeeded" for every Endpoint
        # every few seconds.
        while not stopped:
            try:
                # kopf keeps a daemon's body current: only scaled Endpoints pay
                # for the scaler's extra reads.
                if scaled(body.get("spec")):
                    await sync.autoscale(namespace or "", name)
                await sync.sync(namespace or "", name)
            except SpecError:
                pass  # already in status.conditions; waiting for the spec to change
            except ClusterError as exc:
                logger.warning("Status refresh failed: %s; next try in %.0f s", exc, interval_s)
            await stopped.wait(interval_s)
