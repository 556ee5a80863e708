"""Endpoint status from Deployment availability; conditions keep their transition times."""

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
                replicas: int = 2) -> dict[str, Any]:
    return {"kind": "Deployment", "metadata": {"name": name}, "spec": {"replicas": replicas},
            "status": {"availableReplicas": available,
                       "readyReplicas": available if ready is None else ready}}


def _deployments(**available: int) -> dict[str, Any]:
    return st.deployments_by_name(_deployment(f"iris-{k}", v) for k, v in available.items())


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def test_deployment_state() -> None:
    assert st.deployment_state(None) == st.DeploymentState()
    state = st.deployment_state(_deployment("x", 1, ready=2, replicas=3))
    assert (state.exists, state.desired, state.ready, state.available) == (True, 3, 2, 1)
    assert state.serving
    assert not st.deployment_state({"spec": {"replicas": 1}, "status": {}}).serving


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
    assert set(c) == {"Ready", "VariantReady-primary", "VariantReady-canary"}
    assert c["Ready"]["status"] == "False"
    assert c["Ready"]["reason"] == "GatewayUnavailable"
    assert c["Ready"]["message"].startswith("Deployment ml/iris-gateway has no available replica")
    assert c["VariantReady-canary"]["message"].startswith(
        "Deployment ml/iris-canary: not created yet; the gateway does not route to variant canary")
    assert all(x["observedGeneration"] == 2 and x["lastTransitionTime"] == "2026-01-02T03:04:05Z"
               for x in c.values())
    EndpointStatus.model_validate(status)  # fits the CRD's status schema


def test_one_variant_unavailable() -> None:
    status = st.endpoint_status(_plan(), _deployments(gateway=1, primary=2, canary=0),
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
    status = st.endpoint_status(_plan(), _deployments(gateway=1, primary=1, canary=2),
                                url=URL, old=None, now=T0)
    ready = _conditions(status)["Ready"]
    assert ready["status"] == "True"
    assert ready["reason"] == "AllVariantsReady"
    assert URL in ready["message"]
    assert status["readyVariants"] == "2/2"
    assert [v["readyReplicas"] for v in status["variants"]] == [1, 2]


def test_transition_time_changes_only_when_status_flips() -> None:
    plan = _plan()
    first = st.endpoint_status(plan, _deployments(gateway=1, primary=1), url=URL, old=None, now=T0)
    again = st.endpoint_status(plan, _deployments(gateway=1, primary=1), url=URL, old=first,
                               now=T1)
    assert again == first  # unchanged world, identical status: nothing to write
    flipped = st.endpoint_status(plan, _deployments(gateway=1, primary=1, canary=1), url=URL,
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
    assert set(_conditions(new)) == {"Ready", "VariantReady-primary", "example.com/Audited"}


def test_failed_status_keeps_what_is_running() -> None:
    old = st.endpoint_status(_plan(generation=2), _deployments(gateway=1, primary=1, canary=1),
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


@pytest.mark.parametrize(("retry", "delay"), [(0, 1.0), (1, 2.0), (3, 8.0), (6, 60.0),
                                              (50, 60.0)])
def test_retry_backoff_grows_and_is_capped(retry: int, delay: float) -> None:
    assert backoff_delay(retry) == delay
