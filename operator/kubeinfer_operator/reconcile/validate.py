"""Semantic validation of an Endpoint before anything is created: PURE.

The CRD schema refuses structural errors at ``kubectl apply`` time, but some
problems only show up when the whole object is considered (weights summing to
0, names that become too long once prefixed, a model URI the runtime cannot
read, a limit below its request). ``validate_endpoint`` finds all of them at
once, so the operator can set ``Ready=False, reason=InvalidSpec`` with one
message naming every field and its fix, and create nothing half-way.

URLs our own processes will call (``spec.async.notification.successUrl`` /
``errorUrl``, ``spec.variants[].autoscaling.prometheusUrl``,
``spec.deploymentConfig.autoRollback.prometheusUrl``) are checked
against the outbound policy (``contract.outbound``): a link-local, cloud
metadata or API-server destination is refused here, naming the field, unless
the allow-list lets it through. (Names that only *resolve* to such addresses
are refused at call time by the guarded connector: no DNS here.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import (
    Endpoint,
    EndpointSpec,
    EndpointType,
    ObjectMeta,
    VariantFleet,
    format_validation_error,
)
from kubeinfer_operator.api.env_policy import env_problems
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.reconcile.promql_scope import (
    prometheus_url_problem,
    scope_problem,
    with_namespace,
)
from kubeinfer_operator.reconcile.quantity import parse_quantity
from kubeinfer_operator.reconcile.rollout import fleet_names
from kubeinfer_operator.reconcile.rollout_alarms import render_query
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.async_plan import WORKER_ENV
from kubeinfer_operator.render.k8s_workloads import RUNTIME_CONTAINER_ENV
from kubeinfer_operator.render.plan import SERVER_ENV, EndpointPlan
from kubeinfer_operator.render.plan_steps import IMAGE_STEP_ENV
from kubeinfer_runtime.contract.outbound import ALLOW_ENV, OutboundPolicy, url_problem

REASON_INVALID_SPEC = "InvalidSpec"

#: Endpoint names become Service names (``<name>-gateway``): DNS-1035 labels,
#: which must start with a letter. 40 characters leave room for the suffixes.
_ENDPOINT_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_ENDPOINT_NAME = 40

#: What local mode sets in each model server (``local.children``, ``local.supervisor``)
#: and async worker (``local.async_local``) besides the plan's env: refused on both
#: backends, so one manifest means the same on a laptop and on a cluster.
LOCAL_SERVER_ENV = frozenset({"KUBEINFER_HOST", "KUBEINFER_MODEL_CACHE_DIR"})
LOCAL_WORKER_ENV = frozenset({"KUBEINFER_DRAIN_TIMEOUT_S"})


def variant_operator_env(asynchronous: bool) -> frozenset[str]:
    """Every name the operator renders into a variant's runtime container (model server,
    or async worker when ``asynchronous``), on either backend: its env may not set them."""
    names = SERVER_ENV | RUNTIME_CONTAINER_ENV | LOCAL_SERVER_ENV
    if asynchronous:
        names |= WORKER_ENV | LOCAL_WORKER_ENV | {ALLOW_ENV}
    return names


def variant_env_problems(path: str, variant: VariantFleet, asynchronous: bool) -> list[str]:
    """The variant's env and its image steps' env entries ``api.env_policy`` refuses."""
    problems = env_problems(((f"{path}.env[{j}].name", e.name) for j, e in enumerate(variant.env)),
                            variant_operator_env(asynchronous))
    for k, step in enumerate(variant.containers or []):
        # An image step runs the user's image: only what the operator renders is refused.
        problems += env_problems(
            ((f"{path}.containers[{k}].env[{j}].name", e.name) for j, e in enumerate(step.env)),
            IMAGE_STEP_ENV, kubeinfer_image=False)
    return problems


def env_spec_problems(spec: EndpointSpec) -> list[str]:
    """Every variant's and shadow variant's refused env (both backends validate with it)."""
    asynchronous = spec.type is EndpointType.ASYNC
    return ([p for i, v in enumerate(spec.variants)
             for p in variant_env_problems(f"spec.variants[{i}]", v, asynchronous)]
            + [p for i, v in enumerate(spec.shadowVariants)
               for p in variant_env_problems(f"spec.shadowVariants[{i}]", v, asynchronous)])


class InvalidSpec(SpecError):
    """The Endpoint cannot be deployed as written; ``problems`` name each field and fix."""

    reason = REASON_INVALID_SPEC

    def __init__(self, endpoint: str, problems: list[str]) -> None:
        self.endpoint = endpoint
        self.problems = problems
        super().__init__(f"Endpoint {endpoint} is invalid: " + "; ".join(problems))


def _clean(problem: str) -> str:
    # Model-level pydantic errors already name their field: "spec: spec.variants..." → once.
    problem = re.sub(r"^spec: (spec\.)", r"\1", problem.strip())
    return problem.rstrip(".")


def _name_problems(name: str) -> list[str]:
    if len(name) > MAX_ENDPOINT_NAME or not _ENDPOINT_NAME.match(name):
        return [f"metadata.name: {name!r} must start with a letter, use only lowercase letters, "
                f"digits and '-', and have at most {MAX_ENDPOINT_NAME} characters; "
                "recreate the Endpoint under such a name"]
    return []


def _uri_problems(path: str, uri: str) -> list[str]:
    """What the runtime would refuse at load time, caught before pods crash-loop."""
    parsed = urlparse(uri)
    location = (parsed.netloc + parsed.path) if parsed.scheme == "file" else parsed.path
    if ".." in location.split("/"):
        return [f"{path}: model URI {uri!r} contains '..'; name the model by a path without "
                "parent-directory segments"]
    if parsed.scheme == "s3" and parsed.path.endswith("/"):
        return [f"{path}: model URI {uri!r} names a prefix, not an object; point it at the "
                "model file, e.g. s3://bucket/models/model.onnx"]
    return []


def _resource_problems(path: str, requests: dict[str, str],
                       limits: dict[str, str]) -> list[str]:
    problems: list[str] = []
    parsed: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    for section, values in (("requests", requests), ("limits", limits)):
        for key, text in values.items():
            value = parse_quantity(text)
            if value is None:
                problems.append(f"{path}.{section}.{key}: {text!r} is not a Kubernetes quantity; "
                                "write it like 500m, 2 or 1Gi")
            else:
                parsed[section][key] = value
    for key, limit in parsed["limits"].items():
        request = parsed["requests"].get(key)
        if request is not None and limit < request:
            problems.append(f"{path}.limits.{key}: {limits[key]} is below the request "
                            f"{requests[key]}; raise the limit or lower the request")
    return problems


def _variant_problems(endpoint: str, index: int, v: VariantFleet,
                      field: str = "variants") -> list[str]:
    """``field``: variants, or shadowVariants (a shadow runs what a variant runs)."""
    path = f"spec.{field}[{index}]"
    problems: list[str] = []
    object_name = meta.variant_object_name(endpoint, v.name)
    if v.name in meta.RESERVED_VARIANT_NAMES:
        problems.append(f"{path}.name: {v.name!r} is reserved for the Endpoint's own "
                        f"{v.name} objects; rename the variant")
    elif len(object_name) > meta.MAX_NAME:
        problems.append(f"{path}.name: {v.name!r} makes the object name {object_name!r} longer "
                        f"than {meta.MAX_NAME} characters; shorten the variant or Endpoint name")
    if v.model is not None:
        problems += _uri_problems(f"{path}.model.uri", v.model.uri)
    for j, step in enumerate(v.containers or []):
        if step.model is not None:
            problems += _uri_problems(f"{path}.containers[{j}].model.uri", step.model.uri)
            if step.model.compile is not None:
                problems.append(f"{path}.containers[{j}].model.compile: only a variant's own "
                                "model compiles before it is served; run a CompilationJob and "
                                "give the step its artifact (model.format: compiled)")
        ports = [c.port or 8081 + k for k, c in enumerate(v.containers or []) if c.image]
        if step.image and ports.count(step.port or 8081 + j) > 1:
            problems.append(f"{path}.containers[{j}].port: {step.port or 8081 + j} is used by "
                            "another image step of the variant; give each image its own port")
    problems += _resource_problems(f"{path}.resources", v.resources.requests,
                                   v.resources.limits)
    return problems


def image_port_problems(plan: EndpointPlan, taken: Mapping[int, str]) -> list[str]:
    """Image steps whose port the runtime container of the same pod listens on (``taken``:
    port -> what it serves). SageMaker's containers default to 8080, which a step may
    well name; both containers would bind it, and the pod would crash-loop (the API
    server only warns of a duplicate port)."""
    problems = []
    for v in plan.variants:
        for j, step in enumerate(v.steps):
            if step.image is not None and step.port is not None and step.port in taken:
                problems.append(
                    f"{plan.field_path(v.name)}.containers[{j}].port: {step.port} is the "
                    f"runtime container's {taken[step.port]} port in the same pod; give the "
                    "image another port (the default is 8081 + the step's index)")
    return problems


def outbound_problems(spec: EndpointSpec, policy: OutboundPolicy) -> list[str]:
    """The spec's outbound URLs the policy refuses, each naming its field (PURE)."""
    urls: list[tuple[str, str | None]] = []
    if spec.async_ is not None:
        notification = spec.async_.notification
        urls += [("spec.async.notification.successUrl", notification.successUrl),
                 ("spec.async.notification.errorUrl", notification.errorUrl)]
    for i, variant in enumerate(spec.variants):
        if variant.autoscaling is not None:
            urls.append((f"spec.variants[{i}].autoscaling.prometheusUrl",
                         variant.autoscaling.prometheusUrl))
    for i, shadow in enumerate(spec.shadowVariants):
        if shadow.autoscaling is not None:
            urls.append((f"spec.shadowVariants[{i}].autoscaling.prometheusUrl",
                         shadow.autoscaling.prometheusUrl))
    if spec.deploymentConfig is not None and spec.deploymentConfig.autoRollback is not None:
        urls.append(("spec.deploymentConfig.autoRollback.prometheusUrl",
                     spec.deploymentConfig.autoRollback.prometheusUrl))
    return [problem for path, url in urls
            if url and (problem := url_problem(url, policy, path)) is not None]


