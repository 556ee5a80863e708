"""examples/serial-pipeline.yaml and examples/direct-endpoint.yaml on kind.

Both run the example handler steps (``examples/handlers/iris_steps.py``, baked
into the runtime image as /srv/kubeinfer/handlers, ``codeUri: file://handlers``)
around the iris model. Expected answers come from the same handler functions
and onnxruntime on the same model, run in this process, so the pipeline on the
cluster must agree with the code it is built from, step by step. The outputs
and error messages are the ones the local-mode test
(tests/integration/test_multicontainer.py) expects.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from e2e.cluster import (
    EXAMPLES,
    GC_TIMEOUT_S,
    READY_TIMEOUT_S,
    apply_and_wait_ready,
    caller_keys,
    delete_endpoint,
    diagnosed,
    gateway_of,
    load_example,
    port_forward,
    requires_cluster,
)
from e2e.inference import (
    assert_predictions,
    error_of,
    invoke_raw,
    local_model,
    run_model,
    sagemaker_runtime,
)

pytestmark = requires_cluster

FLOWERS = {"flowers": [
    {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
    {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
]}
#: What the local-mode test gets for FLOWERS from the same pipeline.
SPECIES = ["setosa", "virginica"]
JSON = "application/json"


def _steps() -> Any:
    """The example handler module, loaded from its file as the runtime does."""
    path = EXAMPLES / "handlers" / "iris_steps.py"
    spec = importlib.util.spec_from_file_location("e2e_iris_steps", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model_file(doc: dict[str, Any], models_dir: Path) -> Path:
    """The local copy of the pipeline's one model step."""
    (variant,) = doc["spec"]["variants"]
    (step,) = [c for c in variant["containers"] if "model" in c]
    model = local_model(step["model"]["uri"], models_dir)
    assert model is not None, f"{step['model']['uri']}: not a model the image bakes"
    return model


def _predictions(model: Path, rows: list[list[float]]) -> dict[str, Any]:
    """The model server's ``{"predictions": ...}`` for ``rows``, from onnxruntime."""
    out = run_model(model, rows)
    return {"predictions": {k: np.asarray(v).tolist() for k, v in out.items()}}


def _assert_results(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Species exactly; confidence to its 4 rounded decimals (float32 through JSON)."""
    assert [r["species"] for r in got] == [r["species"] for r in want], (got, want)
    for g, w in zip(got, want, strict=True):
        assert abs(g["confidence"] - w["confidence"]) <= 1.5e-4, (got, want)


@pytest.mark.timeout(READY_TIMEOUT_S + GC_TIMEOUT_S + 300)
def test_serial_pipeline_runs_every_step(namespace: str, models_dir: Path) -> None:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    example = "serial-pipeline.yaml"
    doc = load_example(example)
    name = doc["metadata"]["name"]
    steps = _steps()
    rows = json.loads(steps.preprocess(json.dumps(FLOWERS).encode(), JSON)[0])
    post = steps.postprocess(json.dumps(_predictions(_model_file(doc, models_dir), rows))
                             .encode(), JSON)[0]
    want = json.loads(post)["results"]
    assert [r["species"] for r in want] == SPECIES

    with diagnosed(namespace, name):
        obj = apply_and_wait_ready(namespace, EXAMPLES / example, name)
        service, service_port = gateway_of(obj)
        with port_forward(namespace, service, service_port) as port:
            client = sagemaker_runtime(port, caller_keys(namespace))
            r = invoke_raw(client, EndpointName=name, ContentType=JSON,
                           Body=json.dumps(FLOWERS).encode())
            assert r["variant"] == doc["spec"]["variants"][0]["name"]
            assert r["content_type"] == JSON
            _assert_results(json.loads(r["body"])["results"], want)

            # A step's refusal comes back as SageMaker's ModelError naming the step.
            with pytest.raises(ClientError) as info:
                client.invoke_endpoint(EndpointName=name, ContentType=JSON,
                                       Body=json.dumps({"flowers": [{"sepal_length": 1}]}))
            code, status, message = error_of(info.value)
            assert (code, status) == ("ModelError", 424), message
            assert message.startswith('Step 1 of 3 ("pre") failed with 400 ValidationError'), \
                message

        delete_endpoint(namespace, name, obj["metadata"]["uid"])


@pytest.mark.timeout(READY_TIMEOUT_S + GC_TIMEOUT_S + 300)
def test_direct_endpoint_runs_the_target_container(namespace: str, models_dir: Path) -> None:
    from botocore.exceptions import ClientError

    example = "direct-endpoint.yaml"
    doc = load_example(example)
    name = doc["metadata"]["name"]
    (variant,) = doc["spec"]["variants"]
    hostnames = [c["name"] for c in variant["containers"]]
    assert hostnames == ["pre", "iris", "post"], hostnames
    steps = _steps()
    model = _model_file(doc, models_dir)
    rows = json.loads(steps.preprocess(json.dumps(FLOWERS).encode(), JSON)[0])
    predictions = _predictions(model, rows)
    results = json.loads(steps.postprocess(json.dumps(predictions).encode(), JSON)[0])

    with diagnosed(namespace, name):
        obj = apply_and_wait_ready(namespace, EXAMPLES / example, name)
        service, service_port = gateway_of(obj)
        with port_forward(namespace, service, service_port) as port:
            client = sagemaker_runtime(port, caller_keys(namespace))

            def call(target: str, body: bytes, content_type: str = JSON,
                     accept: str = JSON) -> bytes:
                r = invoke_raw(client, EndpointName=name, TargetContainerHostname=target,
                               ContentType=content_type, Accept=accept, Body=body)
                assert r["variant"] == variant["name"]
                body_out: bytes = r["body"]
                return body_out

            # pre: named measurements → the model's rows.
            assert json.loads(call("pre", json.dumps(FLOWERS).encode())) == rows
            # iris: the model alone, JSON and CSV, as onnxruntime answers.
            got = json.loads(call("iris", json.dumps({"instances": rows}).encode()))
            assert_predictions(got, run_model(model, rows), f"{name} TargetContainer=iris")
            label = int(run_model(model, rows[:1])["label"][0])
            csv = call("iris", b"5.1,3.5,1.4,0.2\n", "text/csv", "text/csv")
            assert csv.strip() == str(label).encode(), csv
            # post: model output → species, exactly what the handler makes of it.
            assert json.loads(call("post", json.dumps(predictions).encode())) == results

            # No hostname, or one that is not a step: 400 listing the steps.
            for target in ({}, {"TargetContainerHostname": "nope"}):
                with pytest.raises(ClientError) as info:
                    client.invoke_endpoint(EndpointName=name, ContentType=JSON,
                                           Body=json.dumps(FLOWERS), **target)
                code, status, message = error_of(info.value)
                assert (code, status) == ("ValidationError", 400), message
                assert "TargetContainerHostname= to one of pre, iris, post" in message

        delete_endpoint(namespace, name, obj["metadata"]["uid"])
