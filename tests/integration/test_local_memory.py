"""Local mode enforces memory limits like the kubelet: over the limit → OOMKilled, restarted.

Real CLI, supervisor, gateway and model servers. Two ways a model does not fit:

* it cannot even start under its limit (30Mi: the Python runtime alone is
  bigger): the rollout gives up after a few OOM kills, ``up`` says why with the
  numbers, and the version already running keeps serving;
* it fits until a request makes it grow (a "balloon" model whose output is
  small but whose inference allocates 512 MiB, which onnxruntime's arena keeps):
  the server is OOMKilled after answering, the gateway answers 503 for that
  variant while it restarts, status shows OOMKilled and the restart, and a
  variant with a generous limit is never touched.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.integration.test_local import Local, gone, local, runtime_client
from tests.support.ports import wait_until

pytestmark = pytest.mark.integration
__all__ = ["local"]

VARIANT = """\
    - name: {name}
      weight: {weight}
      model: {{uri: file://{model}}}
      resources: {{limits: {{memory: {memory}}}}}
"""


def manifest(*variants: dict[str, Any]) -> str:
    body = "".join(VARIANT.format(**v) for v in variants)
    return ("apiVersion: kubeinfer.io/v1alpha1\nkind: Endpoint\nmetadata:\n  name: ep\n"
            f"spec:\n  variants:\n{body}")


def build_balloon(path: Path) -> Path:
    """X float32 [N, 4] → Y = X [N, 4], via an intermediate [N, 4, (max(X) + 1) * 2^20].

    The warm-up's zeros cost 16 MiB; a row holding 31 costs 512 MiB, which
    onnxruntime's CPU arena keeps after the run (as a real model's peak would).
    """
    scale = numpy_helper.from_array(np.array([1 << 20], dtype=np.int64), "scale")
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
    ones = numpy_helper.from_array(np.array([1, 1], dtype=np.int64), "ones")
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("ReduceMax", ["X"], ["peak"], keepdims=0),
        helper.make_node("Cast", ["peak"], ["peak_int"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["peak_int", "one"], ["peak_1"]),
        helper.make_node("Add", ["peak_1", "one"], ["rows"]),
        helper.make_node("Mul", ["rows", "scale"], ["width"]),
        helper.make_node("Concat", ["ones", "width"], ["shape"], axis=0),
        helper.make_node("Unsqueeze", ["X", "axes"], ["X3"]),
        helper.make_node("Expand", ["X3", "shape"], ["big"]),
        helper.make_node("ReduceMax", ["big", "axes"], ["Y"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "balloon",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])],
        [scale, one, ones, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def events(local: Local) -> list[str]:
    path = local.home / "local" / "ep" / "events.jsonl"
    return [json.loads(line)["message"] for line in path.read_text().splitlines()]


def state(local: Local) -> dict[str, Any]:
    """state.json as the supervisor wrote it: what ``status --json`` prints, without
    paying a CLI start per look (seconds on a busy machine)."""
    doc: dict[str, Any] = json.loads((local.home / "local" / "ep" / "state.json").read_text())
    return doc


def processes(local: Local) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in state(local)["processes"]}


def used_mib(message: str) -> float:
    """The size an OOM message says the process used, in MiB."""
    m = re.search(r"using ([0-9.]+)(Mi|Gi), over", message)
    assert m, message
    return float(m.group(1)) * (1024 if m.group(2) == "Gi" else 1)


def test_a_limit_the_model_server_cannot_start_under_fails_the_rollout(
        local: Local, models_dir: Path) -> None:
    iris = models_dir / "iris.onnx"
    spec = local.write("ep.yaml", manifest(
        {"name": "main", "weight": 1, "model": iris, "memory": "2Gi"}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    before = processes(local)["main-0"]["pid"]

    # 30Mi: less than the Python runtime alone. The new server is OOMKilled on
    # every start; after a few the rollout gives up and the old one keeps serving.
    spec.write_text(manifest({"name": "main", "weight": 1, "model": iris, "memory": "30Mi"}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 1, result.stdout + result.stderr
    error = " ".join(result.stderr.split())  # rich wraps long lines
    assert "Endpoint ep failed (the previous version keeps serving)" in error
    assert "model server main-0 was OOMKilled 3 times in a row: using " in error
    assert ("over its memory limit 30Mi (resources.limits.memory); raise the limit or use a "
            "smaller model") in error
    kills = [e for e in events(local) if e.startswith("Variant main replica 0: OOMKilled: ")]
    assert len(kills) == 3
    assert all(used_mib(e) > 30 for e in kills)

    server = processes(local)["main-0"]
    assert server["pid"] == before and server["restarts"] == 0
    assert server["last_termination"] == "" and server["state"] == "ready"
    client = runtime_client(state(local)["url"])
    r = client.invoke_endpoint(EndpointName="ep", ContentType="application/json",
                               Body=json.dumps({"instances": [[5.1, 3.5, 1.4, 0.2]]}))
    assert r["InvokedProductionVariant"] == "main"


def test_a_server_that_grows_over_its_limit_is_oomkilled_and_restarted(
        local: Local, models_dir: Path, tmp_path: Path) -> None:
    balloon = build_balloon(tmp_path / "balloon.onnx")
    spec = local.write("ep.yaml", manifest(
        {"name": "big", "weight": 1, "model": models_dir / "iris.onnx", "memory": "2Gi"},
        {"name": "balloon", "weight": 0, "model": balloon, "memory": "300Mi"}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    pids = {name: p["pid"] for name, p in processes(local).items()}
    client = runtime_client(state(local)["url"])

    def invoke(variant: str, value: float) -> tuple[int, str]:
        try:
            r = client.invoke_endpoint(EndpointName="ep", ContentType="application/json",
                                       TargetVariant=variant,
                                       Body=json.dumps({"instances": [[value, 0, 0, 0]]}))
        except client.exceptions.ServiceUnavailable as exc:
            return 503, str(exc)
        return r["ResponseMetadata"]["HTTPStatusCode"], r["Body"].read().decode()

    assert invoke("balloon", 1.0) == (200, '{"predictions":[[1.0,0.0,0.0,0.0]]}')
    # 512 MiB for this one: the server is killed after answering, or while it runs
    # (the gateway then answers 503 for the cut-off request).
    assert invoke("balloon", 31.0)[0] in (200, 503)
    seen: list[tuple[int, str]] = []

    def unavailable() -> bool:
        seen.append(invoke("balloon", 1.0))
        return seen[-1][0] == 503

    # While it restarts the gateway answers 503 for the variant, and keeps serving others.
    wait_until(unavailable, 10, "a 503 for the variant being restarted", interval=0.02)
    assert "balloon" in seen[-1][1]
    assert invoke("big", 1.0)[0] == 200

    wait_until(lambda: processes(local)["balloon-0"]["restarts"] == 1
               and processes(local)["balloon-0"]["state"] == "ready", 20,
               "balloon-0 restarted and ready")
    procs = processes(local)
    restarted = procs["balloon-0"]
    assert restarted["last_termination"] == "OOMKilled"
    assert restarted["last_exit"] == -signal.SIGKILL and gone(pids["balloon-0"])
    assert restarted["last_termination_message"].endswith(
        "over its memory limit 300Mi (resources.limits.memory); raise the limit or use a "
        "smaller model")
    # Measured while growing or after: over the limit either way.
    assert used_mib(restarted["last_termination_message"]) > 300
    [kill] = [e for e in events(local) if "OOMKilled: " in e]
    assert kill.startswith("Variant balloon replica 0: OOMKilled: using ")
    # The generous limit: never killed, same process all along.
    assert procs["big-0"]["pid"] == pids["big-0"] and procs["big-0"]["restarts"] == 0
    assert procs["big-0"]["last_termination"] == ""

    # kubeinfer status shows it like kubectl's lastState (wide: rich fits tables to it).
    result = subprocess.run(local.argv("status", "ep"), env={**local.env, "COLUMNS": "200"},
                            capture_output=True, text=True, timeout=60)
    row = next(line for line in result.stdout.splitlines() if "balloon-0" in line)
    assert "OOMKilled (-9)" in row and " 1 " in row
    wait_until(lambda: invoke("balloon", 1.0)[0] == 200, 10, "balloon serving again")
