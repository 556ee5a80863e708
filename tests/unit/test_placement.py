"""Placement and identity of runtime pods (podTemplate), PodDisruptionBudgets, and the
requests, limits and probes every rendered container carries."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error
from kubeinfer_operator.api.placement import PodTemplate, merge_pod_templates, validated
from kubeinfer_operator.reconcile.diff import diff_children
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.k8s_placement import complete_resources
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
OWNER = Owner(name="iris", namespace="ml", uid="0b6c2a3e-1111-4222-8333-944455556666")
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: Endpoint" in p.read_text())

FULL: dict[str, Any] = {
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "inference",
                     "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "node.kubernetes.io/instance-type", "operator": "In",
             "values": ["c7i.large"]}]}]}}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
    "priorityClassName": "inference-high",
    "serviceAccountName": "iris-reader",
    "imagePullSecrets": [{"name": "regcred"}],
    "labels": {"example.com/team": "ml"},
    "annotations": {"example.com/owner": "ml-platform"},
}


def _doc(**variant: Any) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "iris"},
            "spec": {"variants": [{"name": "primary", "model": {"uri": "s3://m/iris.onnx"},
                                   **variant}]}}


def _render(doc: dict[str, Any], settings: OperatorSettings | None = None,
            owner: Owner = OWNER) -> dict[tuple[str, str], dict[str, Any]]:
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=1)
    return {(m["kind"], m["metadata"]["name"]): m
            for m in render_endpoint(plan, owner, settings or OperatorSettings())}


def _problems(doc: dict[str, Any]) -> str:
    try:
        Endpoint.model_validate(doc)
    except ValueError as exc:
        return format_validation_error(exc)
    return ""


# -- the merge ---------------------------------------------------------------------------------

def test_merge_own_value_wins_per_field_and_maps_merge_key_by_key() -> None:
    default = {"nodeSelector": {"pool": "cpu", "kubernetes.io/os": "linux"},
               "tolerations": [{"key": "a", "operator": "Exists"}],
               "priorityClassName": "low", "labels": {"team": "platform", "cost": "x"},
               "annotations": {"a": "1"}, "imagePullSecrets": [{"name": "shared"}]}
    own = {"nodeSelector": {"pool": "gpu"}, "priorityClassName": "high",
           "labels": {"cost": "y"}, "serviceAccountName": "sa"}
    assert merge_pod_templates(default, own) == {
        "nodeSelector": {"pool": "gpu", "kubernetes.io/os": "linux"},
        "tolerations": [{"key": "a", "operator": "Exists"}],
        "priorityClassName": "high", "serviceAccountName": "sa",
        "imagePullSecrets": [{"name": "shared"}],
        "labels": {"team": "platform", "cost": "y"}, "annotations": {"a": "1"},
    }


def test_merge_an_explicit_empty_list_clears_the_default() -> None:
    default = validated({"tolerations": [{"operator": "Exists"}]}, "default", trusted=True)
    own = PodTemplate.model_validate({"tolerations": []}).written()
    assert merge_pod_templates(default, own) == {"tolerations": []}
    # Unset is not empty: the default stays.
    assert merge_pod_templates(default, PodTemplate().written()) == default


def test_merge_of_nothing_is_nothing() -> None:
    assert merge_pod_templates(None, None) == {}
    assert merge_pod_templates({}, FULL) == FULL
    assert merge_pod_templates(FULL, {}) == FULL


# -- the API -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    ({"labels": {"app.kubernetes.io/name": "x"}}, "label 'app.kubernetes.io/name' is reserved"),
    ({"labels": {"kubeinfer.io/variant": "x"}}, "is reserved"),
    ({"annotations": {"kubeinfer.io/server-hash": "x"}}, "is reserved"),
    ({"labels": {"team": "has space"}}, "value 'has space' of 'team'"),
    ({"labels": {"Bad_Prefix.com/x": "y"}}, "must be a DNS subdomain"),
    ({"nodeSelector": {"-bad": "x"}}, "name '-bad' must be 1 to 63 characters"),
    ({"tolerations": [{"key": "a", "operator": "Maybe"}]}, "must be Exists or Equal"),
    ({"tolerations": [{"key": "a", "operator": "Exists", "value": "v"}]},
     "operator Exists takes no value"),
    ({"tolerations": [{"effect": "Never"}]}, "effect 'Never' must be one of"),
    ({"topologySpreadConstraints": [{"maxSkew": 0, "topologyKey": "z",
                                     "whenUnsatisfiable": "DoNotSchedule"}]},
     "maxSkew must be an integer of at least 1"),
    ({"topologySpreadConstraints": [{"maxSkew": 1, "whenUnsatisfiable": "DoNotSchedule"}]},
     "topologyKey is required"),
    ({"serviceAccountName": "Not_A_Name"}, "is not a DNS subdomain name"),
    ({"imagePullSecrets": ["regcred"]}, "imagePullSecrets[0]"),
    ({"imagePullSecrets": [{"name": "UPPER"}]}, "is not a DNS subdomain name"),
    ({"nodeSelectorr": {}}, "unknown field"),
    # Escalations: what a namespace's own pods would not get from the cluster.
    ({"tolerations": [{"operator": "Exists"}]},
     "tolerations[0] has no key: a toleration without one matches every taint"),
    ({"tolerations": [{"key": "a", "operator": "Exists"}, {"operator": "Exists",
                                                          "effect": "NoSchedule"}]},
     "tolerations[1] has no key"),
    ({"tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
     "runtime pods do not run on control-plane nodes"),
    ({"tolerations": [{"key": "node-role.kubernetes.io/master", "operator": "Exists",
                       "effect": "NoSchedule"}]}, "is refused"),
    ({"priorityClassName": "system-node-critical"},
     "priorityClassName 'system-node-critical' is refused: the system-* classes are "
     "Kubernetes' own"),
    ({"priorityClassName": "system-cluster-critical"}, "use another PriorityClass"),
    ({"annotations": {"container.apparmor.security.beta.kubernetes.io/step-x": "unconfined"}},
     "annotation 'container.apparmor.security.beta.kubernetes.io/step-x' is refused: it "
     "would set the pods' AppArmor or seccomp profile"),
    ({"annotations": {"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}},
     "AppArmor or seccomp profile"),
    ({"annotations": {"container.seccomp.security.alpha.kubernetes.io/model-server":
                      "unconfined"}}, "AppArmor or seccomp profile"),
    ({"annotations": {"sidecar.istio.io/inject": "false"}},
     "annotation 'sidecar.istio.io/inject' is refused: keys under istio.io and linkerd.io "
     "configure the service mesh's proxy"),
    ({"annotations": {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "0.0.0.0/0"}},
     "configure the service mesh's proxy"),
    ({"labels": {"istio.io/dataplane-mode": "none"}},
     "label 'istio.io/dataplane-mode' is refused"),
    ({"labels": {"sidecar.istio.io/inject": "false"}}, "configure the service mesh's proxy"),
    ({"annotations": {"config.linkerd.io/skip-outbound-ports": "443"}},
     "configure the service mesh's proxy"),
])
def test_bad_templates_are_refused_naming_the_field(template: dict[str, Any],
                                                    expected: str) -> None:
    problems = _problems(_doc(podTemplate=template))
    assert "spec.variants[0].podTemplate" in problems
    assert expected in problems
    gateway = _problems({**_doc(), "spec": {**_doc()["spec"],
                                            "gateway": {"podTemplate": template}}})
    assert "spec.gateway.podTemplate" in gateway and expected in gateway


def test_the_audits_escalations_are_all_refused_at_once() -> None:
    problems = _problems(_doc(podTemplate={
        "serviceAccountName": "ci-deployer",  # allowed: its identity, not its token
        "priorityClassName": "system-node-critical",
        "tolerations": [{"operator": "Exists"}],
        "annotations": {"container.apparmor.security.beta.kubernetes.io/step-x": "unconfined",
                        "sidecar.istio.io/inject": "false"}}))
    for expected in ("tolerations[0] has no key", "'system-node-critical' is refused",
                     "'container.apparmor.security.beta.kubernetes.io/step-x' is refused",
                     "'sidecar.istio.io/inject' is refused"):
        assert expected in problems
    assert "serviceAccountName" not in problems


@pytest.mark.parametrize("template", [
    {"tolerations": [{"key": "dedicated", "operator": "Exists"}]},
    {"tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                      "effect": "NoExecute", "tolerationSeconds": 60}]},
    {"priorityClassName": "systems-high"},
    {"annotations": {"notistio.io/x": "1", "example.com/istio.io": "1",
                     "cluster-autoscaler.kubernetes.io/safe-to-evict": "true"}},
    {"labels": {"example.com/linkerd.io": "yes"}},
], ids=["keyed-toleration", "not-ready-seconds", "non-system-priority", "lookalike-keys",
        "lookalike-label"])
def test_what_is_near_the_deny_list_is_accepted(template: dict[str, Any]) -> None:
    assert _problems(_doc(podTemplate=template)) == ""


def test_the_operators_default_is_the_administrators_and_skips_the_deny_list() -> None:
    default = {"tolerations": [{"operator": "Exists"}],
               "priorityClassName": "system-cluster-critical",
               "annotations": {"sidecar.istio.io/inject": "true"},
               "labels": {"istio.io/rev": "stable"}}
    settings = OperatorSettings(default_pod_template=default)
    assert settings.default_pod_template == default
    pod = _pod(_render(_doc(), settings), "iris-primary")
    assert pod["spec"]["tolerations"] == [{"operator": "Exists"}]
    assert pod["metadata"]["annotations"]["sidecar.istio.io/inject"] == "true"
    # Syntax is still checked.
    with pytest.raises(ValueError, match="KUBEINFER_DEFAULT_POD_TEMPLATE: tolerations"):
        OperatorSettings(default_pod_template={"tolerations": [{"operator": "Maybe"}]})


def test_a_full_template_is_accepted_and_kept_as_written() -> None:
    endpoint = Endpoint.model_validate(_doc(podTemplate=FULL))
    template = endpoint.spec.variants[0].podTemplate
    assert template is not None and template.written() == FULL


def test_operator_default_is_checked_at_startup() -> None:
    with pytest.raises(ValueError, match=re.escape("KUBEINFER_DEFAULT_POD_TEMPLATE: labels: "
                                                   "label 'kubeinfer.io/endpoint' is reserved")):
        OperatorSettings(default_pod_template={"labels": {"kubeinfer.io/endpoint": "x"}})


def test_the_crd_keeps_kubernetes_shaped_objects_free_form() -> None:
    crd = yaml.safe_load((REPO / "crds" / "endpoints.kubeinfer.io.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for template in (spec["properties"]["gateway"]["properties"]["podTemplate"],
                     spec["properties"]["variants"]["items"]["properties"]["podTemplate"]):
        props = template["properties"]
        assert set(props) == set(FULL)
        assert props["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
        assert "additionalProperties" not in props["affinity"]
        assert props["topologySpreadConstraints"]["items"] == {
            "type": "object", "x-kubernetes-preserve-unknown-fields": True}
        # A toleration declares its key only (for the CRD's CEL rules), the rest free-form.
        toleration = props["tolerations"]["items"]
        assert toleration["x-kubernetes-preserve-unknown-fields"] is True
        assert set(toleration["properties"]) == {"key"}


# -- rendering ---------------------------------------------------------------------------------

def _pod(manifests: dict[tuple[str, str], Any], name: str) -> dict[str, Any]:
    template: dict[str, Any] = manifests[("Deployment", name)]["spec"]["template"]
    return template


def test_every_placement_field_lands_on_the_gateway_and_variant_pods() -> None:
    doc = _doc(podTemplate=FULL)
    doc["spec"]["gateway"] = {"podTemplate": {**FULL, "priorityClassName": "gateway-high"}}
    manifests = _render(doc)
    for name, priority in (("iris-primary", "inference-high"),
                           ("iris-gateway", "gateway-high")):
        pod = _pod(manifests, name)
        spec = pod["spec"]
        for field in ("nodeSelector", "tolerations", "affinity", "serviceAccountName",
                      "imagePullSecrets"):
            assert spec[field] == FULL[field], (name, field)
        assert spec["priorityClassName"] == priority
        # A spread constraint without labelSelector counts its own workload's pods.
        selector = manifests[("Deployment", name)]["spec"]["selector"]
        assert spec["topologySpreadConstraints"] == [
            {**FULL["topologySpreadConstraints"][0], "labelSelector": selector}]
        # A named ServiceAccount lends its identity, never its API token.
        assert spec["automountServiceAccountToken"] is False
        assert pod["metadata"]["labels"]["example.com/team"] == "ml"
        assert pod["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
        # The selector labels are still there, and still select the pods.
        assert selector["matchLabels"].items() <= pod["metadata"]["labels"].items()
        kubernetes_validate.validate(manifests[("Deployment", name)], "1.33.0", strict=True)


def test_without_a_template_pods_mount_no_token_and_stay_as_before() -> None:
    pod = _pod(_render(_doc()), "iris-primary")
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert not {"nodeSelector", "tolerations", "affinity", "serviceAccountName",
                "priorityClassName", "imagePullSecrets",
                "topologySpreadConstraints"} & set(pod["spec"])


def test_operator_default_applies_under_the_endpoints_own() -> None:
    settings = OperatorSettings(default_pod_template={
        "nodeSelector": {"pool": "inference", "kubernetes.io/os": "linux"},
        "tolerations": [{"key": "pool", "operator": "Exists"}],
        "priorityClassName": "default-high",
        "imagePullSecrets": [{"name": "shared"}],
        "labels": {"example.com/team": "platform", "example.com/cost": "shared"}})
    doc = _doc(podTemplate={"nodeSelector": {"pool": "gpu"},
                            "labels": {"example.com/team": "ml"}, "tolerations": []})
    manifests = _render(doc, settings)
    variant = _pod(manifests, "iris-primary")
    assert variant["spec"]["nodeSelector"] == {"pool": "gpu", "kubernetes.io/os": "linux"}
    assert "tolerations" not in variant["spec"]  # cleared by the Endpoint's []
    assert variant["spec"]["priorityClassName"] == "default-high"
    assert variant["spec"]["imagePullSecrets"] == [{"name": "shared"}]
    assert variant["metadata"]["labels"]["example.com/team"] == "ml"
    assert variant["metadata"]["labels"]["example.com/cost"] == "shared"
    # The gateway, with no template of its own, gets the default whole.
    gateway = _pod(manifests, "iris-gateway")
    assert gateway["spec"]["nodeSelector"] == {"pool": "inference", "kubernetes.io/os": "linux"}
    assert gateway["spec"]["tolerations"] == [{"key": "pool", "operator": "Exists"}]
    assert gateway["metadata"]["labels"]["example.com/team"] == "platform"
    assert gateway["spec"]["automountServiceAccountToken"] is False
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_a_placement_change_rolls_only_its_own_deployment() -> None:
    before = _render(_doc())
    after = _render(_doc(podTemplate={"nodeSelector": {"pool": "gpu"}}))
    changed = {k for k in before if meta.applied_hash(before[k]) != meta.applied_hash(after[k])}
    assert changed == {("Deployment", "iris-primary")}


# -- keeping the cluster in line with the template ----------------------------------------------

def _live(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` as the API server returns it, plus what others add."""
    live = copy.deepcopy(manifest)
    template = live["spec"]["template"]
    template["metadata"].setdefault("annotations", {})[
        "kubectl.kubernetes.io/restartedAt"] = "2025-01-01T00:00:00Z"
    template["spec"]["dnsPolicy"] = "ClusterFirst"
    return live


