"""The Kubernetes Job of one CompilationJob: PURE.

A CompilationJob runs as one ``batch/v1`` Job, ``<name>-compile``: one pod
running ``kubeinfer-runtime compile`` with the plan's ``KUBEINFER_*`` env. Its
report (``CompileReport``, at most 4 KiB) is the container's termination
message, which the operator reads into the CompilationJob's status. A
podFailurePolicy fails the Job at once on bad input (exit 42: not ONNX, a bad
calibration set; a retry would fail the same way), ignores disruptions
(eviction, preemption, drain: not the job's fault) and lets anything else retry
``backoffLimit`` times; ``activeDeadlineSeconds`` is the spec's
``stoppingCondition.maxRuntimeInSeconds``.

The Job is owned by the CompilationJob (deleting it deletes the Job and its
pod), carries the spec's hash, and runs its pod as locked down as an
Endpoint's (non-root, read-only root filesystem with an emptyDir /tmp for
scratch and the tuning cache, no capabilities, no API token), with the S3
Secret by reference, as TransformJob pods get it.
"""

from __future__ import annotations

from typing import Any

from kubeinfer_operator.api import compilation_job as cj
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.compile_plan import CompilePlan
from kubeinfer_operator.render.k8s_placement import (
    apply_pod_template,
    complete_resources,
    effective_template,
)
from kubeinfer_operator.render.k8s_workloads import (
    _container_security,
    _env,
    _pod_security,
    _tmp_volume,
)
from kubeinfer_operator.render.transform_names import ANNOTATION_RUN_HASH
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.compile import EXIT_BAD_INPUT

#: kubeinfer's label on the Job and pod of a CompilationJob (to list and watch them).
LABEL_COMPILATION_JOB = "kubeinfer.io/compilation-job"
#: Name of the compiler container (the podFailurePolicy and the status reader name it).
CONTAINER = "compile"
COMPONENT = "compiler"
#: Without spec.resources: TVM's compiler and MetaSchedule want more than a model server.
DEFAULT_MEMORY_REQUEST = "1Gi"
DEFAULT_MEMORY_LIMIT = "4Gi"


def job_name(name: str) -> str:
    return f"{name}-compile"


def labels(name: str) -> dict[str, str]:
    return {
        meta.LABEL_NAME: meta.APP_NAME,
        meta.LABEL_INSTANCE: name,
        meta.LABEL_COMPONENT: COMPONENT,
        meta.LABEL_PART_OF: meta.APP_NAME,
        meta.LABEL_MANAGED_BY: meta.MANAGED_BY,
        LABEL_COMPILATION_JOB: name,
    }


def selector(name: str) -> dict[str, str]:
    """Labels the Job and pods of one CompilationJob carry."""
    return {LABEL_COMPILATION_JOB: name, meta.LABEL_MANAGED_BY: meta.MANAGED_BY}


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {**meta.owner_reference(name, uid), "apiVersion": cj.API_VERSION, "kind": cj.KIND}


def resources(plan: CompilePlan) -> dict[str, Any]:
    """The spec's requests/limits, completed as a variant's are (``complete_resources``):
    what it leaves out is a CPU per measuring thread (timings taken on a shared CPU would
    be noise) and the compiler's memory, and there is always a memory limit."""
    return complete_resources(dict(plan.requests), dict(plan.limits), cpu=str(plan.threads),
                              memory=DEFAULT_MEMORY_REQUEST, memory_limit=DEFAULT_MEMORY_LIMIT)


def pod_failure_policy(container: str = CONTAINER) -> dict[str, Any]:
    return {"rules": [
        {"action": "FailJob",
         "onExitCodes": {"containerName": container, "operator": "In",
                         "values": [EXIT_BAD_INPUT]}},
        # Evicted, preempted, node drained: not the job's fault, retried without counting.
        {"action": "Ignore",
         "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


def render_job(plan: CompilePlan, *, namespace: str, uid: str,
               settings: OperatorSettings) -> dict[str, Any]:
    """The CompilationJob's Job."""
    tmp_volume, tmp_mount = _tmp_volume()
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.compiler_image,
        "imagePullPolicy": settings.image_pull_policy,
        "args": ["compile"],
        "env": _env(plan.env),
        "securityContext": _container_security(),
        "volumeMounts": [tmp_mount],
        # The report is the termination message; a crash before it leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": resources(plan),
    }
    if settings.s3_secret_name:
        container["envFrom"] = [{"secretRef": {"name": settings.s3_secret_name}}]
    pod_labels = labels(plan.name)
    pod: dict[str, Any] = {
        # The runtime never calls the Kubernetes API: no token in its pods.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # Required by podFailurePolicy; retries are new pods, counted by the Job.
        "restartPolicy": "Never",
        "securityContext": _pod_security(settings),
        "terminationGracePeriodSeconds": 30,
        "containers": [container],
        "volumes": [tmp_volume],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(plan.name),
            "namespace": namespace,
            "labels": pod_labels,
            "annotations": {ANNOTATION_RUN_HASH: plan.run_hash},
            "ownerReferences": [owner_reference(plan.name, uid)],
        },
        "spec": {
            "completions": 1,
            "parallelism": 1,
            "backoffLimit": plan.backoff_limit,
            "activeDeadlineSeconds": plan.active_deadline_s,
            "podFailurePolicy": pod_failure_policy(),
            "template": apply_pod_template(
                {"metadata": {"labels": pod_labels}, "spec": pod},
                effective_template(settings.default_pod_template, plan.pod_template),
                pod_labels),
        },
    }
