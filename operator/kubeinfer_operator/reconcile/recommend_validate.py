"""Semantic validation of a RecommendationJob before anything runs: PURE.

The CRD schema refuses structural errors at ``kubectl apply`` time; this finds
what needs the whole object: a name that would make its children's names too
long, resource quantities of the candidates, relative ``file://`` paths
(meaningless inside a pod), and ``candidates[].urls``, which the operator sets
to the candidate's own Service (the load generator calls nothing else; a URL in
the spec would be silently replaced, so it is refused instead). Every problem
at once, each naming its field.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlparse

from kubeinfer_operator.api.endpoint import ObjectMeta
from kubeinfer_operator.api.recommendation_job import RecommendationJob, RecommendationJobSpec
from kubeinfer_operator.reconcile.job_validate import InvalidJob, parse_job_spec
from kubeinfer_operator.reconcile.validate import _resource_problems

REASON_INVALID_SPEC = "InvalidSpec"
#: On Kubernetes the load test's whole request travels in one environment variable
#: (``render.recommend_jobs``), and Linux refuses to start a process with one over
#: 128 KiB (MAX_ARG_STRLEN): the pod would never start. The rest of the request (at most
#: 16 candidates and 64 instance types) stays well under the other 32 KiB.
MAX_PAYLOADS_JSON_BYTES = 96 * 1024


class InvalidRecommendationJob(InvalidJob):
    """The RecommendationJob cannot run as written; ``problems`` name each field and fix."""

    reason = REASON_INVALID_SPEC
    kind = "RecommendationJob"


def spec_problems(spec: RecommendationJobSpec, *, on_kubernetes: bool = True) -> list[str]:
    problems: list[str] = []
    for i, cand in enumerate(spec.search().expand()):
        problems += _resource_problems(f"spec.candidates[{i}].resources",
                                       cand.resources.requests, cand.resources.limits)
    for i, listed in enumerate(spec.candidates or []):
        if listed.urls is not None:
            problems.append(f"spec.candidates[{i}].urls: set by the operator (the candidate's "
                            "own Service in this namespace, the only address the load "
                            "generator calls); remove it")
    if on_kubernetes:
        size = len(json.dumps(spec.payloads or [], ensure_ascii=False).encode())
        if size > MAX_PAYLOADS_JSON_BYTES:
            problems.append(f"spec.payloads: {size} bytes as JSON, over the "
                            f"{MAX_PAYLOADS_JSON_BYTES} the load test's pod can be given "
                            "(one environment variable holds its request): send fewer or "
                            "smaller sample payloads")
        for field, uri in (("spec.model.uri", spec.model.uri if spec.model else None),
                           ("spec.compiledModelUri", spec.compiledModelUri)):
            parsed = urlparse(uri or "")
            if parsed.scheme == "file" and parsed.netloc:
                problems.append(f"{field}: {uri!r} is a relative path, which means nothing "
                                "inside a pod; use s3://bucket/key or an absolute "
                                "file:///path inside the runtime image")
    return problems


def validate_recommendation_job(name: str, namespace: str | None, spec: Any, *,
                                on_kubernetes: bool = True) -> RecommendationJob:
    """Parse and check a RecommendationJob's spec; raise ``InvalidRecommendationJob``
    listing every problem."""
    parsed = parse_job_spec(name, namespace, spec, RecommendationJobSpec,
                            lambda s: spec_problems(s, on_kubernetes=on_kubernetes),
                            InvalidRecommendationJob)
    return RecommendationJob(apiVersion="kubeinfer.io/v1alpha1", kind="RecommendationJob",
                             metadata=ObjectMeta(name=name, namespace=namespace), spec=parsed)