def test_fields_the_spec_drops_are_removed_and_other_writers_kept() -> None:
    old = _render(_doc(podTemplate=FULL))[("Deployment", "iris-primary")]
    new = _render(_doc())[("Deployment", "iris-primary")]
    changes = diff_children([new], [_live(old)], owner_uid=OWNER.uid, owner_name="iris",
                            namespace="ml")
    [patch] = changes.patch
    spec = patch["spec"]["template"]["spec"]
    for field in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                  "priorityClassName", "serviceAccountName", "imagePullSecrets"):
        assert spec[field] is None, field  # a merge patch's null removes the field
    assert spec["automountServiceAccountToken"] is False
    template_meta = patch["spec"]["template"]["metadata"]
    assert template_meta["labels"]["example.com/team"] is None
    assert template_meta["annotations"]["example.com/owner"] is None
    assert "kubectl.kubernetes.io/restartedAt" not in template_meta["annotations"]  # kept
    assert patch["metadata"]["annotations"][meta.ANNOTATION_POD_ANNOTATIONS] is None


def test_an_unchanged_template_makes_no_patch() -> None:
    manifest = _render(_doc(podTemplate=FULL))[("Deployment", "iris-primary")]
    changes = diff_children([manifest], [_live(manifest)], owner_uid=OWNER.uid,
                            owner_name="iris", namespace="ml")
    assert changes.empty


