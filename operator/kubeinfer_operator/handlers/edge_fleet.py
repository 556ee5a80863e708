"""kopf handlers of the ``EdgeFleet`` kind: thin triggers around ``EdgeSync.sync``.

* create / resume / update (of ``spec``) → one sync: renders and applies (package
  Jobs of a new version, the fleet config, the fleet server).
* every event of a Job labelled ``kubeinfer.io/edge-fleet`` → a sync of the
  EdgeFleet the label names: a finished package Job's report reaches the status
  (and the fleet config) at once.
* a daemon per EdgeFleet re-runs the sync every ``status_interval_s`` for as long
  as the EdgeFleet exists: it polls the fleet server's ``GET /v1/fleet`` and
  rolls devices, waves and rollbacks up into the status.
* deletion: no handler. Everything carries an ownerReference to the EdgeFleet,
  so the garbage collector removes it.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubeinfer_operator.api import edge_fleet as ef
from kubeinfer_operator.errors import ClusterError, SpecError
from kubeinfer_operator.handlers.edge_sync import EdgeSync
from kubeinfer_operator.handlers.plumbing import sync_owner_of
from kubeinfer_operator.handlers.retry import Logger, on_reconcile, reconcile_or_raise
from kubeinfer_operator.render.edge_fleet import LABEL_EDGE_FLEET


def register(registry: kopf.OperatorRegistry, sync: EdgeSync, interval_s: float) -> None:
    """Register the EdgeFleet handlers on ``registry``."""
    resource = (ef.GROUP, ef.VERSION, ef.PLURAL)

    @on_reconcile(registry, resource)
    async def reconcile_edge_fleet(*, namespace: str | None, name: str, retry: int,
                                   body: kopf.Body, logger: Logger, **_: Any) -> None:
        await reconcile_or_raise(sync.sync(namespace or "", name), body=body, retry=retry,
                                 logger=logger)

    @kopf.on.event("batch", "v1", "jobs", registry=registry,
                   labels={LABEL_EDGE_FLEET: kopf.PRESENT})
    async def edge_package_job_changed(*, namespace: str | None, labels: kopf.Labels,
                                       logger: Logger, **_: Any) -> None:
        await sync_owner_of(labels, LABEL_EDGE_FLEET, "EdgeFleet", namespace, sync.sync,
                            logger)

    @kopf.daemon(*resource, id="refresh", registry=registry, initial_delay=interval_s,
                 cancellation_timeout=5.0)
    async def refresh_edge_fleet(*, namespace: str | None, name: str,
                                 stopped: kopf.DaemonStopped, logger: Logger,
                                 **_: Any) -> None:
        while not stopped:
            try:
                if await sync.sync(namespace or "", name) is None:
                    return  # gone
            except SpecError:
                pass  # InvalidSpec in status; a spec change re-runs the reconcile
            except ClusterError as exc:
                logger.warning("Status refresh failed: %s; next try in %.0f s", exc,
                               interval_s)
            await stopped.wait(interval_s)
