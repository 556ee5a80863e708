"""kopf handlers of the ``TransformJob`` kind: thin triggers around ``TransformSync.sync``.

* create / resume / update (of ``spec``) → one sync: the first creates the
  planner Job. (The CRD refuses spec changes; should one get through, the Jobs'
  run hash no longer matches and the job fails with SpecChanged.)
* every event of a Job labelled ``kubeinfer.io/transform-job`` → a sync of the
  TransformJob the label names: a finished planner is followed by the workers at
  once, finished workers by the finalizer, and progress (``completedIndexes``)
  rolls into the status as the Job controller reports it.
* a daemon per TransformJob re-runs the sync every ``status_interval_s``: events
  lost during a watch restart cost one interval, not the job; it also cleans the
  Jobs up ``ttlSecondsAfterFinished`` after the end, then exits.
* deletion: no handler. The Jobs carry an ownerReference to the TransformJob,
  so the garbage collector removes them and their pods.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubeinfer_operator.api import transform_job as tj
from kubeinfer_operator.errors import ClusterError, SpecError
from kubeinfer_operator.handlers.plumbing import sync_owner_of
from kubeinfer_operator.handlers.retry import Logger, on_reconcile, reconcile_or_raise
from kubeinfer_operator.handlers.transform_sync import TransformSync
from kubeinfer_operator.render.transform_names import LABEL_TRANSFORM_JOB


def register(registry: kopf.OperatorRegistry, sync: TransformSync, interval_s: float) -> None:
    """Register the TransformJob handlers on ``registry``."""
    resource = (tj.GROUP, tj.VERSION, tj.PLURAL)

    @on_reconcile(registry, resource)
    async def reconcile_transform_job(*, namespace: str | None, name: str, retry: int,
                                      body: kopf.Body, logger: Logger, **_: Any) -> None:
        await reconcile_or_raise(sync.sync(namespace or "", name), body=body, retry=retry,
                                 logger=logger)

    @kopf.on.event("batch", "v1", "jobs", registry=registry,
                   labels={LABEL_TRANSFORM_JOB: kopf.PRESENT})
    async def job_changed(*, namespace: str | None, labels: kopf.Labels, logger: Logger,
                          **_: Any) -> None:
        await sync_owner_of(labels, LABEL_TRANSFORM_JOB, "TransformJob", namespace, sync.sync,
                            logger)

    @kopf.daemon(*resource, id="refresh", registry=registry, initial_delay=interval_s,
                 cancellation_timeout=5.0)
    async def refresh_transform_job(*, namespace: str | None, name: str,
                                    stopped: kopf.DaemonStopped, logger: Logger,
                                    **_: Any) -> None:
        while not stopped:
            try:
                decision = await sync.sync(namespace or "", name)
                if decision is None:
                    return
                if decision.done:
                    return  # finished and cleaned up: nothing can change any more
            except SpecError:
                return  # Failed (InvalidSpec) in status; the spec cannot change
            except ClusterError as exc:
                logger.warning("Status refresh failed: %s; next try in %.0f s", exc,
                               interval_s)
            await stopped.wait(interval_s)
