"""The names a TransformJob's Kubernetes objects share: PURE constants and two helpers.

Separate from ``transform_jobs`` (the renderer) so that what only reads Jobs and pods
back (``reconcile.transform_observe``, ``transform_status``) and the local runner,
a short-lived process of every local job, do not import the renderer's chain (the
operator's settings, the workload renderers) for a handful of strings.
"""

from __future__ import annotations

from enum import StrEnum

#: kubeinfer's label on every object of a TransformJob (to list and watch them).
LABEL_TRANSFORM_JOB = "kubeinfer.io/transform-job"
#: Annotation: hash of the spec and resolved model the Job was rendered from.
ANNOTATION_RUN_HASH = "kubeinfer.io/run-hash"
#: Annotation on the TransformJob: the model pinned when it started (JSON).
ANNOTATION_RESOLVED_MODEL = "kubeinfer.io/resolved-model"
#: Name of the batch container in every pod (the podFailurePolicy names it).
CONTAINER = "batch"
#: Label and annotation Kubernetes puts on Indexed Job pods.
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

#: Reasons of a TransformJob's conditions, the operator's and local mode's alike.
REASON_INVALID_SPEC = "InvalidSpec"
REASON_SPEC_CHANGED = "SpecChanged"
REASON_DEADLINE = "DeadlineExceeded"
REASON_BAD_INPUT = "BadInput"
REASON_MODEL_FAILED = "ModelFailed"
REASON_NO_REPORT = "NoReport"
REASON_COMPLETED = "Completed"


class Step(StrEnum):
    PLAN = "plan"
    WORK = "work"
    FINALIZE = "finalize"

    @property
    def component(self) -> str:
        return {"plan": "batch-planner", "work": "batch-worker",
                "finalize": "batch-finalizer"}[self.value]


def job_name(name: str, step: Step) -> str:
    return f"{name}-{step.value}"
