"""Semantic validation: every problem found at once, named by field, with the fix."""

from __future__ import annotations

import copy
import re
from decimal import Decimal
from typing import Any

import pytest

from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.reconcile.quantity import parse_quantity
from kubeinfer_operator.reconcile.validate import InvalidSpec, validate_endpoint
from kubeinfer_runtime.contract.outbound import OutboundPolicy

SPEC: dict[str, Any] = {
    "variants": [
        {"name": "primary", "weight": 0.9, "model": {"uri": "s3://models/iris.onnx"},
         "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                       "limits": {"memory": "512Mi"}}},
        {"name": "canary", "weight": 0.1, "model": {"uri": "file://models/iris-v2.onnx"}},
    ],
}


def _spec(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(SPEC)
    for index, patch in changes.items():
        spec["variants"][int(index.removeprefix("v"))].update(patch)
    return spec


def _problems(spec: Any, name: str = "iris") -> list[str]:
    with pytest.raises(InvalidSpec) as info:
        validate_endpoint(name, "ml", spec)
    assert isinstance(info.value, SpecError)
    assert info.value.reason == "InvalidSpec"
    return info.value.problems


def test_valid_spec_parses_with_defaults() -> None:
    endpoint = validate_endpoint("iris", "ml", SPEC)
    assert endpoint.metadata.name == "iris"
    assert endpoint.metadata.namespace == "ml"
    assert [v.replicas for v in endpoint.spec.variants] == [1, 1]
    # Relative file:// URIs are fine on Kubernetes: the runtime resolves them.
    assert endpoint.spec.variants[1].model.uri == "file://models/iris-v2.onnx"


def test_all_weights_zero() -> None:
    problems = _problems(_spec(v0={"weight": 0}, v1={"weight": 0}))
    assert problems == ["spec.variants[*].weight: all weights are 0; give at least one "
                        "variant a weight above 0"]


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://models", "must look like s3://bucket/path/to/model.onnx"),
    ("http://example.com/m.onnx", "unsupported scheme 'http'"),
    ("s3://models/iris/", "names a prefix, not an object"),
    ("file:///models/../etc/passwd", "contains '..'"),
])
def test_unreadable_model_uris(uri: str, expected: str) -> None:
    problems = _problems(_spec(v1={"model": {"uri": uri}}))
    assert len(problems) == 1
    assert problems[0].startswith("spec.variants[1].model.uri: ")
    assert expected in problems[0]


@pytest.mark.parametrize("name", ["1iris", "Iris", "iris_", "a" * 41])
def test_endpoint_names_that_cannot_become_service_names(name: str) -> None:
    (problem,) = _problems(SPEC, name=name)
    assert problem.startswith("metadata.name: ")
    assert "start with a letter" in problem


def test_variant_name_reserved_for_the_gateway() -> None:
    (problem,) = _problems(_spec(v1={"name": "gateway"}))
    assert problem.startswith("spec.variants[1].name: 'gateway' is reserved")


def test_variant_name_too_long_once_prefixed() -> None:
    name = "e" * 30
    (problem,) = _problems(_spec(v1={"name": "v" * 33}), name=name)
    assert problem.startswith("spec.variants[1].name: ")
    assert "longer than 63 characters; shorten the variant or Endpoint name" in problem
    # 30 + 1 + 32 = 63 is fine.
    validate_endpoint(name, "ml", _spec(v1={"name": "v" * 32}))


def test_resources_must_be_quantities_and_limits_at_least_requests() -> None:
    problems = _problems(_spec(v0={"resources": {
        "requests": {"cpu": "1kM", "memory": "1Gi"}, "limits": {"memory": "512Mi"}}}))
    assert problems == [
        "spec.variants[0].resources.requests.cpu: '1kM' is not a Kubernetes quantity; "
        "write it like 500m, 2 or 1Gi",
        "spec.variants[0].resources.limits.memory: 512Mi is below the request 1Gi; "
        "raise the limit or lower the request",
    ]


def test_env_the_operator_owns() -> None:
    (problem,) = _problems(_spec(v0={"env": [{"name": "OK", "value": "1"},
                                            {"name": "KUBEINFER_PORT", "value": "1"}]}))
    assert problem == ("spec.variants[0].env[1].name: KUBEINFER_PORT is set by the operator; "
                       "remove it from the spec")


def test_structural_problems_name_their_field() -> None:
    problems = _problems({"variants": [{"name": "a", "model": {"uri": "s3://b/k"},
                                        "replicas": 0, "typo": 1}]})
    assert "spec.variants[0].replicas: Input should be greater than or equal to 1" in problems
    assert ("spec.variants[0].typo: unknown field (check spelling and indentation)"
            in problems)


def test_every_problem_is_reported_at_once_in_kubernetes_style() -> None:
    spec = _spec(v0={"name": "gateway", "model": {"uri": "s3://b/p/"}})
    with pytest.raises(InvalidSpec) as info:
        validate_endpoint("iris", "ml", spec)
    assert len(info.value.problems) == 2
    message = str(info.value)
    assert message.startswith("Endpoint ml/iris is invalid: spec.variants[0].name: ")
    assert "; spec.variants[0].model.uri: " in message
    assert not message.endswith(".")
    assert all(not p.endswith(".") for p in info.value.problems)


