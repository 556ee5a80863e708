"""Endpoint status from Deployment rollouts; conditions keep their transition times.

A variant is Ready only when its Deployment's controller observed the latest
generation and updated and available replicas meet ``spec.replicas``; a
Deployment that gave up (``Progressing=False``) passes its reason and message
to the variant's condition and to Ready.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubeinfer_operator.api.endpoint import Endpoint, EndpointStatus
from kubeinfer_operator.handlers.endpoint import backoff_delay
from kubeinfer_operator.reconcile import status as st
from kubeinfer_operator.render.plan import EndpointPlan, plan_endpoint

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)
URL = "http://iris-gateway.ml.svc:8080"


def _plan(generation: int = 2, variants: tuple[str, ...] = ("primary", "canary")) -> EndpointPlan:
    return plan_endpoint(Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
        "metadata": {"name": "iris", "namespace": "ml"},
        "spec": {"variants": [{"name": v, "model": {"uri": f"s3://m/{v}.onnx"}, "replicas": 2}
                              for v in variants]},
    }), generation=generation)


def _deployment(name: str, available: int, ready: int | None = None,
                replicas: int = 2, updated: int | None = None, generation: int = 4,
                observed: int | None = 4, total: int | None = None,
                conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Deployment as its controller reports it (``updated`` defaults to ``replicas``)."""
    status: dict[str, Any] = {"availableReplicas": available,
                              "readyReplicas": available if ready is None else ready,
                              "updatedReplicas": replicas if updated is None else updated,
                              "replicas": replicas if total is None else total}
    if observed is not None:
        status["observedGeneration"] = observed
    if conditions is not None:
        status["conditions"] = conditions
    return {"kind": "Deployment", "metadata": {"name": name, "generation": generation},
            "spec": {"replicas": replicas}, "status": status}


def _deployments(**available: int) -> dict[str, Any]:
    return st.deployments_by_name(_deployment(f"iris-{k}", v) for k, v in available.items())


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_deployment_state() -> None:
    assert st.deployment_state(None) == st.DeploymentState()
    state = st.deployment_state(_deployment("x", 1, ready=2, replicas=3, updated=2))
    assert (state.exists, state.desired, state.ready, state.available, state.updated) == (
        True, 3, 2, 1, 2)
    assert (state.generation, state.observed_generation) == (4, 4)
    assert state.serving and not state.rolled_out
    assert not st.deployment_state({"spec": {"replicas": 1}, "status": {}}).serving


@pytest.mark.parametrize(("deployment", "rolled_out"), [
    (_deployment("x", 2), True),
    # The controller has not seen the new template yet: its counts are the old one's.
    (_deployment("x", 2, generation=5, observed=4), False),
    # 1 of 2 pods run the new template (the other is an old one, still available).
    (_deployment("x", 2, updated=1), False),
    # Scaled up: every pod has the template, one is not available yet.
    (_deployment("x", 1, updated=2), False),
    # Every new pod exists but an old one is left: the one available may be the old one.
    (_deployment("x", 2, updated=2, total=3), False),
    # Never touched by a controller (no observedGeneration): the counts decide.
    (_deployment("x", 0, replicas=0, observed=None), True),
    (_deployment("x", 2, conditions=[{"type": "Progressing", "status": "False",
                                      "reason": "ProgressDeadlineExceeded"}]), False),
], ids=["done", "generation-not-observed", "half-updated", "scaling-up", "old-pod-left",
         "zero-replicas",
        "deadline-exceeded"])
def test_rolled_out_needs_the_latest_generation_and_every_replica(
        deployment: dict[str, Any], rolled_out: bool) -> None:
    assert st.deployment_state(deployment).rolled_out is rolled_out


def test_a_stale_deadline_from_the_previous_template_is_not_a_stall() -> None:
    stale = _deployment("x", 2, generation=5, observed=4, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}])
    assert not st.deployment_state(stale).stalled


def test_serving_variants_need_an_available_replica() -> None:
    deployments = _deployments(primary=1, canary=0)
    assert st.serving_variants(_plan(), deployments) == {"primary"}


