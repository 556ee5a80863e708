"""Manifests rendered for Endpoints: schema-valid, locked down, rolled only when needed."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s import Owner, endpoint_url, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import RouteTable
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
#: The Endpoint examples (the TransformJob ones are rendered in test_transform_render.py).
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: Endpoint" in p.read_text())
OWNER = Owner(name="iris", namespace="ml", uid="0b6c2a3e-1111-4222-8333-944455556666")


def _endpoint(doc: dict[str, Any]) -> Endpoint:
    return Endpoint.model_validate(doc)


def _example(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def _render(doc: dict[str, Any], settings: OperatorSettings | None = None,
            ready: tuple[str, ...] = (), owner: Owner = OWNER) -> dict[tuple[str, str], Any]:
    plan = plan_endpoint(_endpoint(doc), generation=3)
    manifests = render_endpoint(plan, owner, settings or OperatorSettings(), ready)
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


@pytest.fixture
def doc() -> dict[str, Any]:
    return _example(REPO / "examples" / "realtime-endpoint.yaml")


def test_there_are_examples_to_render() -> None:
    assert EXAMPLES, "examples/*.yaml is empty"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_passes_kubernetes_validate_strict(path: Path) -> None:
    doc = _example(path)
    owner = Owner(doc["metadata"]["name"], "default", OWNER.uid)
    variants = [v["name"] for v in doc["spec"]["variants"]]
    for settings, ready in ((OperatorSettings(), ()),
                            (OperatorSettings(s3_secret_name="s3-creds"), tuple(variants))):
        for manifest in _render(doc, settings, ready, owner).values():
            # The real tool, as `kubernetes-validate --strict -k 1.33.0` runs it.
            kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_strict_schema_catches_a_typo(doc: dict[str, Any]) -> None:
    deployment = copy.deepcopy(_render(doc)[("Deployment", "iris-primary")])
    assert schema_errors(deployment) == []
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in e for e in schema_errors(deployment))


def test_children_names_and_kinds(doc: dict[str, Any]) -> None:
    assert sorted(_render(doc)) == [
        ("ConfigMap", "iris-routes"),
        ("Deployment", "iris-canary"), ("Deployment", "iris-gateway"),
        ("Deployment", "iris-primary"),
        ("Service", "iris-canary"), ("Service", "iris-gateway"), ("Service", "iris-primary"),
    ]


def test_configmap_comes_first_and_gateway_last(doc: dict[str, Any]) -> None:
    plan = plan_endpoint(_endpoint(doc))
    order = [(m["kind"], m["metadata"]["name"])
             for m in render_endpoint(plan, OWNER, OperatorSettings())]
    assert order[0] == ("ConfigMap", "iris-routes")
    assert order[-1] == ("Deployment", "iris-gateway")


def test_every_child_is_owned_labelled_and_namespaced(doc: dict[str, Any]) -> None:
    for (_kind, name), m in _render(doc).items():
        md = m["metadata"]
        assert md["namespace"] == "ml"
        assert md["ownerReferences"] == [{
            "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "name": "iris",
            "uid": OWNER.uid, "controller": True, "blockOwnerDeletion": True}]
        labels = md["labels"]
        assert labels[meta.LABEL_NAME] == "kubeinfer"
        assert labels[meta.LABEL_INSTANCE] == "iris"
        assert labels[meta.LABEL_PART_OF] == "kubeinfer"
        assert labels[meta.LABEL_MANAGED_BY] == "kubeinfer-operator"
        assert labels[meta.LABEL_ENDPOINT] == "iris"
        assert labels[meta.LABEL_COMPONENT] in ("model-server", "gateway", "routes")
        if name in ("iris-primary", "iris-canary"):
            assert labels[meta.LABEL_VARIANT] == name.removeprefix("iris-")
        else:
            assert meta.LABEL_VARIANT not in labels
        assert len(name) <= meta.MAX_NAME
        assert md["annotations"][meta.ANNOTATION_APPLIED_HASH]


def test_selectors_pick_only_their_own_pods(doc: dict[str, Any]) -> None:
    out = _render(doc)
    pods = {name: out[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
            for kind, name in out if kind == "Deployment"}
    for name in pods:
        selector = out[("Deployment", name)]["spec"]["selector"]["matchLabels"]
        assert out[("Service", name)]["spec"]["selector"] == selector
        matching = [p for p, labels in pods.items()
                    if all(labels.get(k) == v for k, v in selector.items())]
        assert matching == [name]


def _container(m: dict[str, Any]) -> dict[str, Any]:
    containers = m["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


def test_model_server_pod(doc: dict[str, Any]) -> None:
    settings = OperatorSettings(runtime_image="registry.example/runtime:1.2", runtime_port=9000)
    dep = _render(doc, settings)[("Deployment", "iris-canary")]
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    c = _container(dep)
    assert c["image"] == "registry.example/runtime:1.2"
    assert c["args"] == ["serve", "--role", "model-server"]
    assert c["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {
        "KUBEINFER_MODEL_URI": "file://models/iris-v2.onnx",  # the runtime resolves relative URIs
        "KUBEINFER_MODEL_FORMAT": "onnx",
        "KUBEINFER_MODEL_NAME": "canary",
        "KUBEINFER_ENDPOINT_NAME": "iris",
        "KUBEINFER_VARIANT_NAME": "canary",
        "KUBEINFER_PORT": "9000",
        "KUBEINFER_METRICS_PORT": "9090",
        # A model that fails to load ends the container: the kubelet retries it.
        "KUBEINFER_EXIT_ON_LOAD_FAILURE": "true",
    }
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                              "limits": {"memory": "512Mi"}}
    assert "envFrom" not in c
    # Locked down: non-root, read-only root, no escalation, no capabilities, seccomp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    # ... so the model cache needs a writable emptyDir at /tmp.
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]


def test_default_resources_when_the_spec_sets_none(doc: dict[str, Any]) -> None:
    del doc["spec"]["variants"][0]["resources"]
    settings = OperatorSettings(default_cpu_request="250m", default_memory_request="300Mi",
                                default_memory_limit="2Gi")
    c = _container(_render(doc, settings)[("Deployment", "iris-primary")])
    assert c["resources"] == {"requests": {"cpu": "250m", "memory": "300Mi"},
                              "limits": {"memory": "2Gi"}}


def test_s3_secret_is_mounted_as_env(doc: dict[str, Any]) -> None:
    out = _render(doc, OperatorSettings(s3_secret_name="s3-creds"))
    assert _container(out[("Deployment", "iris-primary")])["envFrom"] == [
        {"secretRef": {"name": "s3-creds"}}]
    assert "envFrom" not in _container(out[("Deployment", "iris-gateway")])


def test_gateway_pod_mounts_the_route_table_directory(doc: dict[str, Any]) -> None:
    out = _render(doc, OperatorSettings(gateway_replicas=2))
    dep = out[("Deployment", "iris-gateway")]
    assert dep["spec"]["replicas"] == 2
    c = _container(dep)
    assert c["args"] == ["serve", "--role", "gateway"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ping"
    assert c["livenessProbe"]["httpGet"]["path"] == "/ping"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["KUBEINFER_ROUTE_TABLE_PATH"] == "/etc/kubeinfer/routes.json"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "routes")
    # A directory mount (no subPath): kubelet refreshes it when the ConfigMap changes.
    assert mount == {"name": "routes", "mountPath": "/etc/kubeinfer", "readOnly": True}
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "routes")
    assert volume["configMap"]["name"] == "iris-routes"
    # No hash of the route table: weight changes must not restart the gateway.
    assert "annotations" not in dep["spec"]["template"]["metadata"]


def test_route_table_lists_only_ready_variants(doc: dict[str, Any]) -> None:
    cm = _render(doc, ready=("primary",))[("ConfigMap", "iris-routes")]
    table = RouteTable.from_json(cm["data"]["routes.json"])
    assert table.revision == 3
    route = table.endpoints["iris"]
    assert route.variant("primary") is not None
    assert route.variant("primary").upstreams == ["http://iris-primary.ml.svc:8080"]  # type: ignore[union-attr]
    assert route.variant("canary").upstreams == []  # type: ignore[union-attr]
    assert [v.weight for v in route.variants] == [0.9, 0.1]


def test_variants_are_reached_per_pod_through_headless_services(doc: dict[str, Any]) -> None:
    children = _render(doc, ready=("primary", "canary"))
    for variant in ("primary", "canary"):
        assert children[("Service", f"iris-{variant}")]["spec"]["clusterIP"] == "None"
    # The gateway keeps ClusterIP: clients reach it through kube-proxy.
    assert children[("Service", "iris-gateway")]["spec"].get("clusterIP") != "None"
    table = RouteTable.from_json(children[("ConfigMap", "iris-routes")]["data"]["routes.json"])
    assert {v.discovery for v in table.endpoints["iris"].variants} == {"dns"}


def test_endpoint_url_is_the_gateway_service() -> None:
    assert endpoint_url(OWNER, OperatorSettings()) == "http://iris-gateway.ml.svc:8080"


def _changed(a: dict[tuple[str, str], Any], b: dict[tuple[str, str], Any]) -> set[tuple[str, str]]:
    assert a.keys() == b.keys()
    return {k for k in a if meta.applied_hash(a[k]) != meta.applied_hash(b[k])}


def test_weight_change_touches_only_the_configmap(doc: dict[str, Any]) -> None:
    before = _render(doc)
    doc["spec"]["variants"][0]["weight"] = 0.5
    assert _changed(before, _render(doc)) == {("ConfigMap", "iris-routes")}


def test_readiness_change_touches_only_the_configmap(doc: dict[str, Any]) -> None:
    assert _changed(_render(doc), _render(doc, ready=("canary",))) == {
        ("ConfigMap", "iris-routes")}


def test_replica_change_does_not_roll_pods(doc: dict[str, Any]) -> None:
    before = _render(doc)
    doc["spec"]["variants"][1]["replicas"] = 4
    after = _render(doc)
    # Two replicas or more: the variant gets a PodDisruptionBudget too.
    budget = after.pop(("PodDisruptionBudget", "iris-canary"))
    assert budget["spec"]["maxUnavailable"] == 1
    assert _changed(before, after) == {("Deployment", "iris-canary")}
    old, new = before[("Deployment", "iris-canary")], after[("Deployment", "iris-canary")]
    assert new["spec"]["replicas"] == 4
    assert old["spec"]["template"] == new["spec"]["template"]


@pytest.mark.parametrize("change", [
    lambda v: v["model"].update(uri="s3://models/iris-v3.onnx"),
    lambda v: v.update(env=[{"name": "OMP_NUM_THREADS", "value": "2"}]),
    lambda v: v["resources"]["limits"].update(memory="1Gi"),
], ids=["model", "env", "resources"])
def test_model_env_or_resource_change_rolls_only_that_variant(doc: dict[str, Any],
                                                              change: Any) -> None:
    before = _render(doc)
    change(doc["spec"]["variants"][1])
    after = _render(doc)
    assert _changed(before, after) == {("Deployment", "iris-canary")}
    annotation = "kubeinfer.io/server-hash"
    old = before[("Deployment", "iris-canary")]["spec"]["template"]["metadata"]["annotations"]
    new = after[("Deployment", "iris-canary")]["spec"]["template"]["metadata"]["annotations"]
    assert old[annotation] != new[annotation]


def test_rendering_is_deterministic(doc: dict[str, Any]) -> None:
    a = json.dumps(list(_render(doc).values()), sort_keys=True)
    b = json.dumps(list(_render(copy.deepcopy(doc)).values()), sort_keys=True)
    assert a == b


def test_longest_allowed_names_stay_valid(doc: dict[str, Any]) -> None:
    name = "e" * 40
    doc["metadata"]["name"] = name
    doc["spec"]["variants"][0]["name"] = "v" * (meta.MAX_NAME - len(name) - 1)
    owner = Owner(name, "default", OWNER.uid)
    for (_, obj_name), m in _render(doc, owner=owner).items():
        assert len(obj_name) <= meta.MAX_NAME
        assert schema_errors(m) == []
