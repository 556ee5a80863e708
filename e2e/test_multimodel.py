"""examples/multimodel-endpoint.yaml on kind: TargetModel picks the model per request.

The example serves every model under ``file://models/`` of the runtime image
(``/srv/kubeinfer/models``: the example models and three numbered
``tenant-<i>/model.onnx`` ones, all built by the Dockerfile) from two replicas.
Each model named with boto3's ``TargetModel`` must answer exactly what
onnxruntime answers here on the same file; an unknown model is SageMaker's
404 ValidationError and a name escaping the prefix a 400 ValidationError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    MULTIMODEL_COUNT,
    assert_predictions,
    error_of,
    invoke,
    sagemaker_runtime,
    sample_and_expected,
)

pytestmark = requires_cluster

EXAMPLE = "multimodel-endpoint.yaml"
#: TargetModel names (relative to the prefix): flat and nested, of three shapes.
TARGETS = ("iris.onnx", "iris-v2.onnx", "mlp.onnx",
           *(f"tenant-{i}/model.onnx" for i in range(MULTIMODEL_COUNT)))


def _refused(client: Any, name: str, target: str, body: bytes) -> tuple[str, int, str]:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    with pytest.raises(ClientError) as info:
        client.invoke_endpoint(EndpointName=name, TargetModel=target,
                               ContentType="application/json", Body=body)
    return error_of(info.value)


@pytest.mark.timeout(READY_TIMEOUT_S + GC_TIMEOUT_S + 300)
def test_multimodel_endpoint_serves_each_target_model(namespace: str, models_dir: Path) -> None:
    doc = load_example(EXAMPLE)
    name = doc["metadata"]["name"]
    (variant,) = doc["spec"]["variants"]
    assert variant["multiModel"]["prefix"] == "file://models/", (
        "the example's prefix changed: this test reads the models baked under "
        "/srv/kubeinfer/models")
    with diagnosed(namespace, name):
        obj = apply_and_wait_ready(namespace, EXAMPLES / EXAMPLE, name)
        service, service_port = gateway_of(obj)
        with port_forward(namespace, service, service_port) as port:
            client = sagemaker_runtime(port, caller_keys(namespace))
            for target in TARGETS:
                model = models_dir / target
                body, expected = sample_and_expected(model)
                # Twice: the first loads the model into the cache, the second hits it.
                for attempt in ("cold", "warm"):
                    invoked, got = invoke(client, name, body, TargetModel=target)
                    assert invoked == variant["name"]
                    assert_predictions(got, expected, f"{name} TargetModel={target} ({attempt})")

            body = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
            for missing in ("no-such-model.onnx", f"tenant-{MULTIMODEL_COUNT + 99}/model.onnx"):
                code, status, message = _refused(client, name, missing, body)
                assert (code, status) == ("ValidationError", 404), message
                assert missing in message
            for escape in ("../models/iris.onnx", "tenant-0/../../models/iris.onnx",
                           "/srv/kubeinfer/models/iris.onnx"):
                code, status, message = _refused(client, name, escape, body)
                assert (code, status) == ("ValidationError", 400), f"{escape}: {message}"

        delete_endpoint(namespace, name, obj["metadata"]["uid"])
