"""A fleet's package Jobs write below ``<packages.uri>/<namespace>/<fleet>/``, never elsewhere.

The package Job parses the prefix it is given (``--out``) as a URI: a '?' or '#' in
``spec.packages.uri`` would end the object key there, before the namespace and fleet
the operator appends, so a fleet of one namespace could overwrite another's packages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubeinfer_operator.reconcile.edge_validate import InvalidEdgeFleet, validate_edge_fleet
from kubeinfer_operator.render.edge_plan import plan_fleet
from kubeinfer_runtime.edge import main as edge_main

VICTIM = "s3://pkgs/edge/victim/sensors/v1/x86.tar.gz"


def _spec(packages: str) -> dict[str, Any]:
    return {"model": {"uri": "s3://models/mlp.onnx"}, "targets": [{"name": "x86"}],
            "registration": {"bootstrapTokenSecret": {"name": "boot", "key": "token"}},
            "signing": {"keySecret": {"name": "signing", "key": "key"}},
            "packages": {"uri": packages}, "redis": {"url": "redis://redis:6379/0"}}


@pytest.mark.parametrize("uri", [VICTIM + "?", VICTIM + "#", "s3://pkgs/edge?x=1",
                                 "s3://pkgs/edge#top"])
def test_a_query_or_fragment_in_packages_uri_is_refused(uri: str) -> None:
    with pytest.raises(InvalidEdgeFleet, match=r"spec\.packages\.uri.*'\?' or '#'"):
        validate_edge_fleet("thief", "attacker", _spec(uri))


def test_the_package_is_uploaded_below_the_namespace_and_fleet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_fleet(validate_edge_fleet("sensors", "ml", _spec("s3://pkgs/edge/")), "ml")
    args = list(plan.builds[0].args)
    out = args[args.index("--out") + 1]
    uploads: list[tuple[str, str]] = []

    class Client:
        def fput_object(self, bucket: str, key: str, path: str) -> None:
            uploads.append((bucket, key))

    monkeypatch.setattr("kubeinfer_runtime.storage.fetch.s3_client",
                        lambda *a, **k: Client())
    edge_main._publish(Path("/dev/null"), f"{out}/{plan.version}/x86.tar.gz")  # as package() does
    assert uploads == [("pkgs", f"edge/ml/sensors/{plan.version}/x86.tar.gz")]