def test_a_label_added_by_hand_to_the_pods_is_drift() -> None:
    manifest = _render(_doc())[("Deployment", "iris-primary")]
    live = _live(manifest)
    live["spec"]["template"]["metadata"]["labels"]["sneaky"] = "yes"
    live["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "elsewhere"}
    changes = diff_children([manifest], [live], owner_uid=OWNER.uid, owner_name="iris",
                            namespace="ml")
    [patch] = changes.patch
    assert patch["spec"]["template"]["metadata"]["labels"]["sneaky"] is None
    assert patch["spec"]["template"]["spec"]["nodeSelector"] is None


def test_a_node_selector_key_the_spec_drops_is_removed() -> None:
    old = _render(_doc(podTemplate={"nodeSelector": {"a": "1", "b": "2"}}))
    new = _render(_doc(podTemplate={"nodeSelector": {"a": "1"}}))
    [patch] = diff_children([new[("Deployment", "iris-primary")]],
                            [_live(old[("Deployment", "iris-primary")])], owner_uid=OWNER.uid,
                            owner_name="iris", namespace="ml").patch
    assert patch["spec"]["template"]["spec"]["nodeSelector"] == {"a": "1", "b": None}


# -- PodDisruptionBudgets ----------------------------------------------------------------------

def _budgets(manifests: dict[tuple[str, str], Any]) -> dict[str, Any]:
    return {name: m for (kind, name), m in manifests.items() if kind == "PodDisruptionBudget"}


def test_two_replicas_get_a_budget_one_does_not() -> None:
    doc = _doc(replicas=2)
    doc["spec"]["variants"].append({"name": "canary", "model": {"uri": "s3://m/v2.onnx"},
                                    "replicas": 1})
    manifests = _render(doc)
    budgets = _budgets(manifests)
    assert set(budgets) == {"iris-primary"}
    budget = budgets["iris-primary"]
    deployment = manifests[("Deployment", "iris-primary")]
    assert budget["spec"] == {"maxUnavailable": 1, "selector": deployment["spec"]["selector"]}
    assert budget["metadata"]["labels"] == deployment["metadata"]["labels"]
    assert budget["metadata"]["ownerReferences"] == deployment["metadata"]["ownerReferences"]
    kubernetes_validate.validate(budget, "1.33.0", strict=True)


def test_a_gateway_of_two_replicas_gets_a_budget() -> None:
    budgets = _budgets(_render(_doc(), OperatorSettings(gateway_replicas=2)))
    assert set(budgets) == {"iris-gateway"}
    assert budgets["iris-gateway"]["spec"]["selector"]["matchLabels"] == meta.pod_selector(
        "iris", meta.COMPONENT_GATEWAY)


def test_a_scaled_variant_is_judged_by_its_maximum() -> None:
    scaled = _doc(replicas=1, autoscaling={
        "minReplicas": 1, "maxReplicas": 4,
        "targetTracking": [{"metric": "InvocationsPerReplica", "target": 100}]})
    assert set(_budgets(_render(scaled))) == {"iris-primary"}
    capped = _doc(replicas=1, autoscaling={
        "minReplicas": 1, "maxReplicas": 1,
        "targetTracking": [{"metric": "InvocationsPerReplica", "target": 100}]})
    assert _budgets(_render(capped)) == {}


def test_a_budget_goes_when_replicas_drop_to_one() -> None:
    two = _render(_doc(replicas=2))
    one = _render(_doc(replicas=1))
    changes = diff_children(one.values(), two.values(), owner_uid=OWNER.uid, owner_name="iris",
                            namespace="ml")
    assert [str(k) for k in changes.delete] == ["PodDisruptionBudget iris-primary"]


def test_a_budget_selector_edited_by_hand_is_restored() -> None:
    budget = _budgets(_render(_doc(replicas=3)))["iris-primary"]
    live = copy.deepcopy(budget)
    live["spec"]["selector"]["matchLabels"]["extra"] = "x"
    live["spec"]["maxUnavailable"] = 2
    [patch] = diff_children([budget], [live], owner_uid=OWNER.uid, owner_name="iris",
                            namespace="ml").patch
    assert patch["spec"]["selector"]["matchLabels"]["extra"] is None
    assert patch["spec"]["maxUnavailable"] == 1


# -- requests, limits and probes everywhere ----------------------------------------------------

def test_missing_requests_and_limits_are_filled_in() -> None:
    defaults = {"cpu": "100m", "memory": "256Mi", "memory_limit": "1Gi"}
    assert complete_resources({}, {}, **defaults) == {
        "requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    # Serverless: memory only (request and limit): a CPU request is added.
    assert complete_resources({"memory": "2Gi"}, {"memory": "2Gi"}, **defaults) == {
        "requests": {"memory": "2Gi", "cpu": "100m"}, "limits": {"memory": "2Gi"}}
    # A limit without a request: the request is the limit (as Kubernetes defaults it).
    assert complete_resources({}, {"cpu": "50m", "memory": "128Mi"}, **defaults) == {
        "requests": {"cpu": "50m", "memory": "128Mi"},
        "limits": {"cpu": "50m", "memory": "128Mi"}}
    # A request above the default limit: the limit is the request, never below it.
    assert complete_resources({"memory": "3Gi"}, {}, **defaults)["limits"] == {"memory": "3Gi"}


PIPELINE_WITH_IMAGE = _doc()
PIPELINE_WITH_IMAGE["spec"]["variants"][0] = {
    "name": "primary", "containers": [
        {"name": "pre", "handler": "steps:pre", "codeUri": "file:///code"},
        {"name": "xgb", "image": "example.com/xgboost:1.7",
         "resources": {"requests": {"memory": "2Gi"}}},
        {"name": "plain", "image": "example.com/sklearn:1.2"}]}
COMPILED = _doc(model={"uri": "s3://m/iris.onnx", "compile": {"target": "native"}},
                podTemplate=FULL)
FIXTURES = {"pipeline-with-images": PIPELINE_WITH_IMAGE, "compile": COMPILED,
            "placement": _doc(podTemplate=FULL, replicas=3)}


def _specs() -> list[tuple[str, dict[str, Any]]]:
    out = [(p.name, yaml.safe_load(p.read_text())) for p in EXAMPLES]
    return out + list(FIXTURES.items())


@pytest.mark.parametrize(("name", "doc"), _specs(), ids=[n for n, _ in _specs()])
def test_every_container_has_requests_a_memory_limit_and_probes(name: str,
                                                                doc: dict[str, Any]) -> None:
    owner = Owner(doc["metadata"]["name"], "default", OWNER.uid)
    for settings in (OperatorSettings(), OperatorSettings(gateway_replicas=2,
                                                          default_pod_template=FULL)):
        manifests = _render(doc, settings, owner)
        pods = [m["spec"]["template"]["spec"] for m in manifests.values()
                if m["kind"] == "Deployment"]
        assert pods
        for pod in pods:
            for container in pod["containers"] + pod.get("initContainers", []):
                resources = container["resources"]
                assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
                assert "memory" in resources["limits"], container["name"]
            for container in pod["containers"]:  # init containers run once: no probes
                assert "livenessProbe" in container and "readinessProbe" in container, (
                    name, container["name"])
        for manifest in manifests.values():
            kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_image_steps_are_probed_on_ping_and_sized() -> None:
    pod = _pod(_render(PIPELINE_WITH_IMAGE), "iris-primary")["spec"]
    xgb = next(c for c in pod["containers"] if c["name"] == "step-xgb")
    port = xgb["ports"][0]["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert xgb[probe]["httpGet"] == {"path": "/ping", "port": port}
    assert xgb["resources"] == {"requests": {"memory": "2Gi", "cpu": "100m"},
                                "limits": {"memory": "2Gi"}}
    plain = next(c for c in pod["containers"] if c["name"] == "step-plain")
    assert plain["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"},
                                  "limits": {"memory": "1Gi"}}


def test_resources_on_a_non_image_step_are_refused() -> None:
    doc = copy.deepcopy(PIPELINE_WITH_IMAGE)
    doc["spec"]["variants"][0]["containers"][0]["resources"] = {"requests": {"cpu": "1"}}
    assert "resources apply to image steps only" in _problems(doc)
