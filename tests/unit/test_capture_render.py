"""spec.dataCapture from the Endpoint to the gateway: parsed, checked, rendered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile.validate import (
    InvalidSpec,
    capture_cluster_problems,
    validate_endpoint,
)
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.capture import CaptureRoute
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "capture-endpoint.yaml"
OWNER = Owner(name="iris-captured", namespace="ml", uid="0b6c2a3e-1111-4222-8333-944455556666")


def _doc(**capture: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["dataCapture"].update(capture)
    return doc


def _gateway(doc: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=2)
    for m in render_endpoint(plan, OWNER, settings, ()):
        if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("-gateway"):
            return m
    raise AssertionError("no gateway Deployment")


def test_the_route_table_carries_capture() -> None:
    plan = plan_endpoint(Endpoint.model_validate(_doc(captureOptions=["Input"])))
    route = plan.route_table({}).endpoints["iris-captured"].capture
    assert route == CaptureRoute(destination="s3://captures/iris", sampling_percentage=20,
                                 capture_input=True, capture_output=False)
    off = plan_endpoint(Endpoint.model_validate(_doc(enabled=False)))
    assert off.route_table({}).endpoints["iris-captured"].capture is None


def test_local_mode_resolves_a_relative_folder() -> None:
    plan = plan_endpoint(Endpoint.model_validate(_doc(destination="file://captures")),
                         base_dir="/home/me/examples")
    assert plan.capture is not None
    assert plan.capture.destination == "file:///home/me/examples/captures"


def test_gateway_gets_the_s3_credentials_and_stays_schema_valid() -> None:
    settings = OperatorSettings(s3_secret_name="s3-creds")
    gateway = _gateway(_doc(), settings)
    assert schema_errors(gateway, strict=True) == []
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    # Without capture to s3:// the gateway gets no object-store credentials.
    plain = _doc()
    del plain["spec"]["dataCapture"]
    (container,) = _gateway(plain, settings)["spec"]["template"]["spec"]["containers"]
    assert "envFrom" not in container


@pytest.mark.parametrize(("capture", "field"), [
    ({"samplingPercentage": 101}, "spec.dataCapture.samplingPercentage"),
    ({"destination": "http://example.com/x"}, "spec.dataCapture.destination"),
    ({"destination": "s3://bucket/../x"}, "spec.dataCapture.destination"),
    ({"captureOptions": []}, "spec.dataCapture.captureOptions"),
    ({"captureOptions": ["Input", "Input"]}, "spec.dataCapture"),
    ({"jsonContentTypes": ["text/csv"]}, "spec.dataCapture"),
    ({"csvContentTypes": ["Text/CSV; charset=utf-8"]}, "spec.dataCapture.csvContentTypes"),
    ({"unknown": 1}, "spec.dataCapture.unknown"),
])
def test_the_operator_refuses_bad_capture_settings(capture: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        validate_endpoint("iris-captured", "ml", _doc(**capture)["spec"])
    assert any(p.startswith(field) for p in info.value.problems), info.value.problems


def test_async_endpoints_do_not_capture() -> None:
    doc = _doc()
    doc["spec"].update({"type": "Async", "async": {"outputPath": "s3://out/iris"}})
    with pytest.raises(InvalidSpec, match="dataCapture applies to RealTime and Serverless"):
        validate_endpoint("iris-captured", "ml", doc["spec"])


def test_kubernetes_needs_an_s3_destination() -> None:
    assert capture_cluster_problems("s3://captures/iris") == []
    assert capture_cluster_problems("") == []
    (problem,) = capture_cluster_problems("file://captures")
    assert problem.startswith("spec.dataCapture.destination: ") and "s3://" in problem
