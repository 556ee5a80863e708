"""One reconcile of one TransformJob: read, decide (pure code), apply, report.

``TransformSync.sync`` reads the TransformJob fresh from the API, lists its
Jobs and their pods (label ``kubeinfer.io/transform-job``), asks
``reconcile.transform_status.decide`` what to do, does exactly that (create the
next Job, or delete Jobs: stopped on failure, cleaned up after the TTL) and
writes the status only when it differs. It is state-based and idempotent: a
duplicate Job event, a timer tick and a resume all converge on the same
writes, and calls for one TransformJob are serialised by a per-object lock.

The model is resolved once: an ``endpointRef`` is copied from the Endpoint's
variant into the annotation ``kubeinfer.io/resolved-model`` before the first
Job is created, so the workers run the model the planner was started for even
if the Endpoint changes meanwhile. Whoever may edit the TransformJob may write
that annotation too, so it is input like the spec: read only for an
``endpointRef`` job, held to the checks a fresh resolution passes (and its env
to ``api.env_policy`` in ``plan_transform``, as ``spec.environment``), and
resolved again when it fails them.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error
from kubeinfer_operator.api.transform_job import TransformJob
from kubeinfer_operator.errors import ConflictError, SpecError
from kubeinfer_operator.handlers.plumbing import JobSync, create_owned_job
from kubeinfer_operator.k8s import kinds
from kubeinfer_operator.reconcile import transform_observe as obs
from kubeinfer_operator.reconcile import transform_status as ts
from kubeinfer_operator.reconcile.diff import owned_by
from kubeinfer_operator.reconcile.transform_validate import (
    InvalidTransformJob,
    model_problems,
    validate_transform_job,
)
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render import transform_jobs as tj
from kubeinfer_operator.render import transform_names as names
from kubeinfer_operator.render.transform_plan import (
    ModelRefError,
    ResolvedModel,
    TransformPlan,
    model_from_endpoint,
    own_model,
    plan_transform,
)
from kubeinfer_operator.render.transform_plan import env_problems as transform_env_problems

log = logging.getLogger(__name__)


def _pinned(text: str | None, job: str) -> ResolvedModel | None:
    """The pinned model, if the annotation holds one that passes what a freshly resolved
    model passes: readable, a model URI and steps the runtime runs, env the policy allows
    the model (``transform_plan.env_problems``). A pin is never local mode's (``base_dir``)."""
    if not text:
        return None
    try:
        model = ResolvedModel.model_validate_json(text).model_copy(update={"base_dir": None})
    except ValidationError:
        log.warning("Annotation %s of TransformJob %s is not readable; resolving the model "
                    "again", names.ANNOTATION_RESOLVED_MODEL, job)
        return None
    where = f"annotation {names.ANNOTATION_RESOLVED_MODEL}"
    problems = model_problems(model.containers, where, on_kubernetes=True,
                              model_uri=model.model.uri if model.model else None)
    problems += transform_env_problems(model, {}, f"{where}: ", kubeinfer_image=True)
    if problems:
        log.warning("Annotation %s of TransformJob %s is refused (%s); resolving the model "
                    "again", names.ANNOTATION_RESOLVED_MODEL, job, "; ".join(problems))
        return None
    return model


class JobConflict(ConflictError):
    """A Job name this TransformJob needs is taken by an object it does not own (transient
    when that is a deleted namesake's Job the garbage collector has not removed yet)."""