def test_nothing_available_yet() -> None:
    status = st.endpoint_status(_plan(), {}, url=URL, old=None, now=T0)
    assert status["observedGeneration"] == 2
    assert status["url"] == URL
    assert status["readyVariants"] == "0/2"
    assert status["variants"] == [
        {"name": "primary", "desiredReplicas": 2, "readyReplicas": 0, "weight": 1.0},
        {"name": "canary", "desiredReplicas": 2, "readyReplicas": 0, "weight": 1.0}]
    c = _conditions(status)
    assert set(c) == {"Ready", "Progressing", "Reconciling", "Stalled", "VariantReady-primary",
                      "VariantReady-canary"}
    assert c["Ready"]["status"] == "False"
    assert (c["Progressing"]["status"], c["Reconciling"]["status"], c["Stalled"]["status"]) == (
        "True", "True", "False")
    assert c["Ready"]["reason"] == "GatewayUnavailable"
    assert c["Ready"]["message"].startswith("Deployment ml/iris-gateway has no available replica")
    assert c["VariantReady-canary"]["message"].startswith(
        "Deployment ml/iris-canary: not created yet; the gateway does not route to variant canary")
    assert all(x["observedGeneration"] == 2 and x["lastTransitionTime"] == "2026-01-02T03:04:05Z"
               for x in c.values())
    EndpointStatus.model_validate(status)  # fits the CRD's status schema


def test_one_variant_unavailable() -> None:
    status = st.endpoint_status(_plan(), _deployments(gateway=2, primary=2, canary=0),
                                url=URL, old=None, now=T0)
    c = _conditions(status)
    assert c["Ready"]["status"] == "False"
    assert c["Ready"]["reason"] == "VariantsUnavailable"
    assert "canary" in c["Ready"]["message"]
    assert c["VariantReady-primary"]["status"] == "True"
    assert c["VariantReady-primary"]["message"] == (
        "Deployment ml/iris-primary: 2/2 replicas available")
    assert c["VariantReady-canary"]["reason"] == "Unavailable"
    assert status["readyVariants"] == "1/2"


def test_all_available_is_ready() -> None:
    status = st.endpoint_status(_plan(), _deployments(gateway=2, primary=2, canary=2),
                                url=URL, old=None, now=T0)
    c = _conditions(status)
    ready = c["Ready"]
    assert ready["status"] == "True"
    assert ready["reason"] == "AllVariantsReady"
    assert URL in ready["message"]
    assert {t: (c[t]["status"], c[t]["reason"]) for t in ("Progressing", "Reconciling",
                                                          "Stalled")} == {
        "Progressing": ("False", "RolloutComplete"), "Reconciling": ("False", "RolloutComplete"),
        "Stalled": ("False", "RolloutComplete")}
    assert status["readyVariants"] == "2/2"
    assert [v["readyReplicas"] for v in status["variants"]] == [2, 2]


def test_transition_time_changes_only_when_status_flips() -> None:
    plan = _plan()
    first = st.endpoint_status(plan, _deployments(gateway=2, primary=2), url=URL, old=None, now=T0)
    again = st.endpoint_status(plan, _deployments(gateway=2, primary=2), url=URL, old=first,
                               now=T1)
    assert again == first  # unchanged world, identical status: nothing to write
    flipped = st.endpoint_status(plan, _deployments(gateway=2, primary=2, canary=2), url=URL,
                                 old=first, now=T1)
    c = _conditions(flipped)
    assert c["Ready"]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert c["VariantReady-canary"]["lastTransitionTime"] == "2026-01-02T03:09:05Z"
    assert c["VariantReady-primary"]["lastTransitionTime"] == "2026-01-02T03:04:05Z"


def test_removed_variant_loses_its_condition_others_writers_keep_theirs() -> None:
    old = st.endpoint_status(_plan(), {}, url=URL, old=None, now=T0)
    old["conditions"].append({"type": "example.com/Audited", "status": "True", "reason": "X",
                              "lastTransitionTime": "2025-01-01T00:00:00Z"})
    new = st.endpoint_status(_plan(variants=("primary",)), {}, url=URL, old=old, now=T1)
    assert set(_conditions(new)) == {"Ready", "Progressing", "Reconciling", "Stalled",
                                     "VariantReady-primary", "example.com/Audited"}


