"""One reconcile of one RecommendationJob: read, decide (pure code), apply, report.

``RecommendSync.sync`` reads the RecommendationJob (and its ``endpointRef``'s
Endpoint) fresh from the API, lists its candidates' Deployments and Services, its
Job and the Job's pods (label ``kubeinfer.io/recommendation-job``), asks
``reconcile.recommend_status.decide`` what to do, does exactly that (create the
candidates, create the Job, delete the candidates once the Job has ended, delete
the Job after the TTL) and writes the status only when it differs.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import yaml

from kubeinfer_operator.errors import ConflictError, SpecError
from kubeinfer_operator.handlers.plumbing import JobSync, create_owned_job
from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.k8s.client import AlreadyExists
from kubeinfer_operator.reconcile import recommend_status as rs
from kubeinfer_operator.reconcile.compile_status import PodView, pod_view
from kubeinfer_operator.reconcile.diff import owned_by
from kubeinfer_operator.reconcile.recommend_validate import (
    InvalidRecommendationJob,
    validate_recommendation_job,
)
from kubeinfer_operator.reconcile.transform_observe import job_view
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import recommend_jobs as rjobs
from kubeinfer_operator.render.recommend_plan import apply_candidate

log = logging.getLogger(__name__)


class RecommendJobConflict(ConflictError):
    """An object name this RecommendationJob needs is taken by one it does not own."""


def endpoint_yaml(plan: rjobs.RecommendPlan, summary: rs.Summary) -> str | None:
    """The source Endpoint with the winner's settings, as YAML."""
    cand = next((c for c in plan.candidates if c.name == summary.recommended), None)
    if cand is None:
        return None
    doc = copy.deepcopy(plan.endpoint)
    apply_candidate(doc["spec"]["variants"][0], cand,
                    compiled_uri=plan.request.compiledModelUri,
                    autoscaling_target=summary.autoscalingTarget)
    return yaml.safe_dump(doc, sort_keys=False)


