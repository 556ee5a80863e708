"""Shadow variants on the emulator: the real kopf operator renders them and fills
``status.shadow`` from the gateway pods' metrics.

The gateway pods are one small local HTTP server (found through
``ClusterScaler.gateway_pods``, patched before the operator starts, as in
``test_operator_guardrails_alarms``) serving the shadow comparison counters a
gateway exports for ``iris``: 200 copies sent to ``candidate``, 180 pairs
compared of which 171 agreed, 3 shadow errors, each side's latency histogram.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubeinfer_operator.scaling import cluster
from kubeinfer_operator.settings import OperatorSettings
from tests.integration.test_operator_guardrails_alarms import FakeGatewayPod
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.kube_schema import schema_errors
from tests.support.route_json import full_table

NS = "shadow"
SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.2, namespaces=[],
                            runtime_image="example.test/runtime:1", s3_secret_name=None)
LABELS = 'endpoint="iris",variant="primary",peer="candidate"'
SHADOW_METRICS = f"""\
# TYPE kubeinfer_shadow_copies counter
kubeinfer_shadow_copies_total{{{LABELS},result="sent"}} 200
kubeinfer_shadow_copies_total{{{LABELS},result="dropped"}} 4
# TYPE kubeinfer_shadow_compared counter
kubeinfer_shadow_compared_total{{{LABELS}}} 180
# TYPE kubeinfer_shadow_agreed counter
kubeinfer_shadow_agreed_total{{{LABELS}}} 171
# TYPE kubeinfer_shadow_disagreed counter
kubeinfer_shadow_disagreed_total{{{LABELS}}} 9
# TYPE kubeinfer_shadow_errors counter
kubeinfer_shadow_errors_total{{{LABELS},side="peer"}} 3
# TYPE kubeinfer_shadow_latency_seconds histogram
kubeinfer_shadow_latency_seconds_bucket{{{LABELS},side="production",le="0.01"}} 200
kubeinfer_shadow_latency_seconds_bucket{{{LABELS},side="production",le="+Inf"}} 200
kubeinfer_shadow_latency_seconds_count{{{LABELS},side="production"}} 200
kubeinfer_shadow_latency_seconds_sum{{{LABELS},side="production"}} 1
kubeinfer_shadow_latency_seconds_bucket{{{LABELS},side="peer",le="0.01"}} 0
kubeinfer_shadow_latency_seconds_bucket{{{LABELS},side="peer",le="0.1"}} 200
kubeinfer_shadow_latency_seconds_bucket{{{LABELS},side="peer",le="+Inf"}} 200
kubeinfer_shadow_latency_seconds_count{{{LABELS},side="peer"}} 200
kubeinfer_shadow_latency_seconds_sum{{{LABELS},side="peer"}} 10
"""
API = {"Deployment": "apps/v1", "Service": "v1", "ConfigMap": "v1",
       "NetworkPolicy": "networking.k8s.io/v1", "PodDisruptionBudget": "policy/v1"}


class ShadowGatewayPod(FakeGatewayPod):
    def metrics(self) -> str:
        return SHADOW_METRICS


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with ShadowGatewayPod() as pod:
        async def discover(*_: Any) -> list[str]:
            return [pod.url]

        patch = pytest.MonkeyPatch()
        patch.setattr(cluster.ClusterScaler, "gateway_pods", discover)
        try:
            with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (client, _):
                client.create_namespace(NS)
                yield client
        finally:
            patch.undo()


ENDPOINT: dict[str, Any] = {
    "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "iris"},
    "spec": {"variants": [{"name": "primary", "replicas": 2,
                           "model": {"uri": "s3://m/v1.onnx"}}],
             "shadowVariants": [{"name": "candidate", "samplingPercentage": 25,
                                 "timeoutSeconds": 3, "replicas": 1,
                                 "model": {"uri": "s3://m/v2.onnx"}}]}}


def route(kube: Kube) -> dict[str, Any]:
    cm = kube.get("ConfigMap", NS, "iris-routes") or {}
    data = next(iter((cm.get("data") or {}).values()), "{}")
    found: dict[str, Any] = full_table(data).get("endpoints", {}).get("iris", {})
    return found


def test_a_shadow_variant_renders_routes_and_fills_status(kube: Kube) -> None:
    assert kube.create(ENDPOINT, NS).status_code == 201
    wait_for(lambda: kube.get("Deployment", NS, "iris-candidate"), what="shadow Deployment")
    for name in ("iris-primary", "iris-candidate", "iris-gateway"):
        kube.make_available(NS, name)
    wait_for(lambda: [s["name"] for s in route(kube).get("shadows", [])] == ["candidate"]
             and all(s["upstreams"] for s in route(kube)["shadows"]), what="shadow routed")
    r = route(kube)
    # The shadow gets its sampled copies, never a share of the weights.
    assert [(v["name"], v["weight"]) for v in r["variants"]] == [("primary", 1.0)]
    [shadow] = r["shadows"]
    assert shadow["sampling_percentage"] == 25 and shadow["timeout_s"] == 3
    assert kube.get("Service", NS, "iris-candidate") is not None
    dep = kube.get("Deployment", NS, "iris-candidate")
    assert dep is not None and dep["spec"]["replicas"] == 1
    # Every manifest the operator wrote is valid against Kubernetes' strict schema.
    checked = 0
    for kind, api in API.items():
        for obj in kube.list(kind, NS):
            if kind == "ConfigMap" and obj["metadata"]["name"] == "kube-root-ca.crt":
                continue
            obj = {"apiVersion": api, "kind": kind, **obj}
            obj.pop("status", None)
            assert schema_errors(obj) == [], (kind, obj["metadata"]["name"])
            checked += 1
    assert checked >= 6

    def shadow_status() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = ((kube.get("Endpoint", NS, "iris") or {}).get("status")
                                     or {}).get("shadow") or []
        return got if got and got[0].get("requestsCompared") else []

    [entry] = wait_for(shadow_status, timeout=15, what="status.shadow")
    assert entry["name"] == "candidate"
    assert entry["copiesSent"] == 200 and entry["copiesDropped"] == 4
    assert entry["requestsCompared"] == 180 and entry["agreementPercent"] == 95.0
    assert entry["shadowErrors"] == 3 and entry["productionErrors"] == 0
    assert entry["productionLatencyP50Ms"] == 5.0
    assert entry["shadowLatencyP50Ms"] == 55.0 and entry["shadowLatencyP99Ms"] == 99.1
