"""The client side of the e2e tests: boto3 through port-forwards, and the right answers.

Right answers are computed in the test process with onnxruntime on model files
built by the same scripts, with the same seeds, as the runtime image's
(``examples/build_models.py``, ``examples/build_multimodel_models.py``): "the
cluster answered right" means "equal to onnxruntime", not "some 200".
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

#: Models of build_multimodel_models.py the Dockerfile bakes (tenant-0 .. tenant-N-1).
MULTIMODEL_COUNT = 3


def build_example_models(out: Path) -> Path:
    """iris.onnx, iris-v2.onnx, mlp.onnx and tenant-*/model.onnx, as the image has them."""
    from examples import build_models, build_multimodel_models

    build_models.build_all(out)
    build_multimodel_models.build(out, MULTIMODEL_COUNT)
    return out


def local_model(uri: str, models_dir: Path) -> Path | None:
    """The local copy of a model the runtime image bakes, or None.

    ``file://models/x.onnx`` names ``$KUBEINFER_MODEL_BASE_DIR/models/x.onnx`` in
    the image, built by the same script as ``models_dir``.
    """
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        return None
    path = (parsed.netloc + parsed.path).lstrip("/")
    name = path.removeprefix("models/")
    local = models_dir / name
    return local if "/" not in name and local.exists() else None


# -- boto3 ---------------------------------------------------------------------------------


def sagemaker_runtime(port: int, keys: tuple[str, str], read_timeout: float = 60,
                      connections: int = 10) -> Any:
    """boto3's unchanged ``sagemaker-runtime`` client, pointed at a port-forwarded gateway,
    signing with ``keys`` (the namespace's default pair: ``cluster.caller_keys(namespace)``)."""
    import boto3  # type: ignore[import-untyped]
    from botocore.config import Config  # type: ignore[import-untyped]

    return boto3.client(
        "sagemaker-runtime", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id=keys[0], aws_secret_access_key=keys[1],
        # One attempt: botocore's "max_attempts" counts retries, so 1 would retry a 503
        # or a 429 once behind invoke_raw's back (and the serverless checks' too).
        config=Config(retries={"total_max_attempts": 1}, read_timeout=read_timeout,
                      connect_timeout=10, max_pool_connections=connections),
    )


def s3_client(port: int, access_key: str, secret_key: str) -> Any:
    """boto3 S3 through a port-forward (path-style: the host is 127.0.0.1)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
        aws_access_key_id=access_key, aws_secret_access_key=secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3},
                      read_timeout=30, connect_timeout=10),
    )


def error_of(exc: Any) -> tuple[str, int, str]:
    """(SageMaker error code, HTTP status, message) of a botocore ClientError."""
    err = exc.response
    return (str(err["Error"]["Code"]), int(err["ResponseMetadata"]["HTTPStatusCode"]),
            str(err["Error"].get("Message", "")))


def invoke_raw(client: Any, patience_s: float = 30, **kwargs: Any) -> dict[str, Any]:
    """``invoke_endpoint(**kwargs)``, its body read; retried only while the path settles.

    Ready means the gateway routes to the variants, but the port-forward and the
    gateway's first look at a new pod can lag a moment behind it: a 503 or a
    dropped connection is retried for ``patience_s``, anything else raises.
    """
    from botocore.exceptions import (  # type: ignore[import-untyped]
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
    )

    deadline = time.monotonic() + patience_s
    while True:
        try:
            r = client.invoke_endpoint(**kwargs)
            return {"variant": r.get("InvokedProductionVariant"),
                    "content_type": r.get("ContentType"), "body": r["Body"].read()}
        except ClientError as e:
            if error_of(e)[1] != 503 or time.monotonic() > deadline:
                raise
        except (ConnectionClosedError, EndpointConnectionError):
            if time.monotonic() > deadline:
                raise
        time.sleep(1)


def invoke(client: Any, endpoint: str, body: bytes, variant: str | None = None,
           patience_s: float = 30, **extra: Any) -> tuple[str, Any]:
    """A JSON invocation: (InvokedProductionVariant, the decoded body)."""
    kwargs: dict[str, Any] = {"EndpointName": endpoint, "ContentType": "application/json",
                              "Accept": "application/json", "Body": body, **extra}
    if variant is not None:
        kwargs["TargetVariant"] = variant
    r = invoke_raw(client, patience_s, **kwargs)
    return str(r["variant"]), json.loads(r["body"])


# -- expected answers ----------------------------------------------------------------------


def sample_and_expected(model: Path, rows: int = 3,
                        seed: int = 7) -> tuple[bytes, dict[str, np.ndarray]]:
    """A request for ``model``'s single 2-D input, and onnxruntime's answer to it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    width = inp.shape[1]
    assert isinstance(width, int), f"{model.name}: e2e needs a static feature dimension"
    x = np.random.default_rng(seed).normal(3.0, 1.5, size=(rows, width)).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    outputs = dict(zip(names, sess.run(None, {inp.name: x}), strict=True))
    return json.dumps({"instances": x.tolist()}).encode(), outputs


def run_model(model: Path, rows: list[list[float]]) -> dict[str, np.ndarray]:
    """onnxruntime's outputs of ``model`` on ``rows`` (float32), by output name."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    names = [o.name for o in sess.get_outputs()]
    x = np.asarray(rows, dtype=np.float32)
    return dict(zip(names, sess.run(None, {inp.name: x}), strict=True))


def assert_predictions(got: Any, expected: dict[str, np.ndarray], where: str) -> None:
    """The runtime's ``{"predictions": ...}`` equals onnxruntime's outputs."""
    preds = got["predictions"]
    if len(expected) == 1:
        preds = {next(iter(expected)): preds}
    assert set(preds) == set(expected), f"{where}: outputs {sorted(preds)} != {sorted(expected)}"
    for name, want in expected.items():
        have = np.asarray(preds[name])
        assert have.shape == want.shape, f"{where}: {name} shape {have.shape} != {want.shape}"
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5, err_msg=where)
        else:
            np.testing.assert_array_equal(have, want, err_msg=where)


# -- the gateway's own endpoints -----------------------------------------------------------


#: Straight to the port-forward, whatever HTTP(S)_PROXY the environment sets.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(port: int, path: str) -> bytes:
    with _DIRECT.open(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        body: bytes = resp.read()
        return body


def gateway_metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of the gateway's ``/metrics`` (None when it has no such series)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(_get(port, "/metrics").decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return None


def gateway_pods(port: int) -> dict[str, list[str]]:
    """The per-pod URLs the gateway resolved for each variant Service (``GET /routes``)."""
    pods: dict[str, list[str]] = json.loads(_get(port, "/routes"))["pods"]
    return pods
