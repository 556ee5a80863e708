"""The pure plan diff of local mode: which change restarts what."""

from __future__ import annotations

from typing import Any

import pytest

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.local_diff import ChangeKind, diff_plans
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint


def variant(name: str, **over: Any) -> dict[str, Any]:
    v: dict[str, Any] = {"name": name, "weight": 1.0, "replicas": 1,
                         "model": {"uri": f"file:///models/{name}.onnx"}}
    v.update(over)
    return v


def plan(*variants: dict[str, Any], name: str = "iris") -> EndpointPlan:
    ep = Endpoint.model_validate({"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                                  "metadata": {"name": name},
                                  "spec": {"variants": list(variants)}})
    return plan_endpoint(ep)


def kinds(old: EndpointPlan | None, new: EndpointPlan) -> list[tuple[str, ChangeKind]]:
    return [(c.variant, c.kind) for c in diff_plans(old, new)]


def test_first_apply_adds_every_variant() -> None:
    assert kinds(None, plan(variant("a"), variant("b"))) == [("a", ChangeKind.ADD),
                                                             ("b", ChangeKind.ADD)]


def test_same_plan_has_no_change() -> None:
    assert diff_plans(plan(variant("a")), plan(variant("a"))) == []


def test_weight_only_rewrites_routes_and_restarts_nothing() -> None:
    changes = diff_plans(plan(variant("a", weight=0.9), variant("b", weight=0.1)),
                         plan(variant("a", weight=0.5), variant("b", weight=0.5)))
    assert [(c.variant, c.kind) for c in changes] == [("a", ChangeKind.REWEIGHT),
                                                      ("b", ChangeKind.REWEIGHT)]
    assert not any(c.restarts_servers for c in changes)
    assert "weight 0.9 → 0.5" in changes[0].describe()
    assert "route table only" in changes[0].describe()


@pytest.mark.parametrize("over", [
    {"model": {"uri": "file:///models/other.onnx"}},
    {"env": [{"name": "X", "value": "1"}]},
    {"resources": {"limits": {"memory": "1Gi"}}},
])
def test_server_fields_roll_the_variant(over: dict[str, Any]) -> None:
    changes = diff_plans(plan(variant("a"), variant("b")), plan(variant("a"), variant("b", **over)))
    assert [(c.variant, c.kind) for c in changes] == [("b", ChangeKind.ROLL)]
    assert changes[0].restarts_servers
    assert "restart" in changes[0].describe()


def test_model_change_names_old_and_new_uri() -> None:
    [change] = diff_plans(plan(variant("a")),
                          plan(variant("a", model={"uri": "file:///m/v2.onnx"})))
    assert "model.uri file:///models/a.onnx → file:///m/v2.onnx" in change.fields


def test_roll_wins_over_scale_and_weight_and_lists_every_field() -> None:
    [change] = diff_plans(plan(variant("a")),
                          plan(variant("a", replicas=3, weight=2,
                                       model={"uri": "file:///m/v2.onnx"})))
    assert change.kind is ChangeKind.ROLL
    assert any(f.startswith("replicas 1 → 3") for f in change.fields)
    assert any(f.startswith("weight 1 → 2") for f in change.fields)


def test_replicas_scale_without_roll() -> None:
    [change] = diff_plans(plan(variant("a", replicas=1)), plan(variant("a", replicas=3,
                                                                       weight=2)))
    assert change.kind is ChangeKind.SCALE
    assert not change.restarts_servers
    assert change.fields == ("replicas 1 → 3", "weight 1 → 2")


def test_added_and_removed_variants_with_removals_last() -> None:
    changes = diff_plans(plan(variant("old"), variant("keep")),
                         plan(variant("keep", weight=3), variant("new")))
    assert [(c.variant, c.kind) for c in changes] == [
        ("new", ChangeKind.ADD), ("keep", ChangeKind.REWEIGHT), ("old", ChangeKind.REMOVE)]
    assert changes[0].describe().startswith("variant new: added (1 replica(s), weight 1)")
    assert "removed" in changes[-1].describe()


def test_variant_order_alone_is_no_change() -> None:
    assert diff_plans(plan(variant("a"), variant("b")), plan(variant("b"), variant("a"))) == []


def test_other_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot diff"):
        diff_plans(plan(variant("a"), name="x"), plan(variant("a"), name="y"))


def test_admission_limits_change_only_the_route_table() -> None:
    old = plan(variant("a"))
    new = plan(variant("a", admission={"maxInFlightPerReplica": 4,
                                       "maxQueueWaitSeconds": 0.5}))
    assert kinds(old, new) == [("a", ChangeKind.REWEIGHT)]
    [route] = new.route_table({"a": ["http://x"]}).endpoints["iris"].variants
    assert (route.max_in_flight_per_upstream, route.max_queue_wait_s) == (4, 0.5)
    assert old.variants[0].server_hash == new.variants[0].server_hash  # nothing restarts


def _async_plan(output: str, max_retries: int = 1) -> EndpointPlan:
    return plan_endpoint(Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
        "metadata": {"name": "aq"},
        "spec": {"type": "Async", "variants": [variant("main")],
                 "async": {"outputPath": output, "maxRetries": max_retries,
                           "notification": {"successUrl": "http://hook/t0ken"}}}}))


def test_async_settings_roll_the_workers_without_saying_the_values() -> None:
    """The workers read their async settings at start: a changed outputPath (or retries)
    restarts them, and the description names the settings, not their values (a webhook
    URL may carry a token)."""
    old = _async_plan("s3://a/out")
    [change] = diff_plans(old, _async_plan("s3://b/out"))
    assert change.kind is ChangeKind.ROLL
    # The input paths default to the output's bucket, so they moved too.
    assert change.fields == ("async settings changed (KUBEINFER_FAILURE_PATH, "
                             "KUBEINFER_INPUT_PATHS, KUBEINFER_OUTPUT_PATH)",)
    assert "s3://" not in change.describe()
    [change] = diff_plans(old, _async_plan("s3://a/out", max_retries=3))
    assert change.kind is ChangeKind.ROLL and "KUBEINFER_MAX_RETRIES" in change.fields[0]
    assert diff_plans(old, _async_plan("s3://a/out")) == []
