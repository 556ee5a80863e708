"""The Helm chart renders, lints and produces only valid, least-privilege objects.

Rendered offline with helm-python-sdk (the Helm 4 SDK in a wheel, no helm
binary, no cluster), then every object is checked with kubernetes-validate in
strict mode (unknown fields are errors) against Kubernetes 1.30 (the oldest
minor the chart is tested on) and 1.33. Objects of
custom kinds that schema set does not know (kopf's peering objects, the
Prometheus Operator's ServiceMonitor) are checked against their CRD schema or
for their shape instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubeinfer"
K8S_VERSION = "1.33.0"
#: Every Kubernetes version the rendered chart is validated (and linted) against.
K8S_VERSIONS = ["1.30.0", "1.33.0"]
RELEASE, RELEASE_NS = "kubeinfer", "kubeinfer-system"
#: CRDs the chart ships that kubeinfer's API models do not generate.
CHART_ONLY_CRDS = {"kopf-peering.yaml"}

NAMESPACED = {"watch": {"scope": "namespaces", "namespaces": ["team-a", "team-b"]}}
MONITORED = {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
HA = {"operator": {"replicas": 3}}
POD_TEMPLATE = {
    "nodeSelector": {"pool": "inference"},
    "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
    "priorityClassName": "serving",
    "serviceAccountName": "model-reader",
    "imagePullSecrets": [{"name": "regcred"}],
    "labels": {"team": "ml"},
    "annotations": {"cost-center": "42"},
}
#: Placement, identity and every other override a platform team sets.
PLACED = {
    "fullnameOverride": "ki",
    "imagePullSecrets": [{"name": "regcred"}, "legacy-regcred"],
    "operator": {
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane",
                         "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname",
             "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "operator"}}}]}},
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"a": "b"}, "podLabels": {"c": "d"},
        "resources": {"requests": {"cpu": 0.5, "memory": "1.5e8"}, "limits": {"cpu": 1}},
        "extraEnv": [{"name": "KUBEINFER_LOG_LEVEL", "value": "DEBUG"}],
        "healthPort": 9080, "scalerPort": 9090, "metricsPort": 9070,
    },
    "runtime": {"podTemplate": POD_TEMPLATE, "upgrade": {"maxConcurrentEndpoints": 0},
                "gatewayResources": {"cpuRequest": 1}},
    "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {
        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]},
    "serviceAccount": {"create": True, "name": "ops", "annotations": {"iam": "role"}},
    "commonLabels": {"owner": "platform"},
}
#: Value sets every check below renders (ids name them in test output).
VALUE_SETS = {
    "default": None,
    "namespaced": NAMESPACED,
    "ha": HA,
    "monitored": MONITORED,
    "placed": PLACED,
    "ns+ha+monitored": {**NAMESPACED, **HA, **MONITORED},
    "no-rbac": {"rbac": {"create": False, "clusterReads": False},
                "serviceAccount": {"create": False, "name": "ops-sa"},
                "networkPolicy": {"enabled": False, "metricsFrom": []}},
    # Private registry images, one pinned by digest.
    "images": {"operator": {"image": {
                   "repository": "registry.example.com:5000/platform/kubeinfer-operator",
                   "tag": "", "digest": "sha256:" + "a" * 64, "pullPolicy": "Always"}},
               "runtime": {"image": {"repository": "localhost:5000/kubeinfer/runtime",
                                     "tag": "0.1.0-rc.1", "digest": "", "pullPolicy": "Always"},
                           "compilerImage": {"repository": "ghcr.io/acme/compiler",
                                             "tag": "v2", "digest": "", "pullPolicy": "Never"}}},
    # Every Secret brought by the platform team instead of generated.
    "existing-secrets": {"credentials": {"existingSecret": "ki-keys"},
                         "runtime": {"s3": {"secretName": "model-store"},
                                     "redis": {"existingSecret": "redis-creds",
                                               "urlKey": "redis-url"},
                                     "auth": {"defaultMode": "Token",
                                              "existingSecret": "caller-creds"}}},
    # Namespaced, HA, no NetworkPolicy, a custom runtime Secret name, labels everywhere.
    "ns+ha+no-netpol+labels": {**NAMESPACED, **HA,
                               "networkPolicy": {"enabled": False, "metricsFrom": []},
                               "runtime": {"secretName": "ki-runtime"},
                               "commonLabels": {"team": "ml", "release": "prom"},
                               "metrics": {"serviceMonitor": {"enabled": True,
                                                              "labels": {"release": "prom"}}}},
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key repeated in one mapping, as the API server's
    YAML-to-JSON conversion does ("mapping key already defined")."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping key {key!r} already defined", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def render(chart: helm.Chart, values: dict[str, Any] | None = None,
           namespace: str = RELEASE_NS) -> list[dict[str, Any]]:
    """Every object the chart renders with ``values``, NOTES.txt excluded."""
    out = chart.render(values, name=RELEASE, namespace=namespace)
    objects = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.load_all(text, Loader=UniqueKeyLoader) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = by_kind(objects, kind)
    return found


def chart_crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) → openAPIV3Schema of every CRD in the chart's crds/."""
    schemas = {}
    for path in (CHART / "crds").glob("*.yaml"):
        for crd in yaml.safe_load_all(path.read_text()):
            for version in crd["spec"]["versions"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def validate(obj: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    """Schema-check one rendered object against ``k8s_version``; raises on any problem."""
    api_version, kind = obj["apiVersion"], obj["kind"]
    if api_version.startswith("kopf.dev/"):
        jsonschema.Draft4Validator(chart_crd_schemas()[(api_version, kind)]).validate(obj)
        return
    if api_version == "monitoring.coreos.com/v1":
        assert_service_monitor_shape(obj)
        return
    kubernetes_validate.validate(obj, k8s_version, strict=True)


def assert_service_monitor_shape(obj: dict[str, Any]) -> None:
    # No schema for monitoring.coreos.com here: check what Prometheus Operator needs.
    assert obj["kind"] == "ServiceMonitor"
    assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
    spec = obj["spec"]
    assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "endpoints"}
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics"
        for key in ("interval", "scrapeTimeout"):
            assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint[key])
    selector = spec["namespaceSelector"]
    assert selector == {"any": True} or (set(selector) == {"matchNames"} and selector["matchNames"])


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    return found


def is_aggregated(role: dict[str, Any]) -> bool:
    """An aggregated user-facing ClusterRole (aggregate-roles.yaml), not the operator's own."""
    return any(k.startswith("rbac.authorization.k8s.io/aggregate-to-")
               for k in role["metadata"].get("labels", {}))


