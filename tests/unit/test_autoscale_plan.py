"""Serverless / auto scaling specs: validation, the plan, and local mode's metric window."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error
from kubeinfer_operator.local.scaler import keep_scaled_replicas
from kubeinfer_operator.reconcile.autoscale import Metric
from kubeinfer_operator.reconcile.autoscale_metrics import (
    MetricWindow,
    parse_cpu_seconds,
    parse_gateway_metrics,
)
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_runtime.contract import SERVERLESS_MAX_PAYLOAD_BYTES


def endpoint(spec: dict[str, Any]) -> Endpoint:
    variant = {"name": "main", "model": {"uri": "file:///m.onnx"}}
    spec = {"variants": [variant], **spec}
    if "autoscaling" in spec:
        variant["autoscaling"] = spec.pop("autoscaling")
    return Endpoint.model_validate({"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                                    "metadata": {"name": "ep"}, "spec": spec})


def problems(spec: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        endpoint(spec)
    return format_validation_error(info.value)


def test_serverless_plan_and_route() -> None:
    plan = plan_endpoint(endpoint({"type": "Serverless", "serverless": {
        "memory": "3Gi", "maxConcurrency": 5, "provisionedConcurrency": 1,
        "idleTimeout": 30}}))
    [variant] = plan.variants
    assert variant.replicas == 1  # the provisioned ones; spec replicas do not apply
    assert ("memory", "3Gi") in variant.requests and ("memory", "3Gi") in variant.limits
    route = plan.route_table({}).endpoints["ep"]
    assert route.type == "Serverless" and route.max_payload_bytes == SERVERLESS_MAX_PAYLOAD_BYTES
    assert route.serverless is not None and route.serverless.max_concurrency == 5
    assert plan.serverless_policy is not None and plan.serverless_policy.idle_timeout_s == 30
    # Defaults: scale to zero.
    plan = plan_endpoint(endpoint({"type": "Serverless"}))
    assert plan.variants[0].replicas == 0 and plan.serverless is not None
    assert plan_endpoint(endpoint({})).route_table({}).endpoints["ep"].serverless is None


def test_autoscaling_plan() -> None:
    plan = plan_endpoint(endpoint({"autoscaling": {
        "minReplicas": 2, "maxReplicas": 4, "scaleInCooldown": 10,
        "targetTracking": [{"metric": "InvocationsPerReplica", "target": 50}],
        "stepScaling": [{"metric": "Custom", "query": "sum(x)",
                         "steps": [{"lowerBound": 5, "change": 2}]}],
        "prometheusUrl": "http://prom:9090",
        "scheduled": [{"cron": "0 9 * * *", "minReplicas": 3, "maxReplicas": 4}]}}))
    [variant] = plan.variants
    assert variant.replicas == 2  # spec replicas 1 raised to minReplicas
    policy = variant.autoscaling
    assert policy is not None and policy.scale_in_cooldown_s == 10
    assert policy.metric_keys() == {Metric.INVOCATIONS_PER_REPLICA.value, "custom:sum(x)"}
    # Policy changes never restart model servers.
    other = plan_endpoint(endpoint({"autoscaling": {"maxReplicas": 9}})).variants[0]
    assert other.server_hash == variant.server_hash


def test_invalid_specs_name_the_field() -> None:
    assert "spec.serverless applies to type Serverless only" in problems(
        {"serverless": {"maxConcurrency": 3}})
    assert "provisionedConcurrency 5 exceeds maxConcurrency 2" in problems(
        {"type": "Serverless", "serverless": {"maxConcurrency": 2,
                                              "provisionedConcurrency": 5}})
    assert "spec.serverless.memory" in problems({"type": "Serverless",
                                                 "serverless": {"memory": "512Mi"}})
    assert "minReplicas 5 exceeds maxReplicas 2" in problems(
        {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}})
    assert "set query exactly when metric is Custom" in problems(
        {"autoscaling": {"maxReplicas": 2, "targetTracking": [{"metric": "Custom",
                                                                "target": 1}]}})
    assert "needs prometheusUrl" in problems(
        {"autoscaling": {"maxReplicas": 2, "targetTracking": [
            {"metric": "Custom", "query": "x", "target": 1}]}})
    assert "cron minute '99' is outside 0-59" in problems(
        {"autoscaling": {"maxReplicas": 2, "scheduled": [
            {"cron": "99 * * * *", "minReplicas": 1, "maxReplicas": 2}]}})


def test_a_new_spec_keeps_scaled_replicas() -> None:
    old = plan_endpoint(endpoint({"autoscaling": {"minReplicas": 1, "maxReplicas": 8}}))
    old = old.__class__(**{**old.__dict__, "variants": (
        old.variants[0].__class__(**{**old.variants[0].__dict__, "replicas": 6}),)})
    new = plan_endpoint(endpoint({"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}))
    assert keep_scaled_replicas(old, new).variants[0].replicas == 4  # clamped to the new max
    assert keep_scaled_replicas(None, new) is new


def test_metric_window_rates() -> None:
    w = MetricWindow(window_s=10)
    assert w.invocations_per_replica_per_minute(1) is None
    w.add(0.0, 100.0, {"a": 1.0})
    # A burst in the first second is not a rate yet: under half a window of data.
    w.add(1.0, 130.0, {"a": 1.5})
    assert w.invocations_per_replica_per_minute(1) is None and w.cpu_percent(1) is None
    w.add(5.0, 150.0, {"a": 2.0})
    assert w.invocations_per_replica_per_minute(2) == pytest.approx(300.0)  # 10/s * 60 / 2
    assert w.cpu_percent(1) == pytest.approx(20.0)
    # A replica that restarts (counter reset) or appears adds only positive deltas.
    w.add(10.0, 150.0, {"a": 0.1, "b": 5.0})
    w.add(15.0, 150.0, {"a": 0.6, "b": 5.5})
    # The window now spans 5..15 s: no invocations; CPU: the reset of "a" and
    # the first sight of "b" add nothing, then 0.5 + 0.5 s over 10 s, 2 replicas.
    assert w.invocations_per_replica_per_minute(1) == 0.0
    assert w.cpu_percent(2) == pytest.approx(5.0)


def test_parse_metrics() -> None:
    text = ('kubeinfer_gateway_invocations_total{endpoint="ep",variant="main"} 7.0\n'
            'kubeinfer_gateway_invocations_total{endpoint="other",variant="main"} 99.0\n'
            'kubeinfer_gateway_held_requests{endpoint="ep",variant="main"} 2.0\n'
            'kubeinfer_gateway_in_flight_requests{endpoint="ep"} 3.0\n')
    view = parse_gateway_metrics(text, "ep")
    assert (view.invocations, view.held, view.in_flight) == ({"main": 7.0}, {"main": 2.0}, 3.0)
    assert parse_cpu_seconds("process_cpu_seconds_total 1.5\n") == 1.5
    assert parse_cpu_seconds("") is None
