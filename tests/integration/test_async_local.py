"""Async endpoints in local mode: `kubeinfer up` with a private Redis, scale to zero and back.

The real CLI, supervisor, gateway, redis-server and async workers; file://
input and output so no object store is needed. The policy itself is
unit-tested against a fake clock (tests/unit/test_async_scaling.py); here the
supervisor must carry it out: the idle worker stops, and a new request starts
one from zero that processes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.integration import test_local
from tests.integration.test_local import Local, wait_for
from tests.support.ports import wait_until

#: The local-mode fixture (own KUBEINFER_HOME, nothing left running afterwards).
local = test_local.local


def _manifest(name: str, model: Path, out: Path, hook: str | None = None) -> str:
    notification = f"\n    notification: {{successUrl: \"{hook}\"}}" if hook else ""
    return f"""\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: {name}
spec:
  type: Async
  async:
    outputPath: file://{out}
    maxRetries: 1{notification}
    scaling:
      targetBacklogPerReplica: 2
      minReplicas: 0
      maxReplicas: 2
      scaleOutCooldown: 0
      scaleInCooldown: 2
  variants:
  - name: main
    replicas: 1
    model:
      uri: file://{model}
"""


def _workers(state: dict[str, object]) -> list[dict[str, object]]:
    procs = state["processes"]
    assert isinstance(procs, list)
    return [p for p in procs if p["role"] == "async-worker" and p["pid"]]


def test_async_endpoint_scales_to_zero_and_back_on_new_work(local: Local, models_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = tmp_path / "in.json"
    data.write_text(json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}))
    spec = local.write("async.yaml", _manifest("aq", models_dir / "iris.onnx", out))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    state = local.endpoint("aq")
    url = state["url"]
    assert len(_workers(state)) == 1
    assert any(p["role"] == "gateway" for p in state["processes"])

    # Idle: the only worker stops once the queue stayed empty for scaleInCooldown.
    wait_for(local, "aq", lambda s: not _workers(s), "scale to zero", timeout=30)
    assert local.endpoint("aq")["phase"] == "Ready"

    # New work with no worker: the gateway still accepts it, a worker starts, runs it.
    r = httpx.post(f"{url}/endpoints/aq/async-invocations", headers={
        "X-Amzn-SageMaker-InputLocation": f"file://{data}",
        "X-Amzn-SageMaker-Inference-Id": "after-idle"})
    assert r.status_code == 202, r.text
    assert r.headers["x-amzn-sagemaker-outputlocation"] == f"file://{out}/after-idle.out"
    output = out / "after-idle.out"
    wait_until(output.exists, 60, "the output written by a worker started from zero")
    assert json.loads(output.read_text())["predictions"]["label"] == [0]
    assert wait_for(local, "aq", lambda s: len(_workers(s)) >= 1, "a worker", timeout=5)

    # And back to zero once idle again.
    wait_for(local, "aq", lambda s: not _workers(s), "scale to zero again", timeout=30)
    events = (local.home / "local" / "aq" / "events.jsonl").read_text()
    assert "scaling out to 1" in events and "scaling in to 0" in events
    assert "private redis-server" in events

    result = local.run("down", "aq", timeout=60)
    assert result.returncode == 0, result.stderr
    local.wait_no_processes()
