"""RecommendationJobs under the real kopf operator against the Kubernetes emulator.

Nothing runs Deployments, Jobs or pods here, so the test plays their controllers
and the kubelet: it reports the candidates' Deployments available, creates the
recommender's pod with the termination message the runtime leaves (the compact
summary of its report) and patches the Job's status. The operator must create
the rendered candidates, start the Job only when they are available, roll the
summary up into the status and delete the candidates when the Job has ended.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.recommend import (
    Candidate,
    CandidateResult,
    Quantile,
    RecommendReport,
    StepResult,
)
from tests.support.kube_harness import Kube, operator_on_emulator, wait_for
from tests.support.kube_schema import schema_errors

SETTINGS = OperatorSettings(standalone=True, status_interval_s=0.3, namespaces=[],
                            runtime_image="example.test/runtime:1", network_policy=True)
_ids = itertools.count()


def _step(rate: float, p99: float) -> StepResult:
    q = Quantile(value=p99, low=p99 * 0.9, high=p99 * 1.1)
    return StepResult(targetRate=rate, achievedRate=rate, seconds=1.0, requests=int(rate),
                      errors=0, p50=q, p90=q, p99=q, p999=q, cpuPercent=0.0, memoryBytes=0,
                      held=True)


def _result(name: str, rps: float, **cand: Any) -> CandidateResult:
    return CandidateResult(name=name, candidate=Candidate(name=name, **cand),
                           state="Measured", rounds=2, maxThroughput=rps,
                           atMax=_step(rps, 7.5), costPerHour=0.1,
                           costPerMillion=0.1 / (rps * 3600) * 1e6)


REPORT = RecommendReport(
    sloP99Ms=50.0, search="halving", seconds=80.0, ranking=["t2", "t1"], recommended="t2",
    reason="t2 holds 600 req/s under p99 50 ms at the lowest cost per 1M inferences",
    autoscalingTarget=25200.0,
    results=[_result("t2", 600.0, threads=2), _result("t1", 300.0)])


def recommendation_job(name: str = "mlp") -> dict[str, Any]:
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "RecommendationJob",
            "metadata": {"name": name},
            "spec": {"model": {"uri": "s3://models/mlp.onnx"},
                     "candidates": [{"name": "t1"}, {"name": "t2", "threads": 2,
                                                     "resources": {"requests": {"cpu": "2"}}}],
                     "load": {"sloP99Ms": 50}, "ttlSecondsAfterFinished": 3600}}


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    with operator_on_emulator(SETTINGS, tmp_path_factory.mktemp("kube")) as (kube, _):
        yield kube


@pytest.fixture
def ns(kube: Kube) -> str:
    name = f"rj{next(_ids)}"
    kube.create_namespace(name)
    return name


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(kube: Kube, ns: str) -> dict[str, Any]:
    return (kube.get("RecommendationJob", ns, "mlp") or {}).get("status") or {}


def _pod(kube: Kube, ns: str, job: dict[str, Any], *, exit_code: int, message: str) -> None:
    meta = job["metadata"]
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"{meta['name']}-abcde",
                        "labels": {**job["spec"]["template"]["metadata"]["labels"],
                                   "batch.kubernetes.io/job-name": meta["name"]},
                        "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job",
                                             "name": meta["name"], "uid": meta["uid"],
                                             "controller": True, "blockOwnerDeletion": True}]},
           "spec": copy.deepcopy(job["spec"]["template"]["spec"])}
    assert kube.create(pod, ns).status_code == 201
    terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                  "message": message, "finishedAt": _now(), "startedAt": _now()}
    status = {"phase": "Succeeded" if exit_code == 0 else "Failed",
              "containerStatuses": [{"name": "recommend", "ready": False, "restartCount": 0,
                                     "image": "example.test/runtime:1", "imageID": "",
                                     "state": {"terminated": terminated}}]}
    patched = kube.patch("Pod", ns, pod["metadata"]["name"], {"status": status}, sub="status")
    assert patched.status_code == 200, patched.text


def test_candidates_then_the_job_then_the_winner(kube: Kube, ns: str) -> None:
    created = kube.create(recommendation_job(), ns)
    assert created.status_code == 201, created.text
    uid = created.json()["metadata"]["uid"]

    # Both candidates appear, owned and schema-valid; the Job waits for them.
    wait_for(lambda: kube.names("Deployment", ns) >= {"mlp-c0", "mlp-c1"}, 10, "candidates")
    wait_for(lambda: kube.names("Service", ns) >= {"mlp-c0", "mlp-c1"}, 10, "services")
    # Fenced: only the job's load generator reaches them.
    policy = wait_for(lambda: kube.get("NetworkPolicy", ns, "mlp-candidates"), 10, "policy")
    assert schema_errors(policy) == [] and policy["metadata"]["ownerReferences"][0]["uid"] == uid
    for name in ("mlp-c0", "mlp-c1"):
        dep = kube.get("Deployment", ns, name)
        assert dep is not None and schema_errors(dep) == []
        assert dep["metadata"]["ownerReferences"][0]["uid"] == uid
    status = wait_for(lambda: (s := _status(kube, ns)).get("phase") == "StartingCandidates"
                      and s, 10, "StartingCandidates")
    assert status["candidatesAvailable"] == "0/2"
    kube.make_available(ns, "mlp-c0")
    wait_for(lambda: _status(kube, ns).get("candidatesAvailable") == "1/2", 10, "1/2")
    assert kube.get("Job", ns, "mlp-recommend") is None
    kube.make_available(ns, "mlp-c1")

    job: dict[str, Any] = wait_for(lambda: kube.get("Job", ns, "mlp-recommend"), 10, "Job")
    assert schema_errors(job) == []
    wait_for(lambda: _status(kube, ns).get("phase") == "Measuring", 10, "Measuring")

    _pod(kube, ns, job, exit_code=0, message=REPORT.termination_message())
    done = {"startTime": _now(), "completionTime": _now(), "succeeded": 1, "conditions": [
        {"type": "SuccessCriteriaMet", "status": "True", "lastTransitionTime": _now()},
        {"type": "Complete", "status": "True", "lastTransitionTime": _now()}]}
    assert kube.patch("Job", ns, "mlp-recommend", {"status": done},
                      sub="status").status_code == 200

    status = wait_for(lambda: (s := _status(kube, ns)).get("phase") == "Complete" and s, 10,
                      "Complete")
    assert (status["recommended"], status["maxThroughput"]) == ("t2", 600.0)
    assert [r["name"] for r in status["ranking"]] == ["t2", "t1"]
    complete = next(c for c in status["conditions"] if c["type"] == "Complete")
    assert complete["reason"] == "Recommended"
    endpoint = yaml.safe_load(status["recommendedEndpoint"])
    (variant,) = endpoint["spec"]["variants"]
    assert variant["resources"] == {"requests": {"cpu": "2"}}
    assert {"name": "KUBEINFER_INTRA_OP_THREADS", "value": "2"} in variant["env"]
    assert variant["autoscaling"]["targetTracking"][0]["target"] == 25200.0
    # The candidates are deleted once the Job has ended; the Job stays (TTL).
    wait_for(lambda: not kube.names("Deployment", ns) and not kube.names("Service", ns)
             and not kube.names("NetworkPolicy", ns), 10, "candidates deleted")
    assert kube.get("Job", ns, "mlp-recommend") is not None
