"""Multi-container endpoints end to end in local mode, invoked with boto3.

One manifest, two Endpoints built from the example handlers and the iris
model: a Serial pipeline (preprocess → model → postprocess) and a Direct one
(TargetContainerHostname picks a step). ``kubeinfer up`` runs them as real
processes behind the real gateway; a manifest with an image step is refused
by local mode before anything starts.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError

from tests.integration.test_local import Local, runtime_client
from tests.support.procs import start_runtime

REPO = Path(__file__).resolve().parents[2]
FLOWERS = {"flowers": [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
]}


def manifest(models_dir: Path, name: str, execution: str, extra: str = "") -> str:
    handlers = REPO / "examples" / "handlers"
    return f"""\
apiVersion: kubeinfer.io/v1alpha1
kind: Endpoint
metadata:
  name: {name}
spec:
  variants:
    - name: main
      inferenceExecution: {execution}
      containers:
        - name: pre
          handler: iris_steps:preprocess
          codeUri: file://{handlers}
        - name: iris
          model:
            uri: file://{models_dir / 'iris.onnx'}
        - name: post
          handler: iris_steps:postprocess
          codeUri: file://{handlers}
{extra}"""


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Local]:
    tmp = tmp_path_factory.mktemp("multicontainer")
    lm = Local(tmp / "home", tmp)
    spec = lm.write("pipelines.yaml", manifest(models_dir, "serial", "Serial") + "---\n"
                    + manifest(models_dir, "direct", "Direct"))
    result = lm.run("up", "-d", "-f", str(spec), "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    yield lm
    lm.run("down", "--all", timeout=60)
    for pid in lm.our_processes():
        os.kill(pid, signal.SIGKILL)


def _client(local: Local, endpoint: str) -> Any:
    return runtime_client(local.endpoint(endpoint)["url"])


def _error(exc: pytest.ExceptionInfo[ClientError]) -> tuple[str, int, str]:
    err = exc.value.response
    return (err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"],
            err["Error"]["Message"])


def test_serial_pipeline_via_boto3(local: Local) -> None:
    rt = _client(local, "serial")
    r = rt.invoke_endpoint(EndpointName="serial", ContentType="application/json",
                           Body=json.dumps(FLOWERS))
    assert r["ContentType"] == "application/json"
    results = json.loads(r["Body"].read())["results"]
    assert [x["species"] for x in results] == ["setosa", "virginica"]
    state = local.endpoint("serial")
    assert state["variants"][0]["model_uri"].startswith(
        "containers (Serial): pre (handler) → iris (model)")


def test_serial_error_names_the_failing_step(local: Local) -> None:
    rt = _client(local, "serial")
    with pytest.raises(ClientError) as info:
        rt.invoke_endpoint(EndpointName="serial", ContentType="application/json",
                           Body=json.dumps({"flowers": [{"sepal_length": 1}]}))
    code, status, message = _error(info)
    assert (code, status) == ("ModelError", 424)
    assert message.startswith('Step 1 of 3 ("pre") failed with 400 ValidationError')
    with pytest.raises(ClientError) as info:  # a value that is not a number
        rt.invoke_endpoint(EndpointName="serial", ContentType="application/json",
                           Body=json.dumps({"flowers": [dict.fromkeys(
                               ("sepal_length", "sepal_width", "petal_length", "petal_width"),
                               "nan-ish")]}))
    code, status, message = _error(info)
    assert (code, status) == ("ModelError", 424)
    assert 'Step 1 of 3 ("pre") failed' in message and "could not convert" in message


def test_direct_invocation_via_boto3(local: Local) -> None:
    rt = _client(local, "direct")
    r = rt.invoke_endpoint(EndpointName="direct", ContentType="application/json",
                           TargetContainerHostname="pre", Body=json.dumps(FLOWERS))
    assert json.loads(r["Body"].read()) == [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    r = rt.invoke_endpoint(EndpointName="direct", ContentType="text/csv", Accept="text/csv",
                           TargetContainerHostname="iris", Body="5.1,3.5,1.4,0.2\n")
    assert r["Body"].read().strip() == b"0"
    for target in ({}, {"TargetContainerHostname": "nope"}):
        with pytest.raises(ClientError) as info:
            rt.invoke_endpoint(EndpointName="direct", ContentType="application/json",
                               Body=json.dumps(FLOWERS), **target)
        code, status, message = _error(info)
        assert (code, status) == ("ValidationError", 400)
        assert "TargetContainerHostname= to one of pre, iris, post" in message


def test_direct_invocation_via_the_cli(local: Local) -> None:
    result = local.run("invoke", "direct", "--content-type", "text/csv", "--accept", "text/csv",
                       "--target-container", "iris", "--body", "5.1,3.5,1.4,0.2\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    result = local.run("invoke", "direct", "--body", json.dumps(FLOWERS),
                       "--target-container", "nope")
    assert result.returncode == 1
    assert "TargetContainerHostname= to one of pre, iris, post" in result.stderr


def test_local_mode_refuses_image_steps(local: Local, models_dir: Path) -> None:
    spec = local.write("image.yaml", manifest(
        models_dir, "with-image", "Serial",
        "        - name: xgb\n          image: example.com/xgboost:1.7\n"))
    result = local.run("up", "-d", "-f", str(spec), "--timeout", "30")
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "spec.variants[0].containers[3].image: image steps run only on Kubernetes" in out
    assert "with-image" not in {e["endpoint"] for e in local.status()["endpoints"]}


def test_container_steps_over_http(models_dir: Path, tmp_path: Path) -> None:
    """An image step is reached over HTTP (127.0.0.1 in the pod): here a real model server."""
    iris = start_runtime("model-server", {
        "KUBEINFER_MODEL_URI": f"file://{models_dir / 'iris.onnx'}"}, tmp_path / "logs")
    handlers = f"file://{REPO / 'examples' / 'handlers'}"
    pipeline = {"steps": [
        {"name": "iris", "url": iris.url},
        {"name": "post", "handler": "iris_steps:postprocess", "code_dir": handlers}]}
    server = start_runtime("model-server", {"KUBEINFER_PIPELINE": json.dumps(pipeline)},
                           tmp_path / "logs")
    try:
        r = httpx.post(server.url + "/invocations", json=[[5.1, 3.5, 1.4, 0.2]])
        assert r.status_code == 200, r.text
        assert [x["species"] for x in r.json()["results"]] == ["setosa"]
        # The container's own error, passed on with the step that failed.
        r = httpx.post(server.url + "/invocations", json=[[1.0, 2.0]])
        assert r.status_code == 424 and r.headers["x-amzn-errortype"] == "ModelError:"
        message = r.json()["Message"]
        assert message.startswith('Step 1 of 2 ("iris") failed with 424 ModelError: '
                                  f"Container {iris.url} answered 400: ")
        assert 'Input "X"' in message
        # A handler that fails on what the previous step produced (NaN → null).
        r = httpx.post(server.url + "/invocations", json=[[1e39] * 4])
        assert r.status_code == 424
        assert r.json()["Message"].startswith('Step 2 of 2 ("post") failed with 424 '
                                              "ModelError: Handler iris_steps:postprocess "
                                              "failed: TypeError")
        iris.stop()  # the container goes away: /ping names the step
        r = httpx.get(server.url + "/ping")
        assert r.status_code == 503
        assert r.json()["Message"].startswith('Step 1 ("iris") is not ready: Container')
    finally:
        server.stop()
        iris.stop()