def test_failed_status_keeps_what_is_running() -> None:
    old = st.endpoint_status(_plan(generation=2), _deployments(gateway=2, primary=2, canary=2),
                             url=URL, old=None, now=T0)
    failed = st.failed_status(3, "InvalidSpec", "Endpoint ml/iris is invalid: x", old=old, now=T1)
    assert failed["observedGeneration"] == 3
    assert failed["url"] == URL
    assert failed["variants"] == old["variants"]
    c = _conditions(failed)
    assert c["Ready"] == {"type": "Ready", "status": "False", "reason": "InvalidSpec",
                          "message": "Endpoint ml/iris is invalid: x", "observedGeneration": 3,
                          "lastTransitionTime": "2026-01-02T03:09:05Z"}
    assert c["VariantReady-primary"] == _conditions(old)["VariantReady-primary"]
    assert st.failed_status(3, "InvalidSpec", "Endpoint ml/iris is invalid: x", old=failed,
                            now=T1 + timedelta(hours=1)) == failed


STUCK = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "iris-canary-7c9f" has timed out progressing.'}


def test_a_stuck_rollout_sets_the_variant_and_ready_false_with_the_deployments_reason() -> None:
    # The canary's new model never comes up: 1 of 2 replicas updated, the old pods still
    # answer (so it stays routed), and the controller gave up.
    deployments = st.deployments_by_name([
        _deployment("iris-gateway", 2), _deployment("iris-primary", 2),
        _deployment("iris-canary", 2, updated=1, conditions=[STUCK])])
    status = st.endpoint_status(_plan(), deployments, url=URL, old=None, now=T0)
    c = _conditions(status)
    canary = c["VariantReady-canary"]
    assert (canary["status"], canary["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert canary["message"].startswith(
        'Deployment ml/iris-canary: ReplicaSet "iris-canary-7c9f" has timed out progressing; ')
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "ProgressDeadlineExceeded")
    assert c["Ready"]["message"] == "Variant canary: " + canary["message"]
    assert (c["Stalled"]["status"], c["Reconciling"]["status"], c["Progressing"]["status"]) == (
        "True", "False", "False")
    assert st.serving_variants(_plan(), deployments) == {"primary", "canary"}
    assert status["readyVariants"] == "1/2"


def test_rolling_out_is_progressing() -> None:
    deployments = st.deployments_by_name([
        _deployment("iris-gateway", 2), _deployment("iris-primary", 2),
        _deployment("iris-canary", 2, updated=1)])
    c = _conditions(st.endpoint_status(_plan(), deployments, url=URL, old=None, now=T0))
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", "VariantsUnavailable")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("True", "RollingOut")
    assert (c["Reconciling"]["status"], c["Stalled"]["status"]) == ("True", "False")
    assert c["VariantReady-canary"]["message"] == (
        "Deployment ml/iris-canary: 1/2 replicas updated, 2 available")
    # The controller has not even looked at the new template yet.
    lagging = {**deployments, "iris-canary": _deployment("iris-canary", 2, generation=5)}
    c = _conditions(st.endpoint_status(_plan(), lagging, url=URL, old=None, now=T0))
    assert c["VariantReady-canary"]["reason"] == "RollingOut"
    assert "generation 5 not yet observed" in c["VariantReady-canary"]["message"]


def test_a_stuck_gateway_is_reported_with_its_reason() -> None:
    deployments = st.deployments_by_name([
        _deployment("iris-gateway", 2, updated=1, conditions=[STUCK]),
        _deployment("iris-primary", 2), _deployment("iris-canary", 2)])
    c = _conditions(st.endpoint_status(_plan(), deployments, url=URL, old=None, now=T0))
    assert (c["Ready"]["reason"], c["Stalled"]["status"]) == ("ProgressDeadlineExceeded", "True")
    assert c["Ready"]["message"].startswith("Deployment ml/iris-gateway: ReplicaSet")


@pytest.mark.parametrize(("reason", "stalled"), [("InvalidSpec", "True"),
                                                 ("NameConflict", "True"),
                                                 ("RejectedByAPI", "True")])
def test_failures_that_need_a_person_are_stalled(reason: str, stalled: str) -> None:
    c = _conditions(st.failed_status(3, reason, "x", old=None, now=T0))
    assert (c["Ready"]["status"], c["Stalled"]["status"], c["Reconciling"]["status"]) == (
        "False", stalled, "False")
    assert c["Stalled"]["reason"] == reason


@pytest.mark.parametrize(("retry", "delay"), [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0),
                                              (50, 60.0)])
def test_retry_backoff_grows_and_is_capped(retry: int, delay: float) -> None:
    assert backoff_delay(retry) == delay
