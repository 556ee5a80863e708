"""examples/compile-job.yaml on kind: the compiler as a Kubernetes Job, S3 in and out.

Needs the SeaweedFS store run.sh deploys (and ``runtime.s3.secretName``, which
gives the compiler's pod the store's credentials); skipped without it. The
example's ``file://`` paths would mean nothing inside a pod (the operator
refuses them), so it is applied with the MLP (built by the same script the
image build runs) uploaded to a bucket of this test's own and the output under
it, short timings, the rest as written. Then: ``kubectl wait
--for=condition=Complete``; the status names the artifact, its sha256 (the
tarball's in the bucket), the chosen candidate and backend, and a speedup of at
least 1.0 when one is reported (never slower than onnxruntime fp32, by
construction); ``kubectl get kcj`` prints the TARGET/STATUS/BACKEND/SPEEDUP
columns; and deleting the CompilationJob takes its Job and pod with it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

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
from e2e.inference import s3_client
from e2e.test_transform_job import _bucket, _owned

pytestmark = requires_cluster

EXAMPLE = "compile-job.yaml"
#: An image pull, TVM's build of the MLP at two batch sizes, timing every candidate.
COMPLETE_WITHIN_S = 900
BUCKET_WITHIN_S = 120
LABEL_COMPILATION_JOB = "kubeinfer.io/compilation-job"


def resource(name: str) -> str:
    return f"compilationjobs.kubeinfer.io/{name}"


def diagnostics(namespace: str, name: str) -> str:
    selector = f"{LABEL_COMPILATION_JOB}={name}"
    return "\n".join([
        f"=== diagnostics of {resource(name)} in namespace {namespace}",
        _section("CompilationJob", "-n", namespace, "get", resource(name), "-o", "yaml"),
        _section("jobs and pods", "-n", namespace, "get", "jobs,pods", "-o", "wide"),
        _section("events", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp"),
        _section("compiler logs", "-n", namespace, "logs", "-l", selector, "--all-containers",
                 "--prefix", "--tail=80"),
        _section("operator log", "-n", RELEASE_NAMESPACE, "logs",
                 f"deployment/{FULLNAME}-operator", "--tail=80"),
    ])


@pytest.mark.timeout(BUCKET_WITHIN_S + COMPLETE_WITHIN_S + GC_TIMEOUT_S + 300)
def test_compilation_job_runs_as_a_kubernetes_job(namespace: str, models_dir: Path,
                                                  tmp_path: Path) -> None:
    if DEPS_NAMESPACE is None or S3_SECRET is None:
        pytest.skip("a CompilationJob reads and writes an object store: run e2e/run.sh with "
                    "KUBEINFER_E2E_ASYNC=1 (the default), which deploys one")
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / EXAMPLE).read_text())
    name = doc["metadata"]["name"]
    bucket = f"kubeinfer-{namespace}"
    model = models_dir / Path(doc["spec"]["model"]["uri"].removeprefix("file://")).name
    assert model.is_file(), f"the example must name a model build_models.py builds: {model}"
    doc["spec"]["model"]["uri"] = f"s3://{bucket}/models/{model.name}"
    doc["spec"]["output"]["uri"] = f"s3://{bucket}/compiled/"
    # Short timings: this checks the plumbing; bench/compile.py measures.
    doc["spec"]["environment"] = {"KUBEINFER_MEASURE_S": "0.2"}
    from kubeinfer_operator.api.compilation_job import CompilationJob
    from kubeinfer_operator.reconcile.compile_validate import validate_compilation_job

    CompilationJob.model_validate(doc)  # the adjusted copy is still valid
    validate_compilation_job(name, namespace, doc["spec"])  # and runs on Kubernetes
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    key, secret = object_store_credentials()

    try:
        with port_forward(DEPS_NAMESPACE, S3_SERVICE, S3_PORT) as s3_port:
            s3 = s3_client(s3_port, key, secret)
            wait_for(lambda: _bucket(s3, bucket), BUCKET_WITHIN_S, f"bucket {bucket}")
            s3.put_object(Bucket=bucket, Key=f"models/{model.name}", Body=model.read_bytes())

            kubectl("-n", namespace, "apply", "-f", str(manifest))
            kubectl("-n", namespace, "wait", "--for=condition=Complete", resource(name),
                    f"--timeout={COMPLETE_WITHIN_S}s", timeout=COMPLETE_WITHIN_S + 30)
            obj = kubectl_json("-n", namespace, "get", resource(name))
            status = obj["status"]
            assert status["phase"] == "Complete", status
            assert status["artifactUri"] == f"s3://{bucket}/compiled/artifact.tar.gz", status
            assert status["backend"] in ("tvm", "onnx"), status
            assert status["chosen"] and status["target"] == "native", status
            assert status.get("speedup") is None or status["speedup"] >= 1.0, status
            assert status["batchSizes"] == [1, 64], status
            tarball = s3.get_object(Bucket=bucket, Key="compiled/artifact.tar.gz")["Body"].read()
            assert hashlib.sha256(tarball).hexdigest() == status["sha256"]
            s3.head_object(Bucket=bucket, Key="compiled/report.json")
            s3.head_object(Bucket=bucket, Key="compiled/artifact/manifest.json")

        table = kubectl("-n", namespace, "get", "kcj", name)
        header = table.splitlines()[0].split()
        assert header == ["NAME", "TARGET", "STATUS", "BACKEND", "SPEEDUP", "AGE"], table
        assert "Complete" in table.splitlines()[1]
        jobs = kubectl_json("-n", namespace, "get", "jobs", "-l",
                            f"{LABEL_COMPILATION_JOB}={name}")["items"]
        assert [j["metadata"]["name"] for j in jobs] == [f"{name}-compile"]

        uid = obj["metadata"]["uid"]
        assert _owned(namespace, uid), "no Job carries the CompilationJob's ownerReference"
        kubectl("-n", namespace, "delete", resource(name), "--wait",
                f"--timeout={GC_TIMEOUT_S}s", timeout=GC_TIMEOUT_S + 30)
        wait_for(lambda: not _owned(namespace, uid), GC_TIMEOUT_S,
                 f"the Job and pod of {resource(name)} to be garbage-collected")
    except BaseException as exc:
        if isinstance(exc, Exception):
            exc.add_note(diagnostics(namespace, name))
        raise
