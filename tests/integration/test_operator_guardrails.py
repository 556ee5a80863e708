"""Deployment guardrails with the real kopf operator against the emulator.

A canary rollout moves the variant's traffic in the route ConfigMap through its
steps (blue ``iris-primary`` keeps serving and keeps its old pods), then green
``iris-primary-green`` takes all traffic and blue is removed. The tests play
the Deployment controller (``make_available``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest

from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for

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
    routes = json.loads(data).get("endpoints", {}).get("iris", {}).get("variants", [])
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
