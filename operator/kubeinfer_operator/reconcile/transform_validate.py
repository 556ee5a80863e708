"""Semantic validation of a TransformJob before anything runs: PURE.

The CRD schema refuses structural errors at ``kubectl apply`` time; this finds
what needs the whole object or the backend: a name that would make Job names
too long, resource quantities, model URIs the runtime would refuse, image
steps sharing a port, and what only one backend can run (``file://`` data on
Kubernetes is private to each pod, so the planner, workers and finalizer would
not see each other's files; image steps need a pod). Every problem at once,
each naming its field and the fix.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from kubeinfer_operator.api.endpoint import ContainerStep, ObjectMeta
from kubeinfer_operator.api.transform_job import TransformJob, TransformJobSpec
from kubeinfer_operator.reconcile.job_validate import (
    InvalidJob,
    job_name_problems,
    parse_job_spec,
)
from kubeinfer_operator.reconcile.validate import _resource_problems, _uri_problems
from kubeinfer_operator.render.plan_steps import FIRST_IMAGE_PORT
from kubeinfer_operator.render.transform_names import REASON_INVALID_SPEC

#: A TransformJob runs the model as given: compiling is a CompilationJob's (or a variant's).
_NO_COMPILE = ("{}: a TransformJob runs its model as given; run a CompilationJob and give the "
               "job its artifact (model.format: compiled)")


class InvalidTransformJob(InvalidJob):
    """The TransformJob cannot run as written; ``problems`` name each field and fix."""

    reason = REASON_INVALID_SPEC
    kind = "TransformJob"


def name_problems(name: str) -> list[str]:
    return job_name_problems(name, "TransformJob")


def image_step_problem(path: str, step: ContainerStep) -> str:
    """Local mode's refusal of an image step (the Endpoint's local mode says the same)."""
    return (f"{path}.image: image steps run only on Kubernetes (as extra containers of the "
            f"pod); locally, replace step {step.name!r} with a model or handler step, or "
            "deploy with kubectl")


def _step_problems(containers: list[ContainerStep] | None, path: str,
                   on_kubernetes: bool) -> list[str]:
    problems: list[str] = []
    steps = containers or []
    ports = [c.port or FIRST_IMAGE_PORT + k for k, c in enumerate(steps) if c.image]
    for j, step in enumerate(steps):
        if step.model is not None:
            problems += _uri_problems(f"{path}[{j}].model.uri", step.model.uri)
            if step.model.compile is not None:
                problems.append(_NO_COMPILE.format(f"{path}[{j}].model.compile"))
        if step.image and ports.count(step.port or FIRST_IMAGE_PORT + j) > 1:
            problems.append(f"{path}[{j}].port: {step.port or FIRST_IMAGE_PORT + j} is used by "
                            "another image step; give each image its own port")
        if step.image and not on_kubernetes:
            problems.append(image_step_problem(f"{path}[{j}]", step))
    return problems


def _kubernetes_problems(spec: TransformJobSpec) -> list[str]:
    problems = []
    for field, uri in (("spec.input.uri", spec.input.uri), ("spec.output.uri", spec.output.uri)):
        if urlparse(uri).scheme == "file":
            problems.append(
                f"{field}: {uri!r} is a path inside one pod on Kubernetes, so the planner, "
                "workers and finalizer would not see each other's files; use "
                "s3://bucket/prefix (kubeinfer up -f runs file:// jobs locally)")
    return problems


def spec_problems(spec: TransformJobSpec, *, on_kubernetes: bool) -> list[str]:
    """What a parsed spec cannot run on the backend at hand."""
    problems = _resource_problems("spec.resources", spec.resources.requests,
                                  spec.resources.limits)
    if spec.model is not None:
        problems += _uri_problems("spec.model.uri", spec.model.uri)
        if spec.model.compile is not None:
            problems.append(_NO_COMPILE.format("spec.model.compile"))
    problems += _step_problems(spec.containers, "spec.containers", on_kubernetes)
    if on_kubernetes:
        problems += _kubernetes_problems(spec)
    return problems


def model_problems(containers: list[ContainerStep] | None, source: str,
                   on_kubernetes: bool, model_uri: str | None = None) -> list[str]:
    """What an Endpoint variant's model (endpointRef, or the pin of one) adds: a model URI
    the runtime would refuse, image steps that run only on Kubernetes."""
    problems = _uri_problems("model.uri", model_uri) if model_uri is not None else []
    problems += _step_problems(containers, "containers", on_kubernetes)
    return [f"{source}: {p}" for p in problems]


def validate_transform_job(name: str, namespace: str | None, spec: Any, *,
                           on_kubernetes: bool = True) -> TransformJob:
    """Parse and check a TransformJob's spec; raise ``InvalidTransformJob`` listing every
    problem."""
    parsed = parse_job_spec(name, namespace, spec, TransformJobSpec,
                            lambda s: spec_problems(s, on_kubernetes=on_kubernetes),
                            InvalidTransformJob)
    return TransformJob(apiVersion="kubeinfer.io/v1alpha1", kind="TransformJob",
                        metadata=ObjectMeta(name=name, namespace=namespace), spec=parsed)
