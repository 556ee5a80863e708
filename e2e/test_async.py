"""examples/async-endpoint.yaml on kind: Redis queue, S3 objects, workers to and from zero.

Needs what run.sh deploys from e2e/manifests/async-deps.yaml (Redis and a
SeaweedFS S3 server in namespace kubeinfer-e2e-deps) and the chart values it
sets for them (``runtime.redis.url``, ``runtime.s3.secretName``); skipped when
run.sh did not (``KUBEINFER_E2E_ASYNC=0``, or a kept cluster without them).

The example writes to ``file:///tmp/...``, which on a cluster would be each
worker pod's private emptyDir (the operator refuses it as InvalidSpec), so it
is applied with ``outputPath`` and
``failurePath`` in a bucket of this test's own, and ``scaleInCooldown`` 15 s
instead of 120 s so the idle workers reach zero quickly; the rest as is.
Then: the idle queue takes the workers to zero; two requests (one good, one
naming an input never uploaded) bring one back through the operator's backlog
scaler; the output object equals onnxruntime's answer and the bad one ends in
a failure object, as SageMaker's InvokeEndpointAsync promises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from e2e.cluster import (
    DEPS_NAMESPACE,
    GC_TIMEOUT_S,
    READY_TIMEOUT_S,
    S3_PORT,
    S3_SECRET,
    S3_SERVICE,
    STATUS_INTERVAL_S,
    apply_and_wait_ready,
    caller_keys,
    delete_endpoint,
    deployment_replicas,
    diagnosed,
    endpoint_events,
    gateway_of,
    load_example,
    object_store_credentials,
    port_forward,
    requires_cluster,
    variant_pods,
    wait_for,
    write_manifest,
)
from e2e.inference import (
    assert_predictions,
    error_of,
    local_model,
    s3_client,
    sagemaker_runtime,
    sample_and_expected,
)

pytestmark = requires_cluster

EXAMPLE = "async-endpoint.yaml"
JSON = "application/json"
SCALE_IN_COOLDOWN_S = 15
#: Bounds of the waits, not timings under test.
BUCKET_WITHIN_S = 120
SCALE_IN_WITHIN_S = SCALE_IN_COOLDOWN_S + 3 * STATUS_INTERVAL_S + 60
POD_GONE_WITHIN_S = 120
#: A scaler round, a worker pod starting from zero, the inference.
DONE_WITHIN_S = 3 * STATUS_INTERVAL_S + 150


def _create_bucket(s3: Any, bucket: str) -> bool | None:
    """True once the bucket exists; None while the store is still starting."""
    from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            return True
        return None
    except BotoCoreError:
        return None
    return True


def _read(s3: Any, uri: str) -> bytes | None:
    """The object at ``s3://bucket/key``, or None while it does not exist."""
    from botocore.exceptions import ClientError

    bucket, _, key = uri.removeprefix("s3://").partition("/")
    try:
        data: bytes = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response["Error"]["Code"] in ("NoSuchKey", "404"):
            return None
        raise
    return data


def _scaled(namespace: str, name: str, needle: str) -> list[str]:
    return [m for m in endpoint_events(namespace, name, "Scaled") if needle in m]


@pytest.mark.timeout(READY_TIMEOUT_S + BUCKET_WITHIN_S + SCALE_IN_WITHIN_S + POD_GONE_WITHIN_S
                     + 2 * DONE_WITHIN_S + GC_TIMEOUT_S + 300)
