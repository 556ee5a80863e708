"""Deployment guardrails with the real kopf operator against the emulator.

A canary rollout moves the variant's traffic in the route ConfigMap through its
steps (blue ``iris-primary`` keeps serving and keeps its old pods), then green
``iris-primary-green`` takes all traffic and blue is removed. The tests play
the Deployment controller (``make_available``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest

from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.route_json import full_table

NS = "guard"
SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.2, namespaces=[],
                            runtime_image="example.test/runtime:1", s3_secret_name=None)


def endpoint(uri: str) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "iris"},
            "spec": {"variants": [{"name": "primary", "replicas": 2,
                                   "model": {"uri": uri}}],
                     "deploymentConfig": {"blueGreen": {"trafficRouting": {
                         "type": "Canary", "waitIntervalInSeconds": 1,
                         "canarySize": {"type": "CapacityPercent", "value": 50}}}}}}


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (kube, _):
        kube.create_namespace(NS)
        yield kube


def weights(kube: Kube) -> dict[str, float]:
    cm = kube.get("ConfigMap", NS, "iris-routes") or {}
    data = next(iter((cm.get("data") or {}).values()), "{}")
    routes = full_table(data).get("endpoints", {}).get("iris", {}).get("variants", [])
    return {v["name"]: v["weight"] for v in routes if v["upstreams"]}


def test_a_canary_rollout_shifts_traffic_in_steps_and_removes_blue(kube: Kube) -> None:
    kube.create(endpoint("s3://m/v1.onnx"), NS)
    wait_for(lambda: kube.get("Deployment", NS, "iris-primary"), what="blue Deployment")
    kube.make_available(NS, "iris-primary")
    kube.make_available(NS, "iris-gateway")
    wait_for(lambda: weights(kube) == {"primary": 1.0}, what="blue routed")
    blue_template = copy.deepcopy(kube.get("Deployment", NS, "iris-primary")["spec"][  # type: ignore[index]
        "template"])
    kube.patch("Endpoint", NS, "iris", {"spec": {"variants": [
        {"name": "primary", "replicas": 2, "model": {"uri": "s3://m/v2.onnx"}}]}})
    wait_for(lambda: kube.get("Deployment", NS, "iris-primary-green"), what="green fleet")
    kube.make_available(NS, "iris-primary-green")
    seen: list[dict[str, float]] = []

    def shifted() -> bool:
        w = weights(kube)
        if not seen or seen[-1] != w:
            seen.append(w)
        return w == {"primary-green": 1.0}

    wait_for(shifted, timeout=15, what="all traffic on green")
    assert {"primary": 0.5, "primary-green": 0.5} in seen
    wait_for(lambda: kube.get("Deployment", NS, "iris-primary") is None, what="blue removed")
    assert kube.get("Deployment", NS, "iris-primary-green")["spec"]["template"] != blue_template  # type: ignore[index]
    # The status patch follows the deletion of blue; on a loaded runner it comes later.
    wait_for(lambda: ((kube.get("Endpoint", NS, "iris") or {}).get("status", {}).get(
        "rollouts") or [{}])[0].get("phase") == "Complete", what="the rollout Complete")


def test_a_green_fleet_past_its_progress_deadline_is_rolled_back_at_once(kube: Kube) -> None:
    """Green's Deployment reports Progressing=False (ProgressDeadlineExceeded: its pods
    never became ready): the rollout is RolledBack (GreenFailed), not left Provisioning
    until maximumExecutionTimeoutInSeconds (8 h by default); blue serves throughout."""
    doc = endpoint("s3://m/v1.onnx")
    doc["metadata"]["name"] = "stuck"
    kube.create(doc, NS)
    wait_for(lambda: kube.get("Deployment", NS, "stuck-primary"), what="blue Deployment")
    kube.make_available(NS, "stuck-primary")
    kube.patch("Endpoint", NS, "stuck", {"spec": {"variants": [
        {"name": "primary", "replicas": 2, "model": {"uri": "s3://m/broken.onnx"}}]}})
    green = wait_for(lambda: kube.get("Deployment", NS, "stuck-primary-green"),
                     what="green fleet")
    r = kube.patch("Deployment", NS, "stuck-primary-green", {"status": {
        "observedGeneration": green["metadata"]["generation"], "replicas": 2,
        "updatedReplicas": 2, "readyReplicas": 0, "availableReplicas": 0,
        "conditions": [{"type": "Progressing", "status": "False",
                        "reason": "ProgressDeadlineExceeded",
                        "message": 'ReplicaSet "stuck-primary-green-5d8" has timed out '
                                   "progressing."}]}}, sub="status")
    assert r.status_code == 200, r.text

    def rolled_back() -> dict[str, Any] | None:
        status = (kube.get("Endpoint", NS, "stuck") or {}).get("status") or {}
        conds = {c["type"]: c for c in status.get("conditions") or []}
        cond = conds.get("RolledBack")
        return cond if cond and cond.get("status") == "True" else None

    cond = wait_for(rolled_back, timeout=15, what="RolledBack")
    assert cond["reason"] == "GreenFailed", cond
    assert "ProgressDeadlineExceeded" in cond["message"], cond
    wait_for(lambda: kube.get("Deployment", NS, "stuck-primary-green") is None,
             what="green removed")
    assert kube.get("Deployment", NS, "stuck-primary") is not None


def test_an_autoscaled_variant_rolls_out_at_its_current_size(kube: Kube) -> None:
    """An autoscaled variant under deploymentConfig: green starts at blue's current
    replicas (what the scaler set, here 3), not the spec's starting count; after the
    rollout the green slot serves with them, and the next rollout goes back to slot
    ``primary`` at the same size (as SageMaker keeps DesiredInstanceCount)."""
    def scaled(uri: str) -> dict[str, Any]:
        doc = endpoint(uri)
        doc["metadata"]["name"] = "auto"
        doc["spec"]["variants"][0]["replicas"] = 1
        doc["spec"]["variants"][0]["autoscaling"] = {
            "minReplicas": 1, "maxReplicas": 5,
            "targetTracking": [{"metric": "InvocationsPerReplica", "target": 600}]}
        return doc

    kube.create(scaled("s3://m/v1.onnx"), NS)
    wait_for(lambda: kube.get("Deployment", NS, "auto-primary"), what="blue Deployment")
    # The scaler scaled blue out to 3 (played here: its decision lands on the Deployment).
    kube.patch("Deployment", NS, "auto-primary", {"spec": {"replicas": 3}})
    kube.make_available(NS, "auto-primary")
    kube.patch("Endpoint", NS, "auto", {"spec": scaled("s3://m/v2.onnx")["spec"]})
    green = wait_for(lambda: kube.get("Deployment", NS, "auto-primary-green"),
                     what="green fleet")
    assert green["spec"]["replicas"] in (2, 3), green["spec"]  # canary 50 %: 2 of 3, then 3

    def green_at_three() -> bool:
        if (kube.get("Deployment", NS, "auto-primary-green") or {})["spec"]["replicas"] == 3:
            return True
        kube.make_available(NS, "auto-primary-green")  # the canary's pods come up
        return False

    wait_for(green_at_three, timeout=15, what="green at blue's 3 replicas")
    kube.make_available(NS, "auto-primary-green")
    wait_for(lambda: kube.get("Deployment", NS, "auto-primary") is None, timeout=20,
             what="blue removed")
    assert (kube.get("Deployment", NS, "auto-primary-green") or {})["spec"]["replicas"] == 3

    # The next rollout goes back to slot primary, still at 3.
    doc = scaled("s3://m/v3.onnx")
    kube.patch("Endpoint", NS, "auto", {"spec": doc["spec"]})
    blue_again = wait_for(lambda: kube.get("Deployment", NS, "auto-primary"),
                          what="the next green, in slot primary")
    assert blue_again["spec"]["replicas"] in (2, 3)
    assert (kube.get("Deployment", NS, "auto-primary-green") or {})["spec"]["replicas"] == 3
