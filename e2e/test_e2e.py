"""End-to-end tests on a real Kubernetes cluster (kind), driven by ``e2e/run.sh``.

run.sh creates the cluster, builds and loads both images and installs the Helm
chart; these tests then check the product's main path for the real-time,
single-model examples: ``kubectl apply`` an Endpoint, wait for ``Ready``,
invoke it through a port-forward of its gateway Service with boto3 (the
unchanged ``sagemaker-runtime`` client), compare each variant's predictions
with onnxruntime run in this process on the same example model, and delete it
(children garbage-collected through their ownerReferences). The serverless,
multi-model, multi-container and async examples have their own modules.

They are skipped unless ``KUBEINFER_E2E=1`` and docker, kind, helm and kubectl
are on PATH: no cluster can run where the unit and integration tests run.
Not collected by a plain ``pytest`` (testpaths is ``tests``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2e.cluster import (
    EXAMPLES,
    GC_TIMEOUT_S,
    READY_TIMEOUT_S,
    RELEASE,
    RELEASE_NAMESPACE,
    apply_and_wait_ready,
    caller_keys,
    delete_endpoint,
    diagnosed,
    gateway_of,
    kubectl,
    port_forward,
    requires_cluster,
)
from e2e.inference import (
    assert_predictions,
    invoke,
    local_model,
    sagemaker_runtime,
    sample_and_expected,
)

pytestmark = requires_cluster


def _realtime_single_model(doc: dict[str, Any]) -> bool:
    """Endpoints this module checks: real-time, one model per variant.

    Serverless, async, multi-model and multi-container examples are invoked
    differently and have their own modules (test_serverless.py, test_async.py,
    test_multimodel.py, test_multicontainer.py).
    """
    spec = doc.get("spec") or {}
    return spec.get("type", "RealTime") == "RealTime" and all(
        "model" in v and "multiModel" not in v and "containers" not in v
        for v in spec.get("variants", []))


def example_endpoints() -> list[Any]:
    """(example file, Endpoint document) for every real-time single-model example."""
    cases = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if (isinstance(doc, dict) and doc.get("kind") == "Endpoint"
                    and _realtime_single_model(doc)):
                cases.append(pytest.param(path, doc, id=f"{path.stem}:{doc['metadata']['name']}"))
    return cases


def test_operator_is_available() -> None:
    kubectl("wait", "--for=condition=Established", "crd/endpoints.kubeinfer.io", "--timeout=60s")
    kubectl("-n", RELEASE_NAMESPACE, "wait", "--for=condition=Available", "deployment",
            "-l", f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator",
            "--timeout=180s", timeout=200)


def test_crd_refuses_an_invalid_endpoint(namespace: str, tmp_path: Path) -> None:
    """Structural errors never reach the operator: the API server answers 422."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint", "metadata": {"name": "bad"},
        "spec": {"variants": [{"name": "a", "weight": -1,
                               "model": {"uri": "file:///models/iris.onnx"}}]},
    }))
    proc = subprocess.run(["kubectl", "-n", namespace, "apply", "-f", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "weight" in proc.stderr, proc.stderr


@pytest.mark.timeout(READY_TIMEOUT_S + GC_TIMEOUT_S + 300)
@pytest.mark.parametrize(("example", "doc"), example_endpoints())
def test_example_endpoint(example: Path, doc: dict[str, Any], namespace: str,
                          models_dir: Path) -> None:
    from botocore.exceptions import ClientError  # type: ignore[import-untyped]

    name = doc["metadata"]["name"]
    with diagnosed(namespace, name):
        obj = apply_and_wait_ready(namespace, example, name)
        service, service_port = gateway_of(obj)
        variants = doc["spec"]["variants"]
        weighted = {v["name"] for v in variants if v.get("weight", 1.0) > 0}

        with port_forward(namespace, service, service_port) as port:
            client = sagemaker_runtime(port, caller_keys(namespace))
            for v in variants:
                model = local_model(v["model"]["uri"], models_dir)
                if model is None:
                    body = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
                    invoked, _ = invoke(client, name, body, variant=v["name"])
                    assert invoked == v["name"]
                    continue
                body, expected = sample_and_expected(model)
                invoked, got = invoke(client, name, body, variant=v["name"])
                assert invoked == v["name"]
                assert_predictions(got, expected, f"{name}/{v['name']} ({model.name})")

            # Unpinned traffic goes to a weighted variant.
            for _ in range(10):
                invoked, _ = invoke(client, name, body)
                assert invoked in weighted

            # SageMaker's errors, as boto3 sees them.
            with pytest.raises(ClientError) as unknown_endpoint:
                client.invoke_endpoint(EndpointName=f"{name}-missing",
                                       ContentType="application/json", Body=body)
            assert unknown_endpoint.value.response["Error"]["Code"] == "ValidationError"
            with pytest.raises(ClientError) as unknown_variant:
                client.invoke_endpoint(EndpointName=name, TargetVariant="no-such-variant",
                                       ContentType="application/json", Body=body)
            assert unknown_variant.value.response["Error"]["Code"] == "ValidationError"

            # Callers sign with the chart's keys (SigV4 by default): a wrong key is refused.
            stranger = sagemaker_runtime(port, (caller_keys(namespace)[0], "not-the-secret"))
            with pytest.raises(ClientError) as refused:
                stranger.invoke_endpoint(EndpointName=name, ContentType="application/json",
                                         Body=body)
            assert refused.value.response["Error"]["Code"] == "InvalidSignatureException"

        # The model servers' NetworkPolicy, and the runtime Secret the pods read.
        kubectl("-n", namespace, "get", f"networkpolicy/{name}-model-servers")
        kubectl("-n", namespace, "get", "secret/kubeinfer-runtime")

        delete_endpoint(namespace, name, obj["metadata"]["uid"])
