"""Deployment guardrails' spec checks that are not CEL rules: the outbound policy on
``autoRollback.prometheusUrl`` (``reconcile.validate.outbound_problems``)."""

from __future__ import annotations

from typing import Any

import pytest

from kubeinfer_operator.reconcile.validate import InvalidSpec, validate_endpoint
from kubeinfer_runtime.contract.outbound import OutboundPolicy


def spec(prometheus_url: str) -> dict[str, Any]:
    return {"variants": [{"name": "a", "model": {"uri": "s3://m/a.onnx"}}],
            "deploymentConfig": {
                "blueGreen": {"trafficRouting": {"type": "AllAtOnce"}},
                "autoRollback": {"prometheusUrl": prometheus_url, "alarms": [
                    {"name": "p", "promQL": {"query": "up", "threshold": 1}}]}}}


@pytest.mark.parametrize("url", ["http://169.254.169.254/", "http://[fd00:ec2::254]/",
                                 "https://kubernetes.default.svc/"])
def test_a_refused_prometheus_url_is_invalid_spec_naming_the_field(url: str) -> None:
    with pytest.raises(InvalidSpec) as caught:
        validate_endpoint("iris", "ml", spec(url))
    assert caught.value.reason == "InvalidSpec"
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "spec.deploymentConfig.autoRollback.prometheusUrl"]


def test_an_ordinary_prometheus_url_passes_and_the_allow_list_opens_one() -> None:
    validate_endpoint("iris", "ml", spec("http://prometheus.monitoring:9090"))
    validate_endpoint("iris", "ml", spec("http://169.254.170.2:9090"),
                      outbound=OutboundPolicy.parse("169.254.170.2/32"))
