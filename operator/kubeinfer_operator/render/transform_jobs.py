"""Kubernetes Jobs of one TransformJob: PURE.

A TransformJob runs as three ``batch/v1`` Jobs, created one after the other by
the operator (``reconcile.transform_status`` decides when):

* ``<name>-plan``      one pod: ``kubeinfer-runtime batch plan`` lists the input
  and writes the shard plan; its termination message is the ``PlanReport``
  (how many shards);
* ``<name>-work``      an Indexed Job, one index per shard
  (``completions`` = shards, ``parallelism`` = ``resources.instanceCount``):
  ``batch work`` processes shard ``JOB_COMPLETION_INDEX``; a podFailurePolicy
  fails the index at once on bad input (exit 42), the whole Job when the model
  cannot load (exit 43), ignores disruptions (eviction, preemption), and lets
  anything else retry ``backoffLimitPerIndex`` times;
* ``<name>-finalize``  one pod: ``batch finalize`` assembles split objects,
  merges the error lists and reports the ``JobSummary``.

Every Job is owned by the TransformJob (deleting it deletes the Jobs and their
pods), carries the run's hash, and runs pods as locked down as an Endpoint's
(non-root, read-only root filesystem, no capabilities, no API token), with the
S3 Secret by reference. An image model runs as a native sidecar of each worker
(an init container with ``restartPolicy: Always``, so the Job completes when
the worker does).
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.api import transform_job as tj
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s_placement import apply_pod_template, effective_template
from kubeinfer_operator.render.k8s_workloads import (
    _container_security,
    _env,
    _pod_security,
    _tmp_volume,
    _user_env,
    default_resources,
)
from kubeinfer_operator.render.plan_steps import StepPlan
from kubeinfer_operator.render.transform_names import (
    ANNOTATION_RUN_HASH,
    CONTAINER,
    LABEL_TRANSFORM_JOB,
    Step,
    job_name,
)
from kubeinfer_operator.render.transform_plan import TransformPlan
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.batch import EXIT_BAD_INPUT, EXIT_MODEL_FAILED

#: Retries of the planner and the finalizer (transient failures only).
STEP_BACKOFF_LIMIT = 3
#: A sidecar image gets this long to answer GET /ping before the worker starts.
SIDECAR_STARTUP_S = 600


def labels(name: str, step: Step) -> dict[str, str]:
    return {
        meta.LABEL_NAME: meta.APP_NAME,
        meta.LABEL_INSTANCE: name,
        meta.LABEL_COMPONENT: step.component,
        meta.LABEL_PART_OF: meta.APP_NAME,
        meta.LABEL_MANAGED_BY: meta.MANAGED_BY,
        LABEL_TRANSFORM_JOB: name,
    }


def selector(name: str) -> dict[str, str]:
    """Labels every Job and pod of one TransformJob carries."""
    return {LABEL_TRANSFORM_JOB: name, meta.LABEL_MANAGED_BY: meta.MANAGED_BY}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {**meta.owner_reference(name, uid), "apiVersion": tj.API_VERSION, "kind": tj.KIND}


def _resources(plan: TransformPlan, settings: OperatorSettings,
               own: bool) -> dict[str, Any]:
    """The spec's requests/limits where the model runs (``own``), else the defaults;
    completed as an Endpoint's are (``default_resources``): every container gets cpu
    and memory requests and a memory limit, so a worker of a 1,000-shard job cannot
    grow without bound on a node it shares."""
    if own:
        return default_resources(dict(plan.requests), dict(plan.limits), settings)
    return default_resources({}, {}, settings)


def _batch_container(plan: TransformPlan, step: Step, settings: OperatorSettings,
                     mount: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.runtime_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["batch", step.value],
        "env": _env(plan.env),
        "securityContext": _container_security(),
        "volumeMounts": [mount],
        # The report is the termination message; a crash before it leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        # The worker runs an in-process model: the spec's resources are its.
        "resources": _resources(plan, settings, own=step is Step.WORK and not plan.images),
    }
    if settings.s3_secret_name:
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret_name}}]
    return container


def _sidecar(plan: TransformPlan, step: StepPlan, settings: OperatorSettings,
             mount: dict[str, Any]) -> dict[str, Any]:
    """An image model beside the worker: a native sidecar, started (and ready) first."""
    assert step.image is not None and step.port is not None
    port_name = f"step-{step.port}"
    security = _container_security()
    # Third-party serving images commonly write outside /tmp.
    security["readOnlyRootFilesystem"] = False
    return {
        "name": f"step-{step.name}",
        "image": step.image,
        "restartPolicy": "Always",
        "ports": [{"name": port_name, "containerPort": step.port, "protocol": "TCP"}],
        "env": _user_env(plan.image_env[step.name]),
        "startupProbe": {"httpGet": {"path": "/ping", "port": port_name}, "periodSeconds": 2,
                         "timeoutSeconds": 2, "failureThreshold": SIDECAR_STARTUP_S // 2},
        "securityContext": security,
        "volumeMounts": [mount],
        "resources": _resources(plan, settings, own=True),
    }


def _pod_failure_policy(step: Step) -> dict[str, Any]:
    bad_input = "FailIndex" if step is Step.WORK else "FailJob"
    return {"rules": [
        {"action": bad_input,
         "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                         "values": [EXIT_BAD_INPUT]}},
        {"action": "FailJob",
         "onExitCodes": {"containerName": CONTAINER, "operator": "In",
                         "values": [EXIT_MODEL_FAILED]}},
        # Evicted, preempted, node drained: not the job's fault, retried without counting.
        {"action": "Ignore",
         "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def render_job(plan: TransformPlan, step: Step, *, namespace: str, uid: str,
               settings: OperatorSettings, shards: int = 1,
               active_deadline_s: int | None = None) -> dict[str, Any]:
    """One of the three Jobs. ``shards``: the workers' completions (from the PlanReport);
    ``active_deadline_s``: what is left of the job's activeDeadlineSeconds."""
    tmp_volume, tmp_mount = _tmp_volume()
    pod_labels = labels(plan.name, step)
    pod: dict[str, Any] = {
        # The runtime never calls the Kubernetes API: no token in its pods.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Required by podFailurePolicy; retries are new pods, counted by the Job.
        "restartPolicy": "Never",
        "securityContext": _pod_security(settings),
        "terminationGracePeriodSeconds": 30,
        "containers": [_batch_container(plan, step, settings, tmp_mount)],
        "volumes": [tmp_volume],
    }
    if step is Step.WORK and plan.images:
        pod["initContainers"] = [_sidecar(plan, s, settings, tmp_mount) for s in plan.images]
    spec: dict[str, Any] = {
        "podFailurePolicy": _pod_failure_policy(step),
        "template": apply_pod_template(
            {"metadata": {"labels": pod_labels}, "spec": pod},
            effective_template(settings.default_pod_template, plan.pod_template), pod_labels),
    }
    if step is Step.WORK:
        spec.update({
            "completionMode": "Indexed",
            "completions": shards,
            "parallelism": max(1, min(plan.instance_count, shards)),
            "backoffLimitPerIndex": plan.backoff_limit_per_index,
        })
        if plan.max_failed_records == 0:
            # SageMaker's behaviour: the first bad shard fails the job, no point going on.
            spec["maxFailedIndexes"] = 0
    else:
        spec.update({"completions": 1, "parallelism": 1, "backoffLimit": STEP_BACKOFF_LIMIT})
    if active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = max(1, active_deadline_s)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(plan.name, step),
            "namespace": namespace,
            "labels": pod_labels,
            "annotations": {ANNOTATION_RUN_HASH: plan.run_hash},
            "ownerReferences": [owner_reference(plan.name, uid)],
        },
        "spec": spec,
    }
