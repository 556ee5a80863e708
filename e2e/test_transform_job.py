"""examples/transform-job.yaml on kind: planner, Indexed workers and finalizer Jobs, S3 data.

Needs the SeaweedFS store run.sh deploys (and ``runtime.s3.secretName``, which
gives every batch pod the store's credentials); skipped without it. The
example's ``file://`` data paths would be private to each pod on a cluster, so
it is applied with its input and output in a bucket of this test's own (the
example's CSV objects uploaded there), the rest as written: the iris model the
image bakes, each line joined with its prediction, two workers. Then:
``kubectl wait --for=condition=Complete``; the status counts every record; each
``<key>.out`` holds each input line followed by the label onnxruntime gives in
the test process; and deleting the TransformJob takes its Jobs and pods with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from e2e.cluster import (
    DEPS_NAMESPACE,
    EXAMPLES,
    FULLNAME,
    GC_TIMEOUT_S,
    RELEASE_NAMESPACE,
    S3_PORT,
    S3_SECRET,
    S3_SERVICE,
    _section,
    kubectl,
    kubectl_json,
    object_store_credentials,
    port_forward,
    requires_cluster,
    wait_for,
)
from e2e.inference import local_model, run_model, s3_client

pytestmark = requires_cluster

EXAMPLE = "transform-job.yaml"
#: Image pulls, three pods one after the other, the model's load in each worker.
COMPLETE_WITHIN_S = 600
BUCKET_WITHIN_S = 120
LABEL_TRANSFORM_JOB = "kubeinfer.io/transform-job"


def resource(name: str) -> str:
    return f"transformjobs.kubeinfer.io/{name}"


def diagnostics(namespace: str, name: str) -> str:
    selector = f"{LABEL_TRANSFORM_JOB}={name}"
    return "\n".join([
        f"=== diagnostics of {resource(name)} in namespace {namespace}",
        _section("TransformJob", "-n", namespace, "get", resource(name), "-o", "yaml"),
        _section("jobs and pods", "-n", namespace, "get", "jobs,pods", "-o", "wide"),
        _section("events", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp"),
        _section("batch logs", "-n", namespace, "logs", "-l", selector, "--all-containers",
                 "--prefix", "--tail=60"),
        _section("operator log", "-n", RELEASE_NAMESPACE, "logs",
                 f"deployment/{FULLNAME}-operator", "--tail=80"),
    ])


def _bucket(s3: Any, bucket: str) -> bool | None:
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


def _owned(namespace: str, uid: str) -> list[str]:
    items = kubectl_json("-n", namespace, "get", "jobs,pods")["items"]
    owners = {uid} | {o["metadata"]["uid"] for o in items
                      if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences",
                                                                                []))}
    return [f"{o['kind']}/{o['metadata']['name']}" for o in items
            if any(r.get("uid") in owners for r in o["metadata"].get("ownerReferences", []))]


@pytest.mark.timeout(BUCKET_WITHIN_S + COMPLETE_WITHIN_S + GC_TIMEOUT_S + 300)
def test_transform_job_runs_as_kubernetes_jobs(namespace: str, models_dir: Path,
                                               tmp_path: Path) -> None:
    if DEPS_NAMESPACE is None or S3_SECRET is None:
        pytest.skip("a TransformJob's data lives in an object store: run e2e/run.sh with "
                    "KUBEINFER_E2E_ASYNC=1 (the default), which deploys one")
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / EXAMPLE).read_text())
    name = doc["metadata"]["name"]
    bucket = f"kubeinfer-{namespace}"
    local_data = EXAMPLES / doc["spec"]["input"]["uri"].removeprefix("file://")
    doc["spec"]["input"]["uri"] = f"s3://{bucket}/in/"
    doc["spec"]["output"]["uri"] = f"s3://{bucket}/out/"
    model = local_model(doc["spec"]["model"]["uri"], models_dir)
    assert model is not None, "the example must use a model the runtime image bakes"
    from kubeinfer_operator.api.transform_job import TransformJob

    TransformJob.model_validate(doc)  # the adjusted copy is still valid
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    inputs = {p.name: p.read_text() for p in sorted(local_data.glob("*.csv"))}
    key, secret = object_store_credentials()

    try:
        with port_forward(DEPS_NAMESPACE, S3_SERVICE, S3_PORT) as s3_port:
            s3 = s3_client(s3_port, key, secret)
            wait_for(lambda: _bucket(s3, bucket), BUCKET_WITHIN_S, f"bucket {bucket}")
            for object_name, text in inputs.items():
                s3.put_object(Bucket=bucket, Key=f"in/{object_name}", Body=text.encode())

            kubectl("-n", namespace, "apply", "-f", str(manifest))
            kubectl("-n", namespace, "wait", "--for=condition=Complete", resource(name),
                    f"--timeout={COMPLETE_WITHIN_S}s", timeout=COMPLETE_WITHIN_S + 30)
            obj = kubectl_json("-n", namespace, "get", resource(name))
            status = obj["status"]
            lines = sum(text.count("\n") for text in inputs.values())
            assert (status["phase"], status["records"], status["objects"]) == (
                "Complete", lines, len(inputs)), status
            assert status["progress"] == f"{status['shards']}/{status['shards']}", status
            jobs = {j["metadata"]["name"]: j for j in
                    kubectl_json("-n", namespace, "get", "jobs", "-l",
                                 f"{LABEL_TRANSFORM_JOB}={name}")["items"]}
            assert set(jobs) == {f"{name}-plan", f"{name}-work", f"{name}-finalize"}
            assert jobs[f"{name}-work"]["spec"]["completionMode"] == "Indexed"

            for object_name, text in inputs.items():
                rows = [[float(v) for v in line.split(",")] for line in text.splitlines()]
                labels = run_model(model, rows)["label"]
                expected = [f"{line},{int(label)}" for line, label in
                            zip(text.splitlines(), np.asarray(labels).ravel(), strict=True)]
                out = s3.get_object(Bucket=bucket, Key=f"out/{object_name}.out")["Body"].read()
                assert out.decode().splitlines() == expected, object_name

        uid = obj["metadata"]["uid"]
        assert _owned(namespace, uid), "no Job carries the TransformJob's ownerReference"
        kubectl("-n", namespace, "delete", resource(name), "--wait",
                f"--timeout={GC_TIMEOUT_S}s", timeout=GC_TIMEOUT_S + 30)
        wait_for(lambda: not _owned(namespace, uid), GC_TIMEOUT_S,
                 f"the Jobs and pods of {resource(name)} to be garbage-collected")
    except BaseException as exc:
        if isinstance(exc, Exception):
            exc.add_note(diagnostics(namespace, name))
        raise
