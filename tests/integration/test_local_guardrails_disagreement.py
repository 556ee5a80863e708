"""The ``disagreement`` alarm in local mode, with real processes (``kubeinfer up -f``).

Blue is a classifier (``label_model``: label ``i % 3`` for input ``i``); the canary's
green flips the label of 5% of inputs, at the same latency and with no error. While
the canary bakes, the gateway mirrors each fleet's requests to the other and
compares the answers; the alarm (2% over at least 200 compared pairs) rolls the
canary back. Every request is answered throughout, by blue after the rollback.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from kubeinfer_operator.local.paths import EndpointPaths
from tests.integration.test_local import Local, local, runtime_client
from tests.integration.test_local_guardrails import NAME, rollout, servers, state
from tests.support.onnx_models import label_model
from tests.support.ports import wait_until
from tests.support.route_json import full_table

#: The local-mode fixture (tests.integration.test_local), shared.
__all__ = ["local"]


def manifest(model: Path) -> str:
    return f"""\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: {NAME}
spec:
  variants:
    - name: primary
      replicas: 1
      model:
        uri: file://{model}
  deploymentConfig:
    blueGreen:
      trafficRouting:
        type: Canary
        canarySize: {{type: CapacityPercent, value: 50}}
        waitIntervalInSeconds: 60
    autoRollback:
      alarms:
        - name: green-disagrees
          disagreement: 0.02
          windowSeconds: 30
          minRequests: 200
"""


class Labels:
    """Requests ``x = [i]`` for i = 0, 1, 2, ... as fast as one client goes."""

    def __init__(self, url: str) -> None:
        self.client = runtime_client(url)
        self.outcomes: list[tuple[float, str]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self.stopped.is_set():
            try:
                r = self.client.invoke_endpoint(
                    EndpointName=NAME, Body=json.dumps({"instances": [float(i)]}),
                    ContentType="application/json")
                json.loads(r["Body"].read())
                outcome = "ok:" + r["InvokedProductionVariant"]
            except Exception as exc:
                outcome = "broken:" + type(exc).__name__
            self.outcomes.append((time.monotonic(), outcome))
            i += 1
            self.stopped.wait(0.005)


def up(local: Local, model: Path) -> None:
    path = local.write("guard.yaml", manifest(model))
    result = local.run("up", "-d", "-f", str(path), "--timeout", "60", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_canary_flipping_5_percent_of_labels_is_rolled_back(local: Local,
                                                             tmp_path: Path) -> None:
    up(local, label_model(tmp_path / "blue.onnx"))
    load = Labels(state(local)["url"])
    load.thread.start()
    try:
        wait_until(lambda: len(load.outcomes) >= 10, 10, "blue answering")
        up(local, label_model(tmp_path / "green.onnx", flip_percent=5))
        wait_until(lambda: rollout(local).get("phase") == "RolledBack", 60, "rolled back",
                   interval=0.1)
        got = rollout(local)
        [evaluation] = got["lastAlarmEvaluation"]
        assert evaluation["name"] == "green-disagrees" and evaluation["tripped"]
        assert evaluation["kind"] == "disagreement" and evaluation["requests"] >= 200
        assert 0.02 < evaluation["value"] < 0.10, evaluation
        assert "rolled back to fleet primary" in got["message"]
        wait_until(lambda: not any(n.startswith("primary-green") for n in servers(local)),
                   10, "green's servers stopped")
        routes = full_table(EndpointPaths.for_endpoint(NAME, local.home).routes.read_text())
        route = routes["endpoints"][NAME]
        assert route["mirrors"] == [] and [v["name"] for v in route["variants"]] == ["primary"]
    finally:
        load.stopped.set()
        load.thread.join(5)
    # Every request was answered, as the production variant, throughout.
    assert {o for _, o in load.outcomes} == {"ok:primary"}
