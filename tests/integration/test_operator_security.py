"""The real operator against the emulator, with every security setting of the chart on:
secrets reach pods only through the namespace's runtime Secret, which the Endpoints share
and the garbage collector removes with the last of them; model servers get their
NetworkPolicy; no object but that Secret carries a credential; spec URLs pointing at the
metadata service or the API server are refused as InvalidSpec."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest

from kubeinfer_operator.render import k8s_secrets as secrets
from kubeinfer_operator.render import redis_users
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import RouteTable
from kubeinfer_runtime.contract.auth import AuthMode
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.ports import free_port

NS = "secure"
PASSWORD = "redis-pass-e2b1c9"
CALLER_SECRET = "caller-secret-5f0a77"
TOKEN = "caller-token-91d3aa"
SIGNING = "signing-key-0c0c0c"


def endpoint(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name},
            "spec": {"variants": [{"name": "main", "model": {"uri": "s3://b/iris.onnx"}}],
                     **spec}}


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    port = free_port()
    settings = OperatorSettings(
        standalone=True, status_interval_s=0.3, namespaces=[],
        runtime_image="example.test/runtime:1", scaler_port=port,
        scaler_url=f"http://127.0.0.1:{port}/scale", scaler_signing_key=SIGNING,
        redis_url=f"redis://:{PASSWORD}@redis.infra:6379/0",
        caller_access_key_id="AKIAKUBEINFERTEST01", caller_secret_access_key=CALLER_SECRET,
        caller_token=TOKEN, default_auth_mode=AuthMode.SIGV4, network_policy=True)
    with operator_on_emulator(settings, tmp_path_factory.mktemp("kube")) as (client, _):
        client.create_namespace(NS)
        yield client


def conditions(kube: Kube, name: str) -> dict[str, dict[str, Any]]:
    ep = kube.get("Endpoint", NS, name) or {}
    return {c["type"]: c for c in (ep.get("status") or {}).get("conditions", [])}


def test_children_carry_no_secret_and_pods_read_the_runtime_secret(kube: Kube) -> None:
    assert kube.create(endpoint("alpha"), NS).status_code == 201
    assert kube.create(endpoint("beta", auth={"mode": "Token", "secretName": "beta-callers"}),
                       NS).status_code == 201
    for name in ("alpha", "beta"):
        wait_for(lambda n=name: kube.get("Deployment", NS, f"{n}-gateway"),
                 what=f"{name}'s gateway")
        wait_for(lambda n=name: kube.get("NetworkPolicy", NS, f"{n}-model-servers"),
                 what=f"{name}'s NetworkPolicy")

    secret = kube.get("Secret", NS, "kubeinfer-runtime")
    assert secret is not None
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    # The namespace's own Redis user and caller credentials, derived (k8s_secrets).
    assert data["redis-url"] == redis_users.namespace_url(
        f"redis://:{PASSWORD}@redis.infra:6379/0", NS)
    assert (data["AWS_ACCESS_KEY_ID"], data["AWS_SECRET_ACCESS_KEY"]) == (
        secrets.caller_key_pair(CALLER_SECRET, NS))
    assert data["token"] == secrets.caller_token(TOKEN, NS)
    assert not {PASSWORD, CALLER_SECRET, TOKEN} & set(data.values())
    wait_for(lambda: sorted(r["name"] for r in (kube.get("Secret", NS, "kubeinfer-runtime")
                                                 or {})["metadata"]["ownerReferences"])
             == ["alpha", "beta"], what="both Endpoints owning the runtime Secret")

    # Nothing else in the namespace names a secret value.
    for kind in ("Deployment", "Service", "ConfigMap", "NetworkPolicy", "Event", "Endpoint"):
        text = json.dumps(kube.list(kind, NS))
        for value in (PASSWORD, CALLER_SECRET, TOKEN, SIGNING):
            assert value not in text, kind

    alpha = kube.get("Deployment", NS, "alpha-gateway")
    assert alpha is not None
    pod = alpha["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "caller-credentials")
    assert volume["secret"]["secretName"] == "kubeinfer-runtime"
    beta = kube.get("Deployment", NS, "beta-gateway")
    assert beta is not None
    volume = next(v for v in beta["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "caller-credentials")
    assert volume["secret"]["secretName"] == "beta-callers"
    table = RouteTable.from_json((kube.get("ConfigMap", NS, "alpha-routes") or {})["data"][
        "routes.json"])
    assert table.endpoints["alpha"].auth is not None
    assert table.endpoints["alpha"].auth.mode is AuthMode.SIGV4
    policy = kube.get("NetworkPolicy", NS, "alpha-model-servers")
    assert policy is not None
    assert policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"][
        "kubeinfer.io/endpoint"] == "alpha"


def test_the_runtime_secret_goes_with_the_last_endpoint(kube: Kube) -> None:
    wait_for(lambda: kube.get("Secret", NS, "kubeinfer-runtime"), what="the runtime Secret")
    assert kube.delete("Endpoint", NS, "alpha").status_code in (200, 202)
    wait_for(lambda: kube.get("Endpoint", NS, "alpha") is None, what="alpha deleted")
    assert kube.get("Secret", NS, "kubeinfer-runtime") is not None  # beta still uses it
    assert kube.delete("Endpoint", NS, "beta").status_code in (200, 202)
    wait_for(lambda: kube.get("Secret", NS, "kubeinfer-runtime") is None,
             what="the runtime Secret collected with its last owner")


def test_promql_that_could_read_another_namespace_is_invalid(kube: Kube) -> None:
    """The operator queries a Prometheus shared by the cluster for Custom metrics and
    reports the value back: a selector not pinned to the Endpoint's own namespace is
    refused before any query is sent; with {namespace} the same spec is accepted."""
    doc = endpoint("peek")
    doc["spec"]["variants"][0]["autoscaling"] = {
        "maxReplicas": 2, "prometheusUrl": "http://prometheus.monitoring:9090",
        "targetTracking": [{"metric": "Custom", "target": 1,
                            "query": 'sum(rate(http_requests_total{namespace="payments"}[5m]))'}]}
    assert kube.create(doc, NS).status_code == 201
    ready = wait_for(lambda: conditions(kube, "peek").get("Ready"), what="a Ready condition")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert "spec.variants[0].autoscaling.targetTracking[0].query" in ready["message"]
    assert f'namespace="{NS}"' in ready["message"]
    assert kube.get("Deployment", NS, "peek-gateway") is None
    fixed = endpoint("own")
    fixed["spec"]["variants"][0]["autoscaling"] = {
        **doc["spec"]["variants"][0]["autoscaling"],
        "targetTracking": [{"metric": "Custom", "target": 1,
                            "query": 'sum(rate(http_requests_total{namespace="{namespace}"}'
                                     '[5m]))'}]}
    assert kube.create(fixed, NS).status_code == 201
    wait_for(lambda: kube.get("Deployment", NS, "own-gateway"), what="the gateway rendered")
    assert conditions(kube, "own").get("Ready", {}).get("reason") != "InvalidSpec"


@pytest.mark.parametrize(("field", "spec", "url"), [
    ("spec.async.notification.errorUrl",
     {"type": "Async", "async": {"outputPath": "s3://b/out",
                                 "notification": {"errorUrl": "http://169.254.169.254/x"}}},
     "169.254.169.254"),
    ("spec.variants[0].autoscaling.prometheusUrl", None, "kubernetes.default.svc"),
])
def test_urls_to_the_metadata_service_or_the_api_server_are_invalid(
        kube: Kube, field: str, spec: dict[str, Any] | None, url: str) -> None:
    name = "meta" if spec else "apisrv"
    doc = endpoint(name, **(spec or {}))
    if spec is None:
        doc["spec"]["variants"][0]["autoscaling"] = {
            "maxReplicas": 2, "prometheusUrl": "https://kubernetes.default.svc/api",
            "targetTracking": [{"metric": "Custom", "query": "up", "target": 1}]}
    assert kube.create(doc, NS).status_code == 201
    ready = wait_for(lambda: conditions(kube, name).get("Ready"), what="a Ready condition")
    assert ready["status"] == "False" and ready["reason"] == "InvalidSpec"
    assert field in ready["message"] and url in ready["message"]
    assert kube.get("Deployment", NS, f"{name}-gateway") is None
