"""Deployment guardrails in local mode, with real processes (``kubeinfer up -f``).

One endpoint, one variant, blue an identity model. Requests go at a steady rate
from a thread for the whole test, two numbers each (x of shape [2]). First a
canary to ``add_3_model``, which passes its warm-up (one number) and then fails
every real request with a model error: the errorRate alarm over the gateway's
own metrics of the green route rolls it back, all traffic goes back to blue and
green's servers stop; every request was answered, the only failures the model
errors of the canary's share before the rollback, none after. Then a canary to a
healthy model completes: traffic shifts, blue stops, every request succeeds.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from bench.local_autoscale import StepLoad, scale_events
from botocore.exceptions import ClientError

from kubeinfer_operator.local.paths import EndpointPaths
from tests.integration.test_local import Local, local, runtime_client
from tests.support.onnx_models import add_3_model, identity_model
from tests.support.ports import wait_until
from tests.support.route_json import full_table

#: The local-mode fixture (tests.integration.test_local), shared.
__all__ = ["local"]

NAME = "guard"


def manifest(model: Path, wait_s: int) -> str:
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
        waitIntervalInSeconds: {wait_s}
    autoRollback:
      alarms:
        - name: green-errors
          errorRate: 0.1
          windowSeconds: 10
          minRequests: 10
"""


class Load:
    """Requests at a steady rate; each outcome recorded: (time, variant or error code)."""

    def __init__(self, url: str) -> None:
        self.client = runtime_client(url)
        self.outcomes: list[tuple[float, str]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        body = json.dumps({"instances": [1.0, 2.0]})
        while not self.stopped.is_set():
            try:
                r = self.client.invoke_endpoint(EndpointName=NAME, Body=body,
                                                ContentType="application/json")
                assert json.loads(r["Body"].read()) is not None
                outcome = "ok:" + r["InvokedProductionVariant"]
            except ClientError as exc:
                outcome = "error:" + str(exc.response["Error"].get("Code"))
            except Exception as exc:  # connection refused, reset: never expected
                outcome = "broken:" + type(exc).__name__
            self.outcomes.append((time.monotonic(), outcome))
            self.stopped.wait(0.02)

    def since(self, t: float) -> list[str]:
        return [o for when, o in list(self.outcomes) if when >= t]


def state(local: Local) -> dict[str, Any]:
    path = EndpointPaths.for_endpoint(NAME, local.home).state
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc


def rollout(local: Local) -> dict[str, Any]:
    found: list[dict[str, Any]] = state(local).get("rollouts") or [{}]
    return found[0]


def servers(local: Local) -> dict[str, int | None]:
    """Model servers: name -> pid (from state.json)."""
    return {p["name"]: p.get("pid") for p in state(local).get("processes", [])
            if p["name"] != "gateway"}


def rollout_span(home: Path, since: float) -> tuple[float, float]:
    """(started, completed) wall times of the first rollout of ``NAME`` after ``since``,
    from the events local mode recorded (``reconcile.rollout``'s messages)."""
    path = home / "local" / NAME / "events.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    began = next(e["time"] for e in events
                 if e["time"] >= since and ": rolling out fleet " in e["message"])
    ended = next(e["time"] for e in events
                 if e["time"] >= began and " serves all traffic; fleet " in e["message"])
    return began, ended