def operator_role(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return named(objects, "ClusterRole", f"{RELEASE}-operator")


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    """Literal env values (entries read from Secrets are in ``secret_env_of``)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"] if "valueFrom" not in e}


def secret_env_of(deployment: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Env entries read from Secrets: name -> (Secret, key)."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: (e["valueFrom"]["secretKeyRef"]["name"],
                        e["valueFrom"]["secretKeyRef"]["key"])
            for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}


# -- CRDs --------------------------------------------------------------------------------


def test_chart_crds_are_the_repository_crds_byte_for_byte() -> None:
    repo = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    in_chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert repo, "crds/ is empty: run `kubeinfer crds`"
    assert set(in_chart) - CHART_ONLY_CRDS == set(repo), (
        "charts/kubeinfer/crds/ and crds/ hold different files: "
        "cp crds/*.yaml charts/kubeinfer/crds/"
    )
    for name, content in repo.items():
        assert in_chart[name] == content, (
            f"charts/kubeinfer/crds/{name} differs from crds/{name}: "
            "cp crds/*.yaml charts/kubeinfer/crds/"
        )


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_chart_crds_are_valid_and_loaded_by_helm(chart: helm.Chart, k8s_version: str) -> None:
    names = set()
    for entry in chart.crds:
        for crd in yaml.safe_load_all(entry["data"]):
            kubernetes_validate.validate(crd, k8s_version, strict=True)
            names.add(crd["metadata"]["name"])
    assert names == {"endpoints.kubeinfer.io", "transformjobs.kubeinfer.io",
                     "compilationjobs.kubeinfer.io", "recommendationjobs.kubeinfer.io",
                     "edgefleets.kubeinfer.io",
                     "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}


# -- lint and values schema --------------------------------------------------------------


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_lint_passes_strict(values: dict[str, Any] | None, k8s_version: str) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=RELEASE_NS,
                       kube_version=f"v{k8s_version}")
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("bad", [
    {"bogus": 1},
    {"operator": {"imag": {"repository": "x"}}},
    {"watch": {"scope": "everywhere"}},
    {"watch": {"scope": "namespaces", "namespaces": ["Not_A_Namespace"]}},
    {"operator": {"replicas": -1}},
    {"operator": {"image": {"digest": "latest"}}},
    {"runtime": {"defaultResources": {"memoryLimit": "lots"}}},
    {"runtime": {"defaultResources": {"cpuRequest": "1.2.3"}}},
    {"runtime": {"gatewayResources": {"memoryLimit": "1Gb"}}},
    {"operator": {"resources": {"limits": {"cpu": "1.2.3"}}}},
    {"operator": {"resources": {"limits": {"cpu": -1}}}},
    {"operator": {"resources": {"requests": {"memory": "12 Mi"}}}},
    {"fullnameOverride": "Kube_Infer"},
    {"fullnameOverride": "1kubeinfer"},
    {"fullnameOverride": "k" * 47},
    {"nameOverride": "Kube_Infer"},
    {"nameOverride": "-kubeinfer"},
    {"imagePullSecrets": [{"nam": "regcred"}]},
    {"imagePullSecrets": [""]},
    {"operator": {"metricsPort": 80}},
    {"peering": {"lifetimeSeconds": 4}},
    {"peering": {"lifetimeSeconds": 301}},
    {"runtime": {"upgrade": {"maxConcurrentEndpoints": -1}}},
    {"runtime": {"upgrade": {"maxConcurrentEndpoints": 1.5}}},
    {"runtime": {"podTemplate": {"nodeSelecter": {"a": "b"}}}},
    {"runtime": {"podTemplate": {"tolerations": {"key": "gpu"}}}},
    {"runtime": {"podTemplate": {"imagePullSecrets": ["regcred"]}}},
    {"runtime": {"podTemplate": {"labels": {"a": 1}}}},
    {"rbac": {"aggregateToDefaultRoles": "yes"}},
    {"metrics": {"serviceMonitor": {"interval": "every minute"}}},
    # Strings that would add YAML lines to a manifest (or are not valid names).
    {"operator": {"priorityClassName": "x\n      hostNetwork: true"}},
    {"operator": {"priorityClassName": "Not A Class"}},
    {"runtime": {"podTemplate": {"priorityClassName": "Not A Class"}}},
    {"serviceAccount": {"create": True, "name": "ops\n  namespace: kube-system"}},
    {"serviceAccount": {"create": False, "name": "Bad_Name"}},
    {"metrics": {"serviceMonitor": {"enabled": True,
                                    "portName": "metrics\n      bearerTokenFile: /x"}}},
    {"metrics": {"serviceMonitor": {"portName": "a-port-name-over-15"}}},
    {"metrics": {"serviceMonitor": {"interval": ""}}},
    {"metrics": {"serviceMonitor": {"scrapeTimeout": ""}}},
    {"operator": {"image": {"tag": "1.0 bad"}}},
    {"operator": {"image": {"repository": "ghcr.io/kubeinfer/operator:0.1.0"}}},
    {"runtime": {"image": {"repository": "ghcr.io/Kubeinfer/runtime"}}},
    {"operator": {"extraEnv": [{"name": "X", "valu": "y"}]}},
    {"operator": {"extraEnv": [{"name": "A=B", "value": "y"}]}},
    {"security": {"outboundAllowList": ["10.0.0.0/8,192.168.0.0/16"]}},
    # Labels the chart owns (the selector's among them) and invalid labels.
    {"commonLabels": {"app.kubernetes.io/name": "x"}},
    {"commonLabels": {"app.kubernetes.io/managed-by": "argocd"}},
    {"operator": {"podLabels": {"app.kubernetes.io/component": "x"}}},
    {"operator": {"podLabels": {"app.kubernetes.io/instance": "other"}}},
    {"metrics": {"serviceMonitor": {"labels": {"helm.sh/chart": "x"}}}},
    {"commonLabels": {"team": "a b"}},
    {"commonLabels": {"bad key": "a"}},
    {"commonLabels": {"team": "x" * 64}},
    # Values the templates cannot do without.
    {"runtime": {"compilerImage": None}},
    {"statusIntervalSeconds": None},
    {"resyncIntervalSeconds": None},
    {"rbac": {"restrictSecretWrites": "yes"}},
], ids=lambda v: str(v))
def test_values_schema_refuses(chart: helm.Chart, bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.render(bad, name=RELEASE, namespace=RELEASE_NS)


def test_values_schema_names_the_unknown_key(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="nodeSelecter"):
        chart.validate_schema({"operator": {"nodeSelecter": {"a": "b"}}})


def test_namespaces_with_cluster_scope_is_refused_with_the_fix(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render({"watch": {"namespaces": ["team-a"]}}, name=RELEASE, namespace=RELEASE_NS)
    message = str(err.value)
    assert "watch.namespaces" in message and "watch.scope" in message
    assert "set watch.scope=namespaces" in message


def test_every_values_key_is_commented() -> None:
    """values.yaml documents each key: a comment line right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    # Free-form maps whose entries are data, not chart keys.
    data_parents = {"resources", "requests", "limits", "selector"}
    parents: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        parents = [(d, k) for d, k in parents if d < indent]
        if not (parents and parents[-1][1] in data_parents):
            above = lines[i - 1].strip() if i else ""
            if not above.startswith("#"):
                missing.append(".".join([k for _, k in parents] + [key]))
        parents.append((indent, key))
    assert missing == [], f"values.yaml keys without a comment: {missing}"


def test_every_values_key_is_in_the_schema(chart: helm.Chart) -> None:
    """Defaults pass the strict schema (so the schema knows every documented key)."""
    chart.validate_schema(chart.values)


# -- rendered objects --------------------------------------------------------------------


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_every_rendered_object_is_valid(chart: helm.Chart, values: dict[str, Any] | None,
                                        k8s_version: str) -> None:
    objects = render(chart, values)
    assert objects
    for obj in objects:
        validate(obj, k8s_version)


def test_validation_catches_a_typo_in_a_rendered_object(chart: helm.Chart) -> None:
    """The strict check this file relies on does fail on an unknown field."""
    deployment = one(render(chart), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_default_render_is_cluster_wide(chart: helm.Chart) -> None:
    objects = render(chart)
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == ["ClusterKopfPeering", "ClusterRole", "ClusterRole", "ClusterRole",
                     "ClusterRoleBinding", "Deployment", "NetworkPolicy", "Secret", "Service",
                     "Service", "ServiceAccount", "ValidatingAdmissionPolicy",
                     "ValidatingAdmissionPolicyBinding"]
    assert env_of(one(objects, "Deployment"))["KUBEINFER_NAMESPACES"] == ""
    # The operator's scaler (serverless scale-from-zero), and where gateways reach it.
    scaler = named(objects, "Service", f"{RELEASE}-scaler")
    assert scaler["spec"]["ports"][0]["targetPort"] == "scaler"
    assert env_of(one(objects, "Deployment"))["KUBEINFER_SCALER_URL"] == (
        f"http://{scaler['metadata']['name']}.{RELEASE_NS}.svc:8090/scale")
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == operator_role(objects)["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubeinfer",
                                    "namespace": RELEASE_NS}]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == (
        "kubeinfer")
    assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == "kubeinfer"


def test_namespaced_scope_grants_nothing_cluster_wide_but_reads(chart: helm.Chart) -> None:
    objects = render(chart, NAMESPACED)
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for b in bindings:
        assert b["subjects"][0]["namespace"] == RELEASE_NS
    (cluster_role,) = [r for r in by_kind(objects, "ClusterRole") if not is_aggregated(r)]
    verbs = {v for rule in cluster_role["rules"] for v in rule["verbs"]}
    assert verbs == {"list", "watch"}
    peerings = by_kind(objects, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert not by_kind(objects, "ClusterKopfPeering")
    assert env_of(one(objects, "Deployment"))["KUBEINFER_NAMESPACES"] == "team-a,team-b"


def test_namespaced_scope_defaults_to_the_release_namespace(chart: helm.Chart) -> None:
    objects = render(chart, {"watch": {"scope": "namespaces"}}, namespace="ml")
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == ["ml"]
    assert env_of(one(objects, "Deployment"))["KUBEINFER_NAMESPACES"] == "ml"


def test_namespaced_scope_without_cluster_reads_is_fully_namespaced(chart: helm.Chart) -> None:
    objects = render(chart, {**NAMESPACED, "rbac": {"create": True, "clusterReads": False,
                                                     "aggregateToDefaultRoles": False,
                                                     "restrictSecretWrites": False}})
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    # Nothing cluster-scoped at all: an installer limited to namespaces can install it.
    assert all(o["metadata"].get("namespace") for o in objects), [
        o["kind"] for o in objects if not o["metadata"].get("namespace")]


def test_rbac_can_be_left_to_the_cluster_admin(chart: helm.Chart) -> None:
    objects = render(chart, {"rbac": {"create": False, "clusterReads": True},
                             "serviceAccount": {"create": False, "name": "ops-sa"}})
    assert sorted(o["kind"] for o in objects) == ["ClusterKopfPeering", "Deployment",
                                                  "NetworkPolicy", "Secret", "Service",
                                                  "Service"]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops-sa"


@pytest.mark.parametrize("values", [None, NAMESPACED], ids=["cluster", "ns"])
def test_rbac_is_least_privilege(chart: helm.Chart, values: dict[str, Any] | None) -> None:
    for role in by_kind(render(chart, values), "ClusterRole") + by_kind(
            render(chart, values), "Role"):
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{role['metadata']['name']}: wildcard {rule}"
            # Pods are read (a TransformJob's and a CompilationJob's reports are their
            # termination messages),
            # never created, changed, deleted or exec'ed into.
            assert not {"pods/exec", "pods/attach", "pods/portforward", "pods/eviction",
                        "pods/log"} & set(rule["resources"]), rule
            if "pods" in rule["resources"]:
                assert rule["resources"] == ["pods"], rule
                assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
            if "jobs" in rule["resources"]:
                assert rule["apiGroups"] == ["batch"] and "patch" not in rule["verbs"], rule
            if "secrets" in rule["resources"]:
                # One Secret name only; create cannot be limited by name but reads nothing.
                assert rule["resources"] == ["secrets"], rule
                assert ((rule.get("resourceNames") == ["kubeinfer-runtime"]
                        and set(rule["verbs"]) <= {"get", "patch", "update"})
                        or (rule["verbs"] == ["create"] and "resourceNames" not in rule)), rule
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
            if rule["resources"] == ["customresourcedefinitions"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"}


@pytest.mark.parametrize("values", [None, NAMESPACED], ids=["cluster", "ns"])
def test_the_operator_may_run_every_kind(chart: helm.Chart, values: dict[str, Any] | None) -> None:
    roles = by_kind(render(chart, values), "ClusterRole" if values is None else "Role")
    for role in [r for r in roles if not is_aggregated(r)]:
        granted = {(r, v) for rule in role["rules"] for r in rule["resources"]
                   for v in rule["verbs"]}
        for kind in ("endpoints", "transformjobs", "compilationjobs", "recommendationjobs",
                     "edgefleets"):
            assert {(kind, "watch"), (kind, "patch"), (f"{kind}/status", "patch"),
                    (f"{kind}/finalizers", "update")} <= granted, kind
        assert {("jobs", "create"), ("jobs", "watch"), ("jobs", "delete"),
                ("pods", "list")} <= granted


def test_every_rbac_rule_has_a_comment_saying_why() -> None:
    lines = (CHART / "templates" / "rbac.yaml").read_text().splitlines()
    rule_lines = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert len(rule_lines) >= 8
    for i in rule_lines:
        assert lines[i - 1].strip().startswith("#"), f"rbac.yaml:{i + 1}: rule without a comment"


def test_operator_pod_is_locked_down(chart: helm.Chart) -> None:
    deployment = one(render(chart), "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["args"] == ["operator"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    health, scaler, metrics = container["ports"]
    assert (health["name"], health["containerPort"]) == ("health", 8080)
    assert (scaler["name"], scaler["containerPort"]) == ("scaler", 8090)
    assert (metrics["name"], metrics["containerPort"]) == ("metrics", 8070)
    assert env_of(deployment)["KUBEINFER_LIVENESS_ENDPOINT"] == "http://0.0.0.0:8080/healthz"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_operator_env_is_read_by_operator_settings(
        chart: helm.Chart, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every KUBEINFER_* variable the chart sets is a real OperatorSettings field, parsed."""
    values = {
        **NAMESPACED,
        "runtime": {"image": {"repository": "reg.example/runtime", "tag": "1.2.3",
                              "pullPolicy": "Always"},
                    "gatewayReplicas": 3, "s3": {"secretName": "s3-creds"},
                    "redis": {"url": "redis://redis.infra:6379/0"},
                    "gatewayResources": {"cpuRequest": "250m"},
                    "podTemplate": POD_TEMPLATE,
                    "upgrade": {"maxConcurrentEndpoints": 5}},
        "networkPolicy": {"enabled": True, "metricsFrom": [{"namespaceSelector": {}}]},
        "security": {"outboundAllowList": ["169.254.170.2/32", "metrics.internal"]},
        "peering": {"name": "ml-peering", "lifetimeSeconds": 30},
        "operator": {"metricsPort": 9100},
        "statusIntervalSeconds": 2.5,
        "resyncIntervalSeconds": 120,
    }
    deployment = one(render(chart, values), "Deployment")
    env = env_of(deployment)
    fields = {"KUBEINFER_" + name.upper() for name in OperatorSettings.model_fields}
    unknown = {k for k in [*env, *secret_env_of(deployment)] if k.startswith("KUBEINFER_")} - (
        fields)
    assert unknown == set(), f"chart sets env the operator does not read: {unknown}"
    for name in fields:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert settings.namespaces == ["team-a", "team-b"]
    assert settings.runtime_image == "reg.example/runtime:1.2.3"
    assert settings.image_pull_policy == "Always"
    assert settings.gateway_replicas == 3
    assert settings.gateway_cpu_request == "250m"
    assert settings.s3_secret_name == "s3-creds"
    assert settings.redis_url == "redis://redis.infra:6379/0"
    assert settings.peering_name == "ml-peering"
    assert settings.status_interval_s == 2.5
    assert settings.resync_interval_s == 120
    assert settings.liveness_endpoint == "http://0.0.0.0:8080/healthz"
    assert settings.standalone is False  # peering objects are rendered for it
    assert settings.runtime_uid == 65532
    assert settings.default_auth_mode == "SigV4"
    assert settings.network_policy is True
    assert settings.metrics_from == [{"namespaceSelector": {}}]
    assert settings.outbound_allow == "169.254.170.2/32,metrics.internal"
    assert settings.runtime_secret_name == "kubeinfer-runtime"
    assert settings.operator_metrics_port == 9100
    assert settings.default_pod_template == POD_TEMPLATE
    # The chart's schema and the operator's podTemplate model know the same fields.
    from kubeinfer_operator.api.placement import PodTemplate

    assert set(PodTemplate.model_fields) == set(
        chart.schema["properties"]["runtime"]["properties"]["podTemplate"]["properties"])
    PodTemplate.model_validate(settings.default_pod_template)
    assert settings.max_concurrent_upgrades == 5
    assert settings.peering_lifetime_s == 30
    # Not set by the chart: each replica draws its own, so replicas never tie.
    assert settings.peering_priority is None
    credentials = f"{RELEASE}-credentials"
    assert secret_env_of(deployment) == {
        "KUBEINFER_CALLER_ACCESS_KEY_ID": (credentials, "AWS_ACCESS_KEY_ID"),
        "KUBEINFER_CALLER_SECRET_ACCESS_KEY": (credentials, "AWS_SECRET_ACCESS_KEY"),
        "KUBEINFER_CALLER_TOKEN": (credentials, "token"),
        "KUBEINFER_SCALER_SIGNING_KEY": (credentials, "scaler-signing-key"),
    }


def test_image_digest_pins_and_tag_defaults_to_app_version(chart: helm.Chart) -> None:
    digest = "sha256:" + "a" * 64
    objects = render(chart, {"operator": {"image": {"digest": digest}}})
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"ghcr.io/kubeinfer/operator@{digest}"
    env = env_of(one(objects, "Deployment"))
    app_version = chart.metadata["appVersion"]
    assert env["KUBEINFER_RUNTIME_IMAGE"] == f"ghcr.io/kubeinfer/runtime:{app_version}"
    assert env["KUBEINFER_COMPILER_IMAGE"] == f"ghcr.io/kubeinfer/compiler:{app_version}"


def test_service_monitor_is_off_by_default_and_selects_runtime_services(
        chart: helm.Chart) -> None:
    assert not by_kind(render(chart), "ServiceMonitor")
    monitor = named(render(chart, MONITORED), "ServiceMonitor", f"{RELEASE}-runtime")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    # The labels and port name the operator puts on every gateway/model-server Service.
    from kubeinfer_operator.render import k8s_meta, k8s_workloads

    operator_labels = k8s_meta.labels("iris", k8s_meta.COMPONENT_GATEWAY)
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert operator_labels[key] == value
    assert monitor["spec"]["endpoints"][0]["port"] == k8s_workloads.METRICS_PORT_NAME

    namespaced = named(render(chart, {**NAMESPACED, **MONITORED}), "ServiceMonitor",
                       f"{RELEASE}-runtime")
    assert namespaced["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_notes_tell_how_to_wait_for_an_endpoint(chart: helm.Chart) -> None:
    notes = chart.render(NAMESPACED, name=RELEASE, namespace=RELEASE_NS)[
        "kubeinfer/templates/NOTES.txt"]
    assert "kubectl -n team-a wait --for=condition=Ready endpoints.kubeinfer.io/iris" in notes


# -- credentials and network policies ----------------------------------------------------


def test_credentials_are_generated_once_and_kept(chart: helm.Chart) -> None:
    import base64

    secret = one(render(chart), "Secret")
    assert secret["metadata"]["name"] == f"{RELEASE}-credentials"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(data) == {"scaler-signing-key", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                         "token"}
    assert len(data["AWS_SECRET_ACCESS_KEY"]) == 40 and data["AWS_ACCESS_KEY_ID"].isupper()
    # Random per install (an upgrade keeps the installed ones: the template looks them up).
    again = one(render(chart), "Secret")
    assert again["data"]["AWS_SECRET_ACCESS_KEY"] != secret["data"]["AWS_SECRET_ACCESS_KEY"]


def test_a_redis_password_never_enters_the_chart_as_a_value(chart: helm.Chart) -> None:
    with pytest.raises(Exception, match="contains a password"):
        render(chart, {"runtime": {"redis": {"url": "redis://:s3cret-pass@redis:6379/0"}}})
    objects = render(chart, {"runtime": {"redis": {"existingSecret": "redis-creds",
                                                   "urlKey": "redis-url"}}})
    deployment = one(objects, "Deployment")
    assert secret_env_of(deployment)["KUBEINFER_REDIS_URL"] == ("redis-creds", "redis-url")
    assert "KUBEINFER_REDIS_URL" not in env_of(deployment)
    with pytest.raises(Exception, match="both set"):
        render(chart, {"runtime": {"redis": {"url": "redis://r:6379/0",
                                             "existingSecret": "redis-creds"}}})


@pytest.mark.parametrize(("values", "expected"), [
    ({}, "true"),  # each namespace its own Redis user by default
    ({"aclPerNamespace": True}, "true"),
    ({"aclPerNamespace": False}, "false"),
])
def test_per_namespace_redis_users_follow_the_value(chart: helm.Chart, values: dict[str, Any],
                                                   expected: str) -> None:
    redis = {"url": "redis://r:6379/0", **values}
    deployment = one(render(chart, {"runtime": {"redis": redis}}), "Deployment")
    assert env_of(deployment)["KUBEINFER_REDIS_ACL"] == expected
    with pytest.raises(Exception, match="aclPerNamespace"):
        render(chart, {"runtime": {"redis": {"aclPerNamespace": "no"}}})


@pytest.mark.parametrize(("values", "expected"), [
    ({}, "namespace"),  # every Endpoint's PromQL pinned to its namespace by default
    ({"promqlNamespaceLabel": "kubernetes_namespace"}, "kubernetes_namespace"),
    ({"promqlNamespaceLabel": ""}, ""),  # off: a single tenant, or a Prometheus per tenant
])
def test_the_promql_namespace_label_follows_the_value(chart: helm.Chart, values: dict[str, Any],
                                                      expected: str) -> None:
    security = {"outboundAllowList": [], "promqlNamespaceLabel": "namespace", **values}
    deployment = one(render(chart, {"security": security}), "Deployment")
    assert env_of(deployment)["KUBEINFER_PROMQL_NAMESPACE_LABEL"] == expected
    assert OperatorSettings(promql_namespace_label=expected).promql_namespace_label == expected
    with pytest.raises(Exception, match="promqlNamespaceLabel"):
        render(chart, {"security": {"outboundAllowList": [],
                                    "promqlNamespaceLabel": 'namespace="x"'}})


def test_the_scaler_accepts_only_gateway_pods(chart: helm.Chart) -> None:
    policy = one(render(chart), "NetworkPolicy")
    validate(policy)
    scaler_rule, health_rule, metrics_rule = policy["spec"]["ingress"]
    assert scaler_rule["ports"] == [{"port": "scaler", "protocol": "TCP"}]
    (peer,) = scaler_rule["from"]
    assert peer["namespaceSelector"] == {}
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert health_rule == {"ports": [{"port": "health", "protocol": "TCP"}]}
    # The operator's /metrics: any source unless networkPolicy.metricsFrom names some.
    assert metrics_rule == {"ports": [{"port": "metrics", "protocol": "TCP"}]}
    selector = policy["spec"]["podSelector"]["matchLabels"]
    labels = one(render(chart), "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert not by_kind(render(chart, {"networkPolicy": {"enabled": False, "metricsFrom": []}}),
                       "NetworkPolicy")


def test_notes_tell_how_to_read_the_namespace_keys(chart: helm.Chart) -> None:
    # The operator derives each namespace's pair into its runtime Secret: callers read
    # theirs there, never the chart's master pair.
    notes = chart.render(None, name=RELEASE, namespace=RELEASE_NS)["kubeinfer/templates/NOTES.txt"]
    assert ("kubectl get secret kubeinfer-runtime "
            "-o jsonpath='{.data.AWS_SECRET_ACCESS_KEY}' | base64 -d") in notes
    assert f"{RELEASE}-credentials" not in notes
    assert "SigV4" in notes and "derived per namespace" in notes
    watched = chart.render({"watch": {"scope": "namespaces", "namespaces": ["ml"]}}, name=RELEASE,
                           namespace=RELEASE_NS)["kubeinfer/templates/NOTES.txt"]
    assert "kubectl -n ml get secret kubeinfer-runtime" in watched


# -- values refused or accepted at install (issue 14) ------------------------------------


@pytest.mark.parametrize(("ports", "a", "b"), [
    ({"scalerPort": 8080}, "operator.healthPort", "operator.scalerPort"),
    ({"metricsPort": 8080}, "operator.healthPort", "operator.metricsPort"),
    ({"metricsPort": 8090}, "operator.metricsPort", "operator.scalerPort"),
    ({"healthPort": 9000, "scalerPort": 9000, "metricsPort": 9000},
     "operator.healthPort", "operator.metricsPort"),
])
def test_equal_operator_ports_are_refused_naming_both(
        chart: helm.Chart, ports: dict[str, int], a: str, b: str) -> None:
    with pytest.raises(helm.HelmRenderError) as err:
        chart.render({"operator": ports}, name=RELEASE, namespace=RELEASE_NS)
    message = str(err.value)
    assert f"Values {a} and {b} are both" in message
    assert "give them different ports" in message


def test_quantities_follow_the_kubernetes_grammar(chart: helm.Chart) -> None:
    """`--set operator.resources.limits.cpu=1` (a number) is accepted; `1.2.3` is not."""
    values = helm.parse_set_string("operator.resources.limits.cpu=1")
    assert values == {"operator": {"resources": {"limits": {"cpu": 1}}}}
    deployment = one(render(chart, values), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": 1, "memory": "256Mi"}
    for good in ["100m", "1.5Gi", "2e3", ".5", "1.", "+1k", "128974848", 0.25]:
        chart.validate_schema({**chart.values, "operator": {
            **chart.values["operator"], "resources": {"requests": {"cpu": good}}}})
    for bad in ["1.2.3", "1Gb", "1 Gi", "m", "1KI", ""]:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema({**chart.values, "operator": {
                **chart.values["operator"], "resources": {"requests": {"cpu": bad}}}})


def test_image_pull_secrets_take_the_pod_spec_form_and_plain_names(chart: helm.Chart) -> None:
    objects = render(chart, {"imagePullSecrets": [{"name": "regcred"}, "legacy"]})
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "legacy"}]
    assert "imagePullSecrets" not in one(render(chart), "Deployment")["spec"]["template"]["spec"]


def test_a_release_name_too_long_for_service_names_is_refused_with_the_fix(
        chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="set fullnameOverride"):
        chart.render(None, name="a" * 40, namespace=RELEASE_NS)
    names = [o["metadata"]["name"] for o in render(chart, {"fullnameOverride": "k" * 46})]
    assert max(len(n) for n in names) <= 63


# -- HA, metrics, placement, staged upgrades ---------------------------------------------


def test_one_replica_is_recreated_and_has_no_budget(chart: helm.Chart) -> None:
    for replicas in (0, 1):
        objects = render(chart, {"operator": {"replicas": replicas}})
        deployment = one(objects, "Deployment")
        assert deployment["spec"]["replicas"] == replicas
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}
        assert "affinity" not in deployment["spec"]["template"]["spec"]
        assert not by_kind(objects, "PodDisruptionBudget")


def test_ha_replicas_roll_one_at_a_time_with_a_budget_and_spread(chart: helm.Chart) -> None:
    objects = render(chart, HA)
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1,
                           "selector": deployment["spec"]["selector"],
                           # A crash-looping standby must not block node drains.
                           "unhealthyPodEvictionPolicy": "AlwaysAllow"}
    assert pdb["metadata"]["namespace"] == RELEASE_NS
    (term,) = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    # The operator's own affinity replaces the default.
    own = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 1, "preference": {"matchExpressions": [
            {"key": "pool", "operator": "In", "values": ["system"]}]}}]}}
    deployment = one(render(chart, {"operator": {"replicas": 2, "affinity": own}}), "Deployment")
    assert deployment["spec"]["template"]["spec"]["affinity"] == own
    env = env_of(deployment)
    assert env["KUBEINFER_PEERING_LIFETIME_S"] == "10"
    assert "KUBEINFER_PEERING_PRIORITY" not in env  # random per process


def test_operator_metrics_are_served_and_scraped(chart: helm.Chart) -> None:
    objects = render(chart, MONITORED)
    deployment = one(objects, "Deployment")
    assert env_of(deployment)["KUBEINFER_OPERATOR_METRICS_PORT"] == "8070"
    service = named(objects, "Service", f"{RELEASE}-operator-metrics")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8070,
                                         "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    monitor = named(objects, "ServiceMonitor", f"{RELEASE}-operator")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NS]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    # It selects the metrics Service, and not the scaler's.
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    matching = [s["metadata"]["name"] for s in by_kind(objects, "Service")
                if selector <= s["metadata"]["labels"].items()]
    assert matching == [f"{RELEASE}-operator-metrics"]


def test_the_operator_metrics_port_admits_metrics_from(chart: helm.Chart) -> None:
    peers = PLACED["networkPolicy"]["metricsFrom"]
    policy = one(render(chart, {"networkPolicy": {"enabled": True, "metricsFrom": peers}}),
                 "NetworkPolicy")
    assert policy["spec"]["ingress"][2] == {
        "ports": [{"port": "metrics", "protocol": "TCP"}], "from": peers}


def test_runtime_pod_template_and_upgrade_pace_reach_the_operator(chart: helm.Chart) -> None:
    env = env_of(one(render(chart), "Deployment"))
    assert env["KUBEINFER_DEFAULT_POD_TEMPLATE"] == "{}"
    assert env["KUBEINFER_MAX_CONCURRENT_UPGRADES"] == "3"
    env = env_of(one(render(chart, PLACED), "Deployment"))
    assert json.loads(env["KUBEINFER_DEFAULT_POD_TEMPLATE"]) == POD_TEMPLATE
    assert env["KUBEINFER_MAX_CONCURRENT_UPGRADES"] == "0"


def test_notes_explain_ha(chart: helm.Chart) -> None:
    notes = chart.render(HA, name=RELEASE, namespace=RELEASE_NS)["kubeinfer/templates/NOTES.txt"]
    assert "3 operator replicas, one active" in notes
    assert "kubectl get clusterkopfpeering kubeinfer" in notes
    assert "resource.customizations.health.kubeinfer.io_Endpoint" in notes
    notes = chart.render(None, name=RELEASE, namespace=RELEASE_NS)[
        "kubeinfer/templates/NOTES.txt"]
    assert "operator.replicas=2" in notes


# -- aggregated user roles ---------------------------------------------------------------


def shipped_kinds(chart: helm.Chart) -> dict[str, set[str]]:
    """API group -> plurals of every CRD the chart ships, kopf's own peering kinds aside."""
    kinds: dict[str, set[str]] = {}
    for entry in chart.crds:
        for crd in yaml.safe_load_all(entry["data"]):
            if crd["spec"]["group"] != "kopf.dev":
                kinds.setdefault(crd["spec"]["group"], set()).add(crd["spec"]["names"]["plural"])
    return kinds


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("values", [None, NAMESPACED], ids=["cluster", "ns"])
def test_aggregated_roles_cover_every_shipped_kind(
        chart: helm.Chart, values: dict[str, Any] | None) -> None:
    objects = render(chart, values)
    edit = named(objects, "ClusterRole", f"{RELEASE}-edit")
    view = named(objects, "ClusterRole", f"{RELEASE}-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    kinds = shipped_kinds(chart)
    assert kinds["kubeinfer.io"] >= {"endpoints", "transformjobs", "compilationjobs"}
    edit_verbs = {"create", "delete", "deletecollection", "get", "list", "patch", "update",
                  "watch"}
    expected_edit = {(g, p, v) for g, plurals in kinds.items() for p in plurals
                     for v in edit_verbs}
    expected_view = {(g, r, v) for g, plurals in kinds.items() for p in plurals
                     for r in (p, f"{p}/status") for v in ("get", "list", "watch")}
    assert grants(edit) == expected_edit
    assert grants(view) == expected_view


def test_aggregated_roles_can_be_turned_off(chart: helm.Chart) -> None:
    for rbac in ({"create": True, "clusterReads": True, "aggregateToDefaultRoles": False},
                 {"create": False, "clusterReads": True, "aggregateToDefaultRoles": True}):
        roles = by_kind(render(chart, {"rbac": rbac}), "ClusterRole")
        assert not [r for r in roles if is_aggregated(r)], rbac


# -- production review: exact grants, admission guard, pod security, labels ---------------

OPERATOR_SRC = REPO / "operator" / "kubeinfer_operator"

#: (apiGroup, resource, verb) -> why: every grant of the operator's namespaced rules and
#: the code that uses it. A grant nothing uses, or a use nothing grants, fails below.
NAMESPACED_GRANTS = {
    **{("kubeinfer.io", kind, verb): "kopf: list/watch, finalizer + annotations; "
                                     "KubeClient.get: fresh spec"
       for kind in ("endpoints", "transformjobs", "compilationjobs", "recommendationjobs",
                    "edgefleets") for verb in ("get", "list", "watch", "patch")},
    **{("kubeinfer.io", f"{kind}/status", "patch"): "KubeClient.merge_patch status"
       for kind in ("endpoints", "transformjobs", "compilationjobs", "recommendationjobs",
                    "edgefleets")},
    **{("kubeinfer.io", f"{kind}/finalizers", "update"): "blockOwnerDeletion owner refs"
       for kind in ("endpoints", "transformjobs", "compilationjobs", "recommendationjobs",
                    "edgefleets")},
    **{("apps", "deployments", v): "children; kopf.on.event watch"
       for v in ("get", "list", "watch", "create", "patch", "delete")},
    **{(g, r, v): "children (create-or-patch, listed by label, deleted)"
       for g, r in (("", "services"), ("", "configmaps"),
                    ("autoscaling", "horizontalpodautoscalers"),
                    ("policy", "poddisruptionbudgets"),
                    ("networking.k8s.io", "networkpolicies"))
       for v in ("get", "list", "create", "patch", "delete")},
    ("", "events", "create"): "kopf posting; k8s.events.post_events",
    # Secrets: get + merge patch of the runtime Secret (name-limited), create (cannot be).
    ("", "secrets", "get"): "runtime Secret (by name)",
    ("", "secrets", "patch"): "runtime Secret (by name), merge patch only",
    ("", "secrets", "create"): "runtime Secret's first creation",
    **{("batch", "jobs", v): "planner/workers/compiler/package Jobs; kopf.on.event watch"
       for v in ("get", "list", "watch", "create", "delete")},
    ("", "pods", "list"): "termination messages, ready pod IPs (listed by label)",
}


def role_grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("values", [None, NAMESPACED], ids=["cluster", "ns"])
def test_operator_grants_are_exactly_what_the_code_uses(
        chart: helm.Chart, values: dict[str, Any] | None) -> None:
    objects = render(chart, values)
    if values is None:
        roles = [operator_role(objects)]
        extra = {("kopf.dev", "clusterkopfpeerings", v) for v in ("get", "list", "watch", "patch")}
        extra |= {("apiextensions.k8s.io", "customresourcedefinitions", v)
                  for v in ("list", "watch")}
    else:
        roles = by_kind(objects, "Role")
        extra = {("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")}
    for role in roles:
        granted = role_grants(role)
        expected = set(NAMESPACED_GRANTS) | extra
        assert granted - expected == set(), f"granted but unused: {granted - expected}"
        assert expected - granted == set(), f"used but not granted: {expected - granted}"
        (named_secrets,) = [r for r in role["rules"] if r.get("resourceNames")]
        assert named_secrets == {"apiGroups": [""], "resources": ["secrets"],
                                 "resourceNames": ["kubeinfer-runtime"],
                                 "verbs": ["get", "patch"]}


def test_the_operator_code_needs_no_update_verb_and_no_pod_get() -> None:
    """Why secrets/update and pods/get are not granted: the operator's only API client
    writes with JSON merge patch (never PUT), and lists pods by label (never GETs one)."""
    client = (OPERATOR_SRC / "k8s" / "client.py").read_text()
    methods = set(re.findall(r'self\._call\("([A-Z]+)"', client))
    assert methods == {"GET", "POST", "PATCH", "DELETE"}, methods
    sources = "\n".join(p.read_text() for p in OPERATOR_SRC.rglob("*.py"))
    assert not re.search(r"\.get\(\s*kinds\.POD\b", sources)
    assert re.search(r"\.list\(\s*kinds\.POD\b", sources)
    assert "kube.merge_patch(kinds.SECRET" in sources


def _cel(expression: str, activation: dict[str, Any]) -> bool:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the policy's CEL")
    env = celpy.Environment()
    program = env.program(env.compile(expression))
    return bool(program.evaluate({k: celpy.json_to_cel(v) for k, v in activation.items()}))


@pytest.mark.parametrize("values", [
    None,
    {"runtime": {"secretName": "ki-runtime"},
     "serviceAccount": {"create": False, "name": "ops-sa"}, **NAMESPACED},
], ids=["default", "custom-names"])
def test_the_operator_may_write_only_its_runtime_secret(
        chart: helm.Chart, values: dict[str, Any] | None) -> None:
    """RBAC cannot limit Secret create by name: without this policy a compromised
    operator could create a service-account-token Secret named like the runtime Secret
    for any ServiceAccount, and read it back with its name-limited get."""
    from kubeinfer_operator.render.k8s_secrets import runtime_secret

    objects = render(chart, values)
    policy = one(objects, "ValidatingAdmissionPolicy")
    binding = one(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"],
                               "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["secrets"] and set(rule["operations"]) == {"CREATE", "UPDATE"}
    sa = one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"]
    (condition,) = policy["spec"]["matchConditions"]
    me = {"request": {"userInfo": {"username": f"system:serviceaccount:{RELEASE_NS}:{sa}"}}}
    other = {"request": {"userInfo": {"username": f"system:serviceaccount:{RELEASE_NS}:x"}}}
    assert _cel(condition["expression"], me) and not _cel(condition["expression"], other)
    (validation,) = policy["spec"]["validations"]
    name = (values or {}).get("runtime", {}).get("secretName", "kubeinfer-runtime")
    # What the operator itself writes is admitted ...
    settings = OperatorSettings(runtime_secret_name=name)
    assert _cel(validation["expression"], {"object": runtime_secret("team-a", settings, [])})
    # ... a token Secret under the same name, or any other Secret, is not.
    token = {"metadata": {"name": name, "namespace": "kube-system", "annotations": {
        "kubernetes.io/service-account.name": "clusterrole-aggregation-controller"}},
        "type": "kubernetes.io/service-account-token"}
    assert not _cel(validation["expression"], {"object": token})
    assert not _cel(validation["expression"],
                    {"object": {"metadata": {"name": "webhook-ca"}, "type": "Opaque"}})


def test_the_secret_policy_follows_rbac_values(chart: helm.Chart) -> None:
    for rbac in ({"create": True, "clusterReads": True, "restrictSecretWrites": False},
                 {"create": False, "clusterReads": True, "restrictSecretWrites": True}):
        objects = render(chart, {"rbac": rbac})
        assert not by_kind(objects, "ValidatingAdmissionPolicy"), rbac
        assert not by_kind(objects, "ValidatingAdmissionPolicyBinding"), rbac


def assert_restricted(pod: dict[str, Any], where: str) -> None:
    """The Pod Security Standards "restricted" profile, as the admission plugin checks it."""
    for key in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        assert not pod.get(key) or (key == "hostUsers"), f"{where}: {key}"
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                       "persistentVolumeClaim", "projected", "secret"}
    for volume in pod.get("volumes", []):
        assert set(volume) - {"name"} <= allowed_volumes, f"{where}: volume {volume}"
    pod_sc = pod.get("securityContext", {})
    for container in pod.get("initContainers", []) + pod["containers"]:
        sc = container.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", pod_sc.get("runAsUser", 1)) != 0, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert not sc.get("privileged"), where
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
        assert set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, where
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
        assert seccomp.get("type") in {"RuntimeDefault", "Localhost"}, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert not any(p.get("hostPort") for p in container.get("ports", [])), where
        resources = container.get("resources", {})
        assert resources.get("requests", {}).get("memory") and resources.get(
            "limits", {}).get("memory"), f"{where}: memory request and limit"


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_every_rendered_pod_meets_the_restricted_profile(
        chart: helm.Chart, values: dict[str, Any] | None) -> None:
    pods = 0
    for obj in render(chart, values):
        if obj["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            assert_restricted(obj["spec"]["template"]["spec"], obj["metadata"]["name"])
            pods += 1
        assert obj["kind"] not in {"Pod", "CronJob"}, obj["kind"]
    assert pods == 1


def test_only_the_operator_pod_mounts_the_service_account_token(chart: helm.Chart) -> None:
    objects = render(chart)
    assert one(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True


def test_user_labels_never_repeat_a_key_nor_move_the_selector(chart: helm.Chart) -> None:
    """commonLabels, podLabels and the ServiceMonitor's labels may share keys; each
    object gets each key once (a repeated key makes the manifest unparsable, which the
    UniqueKeyLoader of render() checks), the most specific value winning."""
    values = {"commonLabels": {"team": "platform", "release": "other"},
              "operator": {"podLabels": {"team": "ml"}},
              "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}}
    objects = render(chart, values)
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod_labels["team"] == "ml" and deployment["metadata"]["labels"]["team"] == "platform"
    for monitor in by_kind(objects, "ServiceMonitor"):
        assert monitor["metadata"]["labels"]["release"] == "prom"
    metrics = named(objects, "Service", f"{RELEASE}-operator-metrics")
    assert metrics["metadata"]["labels"]["kubeinfer.io/metrics"] == "operator"
    assert metrics["metadata"]["labels"]["release"] == "other"
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_the_scaler_admits_gateways_of_the_watched_namespaces_only(chart: helm.Chart) -> None:
    policy = one(render(chart, NAMESPACED), "NetworkPolicy")
    validate(policy)
    (peer,) = policy["spec"]["ingress"][0]["from"]
    assert peer["namespaceSelector"] == {"matchExpressions": [{
        "key": "kubernetes.io/metadata.name", "operator": "In",
        "values": ["team-a", "team-b"]}]}
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"


@pytest.mark.parametrize("values", list(VALUE_SETS.values()), ids=list(VALUE_SETS))
def test_no_value_set_changes_the_deployment_selector(
        chart: helm.Chart, values: dict[str, Any] | None) -> None:
    """`helm upgrade` cannot change a Deployment's selector (immutable): every value set
    but nameOverride, and the release name, must keep it."""
    deployment = one(render(chart, values), "Deployment")
    assert deployment["spec"]["selector"] == {"matchLabels": {
        "app.kubernetes.io/name": "kubeinfer", "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/component": "operator"}}


def test_gitops_installs_bring_their_own_keys(chart: helm.Chart) -> None:
    """Rendered without a cluster (Argo CD, helm template), lookup finds nothing and the
    generated Secret would get new keys at every render: credentials.existingSecret
    names a Secret the platform keeps, and the chart generates none."""
    objects = render(chart, {"credentials": {"existingSecret": "ki-keys"}})
    assert not by_kind(objects, "Secret")
    env = secret_env_of(one(objects, "Deployment"))
    assert env["KUBEINFER_SCALER_SIGNING_KEY"] == ("ki-keys", "scaler-signing-key")
    assert env["KUBEINFER_CALLER_SECRET_ACCESS_KEY"] == ("ki-keys", "AWS_SECRET_ACCESS_KEY")
    objects = render(chart, {"credentials": {"existingSecret": "ki-keys"},
                             "runtime": {"auth": {"defaultMode": "SigV4",
                                                  "existingSecret": "callers"}}})
    env = secret_env_of(one(objects, "Deployment"))
    assert env["KUBEINFER_SCALER_SIGNING_KEY"] == ("ki-keys", "scaler-signing-key")
    assert env["KUBEINFER_CALLER_TOKEN"] == ("callers", "token")
    # By default the chart generates them, and the operator reads its own.
    env = secret_env_of(one(render(chart), "Deployment"))
    assert env["KUBEINFER_SCALER_SIGNING_KEY"] == (f"{RELEASE}-credentials", "scaler-signing-key")
    with pytest.raises(helm.HelmValuesError):
        chart.render({"credentials": {"existingSecret": "Bad Name"}}, name=RELEASE,
                     namespace=RELEASE_NS)


def test_an_existing_service_account_must_be_named(chart: helm.Chart) -> None:
    """serviceAccount.create=false with no name used to bind the operator's ClusterRole
    to the release namespace's "default" ServiceAccount, which every pod there runs as."""
    with pytest.raises(helm.HelmRenderError, match=r"set serviceAccount\.name"):
        chart.render({"serviceAccount": {"create": False, "name": ""}}, name=RELEASE,
                     namespace=RELEASE_NS)
    objects = render(chart, {"serviceAccount": {"create": False, "name": "ops-sa"}})
    assert one(objects, "ClusterRoleBinding")["subjects"][0]["name"] == "ops-sa"
