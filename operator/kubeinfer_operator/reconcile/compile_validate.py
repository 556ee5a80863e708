"""Semantic validation of a CompilationJob before anything runs: PURE.

The CRD schema refuses structural errors at ``kubectl apply`` time; this finds
what needs the whole object or the backend: a name that would make the Job's
name too long, resource quantities, URIs the compiler would refuse, and what
only one backend can do (on Kubernetes a ``file://`` output is private to the
compiler's pod and gone with it; a relative ``file://`` path means nothing
there). Every problem at once, each naming its field and the fix.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from kubeinfer_operator.api.compilation_job import CompilationJob, CompilationJobSpec
from kubeinfer_operator.api.endpoint import ObjectMeta
from kubeinfer_operator.reconcile.compile_status import REASON_INVALID_SPEC
from kubeinfer_operator.reconcile.job_validate import (
    InvalidJob,
    job_name_problems,
    parse_job_spec,
)
from kubeinfer_operator.reconcile.validate import _resource_problems, _uri_problems
from kubeinfer_operator.render.plan import EndpointPlan


class InvalidCompilationJob(InvalidJob):
    """The CompilationJob cannot run as written; ``problems`` name each field and fix."""

    reason = REASON_INVALID_SPEC
    kind = "CompilationJob"


def name_problems(name: str) -> list[str]:
    return job_name_problems(name, "CompilationJob")


def _kubernetes_problems(spec: CompilationJobSpec) -> list[str]:
    problems = []
    if urlparse(spec.output.uri).scheme == "file":
        problems.append(
            f"spec.output.uri: {spec.output.uri!r} is a path inside the compiler's pod on "
            "Kubernetes, gone with the pod; use s3://bucket/prefix (kubeinfer up -f runs "
            "file:// jobs locally)")
    for field, uri in (("spec.model.uri", spec.model.uri),
                       ("spec.quantization.calibrationUri", spec.quantization.calibrationUri),
                       ("spec.tuning.cacheUri", spec.tuning.cacheUri)):
        parsed = urlparse(uri or "")
        if parsed.scheme == "file" and parsed.netloc:
            problems.append(
                f"{field}: {uri!r} is a relative path, which means nothing inside a pod; use "
                "s3://bucket/key or an absolute file:///path inside the runtime image")
    return problems


def spec_problems(spec: CompilationJobSpec, *, on_kubernetes: bool) -> list[str]:
    """What a parsed spec cannot run on the backend at hand."""
    problems = _resource_problems("spec.resources", spec.resources.requests,
                                  spec.resources.limits)
    problems += _uri_problems("spec.model.uri", spec.model.uri)
    if on_kubernetes:
        problems += _kubernetes_problems(spec)
    return problems


def variant_compile_problems(plan: EndpointPlan) -> list[str]:
    """What a cluster cannot compile of an Endpoint's variants: relative ``file://`` paths
    mean nothing inside the compiler's container."""
    problems = []
    for i, variant in enumerate(plan.variants):
        if variant.compile is None:
            continue
        settings = variant.compile.settings()
        for field, key in (("model.uri", "model_uri"),
                           ("model.compile.quantization.calibrationUri", "calibration_uri")):
            uri = str(settings.get(key) or "")
            if uri.startswith("file://") and not uri.startswith("file:///"):
                problems.append(
                    f"spec.variants[{i}].{field}: {uri!r} is a relative path, which the "
                    "compiler cannot resolve inside the pod; use s3://bucket/key or an "
                    "absolute file:///path inside the runtime image")
    return problems


def validate_compilation_job(name: str, namespace: str | None, spec: Any, *,
                             on_kubernetes: bool = True) -> CompilationJob:
    """Parse and check a CompilationJob's spec; raise ``InvalidCompilationJob`` listing every
    problem."""
    parsed = parse_job_spec(name, namespace, spec, CompilationJobSpec,
                            lambda s: spec_problems(s, on_kubernetes=on_kubernetes),
                            InvalidCompilationJob)
    return CompilationJob(apiVersion="kubeinfer.io/v1alpha1", kind="CompilationJob",
                          metadata=ObjectMeta(name=name, namespace=namespace), spec=parsed)