def test_async_endpoint_queues_and_scales_from_zero(namespace: str, models_dir: Path,
                                                   tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    if DEPS_NAMESPACE is None or S3_SECRET is None:
        pytest.skip("async needs the Redis and object store run.sh deploys "
                    "(KUBEINFER_E2E_DEPS_NAMESPACE and KUBEINFER_E2E_S3_SECRET are unset): "
                    "run e2e/run.sh with KUBEINFER_E2E_ASYNC=1 (the default)")
    doc = load_example(EXAMPLE)
    name = doc["metadata"]["name"]
    bucket = f"kubeinfer-{namespace}"
    cfg = doc["spec"]["async"]
    cfg["outputPath"] = f"s3://{bucket}/out"
    cfg["failurePath"] = f"s3://{bucket}/failed"
    cfg["scaling"]["scaleInCooldown"] = SCALE_IN_COOLDOWN_S
    assert cfg["scaling"]["minReplicas"] == 0, "the example must scale to zero"
    (variant,) = doc["spec"]["variants"]
    deployment = f"{name}-{variant['name']}"
    model = local_model(variant["model"]["uri"], models_dir)
    assert model is not None, f"{variant['model']['uri']}: not a model the image bakes"
    body, expected = sample_and_expected(model)
    manifest = write_manifest(doc, tmp_path)
    key, secret = object_store_credentials()

    with diagnosed(namespace, name), port_forward(DEPS_NAMESPACE, S3_SERVICE,
                                                  S3_PORT) as s3_port:
        s3 = s3_client(s3_port, key, secret)
        wait_for(lambda: _create_bucket(s3, bucket), BUCKET_WITHIN_S,
                 f"bucket {bucket} on the object store")
        obj = apply_and_wait_ready(namespace, manifest, name)

        # Nothing queued: the workers go to zero (minReplicas 0).
        wait_for(lambda: deployment_replicas(namespace, deployment) == 0, SCALE_IN_WITHIN_S,
                 f"deployment/{deployment} scaled in to 0 on an idle queue")
        wait_for(lambda: _scaled(namespace, name, "scaling in to 0"), 60,
                 f"a Scaled Event on {name} for the scale-in")
        wait_for(lambda: not variant_pods(namespace, name, variant["name"]),
                 POD_GONE_WITHIN_S, f"the pods of {deployment} to terminate")

        s3.put_object(Bucket=bucket, Key="in/rows.json", Body=body, ContentType=JSON)
        service, service_port = gateway_of(obj)
        with port_forward(namespace, service, service_port) as port:
            rt = sagemaker_runtime(port, caller_keys(namespace))
            with pytest.raises(ClientError) as info:  # SageMaker refuses this too
                rt.invoke_endpoint(EndpointName=name, ContentType=JSON, Body=body)
            code, status, message = error_of(info.value)
            assert (code, status) == ("ValidationError", 400), message
            assert "InvokeEndpointAsync" in message, message
            good = rt.invoke_endpoint_async(EndpointName=name, ContentType=JSON, Accept=JSON,
                                            InputLocation=f"s3://{bucket}/in/rows.json")
            lost = rt.invoke_endpoint_async(EndpointName=name, ContentType=JSON,
                                            InputLocation=f"s3://{bucket}/in/never-uploaded.json")
        for resp in (good, lost):
            assert resp["ResponseMetadata"]["HTTPStatusCode"] == 202, resp
            assert resp["OutputLocation"] == f"s3://{bucket}/out/{resp['InferenceId']}.out"
            assert resp["FailureLocation"] == (f"s3://{bucket}/failed/"
                                               f"{resp['InferenceId']}-error.out")

        # The backlog brings a worker back; it writes the output, or the failure.
        out = wait_for(lambda: _read(s3, good["OutputLocation"]), DONE_WITHIN_S,
                       f"the output object {good['OutputLocation']}")
        assert_predictions(json.loads(out), expected, f"{name}: async output")
        failure = wait_for(lambda: _read(s3, lost["FailureLocation"]), DONE_WITHIN_S,
                           f"the failure object {lost['FailureLocation']}")
        assert "never-uploaded.json does not exist" in json.loads(failure)["Message"], failure
        assert _read(s3, lost["OutputLocation"]) is None
        assert _read(s3, good["FailureLocation"]) is None
        wait_for(lambda: _scaled(namespace, name, "no worker runs"), 60,
                 f"a Scaled Event on {name} for the scale-out from zero")

        delete_endpoint(namespace, name, obj["metadata"]["uid"])
