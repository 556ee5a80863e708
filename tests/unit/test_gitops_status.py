"""What GitOps tools conclude from an Endpoint's status, read the way they read it.

Each scenario builds the status the operator writes (``reconcile.status``) and
checks two readers against it: kstatus's generic rules (Flux, kpt,
cli-utils; ``tests/support/kstatus.py``) and the Argo CD health check the docs
and the chart's notes ship, run under Lua 5.1 as Argo CD runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from lupa import lua51

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.reconcile import status as st
from kubeinfer_operator.render.plan import plan_endpoint
from tests.support import kstatus

REPO = Path(__file__).resolve().parents[2]
LUA_FILE = REPO / "charts" / "kubeinfer" / "files" / "argocd-health.lua"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
URL = "http://iris-gateway.ml.svc:8080"
STUCK = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "iris-canary-7c9f" has timed out progressing.'}


def _deployment(name: str, *, available: int = 1, updated: int = 1, generation: int = 1,
                observed: int = 1, stuck: bool = False) -> dict[str, Any]:
    status: dict[str, Any] = {"availableReplicas": available, "readyReplicas": available,
                              "updatedReplicas": updated, "observedGeneration": observed}
    if stuck:
        status["conditions"] = [STUCK]
    return {"kind": "Deployment", "metadata": {"name": name, "generation": generation},
            "spec": {"replicas": 1}, "status": status}


def _endpoint(generation: int, status: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
        "metadata": {"name": "iris", "namespace": "ml", "generation": generation},
        "spec": {"variants": [{"name": "main", "model": {"uri": "s3://m/a.onnx"}}]}}
    if status is not None:
        obj["status"] = status
    return obj


def _reconciled(**deployment: Any) -> dict[str, Any]:
    """An Endpoint at generation 2 the operator reconciled, its variant's Deployment as given."""
    plan = plan_endpoint(Endpoint.model_validate(_endpoint(2, None)), generation=2)
    children = st.deployments_by_name([_deployment("iris-gateway"),
                                       _deployment("iris-main", **deployment)])
    return _endpoint(2, st.endpoint_status(plan, children, url=URL, old=None, now=T0))


def _ready() -> dict[str, Any]:
    return _reconciled()


def _rolling_out() -> dict[str, Any]:
    return _reconciled(updated=0)


def _not_observed_by_the_deployment_controller() -> dict[str, Any]:
    return _reconciled(generation=3, observed=2)


def _stuck() -> dict[str, Any]:
    return _reconciled(updated=0, stuck=True)


def _new_spec_not_reconciled_yet() -> dict[str, Any]:
    obj = _ready()
    obj["metadata"]["generation"] = 3
    return obj


def _invalid_spec() -> dict[str, Any]:
    old = _ready()["status"]
    return _endpoint(3, st.failed_status(3, "InvalidSpec", "Endpoint ml/iris is invalid: x",
                                         old=old, now=T0))


def _never_reconciled() -> dict[str, Any]:
    return _endpoint(1, None)


SCENARIOS: dict[str, tuple[Callable[[], dict[str, Any]], str, str]] = {
    # name: (object, kstatus verdict, Argo CD health)
    "ready": (_ready, kstatus.CURRENT, "Healthy"),
    "rolling-out": (_rolling_out, kstatus.IN_PROGRESS, "Progressing"),
    "deployment-generation-not-observed": (_not_observed_by_the_deployment_controller,
                                           kstatus.IN_PROGRESS, "Progressing"),
    "rollout-stuck": (_stuck, kstatus.FAILED, "Degraded"),
    "spec-not-reconciled-yet": (_new_spec_not_reconciled_yet, kstatus.IN_PROGRESS,
                                "Progressing"),
    "invalid-spec": (_invalid_spec, kstatus.FAILED, "Degraded"),
    # kstatus's own gap: with no status at all it has nothing to go on and says Current.
    # The operator writes status within one reconcile of the create (~0.1 s); Argo CD waits.
    "never-reconciled": (_never_reconciled, kstatus.CURRENT, "Progressing"),
}


@pytest.fixture(scope="module")
def argocd_health() -> Iterator[Callable[[dict[str, Any]], dict[str, str]]]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval("function(obj) " + LUA_FILE.read_text() + " end")

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: table(v) for k, v in value.items()})
        if isinstance(value, list):
            return lua.table_from([table(v) for v in value])
        return value

    def run(obj: dict[str, Any]) -> dict[str, str]:
        hs = check(table(obj))
        return {"status": hs["status"], "message": hs["message"]}

    yield run


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kstatus_reads_the_endpoint_as_the_operator_means_it(name: str) -> None:
    make, verdict, _ = SCENARIOS[name]
    assert kstatus.compute(make()).status == verdict


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_argocd_health_check(name: str,
                             argocd_health: Callable[[dict[str, Any]], dict[str, str]]) -> None:
    make, _, health = SCENARIOS[name]
    assert argocd_health(make())["status"] == health


def test_argocd_degraded_names_the_reason_and_the_deployments_message(
        argocd_health: Callable[[dict[str, Any]], dict[str, str]]) -> None:
    message = argocd_health(_stuck())["message"]
    assert message.startswith("ProgressDeadlineExceeded: Variant main: Deployment ml/iris-main: "
                              'ReplicaSet "iris-canary-7c9f" has timed out progressing')


def test_kstatus_never_calls_a_not_ready_endpoint_current() -> None:
    for name, (make, verdict, _) in SCENARIOS.items():
        obj = make()
        ready = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions", [])}
        if verdict == kstatus.CURRENT and obj.get("status"):
            assert ready["Ready"] == "True", name


def test_the_docs_and_the_chart_notes_ship_the_same_health_check() -> None:
    lua = LUA_FILE.read_text()
    indented = "".join("    " + line + "\n" if line else "\n" for line in lua.splitlines())
    assert indented in (REPO / "docs" / "gitops.md").read_text()
    with helm.Chart.load(REPO / "charts" / "kubeinfer") as chart:
        notes = chart.render(None, name="kubeinfer", namespace="kubeinfer-system")[
            "kubeinfer/templates/NOTES.txt"]
    assert "resource.customizations.health.kubeinfer.io_Endpoint: |\n" + indented in notes + "\n"