def test_missing_spec() -> None:
    problems = _problems(None)
    assert problems and all(re.match(r"^spec\b", p) for p in problems)


ASYNC_SPEC: dict[str, Any] = {
    "type": "Async",
    "async": {"outputPath": "s3://bucket/out",
              "notification": {"successUrl": "https://hooks.example.com/ok",
                               "errorUrl": "http://169.254.169.254/latest/meta-data/"}},
    "variants": [{"name": "main", "model": {"uri": "s3://models/iris.onnx"}}],
}
API_PROMETHEUS = ("https://kubernetes.default.svc.cluster.local/api/v1/namespaces/monitoring/"
                  "services/prometheus:9090/proxy")
FIX = ("outbound calls may not reach link-local or API-server addresses: use another URL, "
       "or allow it with the chart's security.outboundAllowList (KUBEINFER_OUTBOUND_ALLOW)")


def test_notification_url_at_the_metadata_service_names_the_field() -> None:
    (problem,) = _problems(ASYNC_SPEC)
    assert problem == ("spec.async.notification.errorUrl: "
                       "'http://169.254.169.254/latest/meta-data/' points at the cloud metadata "
                       f"service (169.254.169.254); {FIX}")


def test_notification_url_in_another_spelling_is_refused_too() -> None:
    spec = copy.deepcopy(ASYNC_SPEC)
    spec["async"]["notification"] = {"successUrl": "http://[::ffff:a9fe:a9fe]/x",
                                     "errorUrl": "https://hooks.example.com/error"}
    (problem,) = _problems(spec)
    assert problem.startswith("spec.async.notification.successUrl: 'http://[::ffff:a9fe:a9fe]/x'"
                              " points at the cloud metadata service")


def test_prometheus_url_at_the_api_server_names_the_field() -> None:
    spec = _spec(v1={"autoscaling": {"maxReplicas": 3, "prometheusUrl": API_PROMETHEUS}})
    (problem,) = _problems(spec)
    assert problem == (f"spec.variants[1].autoscaling.prometheusUrl: {API_PROMETHEUS!r} points "
                       "at the Kubernetes API server (kubernetes.default.svc.cluster.local); "
                       f"{FIX}")


def test_outbound_urls_pass_with_an_allow_list() -> None:
    allow = OutboundPolicy.parse("169.254.169.254/32,kubernetes.default.svc.cluster.local",
                                 env={})
    endpoint = validate_endpoint("iris", "ml", ASYNC_SPEC, outbound=allow)
    assert endpoint.spec.async_ is not None
    spec = _spec(v1={"autoscaling": {"maxReplicas": 3, "prometheusUrl": API_PROMETHEUS}})
    validate_endpoint("iris", "ml", spec, outbound=allow)
    # An allow-list for one destination leaves the others refused.
    only_metadata = OutboundPolicy.parse("169.254.169.254", env={})
    with pytest.raises(InvalidSpec, match=r"spec\.variants\[1\]\.autoscaling\.prometheusUrl"):
        validate_endpoint("iris", "ml", spec, outbound=only_metadata)


def test_ordinary_outbound_urls_pass() -> None:
    spec = copy.deepcopy(ASYNC_SPEC)
    spec["async"]["notification"]["errorUrl"] = "http://hooks.default.svc:8080/error"
    validate_endpoint("iris", "ml", spec)
    validate_endpoint("iris", "ml", _spec(v0={"autoscaling": {
        "maxReplicas": 3, "prometheusUrl": "http://prometheus.monitoring.svc:9090"}}))


@pytest.mark.parametrize(("text", "value"), [
    ("500m", Decimal("0.5")), ("2", Decimal(2)), ("1Gi", Decimal(2**30)),
    ("1.5G", Decimal("1.5e9")), ("1e3", Decimal(1000)), ("100Ki", Decimal(102400)),
    ("0.1", Decimal("0.1")), ("1E", Decimal(10**18)),
])
def test_quantities(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "1kM", "Gi", "1..2", "1 Gi", "one", "1gi"])
def test_not_quantities(text: str) -> None:
    assert parse_quantity(text) is None


def test_an_image_step_may_not_take_the_runtime_containers_port() -> None:
    """SageMaker's containers default to 8080, the runtime container's port in the same
    pod: both would bind it and the pod would crash-loop (the API server only warns)."""
    from kubeinfer_operator.reconcile.validate import image_port_problems
    from kubeinfer_operator.render.plan import plan_endpoint

    spec = {"variants": [{"name": "pipe", "containers": [
        {"name": "pre", "handler": "pre:handle"},
        {"name": "model", "image": "example.test/xgb:1", "port": 8080},
        {"name": "post", "image": "example.test/post:1"}]}]}
    endpoint = validate_endpoint("e", "ns", spec)
    plan = plan_endpoint(endpoint, generation=1)
    taken = {8080: "serving", 9090: "metrics"}
    assert image_port_problems(plan, taken) == [
        "spec.variants[0].containers[1].port: 8080 is the runtime container's serving port "
        "in the same pod; give the image another port (the default is 8081 + the step's "
        "index)"]
    spec["variants"][0]["containers"][1]["port"] = 8090  # type: ignore[index]
    fine = plan_endpoint(validate_endpoint("e", "ns", spec), generation=1)
    assert image_port_problems(fine, taken) == []