def up(local: Local, model: Path, wait_s: int) -> None:
    path = local.write("guard.yaml", manifest(model, wait_s))
    result = local.run("up", "-d", "-f", str(path), "--timeout", "60", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_bad_canary_rolls_back_and_a_good_one_completes(local: Local, tmp_path: Path) -> None:
    blue = identity_model(tmp_path / "blue.onnx")
    up(local, blue, 3)
    load = Load(state(local)["url"])
    load.thread.start()
    try:
        wait_until(lambda: len(load.outcomes) >= 10, 10, "blue answering")
        # 1. A canary whose model fails every request: rolled back by the errorRate alarm.
        up(local, add_3_model(tmp_path / "bad.onnx"), 3)
        started = time.monotonic()
        wait_until(lambda: rollout(local).get("phase") == "RolledBack", 30, "rolled back",
                   interval=0.1)
        rolled_back = time.monotonic()
        got = rollout(local)
        [evaluation] = got["lastAlarmEvaluation"]
        assert evaluation["name"] == "green-errors" and evaluation["tripped"]
        assert evaluation["value"] == 1.0 and evaluation["threshold"] == 0.1
        assert "rolled back to fleet primary" in got["message"]
        wait_until(lambda: not any(n.startswith("primary-green") for n in servers(local)),
                   10, "green's servers stopped")
        wait_until(lambda: len(load.since(rolled_back + 1)) >= 20, 10, "requests after")
        during = load.since(started)
        # Every request was answered; the only failures are the canary's model errors,
        # and from shortly after the rollback on, blue answers everything.
        assert set(during) <= {"ok:primary", "error:ModelError"}, set(during)
        assert "error:ModelError" in during
        assert set(load.since(rolled_back + 1)) == {"ok:primary"}
        assert full_table((EndpointPaths.for_endpoint(NAME, local.home).routes).read_text())[
            "endpoints"][NAME]["variants"][0]["name"] == "primary"

        # 2. A healthy canary completes: blue's servers stop, green's serve as primary.
        good = identity_model(tmp_path / "good.onnx")
        before = servers(local)
        mark = time.monotonic()
        up(local, good, 1)
        seen: list[float] = []

        def complete() -> bool:
            r = rollout(local)
            seen.append(float(r.get("trafficToGreen", 0)))
            return bool(r.get("phase") == "Complete")

        wait_until(complete, 30, "rollout complete", interval=0.1)
        assert 50.0 in seen
        wait_until(lambda: set(servers(local)) == {"primary-0"}
                   and servers(local) != before, 10, "green renamed into slot primary")
        assert set(load.since(mark)) == {"ok:primary"}
    finally:
        load.stopped.set()
        load.thread.join(5)
    assert not [o for _, o in load.outcomes if o.startswith("broken:")]


def test_a_canary_that_cannot_load_its_model_rolls_back_at_once(local: Local,
                                                                 tmp_path: Path) -> None:
    """Green's model server gives up on its model ("failed to load"): the rollout is
    RolledBack (GreenFailed) at once instead of Provisioning until the 8-hour default
    maximumExecutionTimeoutInSeconds; blue answers every request throughout."""
    up(local, identity_model(tmp_path / "blue.onnx"), 3)
    load = Load(state(local)["url"])
    load.thread.start()
    try:
        wait_until(lambda: len(load.outcomes) >= 10, 10, "blue answering")
        broken = tmp_path / "broken.onnx"
        broken.write_bytes(b"not an onnx model")
        path = local.write("guard.yaml", manifest(broken, 3))
        local.run("up", "-d", "-f", str(path), "--timeout", "60", timeout=90)
        wait_until(lambda: rollout(local).get("phase") == "RolledBack", 60, "rolled back",
                   interval=0.1)
        got = rollout(local)
        assert got["reason"] == "GreenFailed", got
        assert "cannot become ready" in got["message"] and "failed to load" in got["message"]
        wait_until(lambda: not any(n.startswith("primary-green") for n in servers(local)),
                   10, "green's servers stopped")
        mark = time.monotonic()
        wait_until(lambda: len(load.since(mark)) >= 10, 10, "requests after the rollback")
    finally:
        load.stopped.set()
        load.thread.join(5)
    assert {o for _, o in load.outcomes} == {"ok:primary"}


def test_an_autoscaled_variant_rolls_out_at_its_scaled_size(local: Local, models_dir: Path,
                                                            tmp_path: Path) -> None:
    """Scaled out to 2 under load, the variant's canary starts green at 2 (not the spec's
    1). The load doubles as the rollout starts (3 replicas' worth): scaling holds while
    the rollout runs and catches up afterwards; without load it scales back in to 1."""
    local.env["KUBEINFER_AUTOSCALE_INTERVAL_S"] = "0.5"
    local.env["KUBEINFER_AUTOSCALE_WINDOW_S"] = "2"

    def write(model: Path) -> Path:
        return local.write("auto.yaml", yaml.safe_dump({
            "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": NAME},
            "spec": {"variants": [{"name": "main", "model": {"uri": f"file://{model}"},
                                   "autoscaling": {
                                       "minReplicas": 1, "maxReplicas": 3,
                                       "scaleOutCooldown": 1, "scaleInCooldown": 2,
                                       "targetTracking": [{"metric": "InvocationsPerReplica",
                                                           "target": 300}]}}],
                     "deploymentConfig": {"blueGreen": {"trafficRouting": {
                         "type": "Canary", "waitIntervalInSeconds": 3,
                         "canarySize": {"type": "CapacityPercent", "value": 50}}}}}}))

    v2 = tmp_path / "iris-v2.onnx"
    shutil.copy(models_dir / "iris.onnx", v2)
    result = local.run("up", "-d", "-f", str(write(models_dir / "iris.onnx")), "--timeout",
                       "60", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    with StepLoad(state(local)["url"], NAME, rate=10.0, clients=4) as load:
        wait_until(lambda: set(servers(local)) == {"main-0", "main-1"}, 60,
                   "scaled out to 2 under 600 requests a minute")
        started = time.time()
        result = local.run("up", "-d", "-f", str(write(v2)), "--timeout", "60", timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr
        load.rate = 20.0
        greens: set[str] = set()

        def complete() -> bool:
            greens.update(n for n in servers(local) if n.startswith("main-green"))
            return rollout(local).get("phase") == "Complete"

        wait_until(complete, 60, "the rollout complete", interval=0.1)
        assert greens == {"main-green-0", "main-green-1"}, greens  # green at blue's 2
        # The rollout's span by the supervisor's own clock (its events): scaling may
        # rightly resume the moment it completes, before this test notices.
        began, ended = rollout_span(local.home, started)
        during = [m for t, m in scale_events(local.home, NAME) if began <= t <= ended]
        assert during == [], during  # scaling held while the rollout ran
        wait_until(lambda: set(servers(local)) == {"main-0", "main-1", "main-2"}, 60,
                   "scaled out to 3 once the rollout is over")
    wait_until(lambda: set(servers(local)) == {"main-0"}, 60, "scaled back in to 1")
