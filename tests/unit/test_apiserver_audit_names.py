"""Object names a real API server would refuse, for Endpoints the CRD accepts.

A Service name is a DNS-1035 label (``ValidateServiceName`` in Kubernetes'
pkg/apis/core/validation: a letter first, at most 63 characters). Under a
``deploymentConfig`` a variant also runs as its green fleet ``<variant>-green``
(``render.rollout.expand_plan``), whose Service is ``<endpoint>-<variant>-green``:
six characters more than the ``<endpoint>-<variant>`` the CRD bounded. A shadow
variant's Service is ``<endpoint>-<shadow>``. The CRD's CEL rules (run here with
cel-python, as in test_cel_rules) now refuse both at ``kubectl apply``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import pytest

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile import rollout as ro
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.render.rollout import expand_plan
from kubeinfer_operator.settings import OperatorSettings
from tests.unit.test_cel_rules import _cel_refusals  # skips without cel-python

#: ``IsDNS1035Label``: what a Service's metadata.name must be.
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
GUARDED = {"blueGreen": {"trafficRouting": {"type": "AllAtOnce"}}}


def endpoint(name: str, variant: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": name, "namespace": "ml"},
            "spec": {"variants": [{"name": variant, "model": {"uri": "s3://m/a.onnx"},
                                   "replicas": 2}], **spec}}


def green_manifests(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every child while the variant rolls out to its green fleet."""
    ep = Endpoint.model_validate(obj)
    config = ep.spec.deploymentConfig
    assert config is not None
    plan = plan_endpoint(ep)
    variant = plan.variants[0]
    decision = ro.decide(variant=variant.name, config=config, replicas=2,
                         desired_hash=variant.server_hash, previous=None,
                         fleets={variant.name: ro.Fleet("old", 2)},
                         now=datetime(2026, 1, 1, tzinfo=UTC))
    expanded = expand_plan(plan, {variant.name: decision}, config)
    assert [v.name for v in expanded.variants] == [variant.name, variant.name + "-green"]
    return render_endpoint(expanded, Owner(ep.metadata.name, "ml", "uid"), OperatorSettings())


@pytest.mark.parametrize("variant_len", [1, 10, 16, 17, 22])
def test_every_green_fleet_service_the_crd_lets_through_is_a_dns_1035_label(
        variant_len: int) -> None:
    obj = endpoint("e" * 40, "v" * variant_len, deploymentConfig=GUARDED)
    refusals = _cel_refusals("Endpoint", obj)
    if refusals:
        assert variant_len > 16
        assert any(r.startswith("spec.variants: name: under deploymentConfig")
                   for r in refusals), refusals
        return
    for m in green_manifests(obj):
        if m["kind"] == "Service":
            name = m["metadata"]["name"]
            assert len(name) <= 63 and DNS_1035.match(name), name


def test_a_17_character_variant_of_a_40_character_endpoint_is_refused_when_guarded() -> None:
    # 40 + 1 + 17 = 58: the variant's own Service fits, its green fleet's (64) did not.
    guarded = endpoint("e" * 40, "v" * 17, deploymentConfig=GUARDED)
    services = [m["metadata"]["name"] for m in green_manifests(guarded)
                if m["kind"] == "Service"]
    assert max(len(s) for s in services) == 64
    assert _cel_refusals("Endpoint", guarded) != []
    # Without a deploymentConfig there is no green fleet: still accepted.
    assert _cel_refusals("Endpoint", endpoint("e" * 40, "v" * 17)) == []


def test_a_shadow_variant_whose_service_name_passes_63_is_refused_by_the_crd() -> None:
    obj = endpoint("e" * 40, "a", shadowVariants=[
        {"name": "s" * 23, "model": {"uri": "s3://m/s.onnx"}}])
    assert [r.split(":")[0] for r in _cel_refusals("Endpoint", obj)] == [
        "spec.shadowVariants"]
    fits = endpoint("e" * 40, "a", shadowVariants=[
        {"name": "s" * 22, "model": {"uri": "s3://m/s.onnx"}}])
    assert _cel_refusals("Endpoint", fits) == []
