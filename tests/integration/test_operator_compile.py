"""CompilationJobs under the real kopf operator against the Kubernetes emulator.

Nothing runs Jobs or pods here, so the tests play the Job controller and the
kubelet: they create the compiler's pod (owned by the Job, with the
termination message the compiler would leave: a ``CompileReport``, or a failed
one with its error) and patch the Job's status (``Complete`` / ``Failed``
conditions). The operator must create exactly the rendered Job, roll the
report up into the status, fail naming the reason and the pod, keep
Complete/Failed for good, and lose everything with the CompilationJob.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest

from kubeinfer_operator.api.compilation_job import CompilationJob
from kubeinfer_operator.render.compile_jobs import render_job
from kubeinfer_operator.render.compile_plan import plan_compile
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.compile import (
    EXIT_BAD_INPUT,
    CandidateName,
    CandidateSummary,
    CompileReport,
)
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.kube_schema import schema_errors

SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                            runtime_image="example.test/runtime:1", s3_secret_name="s3-creds")
_ids = itertools.count()

REPORT = CompileReport(
    ok=True, artifact_uri="s3://compiled/mlp/artifact.tar.gz",
    artifact_dir_uri="s3://compiled/mlp/artifact", sha256="ab" * 32, source_sha256="cd" * 32,
    target="native", target_cpu="znver4", chosen=CandidateName.TVM_TUNED, backend="tvm",
    speedup=1.31, max_abs_diff=4.1e-7, verification="timed on this host (znver4), 1 thread",
    reason="tvm-tuned is 1.31x faster than onnxruntime fp32 at every batch size",
    batch_sizes=[1, 64], tuning_trials=64, seconds=42.0,
    candidates=[CandidateSummary(name=CandidateName.ORT_FP32, speedup=1.0, accurate=True),
                CandidateSummary(name=CandidateName.TVM_TUNED, speedup=1.31,
                                 max_abs_diff=4.1e-7, accurate=True, chosen=True)])


def compilation_job(name: str = "mlp", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/mlp.onnx"}, "target": "native",
                            "output": {"uri": "s3://compiled/mlp/"}, "batchSizes": [1, 64],
                            "tuning": {"budgetSeconds": 60}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob",
            "metadata": {"name": name}, "spec": base}


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (kube, _):
        yield kube


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"cj{next(_ids)}"
    kube.create_namespace(name)
    return name


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(kube: Kube, ns: str, name: str = "mlp") -> dict[str, Any]:
    return (kube.get("CompilationJob", ns, name) or {}).get("status") or {}


def _condition(kube: Kube, ns: str, type_: str, name: str = "mlp") -> dict[str, Any]:
    return next((c for c in _status(kube, ns, name).get("conditions", [])
                 if c["type"] == type_ and c["status"] == "True"), {})


def _job(kube: Kube, ns: str, name: str = "mlp-compile") -> dict[str, Any]:
    job: dict[str, Any] = wait_for(lambda: kube.get("Job", ns, name), 10, f"Job {name}")
    return job


def _pod(kube: Kube, ns: str, job: dict[str, Any], suffix: str, *, exit_code: int = 0,
         message: str = "") -> None:
    """What the Job controller and the kubelet do for one pod: create it, run it, end it."""
    meta = job["metadata"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{meta['name']}-{suffix}",
                        "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                   "batch.kubernetes.io/job-name": meta["name"]},
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                             "name": meta["name"], "uid": meta["uid"],
                                             "controller": True, "blockOwnerDeletion": True}]},
           "spec": copy.deepcopy(job["spec"]["template"]["spec"])}
    created = kube.create(pod, ns)
    assert created.status_code == 201, created.text
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "message": message, "finishedAt": _now(), "startedAt": _now()}
    status = {"phase": "Succeeded" if exit_code == 0 else "Failed",
              "containerStatuses": [{"name": "compile", "ready": False, "restartCount": 0,
                                     "image": "example.test/runtime:1", "imageID": "",
                                     "state": {"terminated": terminated}}]}
    patched = kube.patch("Pod", ns, pod["metadata"]["name"], {"status": status}, sub="status")
    assert patched.status_code == 200, patched.text


def _job_status(kube: Kube, ns: str, *, complete: bool = False,
                failure: tuple[str, str] | None = None, **fields: Any) -> None:
    conditions = []
    if complete:
        conditions = [
            {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": _now()},
            {"type": "Complete", "status": "True", "lastTransitionTime": _now()}]
    if failure is not None:
        conditions = [{"type": "FailureTarget", "status": "True", "reason": failure[0],
                       "message": failure[1], "lastTransitionTime": _now()},
                      {"type": "Failed", "status": "True", "reason": failure[0],
                       "message": failure[1], "lastTransitionTime": _now()}]
    status = {"startTime": _now(), **fields, "conditions": conditions}
    if complete:
        status["completionTime"] = _now()
    response = kube.patch("Job", ns, "mlp-compile", {"status": status}, sub="status")
    assert response.status_code == 200, response.text


def test_the_job_runs_and_its_report_becomes_the_status(kube: Kube, ns: str) -> None:
    created = kube.create(compilation_job(), ns)
    assert created.status_code == 201, created.text
    uid = created.json()["metadata"]["uid"]
    job = _job(kube, ns)

    # Exactly what the renderer makes, strict-valid, owned by the CompilationJob.
    parsed = CompilationJob.model_validate({**compilation_job(),
                                            "metadata": {"name": "mlp", "namespace": ns}})
    expected = render_job(plan_compile(parsed), namespace=ns, uid=uid, settings=SETTINGS)
    assert job["spec"]["template"] == expected["spec"]["template"]
    assert job["spec"]["podFailurePolicy"] == expected["spec"]["podFailurePolicy"]
    assert job["spec"]["activeDeadlineSeconds"] == 3600 + 2 * 60 * 2
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob", "name": "mlp",
        "uid": uid, "controller": True, "blockOwnerDeletion": True}]
    assert schema_errors(job) == []
    kubernetes_validate.validate(expected, "1.33.0", strict=True)
    status = wait_for(lambda: (s := _status(kube, ns)).get("phase") == "Compiling" and s, 10,
                      "Compiling")
    assert _condition(kube, ns, "Running")["reason"] == "Compiling"
    assert status["target"] == "native" and status["model"] == "model s3://models/mlp.onnx"

    _pod(kube, ns, job, "x1z2q", message=REPORT.termination_message().decode())
    _job_status(kube, ns, complete=True, succeeded=1)
    complete = wait_for(lambda: _condition(kube, ns, "Complete"), 10, "Complete")
    assert complete["reason"] == "Compiled"
    assert complete["message"] == (
        "tvm-tuned (tvm) for native (znver4): 1.31x onnxruntime fp32, max abs diff 4.1e-07; "
        "artifact s3://compiled/mlp/artifact.tar.gz")
    status = _status(kube, ns)
    assert (status["phase"], status["artifactUri"], status["sha256"], status["backend"],
            status["chosen"], status["speedup"], status["maxAbsDiff"]) == (
        "Complete", "s3://compiled/mlp/artifact.tar.gz", "ab" * 32, "tvm", "tvm-tuned", 1.31,
        4.1e-7)
    assert status["verification"] == "timed on this host (znver4), 1 thread"
    assert status["tuningTrials"] == 64 and status["observedGeneration"] == 1
    assert status["startTime"] and status["completionTime"]
    assert [c["name"] for c in status["candidates"]] == ["onnxruntime-fp32", "tvm-tuned"]

    # Monotonic: whatever the Job reports later, Complete stays and nothing is re-created.
    before = kube.get("CompilationJob", ns, "mlp")
    _job_status(kube, ns, failure=("BackoffLimitExceeded", "later"))
    assert kube.delete("Job", ns, "mlp-compile").status_code == 200
    time.sleep(1.0)
    after = kube.get("CompilationJob", ns, "mlp")
    assert after is not None and before is not None
    assert after["status"] == before["status"]
    assert kube.get("Job", ns, "mlp-compile") is None


def test_bad_input_fails_with_the_compilers_reason(kube: Kube, ns: str) -> None:
    assert kube.create(compilation_job(), ns).status_code == 201
    job = _job(kube, ns)
    error = "Model s3://models/mlp.onnx is not an ONNX model (truncated protobuf): fix the URI"
    _pod(kube, ns, job, "bad01", exit_code=EXIT_BAD_INPUT,
         message=CompileReport(ok=False, target="native", error=error).model_dump_json())
    _job_status(kube, ns, failed=1, failure=("PodFailurePolicy", "Container compile for pod "
                                                                  f"{ns}/mlp-compile-bad01 "
                                                                  "exited with 42"))
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "BadInput"
    assert failed["message"] == (f"Compilation failed: {error} (pod {ns}/mlp-compile-bad01, "
                                 f"exit code 42; kubectl logs -n {ns} mlp-compile-bad01 -c "
                                 "compile)")
    status = _status(kube, ns)
    assert status["phase"] == "Failed" and "artifactUri" not in status
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Failed")


def test_a_crash_without_a_report_fails_with_the_log_tail(kube: Kube, ns: str) -> None:
    assert kube.create(compilation_job(backoffLimit=0), ns).status_code == 201
    job = _job(kube, ns)
    assert job["spec"]["backoffLimit"] == 0
    _pod(kube, ns, job, "oom01", exit_code=137,
         message="Compiling tvm-untuned\nKilled")
    _job_status(kube, ns, failed=1, failure=("BackoffLimitExceeded",
                                             "Job has reached the specified backoff limit"))
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "Compiling tvm-untuned | Killed (pod" in failed["message"]


def test_the_deadline_names_the_field_to_raise(kube: Kube, ns: str) -> None:
    spec = compilation_job(stoppingCondition={"maxRuntimeInSeconds": 120})
    assert kube.create(spec, ns).status_code == 201
    assert _job(kube, ns)["spec"]["activeDeadlineSeconds"] == 120
    _job_status(kube, ns, failure=("DeadlineExceeded", "Job was active longer than specified "
                                                       "deadline"))
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "DeadlineExceeded"
    assert "raise spec.stoppingCondition.maxRuntimeInSeconds" in failed["message"]


def test_an_invalid_spec_fails_at_once_and_creates_nothing(kube: Kube, ns: str) -> None:
    assert kube.create(compilation_job(output={"uri": "file:///tmp/out/"}), ns).status_code == 201
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.output.uri: 'file:///tmp/out/' is a path inside the compiler's pod" in \
        failed["message"]
    assert kube.names("Job", ns) == set()


def test_the_crd_refuses_what_the_compiler_refuses(kube: Kube, ns: str) -> None:
    response = kube.create(compilation_job(target="pentium"), ns)
    assert response.status_code == 422
    assert "target" in response.text


def test_deleting_the_compilation_job_deletes_its_job_and_pod(kube: Kube, ns: str) -> None:
    assert kube.create(compilation_job(), ns).status_code == 201
    _pod(kube, ns, _job(kube, ns), "run01")
    assert kube.names("Job", ns) == {"mlp-compile"} and len(kube.names("Pod", ns)) == 1
    assert kube.delete("CompilationJob", ns, "mlp").status_code == 200
    wait_for(lambda: kube.get("CompilationJob", ns, "mlp") is None, 10, "CompilationJob gone")
    wait_for(lambda: not kube.names("Job", ns) and not kube.names("Pod", ns), 10,
             "Job and pod garbage-collected")


def test_ttl_deletes_the_job_and_keeps_the_status(kube: Kube, ns: str) -> None:
    assert kube.create(compilation_job(ttlSecondsAfterFinished=0), ns).status_code == 201
    _pod(kube, ns, _job(kube, ns), "ok001", message=REPORT.model_dump_json())
    _job_status(kube, ns, complete=True, succeeded=1)
    wait_for(lambda: _condition(kube, ns, "Complete"), 10, "Complete")
    wait_for(lambda: not kube.names("Job", ns) and not kube.names("Pod", ns), 10,
             "Job cleaned up after the TTL")
    assert _status(kube, ns)["artifactUri"] == "s3://compiled/mlp/artifact.tar.gz"


def test_a_spec_change_that_gets_through_fails_the_job(kube: Kube, ns: str) -> None:
    # The CRD's CEL rule (self == oldSelf) refuses this on a real API server; the
    # emulator does not evaluate CEL, so the operator's own guard is what is tested.
    assert kube.create(compilation_job(), ns).status_code == 201
    _job(kube, ns)
    assert kube.patch("CompilationJob", ns, "mlp", {"spec": {"target": "x86-64"}}) \
        .status_code == 200
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "SpecChanged"
    wait_for(lambda: kube.get("Job", ns, "mlp-compile") is None, 10, "compiler stopped")


# -- a variant that compiles before it serves --------------------------------------------------


def _variant_status(kube: Kube, ns: str) -> dict[str, Any]:
    status = (kube.get("Endpoint", ns, "mlp") or {}).get("status") or {}
    return next((v for v in status.get("variants", []) if v["name"] == "primary"), {})


def test_a_compiling_variant_reports_its_pods_compile_step(kube: Kube, ns: str) -> None:
    endpoint = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                "metadata": {"name": "mlp"},
                "spec": {"variants": [{"name": "primary", "model": {
                    "uri": "s3://models/mlp.onnx",
                    "compile": {"target": "native", "cacheUri": "s3://cache/compiled"}}}]}}
    assert kube.create(endpoint, ns).status_code == 201
    deployment: dict[str, Any] = wait_for(lambda: kube.get("Deployment", ns, "mlp-primary"),
                                          10, "the variant's Deployment")
    assert schema_errors(deployment) == []
    template = deployment["spec"]["template"]
    (init,) = template["spec"]["initContainers"]
    assert init["name"] == "compile"
    env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
    assert env["KUBEINFER_MODEL_FORMAT"] == "compiled"

    def pod(name: str, state: dict[str, Any]) -> None:
        obj = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "labels": template["metadata"]["labels"],
                            "annotations": template["metadata"]["annotations"]},
               "spec": copy.deepcopy(template["spec"])}
        assert kube.create(obj, ns).status_code == 201
        status = {"phase": "Pending",
                  "initContainerStatuses": [{"name": "compile", "ready": False,
                                             "restartCount": 0, "image": "x", "imageID": "",
                                             "state": state}]}
        assert kube.patch("Pod", ns, name, {"status": status}, sub="status").status_code == 200

    pod("mlp-primary-a", {"running": {"startedAt": _now()}})
    compiling = wait_for(lambda: (_variant_status(kube, ns).get("compiled") or {}).get(
        "phase") == "Compiling" and _variant_status(kube, ns), 10, "Compiling")
    assert "in pod mlp-primary-a (init container compile)" in compiling["compiled"]["message"]

    report = REPORT.model_copy(update={"artifact_uri": "s3://cache/compiled/k1/artifact.tar.gz",
                                       "artifact_cache_hit": True})
    pod("mlp-primary-b", {"terminated": {"exitCode": 0, "finishedAt": _now(),
                                         "message": report.termination_message().decode()}})
    compiled = wait_for(lambda: (_variant_status(kube, ns).get("compiled") or {}).get(
        "phase") == "Compiled" and _variant_status(kube, ns)["compiled"], 10, "Compiled")
    assert compiled == {
        "phase": "Compiled", "pod": "mlp-primary-b", "chosen": "tvm-tuned", "backend": "tvm",
        "speedup": 1.31, "maxAbsDiff": 4.1e-7, "cacheHit": True,
        "artifactUri": "s3://cache/compiled/k1/artifact.tar.gz",
        "message": "tvm-tuned (tvm) for native (znver4): 1.31x onnxruntime fp32, max abs "
                   "diff 4.1e-07"}
