"""Semantic validation of an EdgeFleet before anything runs: PURE.

The CRD schema refuses structural errors at ``kubectl apply`` time; this finds
what needs the whole object or the cluster: a name its objects cannot extend,
resource quantities, model URIs the packager would refuse, and what a pod
cannot reach (a ``file://`` packages prefix is private to the package Job's pod,
gone with it; a relative ``file://`` path means nothing there). Every problem at
once, each naming its field and the fix.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from kubeinfer_operator.api.edge_fleet import EdgeFleet, EdgeFleetSpec
from kubeinfer_operator.api.endpoint import ObjectMeta
from kubeinfer_operator.reconcile.edge_status import REASON_INVALID_SPEC
from kubeinfer_operator.reconcile.job_validate import InvalidJob, parse_job_spec
from kubeinfer_operator.reconcile.validate import _resource_problems, _uri_problems


class InvalidEdgeFleet(InvalidJob):
    """The EdgeFleet cannot run as written; ``problems`` name each field and fix."""

    reason = REASON_INVALID_SPEC
    kind = "EdgeFleet"


def spec_problems(spec: EdgeFleetSpec) -> list[str]:
    problems = _resource_problems("spec.server.resources", spec.server.resources.requests,
                                  spec.server.resources.limits)
    problems += _uri_problems("spec.model.uri", spec.model.uri)
    model = urlparse(spec.model.uri)
    if model.scheme == "file" and model.netloc:
        problems.append(f"spec.model.uri: {spec.model.uri!r} is a relative path, which means "
                        "nothing inside a pod; use s3://bucket/key")
    if urlparse(spec.packages.uri).scheme != "s3":
        problems.append(f"spec.packages.uri: {spec.packages.uri!r} is a path inside the "
                        "package Job's pod, gone with the pod and out of the fleet server's "
                        "reach; use s3://bucket/prefix")
    capture = spec.dataCapture
    if capture.samplingPercentage > 0 and not capture.destination:
        problems.append("spec.dataCapture.destination: empty while samplingPercentage is "
                        f"{capture.samplingPercentage:g}; set s3://bucket/prefix, or set "
                        "samplingPercentage to 0")
    elif capture.destination and urlparse(capture.destination).scheme != "s3":
        problems.append(f"spec.dataCapture.destination: {capture.destination!r} is a path "
                        "inside one fleet server pod; use s3://bucket/prefix")
    return problems


def validate_edge_fleet(name: str, namespace: str | None, spec: Any) -> EdgeFleet:
    """Parse and check an EdgeFleet's spec; raise ``InvalidEdgeFleet`` listing every
    problem."""
    parsed = parse_job_spec(name, namespace, spec, EdgeFleetSpec, spec_problems,
                            InvalidEdgeFleet)
    return EdgeFleet(apiVersion="kubeinfer.io/v1alpha1", kind="EdgeFleet",
                     metadata=ObjectMeta(name=name, namespace=namespace), spec=parsed)
