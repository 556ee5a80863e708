"""kopf handlers of the ``RecommendationJob`` kind: thin triggers around ``RecommendSync``.

* create / resume / update → one sync (the first creates the candidates).
* every event of a Job or Deployment labelled ``kubeinfer.io/recommendation-job`` →
  a sync of the RecommendationJob the label names (an available candidate starts
  the Job, a finished Job's summary reaches the status at once).
* a daemon per RecommendationJob re-runs the sync every ``status_interval_s`` until
  it has finished and cleaned up.
* deletion: no handler; ownerReferences take the candidates, the Job and its pod.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubeinfer_operator.api import recommendation_job as rj
from kubeinfer_operator.errors import ClusterError, SpecError
from kubeinfer_operator.handlers.plumbing import sync_owner_of
from kubeinfer_operator.handlers.recommend_sync import RecommendSync
from kubeinfer_operator.handlers.retry import Logger, on_reconcile, reconcile_or_raise
from kubeinfer_operator.render.recommend_jobs import LABEL_RECOMMENDATION_JOB


def register(registry: kopf.OperatorRegistry, sync: RecommendSync, interval_s: float) -> None:
    """Register the RecommendationJob handlers on ``registry``."""
    resource = (rj.GROUP, rj.VERSION, rj.PLURAL)

    @on_reconcile(registry, resource)
    async def reconcile_recommendation_job(*, namespace: str | None, name: str, retry: int,
                                           body: kopf.Body, logger: Logger,
                                           **_: Any) -> None:
        await reconcile_or_raise(sync.sync(namespace or "", name), body=body, retry=retry,
                                 logger=logger)

    async def child_changed(namespace: str | None, labels: kopf.Labels,
                            logger: Logger) -> None:
        await sync_owner_of(labels, LABEL_RECOMMENDATION_JOB, "RecommendationJob", namespace,
                            sync.sync, logger)

    @kopf.on.event("batch", "v1", "jobs", registry=registry,
                   labels={LABEL_RECOMMENDATION_JOB: kopf.PRESENT})
    async def recommend_job_changed(*, namespace: str | None, labels: kopf.Labels,
                                    logger: Logger, **_: Any) -> None:
        await child_changed(namespace, labels, logger)

    @kopf.on.event("apps", "v1", "deployments", registry=registry,
                   labels={LABEL_RECOMMENDATION_JOB: kopf.PRESENT})
    async def recommend_candidate_changed(*, namespace: str | None, labels: kopf.Labels,
                                          logger: Logger, **_: Any) -> None:
        await child_changed(namespace, labels, logger)

    @kopf.daemon(*resource, id="refresh", registry=registry, initial_delay=interval_s,
                 cancellation_timeout=5.0)
    async def refresh_recommendation_job(*, namespace: str | None, name: str,
                                         stopped: kopf.DaemonStopped, logger: Logger,
                                         **_: Any) -> None:
        while not stopped:
            try:
                decision = await sync.sync(namespace or "", name)
                if decision is None or decision.done:
                    return
            except SpecError:
                return  # Failed (InvalidSpec) in status; the spec cannot change
            except ClusterError as exc:
                logger.warning("Status refresh failed: %s; next try in %.0f s", exc,
                               interval_s)
            await stopped.wait(interval_s)
