"""Readiness means "answers", with real processes: a model that loads but fails every inference.

The model (``fails_every_inference_model``) has iris's signature and a Reshape
no input can satisfy: onnxruntime loads it and every run fails. It must never
be called ready: the model server says why on every readiness route, local mode
abandons a rollout to it at once and keeps the old version serving, a
multi-model server answers 424 and does not cache it. A pipeline step whose
handler module does not exist fails ``up`` at once as well.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kubeinfer_operator.render.k8s_workloads import MODEL_SERVER_READY_PATH
from kubeinfer_runtime.contract.scale import LOAD_FAILED_EXIT_CODE
from tests.integration.test_local import Local, invoke, manifest, runtime_client
from tests.support.onnx_models import fails_every_inference_model
from tests.support.ports import free_port, wait_until
from tests.support.procs import start_runtime

REPO = Path(__file__).resolve().parents[2]
ROWS = [[5.1, 3.5, 1.4, 0.2]]
#: Local mode must give up long before --timeout: the failure is reported at once.
TIMEOUT_S = 120
ABANDON_WITHIN_S = 30


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    lm = Local(tmp_path / "home", tmp_path)
    yield lm
    if lm.our_processes():
        lm.run("down", "--all", timeout=60)
    for pid in lm.our_processes():
        os.kill(pid, signal.SIGKILL)


def test_model_server_never_ready_and_says_why(tmp_path: Path) -> None:
    model = fails_every_inference_model(tmp_path / "bad.onnx")
    proc = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{model}", "KUBEINFER_MODEL_NAME": "primary",
        "KUBEINFER_ENDPOINT_NAME": "bad", "KUBEINFER_VARIANT_NAME": "primary",
        "KUBEINFER_MODEL_CACHE_DIR": str(tmp_path / "cache")}, tmp_path / "logs",
        expect_ready=False)
    try:
        wait_until(lambda: "failed to load" in httpx.get(proc.url + "/ping").text, 30,
                   "the warm-up failure on /ping")
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # and it stays so: never 200
            r = httpx.get(proc.url + "/ping")
            assert r.status_code == 503, r.text
            time.sleep(0.1)
        message = r.json()["Message"]
        assert message.startswith(f'Model "primary" failed to load from file://{model}: its '
                                  "warm-up inference on inputs made from its signature failed")
        assert "cannot be reshaped" in message
        # The Kubernetes readiness probe's route, and V2 model readiness, agree.
        for path in (MODEL_SERVER_READY_PATH, "/v2/models/primary/ready"):
            r = httpx.get(proc.url + path)
            assert not 200 <= r.status_code < 400, (path, r.status_code)
        assert httpx.get(proc.url + "/v2/health/live").status_code == 200
        r = httpx.post(proc.url + "/invocations", json=ROWS)
        assert r.status_code == 503 and "failed to load" in r.text
        metrics = httpx.get(proc.url + "/metrics").text
        labels = 'endpoint="bad",model="primary",variant="primary"'
        assert f"kubeinfer_model_loaded{{{labels}}} 0.0" in metrics
        assert re.search(r'kubeinfer_model_load_failures_total\{endpoint="bad",model="primary",'
                         r'stage="warmup",variant="primary"\} 1\.0', metrics), metrics
        assert proc.log().count("failed to load from") == 1  # logged once
    finally:
        proc.stop()


@pytest.mark.parametrize("case", ["warm-up fails", "no such model"])
def test_on_kubernetes_a_model_that_fails_to_load_ends_the_process_saying_why(
        tmp_path: Path, case: str) -> None:
    """As the operator runs it (KUBEINFER_EXIT_ON_LOAD_FAILURE): exit code 3, the reason
    in the termination message (``kubectl describe pod`` shows it), so the kubelet retries
    with back-off and the scaler tells a serverless variant's callers at once."""
    model = (fails_every_inference_model(tmp_path / "bad.onnx") if case == "warm-up fails"
             else tmp_path / "missing" / "model.onnx")
    message = tmp_path / "termination-log"
    env = {**os.environ, "KUBEINFER_MODEL_URI": f"file://{model}",
           "KUBEINFER_MODEL_NAME": "primary", "KUBEINFER_ENDPOINT_NAME": "bad",
           "KUBEINFER_VARIANT_NAME": "primary", "KUBEINFER_PORT": str(free_port()),
           "KUBEINFER_MODEL_CACHE_DIR": str(tmp_path / "cache"),
           "KUBEINFER_EXIT_ON_LOAD_FAILURE": "true",
           "KUBEINFER_TERMINATION_MESSAGE_PATH": str(message)}
    done = subprocess.run([sys.executable, "-m", "kubeinfer_runtime", "serve", "--role",
                           "model-server"], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == LOAD_FAILED_EXIT_CODE, done.stderr[-2000:]
    reason = message.read_text()
    assert reason.startswith(f'Model "primary" failed to load from file://{model}')
    assert "failed to load" in done.stderr  # the log says it too


def test_local_rollout_to_a_failing_model_is_abandoned_and_the_old_version_serves(
        local: Local, models_dir: Path, tmp_path: Path) -> None:
    iris = models_dir / "iris.onnx"
    bad = fails_every_inference_model(tmp_path / "bad" / "model.onnx")
    spec = local.write("ep.yaml", manifest(
        "ep", {"name": "primary", "weight": 1, "replicas": 1, "model": iris}))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    before = local.pids("ep")
    client = runtime_client(local.endpoint("ep")["url"])
    assert invoke(client)[1]["predictions"]["label"] == [0]

    spec.write_text(manifest("ep", {"name": "primary", "weight": 1, "replicas": 1,
                                    "model": bad}))
    started = time.monotonic()
    result = local.run("up", "-d", "-f", str(spec), "--timeout", str(TIMEOUT_S))
    took = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < ABANDON_WITHIN_S, f"abandoned after {took:.1f}s"
    err = " ".join(result.stderr.split())  # rich wraps long lines
    assert "Endpoint ep failed (the previous version keeps serving)" in err, err
    assert "failed to load" in err and "cannot be reshaped" in err, err
    # The old server still serves, the new one is gone, the route table never changed.
    state = local.endpoint("ep")
    assert {p["name"]: p["pid"] for p in state["processes"]} == before
    assert state["variants"][0]["model_uri"].endswith("iris.onnx")
    for _ in range(5):
        variant, answer = invoke(client)
        assert variant == "primary" and answer["predictions"]["label"] == [0]


def test_pipeline_with_a_missing_handler_module_fails_up_at_once(
        local: Local, models_dir: Path) -> None:
    spec = local.write("pipe.yaml", f"""\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: pipe
spec:
  variants:
    - name: main
      inferenceExecution: Serial
      containers:
        - name: pre
          handler: nope_module:fn
          codeUri: file://{REPO / 'examples' / 'handlers'}
        - name: iris
          model:
            uri: file://{models_dir / 'iris.onnx'}
""")
    started = time.monotonic()
    result = local.run("up", "-d", "-f", str(spec), "--timeout", str(TIMEOUT_S))
    took = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert took < ABANDON_WITHIN_S, f"failed after {took:.1f}s"
    err = " ".join(result.stderr.split())
    assert 'Step 1 ("pre") is not ready' in err, err
    assert "failed to load: module 'nope_module' cannot be imported" in err, err
    assert "ModuleNotFoundError" in err, err
    local.wait_no_processes()  # a new endpoint that failed leaves nothing running


def test_multi_model_server_answers_424_and_does_not_cache_a_failing_model(
        tmp_path: Path, models_dir: Path) -> None:
    root = tmp_path / "models"
    (root / "good").mkdir(parents=True)
    (root / "good" / "model.onnx").write_bytes((models_dir / "iris.onnx").read_bytes())
    fails_every_inference_model(root / "bad" / "model.onnx")
    proc = start_runtime("model-server", {
        "KUBEINFER_MULTI_MODEL_PREFIX": f"file://{root}/", "KUBEINFER_ADMIN_API": "true",
        "KUBEINFER_MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "KUBEINFER_ENDPOINT_NAME": "zoo", "KUBEINFER_VARIANT_NAME": "all"}, tmp_path / "logs")
    try:
        def call(name: str) -> httpx.Response:
            return httpx.post(proc.url + "/invocations", json=ROWS, timeout=30,
                              headers={"X-Amzn-SageMaker-Target-Model": name})

        for _ in range(2):  # each request tries again: the failure is not cached
            r = call("bad/model.onnx")
            assert r.status_code == 424 and r.headers["x-amzn-errortype"] == "ModelError:"
            message = r.json()["Message"]
            assert message.startswith('Model "bad/model.onnx" failed to load: its warm-up '
                                      "inference on inputs made from its signature failed")
            assert "cannot be reshaped" in message
        assert call("good/model.onnx").json()["predictions"]["label"] == [0]
        listed = {m["modelName"] for m in httpx.get(proc.url + "/models").json()["models"]}
        assert listed == {"good/model.onnx"}
        assert httpx.get(proc.url + "/v2/models/bad/model.onnx/ready").json()["ready"] is False
        assert httpx.get(proc.url + "/ping").status_code == 200  # the server itself is fine
        metrics = httpx.get(proc.url + "/metrics").text
        failures = re.search(r'^kubeinfer_multimodel_load_failures_total\{endpoint="zoo",'
                             r'variant="all"\} (\S+)$', metrics, re.M)
        assert failures is not None and float(failures.group(1)) == 2.0
    finally:
        proc.stop()
