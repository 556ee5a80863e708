"""A shadow variant in local mode, with real processes (``kubeinfer up -f``).

Production is a classifier (``label_model``: label ``i % 3`` for input ``i``); the
shadow flips the label of exactly 10% of inputs (``i % 100 < 10``). Every answered
request is copied (samplingPercentage 100), so over inputs 0..299 the shadow
report must say 300 copies sent, 300 pairs compared, 90% agreement, no errors;
clients only ever see production's answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.local_autoscale import StepLoad, scale_events

from tests.integration.test_local import Local, local, runtime_client
from tests.integration.test_serverless import pids, read_state, replicas
from tests.support.onnx_models import label_model
from tests.support.ports import wait_until

#: The local-mode fixture (tests.integration.test_local), shared.
__all__ = ["local"]

NAME = "shadowed"
N = 300


def manifest(production: Path, shadow: Path, shadow_extra: str = "") -> str:
    """``shadow_extra``: more YAML lines of the shadow variant (indented six spaces)."""
    return f"""\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: {NAME}
spec:
  variants:
    - name: primary
      model:
        uri: file://{production}
  shadowVariants:
    - name: candidate
      samplingPercentage: 100
      model:
        uri: file://{shadow}
""" + shadow_extra


def report(local: Local) -> dict[str, Any]:
    result = local.run("shadow", "report", NAME, "--json", timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_copies_are_sent_compared_and_reported(local: Local, tmp_path: Path) -> None:
    path = local.write("shadow.yaml", manifest(label_model(tmp_path / "prod.onnx"),
                                               label_model(tmp_path / "cand.onnx", 10)))
    result = local.run("up", "-d", "-f", str(path), "--timeout", "60", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    client = runtime_client(local.endpoint(NAME)["url"])
    for i in range(N):
        r = client.invoke_endpoint(EndpointName=NAME, Body=json.dumps({"instances": [i]}),
                                   ContentType="application/json")
        assert r["InvokedProductionVariant"] == "primary"
        assert json.loads(r["Body"].read())["predictions"] == [i % 3]  # production's
    rows: list[dict[str, Any]] = []

    def all_compared() -> bool:
        rows[:] = report(local)["shadow"]
        return bool(rows and rows[0].get("requestsCompared") == N)

    # Each look is a `kubeinfer shadow report` process: seconds apiece on a loaded machine.
    wait_until(all_compared, 30, "every copy compared", interval=0.2)
    [row] = rows
    assert row["name"] == "candidate"
    assert row["copiesSent"] == N and row["copiesDropped"] == 0 and row["copiesFailed"] == 0
    assert row["agreementPercent"] == 90.0
    assert row["shadowErrors"] == 0 and row["productionErrors"] == 0
    assert row["productionLatencyP50Ms"] > 0 and row["shadowLatencyP99Ms"] > 0


def test_a_shadow_with_autoscaling_scales_on_its_copies(local: Local, models_dir: Path) -> None:
    """The shadow's InvocationsPerReplica is the copies it is offered: 10 requests/s
    copied at 100 % are 600 a minute, two replicas' worth at target 300, while
    production (no policy) keeps its one replica; without load it scales back in."""
    local.env["KUBEINFER_AUTOSCALE_INTERVAL_S"] = "0.5"
    local.env["KUBEINFER_AUTOSCALE_WINDOW_S"] = "2"
    iris = models_dir / "iris.onnx"
    path = local.write("scaled-shadow.yaml", manifest(iris, iris, """\
      autoscaling:
        minReplicas: 1
        maxReplicas: 2
        targetTracking: [{metric: InvocationsPerReplica, target: 300}]
        scaleOutCooldown: 1
        scaleInCooldown: 2
"""))
    result = local.run("up", "-d", "-f", str(path), "--timeout", "60", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    state = read_state(local, NAME)
    assert replicas(state, "candidate") == (1, 1)
    with StepLoad(state["url"], NAME, rate=10.0, clients=4):
        wait_until(lambda: replicas(read_state(local, NAME), "candidate") == (2, 2), 60,
                   "the shadow scaled out to 2 ready replicas")
        assert "primary-1" not in pids(local, NAME)
    wait_until(lambda: replicas(read_state(local, NAME), "candidate")[0] == 1, 60,
               "the shadow scaled back in to minReplicas 1")
    timeline = [m for _, m in scale_events(local.home, NAME)]
    assert any(m.startswith("Variant candidate: Scaled out from 1 to 2") for m in timeline), \
        timeline
    assert not any(m.startswith("Variant primary") for m in timeline), timeline
    assert report(local)["shadow"][0]["copiesSent"] > 0
