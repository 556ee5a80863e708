"""Auto scaling across a wall-clock step (NTP, VM resume): cooldowns and the
stabilization window run on the monotonic clock, schedules on the wall clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.autoscale import (
    Metric,
    Policy,
    ScaleState,
    TargetTracking,
    decide,
)
from kubeinfer_operator.reconcile.autoscale_metrics import GatewayView
from kubeinfer_operator.reconcile.cluster_scaling import ScalerMemory
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint

IPR = Metric.INVOCATIONS_PER_REPLICA.value
NOW = datetime(2026, 11, 18, 12, 0, 0, tzinfo=UTC)
POLICY = Policy(min_replicas=1, max_replicas=10,
                target_tracking=(TargetTracking(Metric.INVOCATIONS_PER_REPLICA, 100.0),),
                scale_in_cooldown_s=300.0, scale_out_cooldown_s=60.0)


def test_scale_out_cooldown_ends_on_the_monotonic_clock_after_a_step_back() -> None:
    d = decide(POLICY, 1, {IPR: 200.0}, ScaleState(), NOW, t=1000.0)
    assert d.desired == 2
    # 61 s later on the monotonic clock, but NTP stepped the wall clock back an hour.
    stepped = NOW - timedelta(hours=1) + timedelta(seconds=61)
    d = decide(POLICY, 2, {IPR: 200.0}, d.state, stepped, t=1061.0)
    assert d.desired == 4, d.reason


def test_scale_in_cooldown_is_not_skipped_by_a_step_forward() -> None:
    d = decide(POLICY, 1, {IPR: 500.0}, ScaleState(), NOW, t=0.0)
    assert d.desired == 5
    # 10 s later (monotonic) the wall clock jumped a day ahead: still inside the cooldown.
    d = decide(POLICY, 5, {IPR: 10.0}, d.state, NOW + timedelta(days=1), t=10.0)
    assert d.desired == 5 and "cooldown" in d.reason


def plan() -> EndpointPlan:
    return plan_endpoint(Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "ep"},
        "spec": {"variants": [{"name": "main", "model": {"uri": "s3://b/m.onnx"},
                               "autoscaling": {"minReplicas": 1, "maxReplicas": 10,
                                               "scaleOutCooldown": 60,
                                               "targetTracking": [{
                                                   "metric": "InvocationsPerReplica",
                                                   "target": 60}]}}]}}))


def view(count: float) -> dict[str, GatewayView | None]:
    return {"http://10.0.0.1:8080": GatewayView(invocations={"main": count}, held={},
                                                in_flight=0.0)}


def test_cluster_scaler_scales_out_again_after_the_wall_clock_steps_back() -> None:
    """The operator's memory: a scale-out, then NTP steps the node's clock back an hour;
    a minute later (monotonic) the load still wants more replicas and gets them."""
    memory, p = ScalerMemory(), plan()
    assert memory.decide_scraped(p, "ml", {"main": 1}, view(0), {}, now=NOW, now_m=0.0) == []
    # 120 invocations a minute on one replica (target 60): scale out to 2.
    [out] = memory.decide_scraped(p, "ml", {"main": 1}, view(60), {},
                                  now=NOW + timedelta(seconds=30), now_m=30.0)
    assert "Scaled out from 1 to 2" in out
    back = NOW - timedelta(hours=1)
    [again] = memory.decide_scraped(p, "ml", {"main": 2}, view(300), {},
                                    now=back + timedelta(seconds=95), now_m=95.0)
    assert "Scaled out from 2 to" in again, again