class TransformSync(JobSync[ts.Decision]):
    """Syncs TransformJobs; ``sync`` raises ``InvalidTransformJob`` for a spec that cannot run."""

    kind = kinds.TRANSFORM_JOB

    def _info(self, obj: dict[str, Any], job: TransformJob | None, plan: TransformPlan | None,
              model: str = "") -> ts.JobInfo:
        spec = job.spec if job is not None else None
        return ts.JobInfo(
            name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"],
            generation=int(obj["metadata"].get("generation") or 0),
            run_hash=plan.run_hash if plan is not None else "",
            status=obj.get("status") or {}, model=model,
            instance_count=spec.resources.instanceCount if spec else 1,
            active_deadline_s=spec.activeDeadlineSeconds if spec else None,
            ttl_s=spec.ttlSecondsAfterFinished if spec else None)

    async def _sync(self, obj: dict[str, Any], namespace: str, name: str) -> ts.Decision:
        uid = str(obj["metadata"]["uid"])
        if ts.is_terminal(obj.get("status")):
            # Only the TTL clean-up is left: no validation, no model, no pods to read.
            ttl = (obj.get("spec") or {}).get("ttlSecondsAfterFinished")
            if not isinstance(ttl, int):
                return ts.Decision(dict(obj["status"]), done=True)
            info = replace(self._info(obj, None, None), ttl_s=ttl)
            decision = ts.decide(info, await self._observe(namespace, name, uid, pods=False),
                                 self.clock())
            await self._delete(namespace, name, decision.delete, "its TTL passed")
            return decision
        try:
            job = validate_transform_job(name, namespace, obj.get("spec"))
        except InvalidTransformJob as exc:
            await self._write_status(obj, ts.invalid_status(
                self._info(obj, None, None), exc.reason, str(exc), self.clock()))
            raise
        try:
            model = await self._model(obj, job)
            plan = plan_transform(job, model)
        except ModelRefError as exc:
            status = ts.waiting_status(self._info(obj, job, None), exc.reason, str(exc),
                                       self.clock())
            await self._write_status(obj, status)
            return ts.Decision(status)
        except SpecError as exc:
            await self._write_status(obj, ts.invalid_status(
                self._info(obj, job, None), names.REASON_INVALID_SPEC, str(exc), self.clock()))
            raise InvalidTransformJob(f"{namespace}/{name}", [str(exc)]) from exc
        info = self._info(obj, job, plan, model.source)
        observed = await self._observe(namespace, name, uid)
        decision = ts.decide(info, observed, self.clock())
        await self._delete(namespace, name, decision.delete, "the job failed")
        if decision.create is not None:
            manifest = tj.render_job(plan, decision.create, namespace=namespace, uid=uid,
                                     settings=self.settings, shards=decision.shards,
                                     active_deadline_s=decision.active_deadline_s)
            await self._create(manifest, uid, name)
        await self._write_status(obj, decision.status)
        return decision

    async def _model(self, obj: dict[str, Any], job: TransformJob) -> ResolvedModel:
        """The model this run uses: the spec's, or the Endpoint's variant's as pinned in
        the annotation (resolved and pinned when there is no acceptable pin)."""
        own = own_model(job.spec)
        if own is not None:
            # An annotation never stands in for the spec's own model.
            return own
        annotations = obj["metadata"].get("annotations") or {}
        pinned = _pinned(annotations.get(names.ANNOTATION_RESOLVED_MODEL), job.name)
        if pinned is not None:
            return pinned
        ref = job.spec.endpointRef
        assert ref is not None
        namespace = str(obj["metadata"]["namespace"])
        found = await self.kube.get(kinds.ENDPOINT, namespace, ref.name)
        endpoint = None
        if found is not None:
            try:
                endpoint = Endpoint.model_validate(
                    {"apiVersion": found.get("apiVersion", "kubeinfer.io/v1alpha1"),
                     "kind": "Endpoint", "metadata": {"name": ref.name, "namespace": namespace},
                     "spec": found.get("spec")})
            except ValidationError as exc:
                raise ModelRefError(
                    f"spec.endpointRef: Endpoint {namespace}/{ref.name} is invalid ("
                    + format_validation_error(exc).replace("\n", "; ")
                    + "); fix it or give the job its own model") from exc
        model = model_from_endpoint(job.spec, endpoint, namespace)
        problems = model_problems(model.containers, f"Endpoint {ref.name}", on_kubernetes=True,
                                  model_uri=model.model.uri if model.model else None)
        if problems:
            raise ModelRefError("spec.endpointRef: " + "; ".join(problems))
        await self.kube.merge_patch(kinds.TRANSFORM_JOB, namespace, job.name, {"metadata": {
            "annotations": {names.ANNOTATION_RESOLVED_MODEL: model.to_json()}}})
        return model

    async def _observe(self, namespace: str, name: str, uid: str, *,
                       pods: bool = True) -> obs.Observed:
        selector = meta.label_selector(tj.selector(name))
        steps = {names.job_name(name, s): s for s in names.Step}
        jobs: dict[names.Step, obs.JobView] = {}
        for obj in await self.kube.list(kinds.JOB, namespace, selector):
            step = steps.get(str(obj["metadata"].get("name")))
            # A namesake's Job (an earlier TransformJob being garbage-collected) is not ours.
            if step is not None and owned_by(obj, uid):
                jobs[step] = obs.job_view(obj)
        views: list[obs.PodView] = []
        if pods and jobs:
            components = {s.component: s for s in names.Step}
            for pod in await self.kube.list(kinds.POD, namespace, selector):
                component = (pod["metadata"].get("labels") or {}).get(meta.LABEL_COMPONENT)
                if component in components:
                    views.append(obs.pod_view(pod, components[component]))
        return obs.Observed(jobs=jobs, pods=tuple(views))

    async def _create(self, manifest: dict[str, Any], uid: str, owner: str) -> None:
        await create_owned_job(self.kube, manifest, uid, log=log, conflict=lambda ns, job: (
            JobConflict(f"Job {ns}/{job} exists and is not owned by TransformJob {owner} "
                        "(a deleted namesake's, still being garbage-collected?); retrying")))

    async def _delete(self, namespace: str, name: str, steps: tuple[names.Step, ...],
                      why: str) -> None:
        for step in steps:
            if await self.kube.delete(kinds.JOB, namespace, names.job_name(name, step)):
                log.info("Deleted Job %s/%s (%s)", namespace, names.job_name(name, step), why)
