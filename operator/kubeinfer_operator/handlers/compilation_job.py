"""kopf handlers of the ``CompilationJob`` kind: thin triggers around ``CompileSync.sync``.

* create / resume / update (of ``spec``) → one sync: the first creates the Job.
  (The CRD refuses spec changes; should one get through, the Job's hash no
  longer matches and the job fails with SpecChanged.)
* every event of a Job labelled ``kubeinfer.io/compilation-job`` → a sync of the
  CompilationJob the label names: a finished Job's report reaches the status at
  once.
* a daemon per CompilationJob re-runs the sync every ``status_interval_s``:
  events lost during a watch restart cost one interval, not the job; it also
  deletes the Job ``ttlSecondsAfterFinished`` after the end, then exits.
* deletion: no handler. The Job carries an ownerReference to the
  CompilationJob, so the garbage collector removes it and its pods.
"""

from __future__ import annotations

from typing import Any

import kopf

from kubeinfer_operator.api import compilation_job as cj
from kubeinfer_operator.errors import ClusterError, SpecError
from kubeinfer_operator.handlers.compile_sync import CompileSync
from kubeinfer_operator.handlers.plumbing import sync_owner_of
from kubeinfer_operator.handlers.retry import Logger, on_reconcile, reconcile_or_raise
from kubeinfer_operator.render.compile_jobs import LABEL_COMPILATION_JOB


def register(registry: kopf.OperatorRegistry, sync: CompileSync, interval_s: float) -> None:
    """Register the CompilationJob handlers on ``registry``."""
    resource = (cj.GROUP, cj.VERSION, cj.PLURAL)

    @on_reconcile(registry, resource)
    async def reconcile_compilation_job(*, namespace: str | None, name: str, retry: int,
                                        body: kopf.Body, logger: Logger, **_: Any) -> None:
        await reconcile_or_raise(sync.sync(namespace or "", name), body=body, retry=retry,
                                 logger=logger)

    @kopf.on.event("batch", "v1", "jobs", registry=registry,
                   labels={LABEL_COMPILATION_JOB: kopf.PRESENT})
    async def compile_job_changed(*, namespace: str | None, labels: kopf.Labels,
                                  logger: Logger, **_: Any) -> None:
        await sync_owner_of(labels, LABEL_COMPILATION_JOB, "CompilationJob", namespace,
                            sync.sync, logger)

    @kopf.daemon(*resource, id="refresh", registry=registry, initial_delay=interval_s,
                 cancellation_timeout=5.0)
    async def refresh_compilation_job(*, namespace: str | None, name: str,
                                      stopped: kopf.DaemonStopped, logger: Logger,
                                      **_: Any) -> None:
        while not stopped:
            try:
                decision = await sync.sync(namespace or "", name)
                if decision is None or decision.done:
                    return  # gone, or finished and cleaned up: nothing can change any more
            except SpecError:
                return  # Failed (InvalidSpec) in status; the spec cannot change
            except ClusterError as exc:
                logger.warning("Status refresh failed: %s; next try in %.0f s", exc,
                               interval_s)
            await stopped.wait(interval_s)
