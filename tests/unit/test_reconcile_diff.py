"""Desired vs actual children: create, patch by hash, delete only what we own, never overwrite."""

from __future__ import annotations

import copy
from typing import Any

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.diff import ObjectKey, diff_children, key_of
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings

UID = "9d2f8c1e-0000-4000-8000-000000000001"
OWNER = Owner("iris", "ml", UID)


def _desired(weights: tuple[float, ...] = (0.9, 0.1)) -> list[dict[str, Any]]:
    endpoint = Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
        "metadata": {"name": "iris", "namespace": "ml"},
        "spec": {"variants": [
            {"name": f"v{i}", "weight": w, "model": {"uri": f"s3://m/v{i}.onnx"}}
            for i, w in enumerate(weights)]},
    })
    return render_endpoint(plan_endpoint(endpoint), OWNER, OperatorSettings())


def _as_stored(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the API server returns: our manifest plus server fields and defaults."""
    out = []
    for m in copy.deepcopy(manifests):
        m["metadata"].update(uid="x", resourceVersion="7", generation=1)
        if m["kind"] == "Deployment":
            m["spec"]["progressDeadlineSeconds"] = 600
            m["status"] = {"availableReplicas": 1}
        out.append(m)
    return out


def _diff(desired: list[dict[str, Any]], actual: list[dict[str, Any]]) -> Any:
    return diff_children(desired, actual, owner_uid=UID, owner_name="iris", namespace="ml")


def test_nothing_exists_everything_is_created_in_order() -> None:
    desired = _desired()
    changes = _diff(desired, [])
    assert changes.create == desired
    assert not (changes.patch or changes.delete or changes.conflicts)


def test_server_defaults_and_status_are_not_drift() -> None:
    desired = _desired()
    changes = _diff(desired, _as_stored(desired))
    assert changes.empty


def test_changed_manifest_is_patched() -> None:
    actual = _as_stored(_desired((0.9, 0.1)))
    changes = _diff(_desired((0.5, 0.5)), actual)
    assert [key_of(m) for m in changes.patch] == [ObjectKey("ConfigMap", "iris-routes")]
    assert not (changes.create or changes.delete or changes.conflicts)


def test_removed_variant_objects_are_deleted() -> None:
    actual = _as_stored(_desired((0.5, 0.3, 0.2)))
    changes = _diff(_desired((0.5, 0.5)), actual)
    assert changes.delete == [ObjectKey("Deployment", "iris-v2"), ObjectKey("Service", "iris-v2")]
    assert [key_of(m) for m in changes.patch] == [ObjectKey("ConfigMap", "iris-routes")]


def test_objects_of_another_owner_are_never_touched() -> None:
    desired = _desired()
    actual = _as_stored(desired)
    for obj in actual:
        obj["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    extra = copy.deepcopy(actual[1])
    extra["metadata"]["name"] = "iris-old"
    changes = _diff(desired, [*actual, extra])
    assert not (changes.create or changes.patch or changes.delete)
    assert len(changes.conflicts) == len(desired)
    assert changes.conflicts[0] == (
        "ConfigMap ml/iris-routes already exists and is not owned by Endpoint iris; "
        "delete or rename it, or rename the Endpoint")


def test_an_object_without_the_hash_annotation_is_patched() -> None:
    desired = _desired()
    actual = _as_stored(desired)
    del actual[0]["metadata"]["annotations"]
    assert [key_of(m) for m in _diff(desired, actual).patch] == [key_of(desired[0])]


def _stored(kind: str, name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    desired = _desired()
    actual = _as_stored(desired)
    obj = next(o for o in actual if o["kind"] == kind and o["metadata"]["name"] == name)
    return actual, obj


def test_an_edited_owned_field_is_patched_back() -> None:
    actual, dep = _stored("Deployment", "iris-v0")
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "other:1"
    changes = _diff(_desired(), actual)
    assert [key_of(m) for m in changes.patch] == [ObjectKey("Deployment", "iris-v0")]
    assert changes.drifted == [ObjectKey("Deployment", "iris-v0")]
    assert _diff(_desired(), _as_stored(_desired())).empty


def test_keys_added_to_maps_we_own_whole_are_removed() -> None:
    actual, svc = _stored("Service", "iris-v0")
    svc["spec"]["selector"]["team"] = "other"
    [patch] = _diff(_desired(), actual).patch
    assert patch["spec"]["selector"]["team"] is None
    actual, cm = _stored("ConfigMap", "iris-routes")
    cm["data"]["extra.json"] = "{}"
    [patch] = _diff(_desired(), actual).patch
    assert patch["data"]["extra.json"] is None


def test_a_service_turned_external_name_is_restored_without_its_external_name() -> None:
    # What a namespace editor's `kubectl patch` leaves (the API server drops the clusterIP).
    actual, svc = _stored("Service", "iris-gateway")
    svc["spec"].update(type="ExternalName", externalName="attacker.example")
    [patch] = _diff(_desired(), actual).patch
    assert patch["spec"]["type"] == "ClusterIP"
    assert "externalName" in patch["spec"] and patch["spec"]["externalName"] is None
    assert _diff(_desired(), actual).drifted == [ObjectKey("Service", "iris-gateway")]
    # A Service as rendered carries no externalName: nothing to remove, no drift.
    assert _diff(_desired(), _as_stored(_desired())).empty


def test_what_others_add_or_normalise_is_not_drift() -> None:
    actual, dep = _stored("Deployment", "iris-v0")
    dep["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "{}"
    dep["spec"]["template"]["metadata"].setdefault("annotations", {})[
        "kubectl.kubernetes.io/restartedAt"] = "2026-01-01T00:00:00Z"
    container = dep["spec"]["template"]["spec"]["containers"][0]
    container["terminationMessagePath"] = "/dev/termination-log"
    requests = container.setdefault("resources", {}).setdefault("requests", {})
    if "cpu" in requests:  # the API server writes quantities canonically: 0.1 is 100m
        requests["cpu"] = "0.1" if requests["cpu"] == "100m" else requests["cpu"]
    assert _diff(_desired(), actual).empty