def promql_problems(spec: EndpointSpec, name: str, namespace: str, label: str) -> list[str]:
    """The spec's PromQL that may read outside ``namespace`` (``reconcile.promql_scope``),
    each naming its field (PURE). Alarms are checked as the rollout sends them, with
    each fleet a variant's green can be in ``{variant}``."""
    queries: list[tuple[str, str]] = []
    #: The Prometheus URLs the queries go to, each with its field.
    urls: list[tuple[str, str | None]] = []
    for kind, variants in (("variants", spec.variants), ("shadowVariants", spec.shadowVariants)):
        for i, variant in enumerate(variants):
            if variant.autoscaling is None:
                continue
            scaling = variant.autoscaling
            urls.append((f"spec.{kind}[{i}].autoscaling.prometheusUrl", scaling.prometheusUrl))
            for group, policies in (("targetTracking", scaling.targetTracking),
                                    ("stepScaling", scaling.stepScaling)):
                for j, policy in enumerate(policies):
                    if policy.query is not None:
                        queries.append((f"spec.{kind}[{i}].autoscaling.{group}[{j}].query",
                                        with_namespace(policy.query, namespace)))
    config = spec.deploymentConfig
    if config is not None and config.autoRollback is not None:
        urls.append(("spec.deploymentConfig.autoRollback.prometheusUrl",
                     config.autoRollback.prometheusUrl))
    for i, alarm in enumerate(config.alarms if config is not None else []):
        if alarm.promQL is None:
            continue
        for variant in spec.variants:
            for fleet in fleet_names(variant.name):  # green is either slot in turn
                queries.append((f"spec.deploymentConfig.autoRollback.alarms[{i}].promQL.query",
                                render_query(alarm.promQL.query, name, fleet, namespace)))
    problems = [problem for field, url in urls if url is not None
                and (problem := prometheus_url_problem(url, label, field)) is not None]
    return list(dict.fromkeys(problems + [
        problem for field, query in queries
        if (problem := scope_problem(query, namespace, label, field)) is not None]))


