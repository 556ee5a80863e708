"""One reconcile of one CompilationJob: read, decide (pure code), apply, report.

``CompileSync.sync`` reads the CompilationJob fresh from the API, lists its Job
and the Job's pods (label ``kubeinfer.io/compilation-job``), asks
``reconcile.compile_status.decide`` what to do, does exactly that (create the
Job, or delete it: stopped after a spec change, cleaned up after the TTL) and
writes the status only when it differs. It is state-based and idempotent: a
duplicate Job event, a timer tick and a resume all converge on the same writes,
and calls for one CompilationJob are serialised by a per-object lock.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from kubeinfer_operator.api.compilation_job import CompilationJob
from kubeinfer_operator.errors import ConflictError, SpecError
from kubeinfer_operator.handlers.plumbing import JobSync, create_owned_job
from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.reconcile import compile_status as cs
from kubeinfer_operator.reconcile.compile_validate import (
    InvalidCompilationJob,
    validate_compilation_job,
)
from kubeinfer_operator.reconcile.diff import owned_by
from kubeinfer_operator.reconcile.transform_observe import job_view
from kubeinfer_operator.render import compile_jobs as cjobs
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.compile_plan import CompilePlan, plan_compile

log = logging.getLogger(__name__)


class CompileJobConflict(ConflictError):
    """The Job name this CompilationJob needs is taken by an object it does not own
    (transient when that is a deleted namesake's Job not garbage-collected yet)."""


class CompileSync(JobSync[cs.Decision]):
    """Syncs CompilationJobs; ``sync`` raises ``InvalidCompilationJob`` for a spec that cannot
    run."""

    kind = kinds.COMPILATION_JOB

    def _info(self, obj: dict[str, Any], job: CompilationJob | None,
              plan: CompilePlan | None) -> cs.JobInfo:
        spec = job.spec if job is not None else None
        return cs.JobInfo(
            name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"],
            generation=int(obj["metadata"].get("generation") or 0),
            run_hash=plan.run_hash if plan is not None else "",
            status=obj.get("status") or {},
            model=plan.model_description if plan is not None else "",
            target=plan.target if plan is not None else "",
            max_runtime_s=spec.max_runtime_s if spec else None,
            ttl_s=spec.ttlSecondsAfterFinished if spec else None)

    async def _sync(self, obj: dict[str, Any], namespace: str, name: str) -> cs.Decision:
        uid = str(obj["metadata"]["uid"])
        if cs.is_terminal(obj.get("status")):
            # Only the TTL clean-up is left: no validation, no pods to read.
            ttl = (obj.get("spec") or {}).get("ttlSecondsAfterFinished")
            if not isinstance(ttl, int):
                return cs.Decision(dict(obj["status"]), done=True)
            info = replace(self._info(obj, None, None), ttl_s=ttl)
            decision = cs.decide(info, await self._observe(namespace, name, uid, pods=False),
                                 self.clock())
            if decision.delete:
                await self._delete(namespace, name, "its TTL passed")
            return decision
        try:
            job = validate_compilation_job(name, namespace, obj.get("spec"))
            plan = plan_compile(job)
        except InvalidCompilationJob as exc:
            await self._write_status(obj, cs.invalid_status(
                self._info(obj, None, None), exc.reason, str(exc), self.clock()))
            raise
        except SpecError as exc:
            await self._write_status(obj, cs.invalid_status(
                self._info(obj, None, None), cs.REASON_INVALID_SPEC, str(exc), self.clock()))
            raise InvalidCompilationJob(f"{namespace}/{name}", [str(exc)]) from exc
        info = self._info(obj, job, plan)
        decision = cs.decide(info, await self._observe(namespace, name, uid), self.clock())
        if decision.delete:
            await self._delete(namespace, name, "the job failed")
        if decision.create:
            await self._create(cjobs.render_job(plan, namespace=namespace, uid=uid,
                                                settings=self.settings), uid, name)
        await self._write_status(obj, decision.status)
        return decision

    async def _observe(self, namespace: str, name: str, uid: str, *,
                       pods: bool = True) -> cs.Observed:
        selector = meta.label_selector(cjobs.selector(name))
        found = None
        for obj in await self.kube.list(kinds.JOB, namespace, selector):
            # A namesake's Job (an earlier CompilationJob being garbage-collected) is not ours.
            if obj["metadata"].get("name") == cjobs.job_name(name) and owned_by(obj, uid):
                found = obj
        if found is None:
            return cs.Observed()
        views: tuple[cs.PodView, ...] = ()
        if pods:
            views = tuple(cs.pod_view(p) for p in await self.kube.list(kinds.POD, namespace,
                                                                        selector))
        return cs.Observed(job=job_view(found), pods=views)

    async def _create(self, manifest: dict[str, Any], uid: str, owner: str) -> None:
        await create_owned_job(self.kube, manifest, uid, log=log, conflict=lambda ns, job: (
            CompileJobConflict(f"Job {ns}/{job} exists and is not owned by CompilationJob "
                               f"{owner} (a deleted namesake's, still being "
                               "garbage-collected?); retrying")))

    async def _delete(self, namespace: str, name: str, why: str) -> None:
        if await self.kube.delete(kinds.JOB, namespace, cjobs.job_name(name)):
            log.info("Deleted Job %s/%s (%s)", namespace, cjobs.job_name(name), why)
