"""An EdgeFleet's Secret keys as the API server checks them.

The fleet server reads its bootstrap token and signing key through env
``valueFrom.secretKeyRef``; the API server checks each ``key`` with apimachinery's
``IsConfigMapKey`` (core ``validateSecretKeySelector``): letters, digits, '-',
'_' and '.', but never '.', '..' nor a key starting with '..'. The CRD's pattern
allowed those three, so the rendered Deployment would be refused.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.reconcile.edge_validate import validate_edge_fleet
from kubeinfer_operator.render import edge_fleet as rf
from kubeinfer_operator.render.edge_plan import plan_fleet
from kubeinfer_operator.settings import OperatorSettings

_CONFIG_MAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


def api_key_ok(key: str) -> bool:
    return bool(_CONFIG_MAP_KEY.match(key)) and len(key) <= 253 \
        and key not in (".", "..") and not key.startswith("..")


def spec(key: str) -> dict[str, Any]:
    return {"model": {"uri": "s3://models/mlp.onnx"}, "targets": [{"name": "x86"}],
            "registration": {"bootstrapTokenSecret": {"name": "boot", "key": key}},
            "signing": {"keySecret": {"name": "signing", "key": "key"}},
            "packages": {"uri": "s3://pkgs/edge"}, "redis": {"url": "redis://redis:6379/0"}}


@pytest.mark.parametrize("key", ["token", ".token", "a..b", "1", ".", "..", "..token"])
def test_a_secret_key_the_fleet_accepts_is_one_a_secret_key_ref_may_name(key: str) -> None:
    try:
        fleet = validate_edge_fleet("sensors", "ml", spec(key))
    except SpecError:
        assert not api_key_ok(key)
        return
    assert api_key_ok(key)
    deployment = rf.fleet_server_deployment(plan_fleet(fleet, "ml"), uid="u",
                                            settings=OperatorSettings())
    refs = [e["valueFrom"]["secretKeyRef"]["key"]
            for c in deployment["spec"]["template"]["spec"]["containers"]
            for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})]
    assert key in refs and all(api_key_ok(k) for k in refs), refs