def _green_name_problems(endpoint: str, spec: EndpointSpec) -> list[str]:
    """Under a deploymentConfig each variant also runs as its green fleet, whose Service
    ``<endpoint>-<variant>-green`` must be a DNS label too (63 characters at most)."""
    problems = []
    for i, v in enumerate(spec.variants):
        green = meta.variant_object_name(endpoint, fleet_names(v.name)[1])
        if len(green) > meta.MAX_NAME and v.name not in meta.RESERVED_VARIANT_NAMES \
                and len(meta.variant_object_name(endpoint, v.name)) <= meta.MAX_NAME:
            problems.append(f"spec.variants[{i}].name: under deploymentConfig {v.name!r} "
                            f"also runs as the green fleet {green!r}, longer than "
                            f"{meta.MAX_NAME} characters; shorten the variant or Endpoint "
                            "name")
    return problems


def validate_endpoint(name: str, namespace: str, spec: Any, *,
                      outbound: OutboundPolicy | None = None,
                      promql_label: str = "") -> Endpoint:
    """Parse and check an Endpoint's spec; raise ``InvalidSpec`` listing every problem.

    ``outbound``: the policy spec URLs must obey (default: no allow-list).
    ``promql_label``: the label every PromQL selector must pin to ``namespace``
    (``reconcile.promql_scope``; empty: not checked, as in local mode).
    """
    qualified = f"{namespace}/{name}"
    problems = _name_problems(name)
    try:
        parsed = EndpointSpec.model_validate(spec)
    except ValidationError as exc:
        problems += [_clean(p) for p in format_validation_error(exc, "spec").splitlines()]
        raise InvalidSpec(qualified, problems) from exc
    for i, variant in enumerate(parsed.variants):
        problems += _variant_problems(name, i, variant)
    for i, shadow in enumerate(parsed.shadowVariants):
        problems += _variant_problems(name, i, shadow, "shadowVariants")
    if parsed.deploymentConfig is not None:
        problems += _green_name_problems(name, parsed)
    problems += env_spec_problems(parsed)
    problems += outbound_problems(parsed, outbound if outbound is not None
                                  else OutboundPolicy.parse())
    problems += promql_problems(parsed, name, namespace, promql_label)
    if problems:
        raise InvalidSpec(qualified, [_clean(p) for p in problems])
    # The name passed _name_problems, so ObjectMeta's own pattern accepts it.
    return Endpoint(apiVersion="kubeinfer.io/v1alpha1", kind="Endpoint",
                    metadata=ObjectMeta(name=name, namespace=namespace), spec=parsed)


def capture_cluster_problems(destination: str) -> list[str]:
    """On Kubernetes, ``spec.dataCapture.destination`` (as written) must be s3://: a file://
    folder would be inside the gateway's pod, lost with it."""
    if not destination or destination.startswith("s3://"):
        return []
    return [f"spec.dataCapture.destination: {destination} is a folder inside the gateway's "
            "pod on Kubernetes, lost when the pod goes; use s3://bucket/prefix (file:// is "
            "for local mode)"]
