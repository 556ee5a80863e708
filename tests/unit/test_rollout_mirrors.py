"""``render.rollout.expand_plan``: fleets, the disagreement alarm's mirrors, shadows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubeinfer_operator.api.deployment_config import DeploymentConfig
from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile import rollout as ro
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.render.rollout import expand_plan

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def endpoint(alarm: dict[str, object]) -> Endpoint:
    return Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
        "metadata": {"name": "ep", "namespace": "ns", "generation": 3},
        "spec": {
            "variants": [{"name": "a", "model": {"uri": "s3://m/b.onnx"}, "replicas": 2}],
            "shadowVariants": [{"name": "s", "model": {"uri": "s3://m/s.onnx"},
                                "samplingPercentage": 30}],
            "deploymentConfig": {
                "blueGreen": {"trafficRouting": {
                    "type": "Canary", "waitIntervalInSeconds": 10,
                    "canarySize": {"type": "CapacityPercent", "value": 50}}},
                "autoRollback": {"alarms": [alarm]}}}})


def baking(cfg: DeploymentConfig, new_hash: str) -> dict[str, ro.Decision]:
    fleets = {"a": ro.Fleet("h-old", 2)}
    first = ro.decide(variant="a", config=cfg, replicas=2, desired_hash=new_hash,
                      previous=None, fleets=fleets, now=T0)
    fleets["a-green"] = ro.Fleet(new_hash, 2)
    second = ro.decide(variant="a", config=cfg, replicas=2, desired_hash=new_hash,
                       previous=first.state, fleets=fleets, now=T0 + timedelta(seconds=1))
    assert second.state is not None and second.state.phase is ro.Phase.BAKING
    return {"a": second}


def test_expand_plan_mirrors_blue_and_green_while_a_disagreement_alarm_bakes() -> None:
    ep = endpoint({"name": "d", "disagreement": 0.02, "mirrorSamplingPercentage": 40})
    cfg = ep.spec.deploymentConfig
    assert cfg is not None
    plan = plan_endpoint(ep)
    a = plan.variant("a")
    assert a is not None
    fleets = expand_plan(plan, baking(cfg, a.server_hash), cfg)
    names = [v.name for v in fleets.variants]
    assert names == ["a", "a-green", "s"]  # the shadow passes through, never split
    shadow = fleets.variant("s")
    assert shadow is not None and shadow == plan.variant("s")
    assert {(m.source, m.peer, m.sampling_percentage) for m in fleets.mirrors} == {
        ("a", "a-green", 40.0), ("a-green", "a", 40.0)}
    route = fleets.route_table({"a": ["http://a"], "a-green": ["http://g"],
                                "s": ["http://s"]}).endpoints["ep"]
    assert [(m.source, m.peer) for m in route.mirrors] == [("a", "a-green"), ("a-green", "a")]
    assert [v.name for v in route.variants] == ["a", "a-green"]
    assert [s.name for s in route.shadows] == ["s"]
    # Without a disagreement alarm (or without the config), no copies.
    err = endpoint({"name": "e", "errorRate": 0.1})
    assert err.spec.deploymentConfig is not None
    assert expand_plan(plan, baking(err.spec.deploymentConfig, a.server_hash),
                       err.spec.deploymentConfig).mirrors == ()
    assert expand_plan(plan, baking(cfg, a.server_hash)).mirrors == ()


def test_expand_plan_without_a_rollout_leaves_the_plan_as_it_was() -> None:
    ep = endpoint({"name": "d", "disagreement": 0.02})
    plan = plan_endpoint(ep)
    assert expand_plan(plan, {}, ep.spec.deploymentConfig) == plan
