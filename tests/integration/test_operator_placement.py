"""The real kopf operator against the Kubernetes emulator: podTemplate placement lands on
the Deployments, and Deployments of two replicas or more get a PodDisruptionBudget that
follows the spec (created, restored when edited, deleted at one replica).

The emulator strict-validates every object the operator writes against the
Kubernetes schema (policy/v1 PodDisruptionBudget included).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_operator.settings import OperatorSettings
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for

REPO = Path(__file__).resolve().parents[2]
EXAMPLE: dict[str, Any] = yaml.safe_load(
    (REPO / "examples" / "placement-endpoint.yaml").read_text())
DEFAULT_TEMPLATE: dict[str, Any] = {"nodeSelector": {"example.com/pool": "inference"},
                                    "labels": {"example.com/cost-center": "ml"},
                                    "imagePullSecrets": [{"name": "shared-regcred"}]}
SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.3, resync_interval_s=0.3,
                            namespaces=[], runtime_image="example.test/runtime:1",
                            s3_secret_name=None, default_pod_template=DEFAULT_TEMPLATE)
_ids = itertools.count()


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (client, _):
        yield client


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"p{next(_ids)}"
    kube.create_namespace(name)
    return name


def _endpoint() -> dict[str, Any]:
    doc = copy.deepcopy(EXAMPLE)
    doc["spec"]["variants"].append({"name": "single", "weight": 0,
                                    "model": {"uri": "s3://models/iris.onnx"}, "replicas": 1})
    return doc


def _budgets(kube: Kube, ns: str) -> set[str]:
    return {o["metadata"]["name"] for o in kube.list("PodDisruptionBudget", ns)}


def test_two_replicas_get_a_budget_and_placement_lands_on_the_deployments(kube: Kube,
                                                                          ns: str) -> None:
    doc = _endpoint()
    assert kube.create(doc, ns).status_code == 201
    wait_for(lambda: {"iris-placed-primary", "iris-placed-single",
                      "iris-placed-gateway"} <= kube.names("Deployment", ns), 10,
             "Deployments")
    wait_for(lambda: _budgets(kube, ns) == {"iris-placed-primary"}, 10, "one budget")
    budget = kube.get("PodDisruptionBudget", ns, "iris-placed-primary")
    primary = kube.get("Deployment", ns, "iris-placed-primary")
    assert budget is not None and primary is not None
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == primary["spec"]["selector"]
    owner = budget["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("Endpoint", "iris-placed")

    want = EXAMPLE["spec"]["variants"][0]["podTemplate"]
    pod = primary["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {**DEFAULT_TEMPLATE["nodeSelector"],
                                           **want["nodeSelector"]}
    assert pod["spec"]["tolerations"] == want["tolerations"]
    assert pod["spec"]["topologySpreadConstraints"][0]["labelSelector"] == (
        primary["spec"]["selector"])
    assert pod["spec"]["imagePullSecrets"] == [{"name": "shared-regcred"}]
    assert pod["metadata"]["labels"]["example.com/team"] == "ml"
    assert pod["metadata"]["labels"]["example.com/cost-center"] == "ml"
    assert pod["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
    # The selector labels are untouched.
    assert primary["spec"]["selector"]["matchLabels"].items() <= pod["metadata"][
        "labels"].items()
    gateway = kube.get("Deployment", ns, "iris-placed-gateway")
    assert gateway is not None
    assert gateway["spec"]["template"]["spec"]["nodeSelector"] == {
        "example.com/pool": "inference", "kubernetes.io/os": "linux"}
    # A variant without a template of its own gets the operator's default.
    single = kube.get("Deployment", ns, "iris-placed-single")
    assert single is not None
    assert single["spec"]["template"]["spec"]["nodeSelector"] == DEFAULT_TEMPLATE[
        "nodeSelector"]


def test_the_budget_follows_replicas_and_placement_follows_the_spec(kube: Kube,
                                                                    ns: str) -> None:
    assert kube.create(_endpoint(), ns).status_code == 201
    wait_for(lambda: _budgets(kube, ns) == {"iris-placed-primary"}, 10, "one budget")
    # Edited by hand: put back.
    r = kube.patch("PodDisruptionBudget", ns, "iris-placed-primary",
                   {"spec": {"maxUnavailable": 2}})
    assert r.status_code == 200, r.text
    wait_for(lambda: (kube.get("PodDisruptionBudget", ns, "iris-placed-primary") or {})
             .get("spec", {}).get("maxUnavailable") == 1, 10, "budget restored")
    # Two replicas for "single", one for "primary", and primary's template dropped.
    obj = kube.get("Endpoint", ns, "iris-placed")
    assert obj is not None
    variants = obj["spec"]["variants"]
    variants[0]["replicas"] = 1
    del variants[0]["podTemplate"]
    variants[1]["replicas"] = 2
    r = kube.patch("Endpoint", ns, "iris-placed", {"spec": {"variants": variants}})
    assert r.status_code == 200, r.text
    wait_for(lambda: _budgets(kube, ns) == {"iris-placed-single"}, 10, "budget moved")

    def placement_gone() -> bool:
        d = kube.get("Deployment", ns, "iris-placed-primary") or {}
        template = d.get("spec", {}).get("template", {})
        spec, labels = template.get("spec", {}), template.get("metadata", {}).get("labels", {})
        return (spec.get("nodeSelector") == DEFAULT_TEMPLATE["nodeSelector"]
                and "tolerations" not in spec and "topologySpreadConstraints" not in spec
                and "example.com/team" not in labels
                and "example.com/owner" not in template.get("metadata", {}).get(
                    "annotations", {}))

    wait_for(placement_gone, 10, "primary's podTemplate removed from its Deployment")