class RecommendSync(JobSync[rs.Decision]):
    """Syncs RecommendationJobs."""

    kind = kinds.RECOMMENDATION_JOB

    def _info(self, obj: dict[str, Any], plan: rjobs.RecommendPlan | None) -> rs.JobInfo:
        spec = obj.get("spec") or {}
        ttl = spec.get("ttlSecondsAfterFinished")
        return rs.JobInfo(
            name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"],
            generation=int(obj["metadata"].get("generation") or 0),
            run_hash=plan.run_hash if plan else "", status=obj.get("status") or {},
            model=plan.model_description if plan else "",
            candidates=len(plan.candidates) if plan else 0,
            deadline_s=plan.deadline_s if plan else None,
            ttl_s=ttl if isinstance(ttl, int) else None)

    async def _plan(self, namespace: str, name: str, obj: dict[str, Any]
                    ) -> rjobs.RecommendPlan:
        job = validate_recommendation_job(name, namespace, obj.get("spec"))
        endpoint_doc = None
        ref = job.spec.endpointRef
        if ref is not None:
            endpoint_doc = await self.kube.get(kinds.ENDPOINT, namespace, ref.name)
            if endpoint_doc is None:
                raise InvalidRecommendationJob(f"{namespace}/{name}", [
                    f"spec.endpointRef.name: Endpoint {namespace}/{ref.name} does not "
                    "exist; create it first, or set spec.model"])
        try:
            return rjobs.plan_recommend(job, namespace, endpoint_doc)
        except rjobs.RecommendSpecError as exc:
            raise InvalidRecommendationJob(f"{namespace}/{name}", [str(exc)]) from exc

    async def _sync(self, obj: dict[str, Any], namespace: str, name: str) -> rs.Decision:
        uid = str(obj["metadata"]["uid"])
        if rs.is_terminal(obj.get("status")):
            decision = rs.decide(self._info(obj, None),
                                 await self._observe(namespace, name, uid, pods=False),
                                 self.clock())
            await self._apply(decision, namespace, name, uid, None)
            return decision
        try:
            plan = await self._plan(namespace, name, obj)
        except SpecError as exc:
            reason = getattr(exc, "reason", rs.REASON_INVALID_SPEC)
            await self._write_status(obj, rs.invalid_status(self._info(obj, None), reason,
                                                            str(exc), self.clock()))
            await self._delete_candidates(namespace, name, uid)
            raise
        decision = rs.decide(self._info(obj, plan), await self._observe(namespace, name, uid),
                             self.clock(), endpoint_yaml=lambda s: endpoint_yaml(plan, s))
        await self._apply(decision, namespace, name, uid, plan)
        await self._write_status(obj, decision.status)
        return decision

    async def _apply(self, decision: rs.Decision, namespace: str, name: str, uid: str,
                     plan: rjobs.RecommendPlan | None) -> None:
        if decision.delete_job and await self.kube.delete(kinds.JOB, namespace,
                                                          rjobs.job_name(name)):
            log.info("Deleted Job %s/%s", namespace, rjobs.job_name(name))
        if decision.delete_candidates:
            await self._delete_candidates(namespace, name, uid)
        if plan is None:
            return
        if decision.create_candidates:
            policy = rjobs.render_candidates_policy(plan, uid=uid, settings=self.settings)
            if policy is not None:
                await self._create(policy, uid, name)
            for i in range(len(plan.candidates)):
                for manifest in rjobs.render_candidate(plan, i, uid=uid,
                                                       settings=self.settings):
                    await self._create(manifest, uid, name)
        if decision.create_job:
            await create_owned_job(
                self.kube, rjobs.render_job(plan, uid=uid, settings=self.settings), uid,
                log=log, conflict=lambda ns, job: RecommendJobConflict(
                    f"Job {ns}/{job} exists and is not owned by RecommendationJob {name}; "
                    "retrying"))

    async def _create(self, manifest: dict[str, Any], uid: str, owner: str) -> None:
        md = manifest["metadata"]
        try:
            await self.kube.create(manifest)
            log.info("Created %s %s/%s", manifest["kind"], md["namespace"], md["name"])
        except AlreadyExists:
            existing = await self.kube.get(kinds.kind_of(manifest), md["namespace"],
                                           md["name"])
            if existing is not None and not owned_by(existing, uid):
                raise RecommendJobConflict(
                    f"{manifest['kind']} {md['namespace']}/{md['name']} exists and is not "
                    f"owned by RecommendationJob {owner}; rename one of them") from None

    async def _owned(self, kind: kinds.Kind, namespace: str, name: str,
                     uid: str) -> list[dict[str, Any]]:
        selector = meta.label_selector(rjobs.selector(name))
        return [o for o in await self.kube.list(kind, namespace, selector)
                if owned_by(o, uid)]

    async def _delete_candidates(self, namespace: str, name: str, uid: str) -> None:
        for kind in (kinds.DEPLOYMENT, kinds.SERVICE, kinds.NETWORK_POLICY):
            for obj in await self._owned(kind, namespace, name, uid):
                if await self.kube.delete(kind, namespace, obj["metadata"]["name"]):
                    log.info("Deleted candidate %s %s/%s", kind.kind, namespace,
                             obj["metadata"]["name"])

    async def _observe(self, namespace: str, name: str, uid: str, *,
                       pods: bool = True) -> rs.Observed:
        available: dict[int, bool] = {}
        prefix = f"{name}-c"
        for dep in await self._owned(kinds.DEPLOYMENT, namespace, name, uid):
            dname = str(dep["metadata"]["name"])
            if dname.startswith(prefix) and dname[len(prefix):].isdigit():
                want = int((dep.get("spec") or {}).get("replicas") or 0)
                have = int((dep.get("status") or {}).get("availableReplicas") or 0)
                available[int(dname[len(prefix):])] = have >= want
        found = next((j for j in await self._owned(kinds.JOB, namespace, name, uid)
                      if j["metadata"].get("name") == rjobs.job_name(name)), None)
        views: tuple[PodView, ...] = ()
        if found is not None and pods:
            selector = meta.label_selector(rjobs.selector(name))
            views = tuple(pod_view(p, rjobs.CONTAINER)
                          for p in await self.kube.list(kinds.POD, namespace, selector))
        return rs.Observed(available=available, job=job_view(found), pods=views)
