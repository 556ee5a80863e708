"""examples/recommendation-job.yaml on kind: candidates as Deployments, the load test as a Job.

Needs the SeaweedFS store run.sh deploys (the candidates' model servers read the
MLP from it); skipped without it. The example is applied with the MLP uploaded
to a bucket of this test's own, two candidates and short load steps (this checks
the plumbing; bench/recommend.py measures). Then: the candidates' Deployments
and Services appear, owned by the RecommendationJob; ``kubectl wait
--for=condition=Complete``; the status names a winner among the candidates, the
ranked table and a recommended Endpoint that parses; ``kubectl get krj`` prints
WINNER/THROUGHPUT/STATUS; the candidates are gone once the Job has ended; and
deleting the RecommendationJob takes its Job and pod with it.
"""

from __future__ import annotations

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

EXAMPLE = "recommendation-job.yaml"
#: Image pulls, two candidates starting, the screening and final rounds.
COMPLETE_WITHIN_S = 900
BUCKET_WITHIN_S = 120
LABEL_RECOMMENDATION_JOB = "kubeinfer.io/recommendation-job"


def resource(name: str) -> str:
    return f"recommendationjobs.kubeinfer.io/{name}"


def diagnostics(namespace: str, name: str) -> str:
    selector = f"{LABEL_RECOMMENDATION_JOB}={name}"
    return "\n".join([
        f"=== diagnostics of {resource(name)} in namespace {namespace}",
        _section("RecommendationJob", "-n", namespace, "get", resource(name), "-o", "yaml"),
        _section("objects", "-n", namespace, "get", "deployments,services,jobs,pods", "-o",
                 "wide"),
        _section("events", "-n", namespace, "get", "events", "--sort-by=.lastTimestamp"),
        _section("logs", "-n", namespace, "logs", "-l", selector, "--all-containers",
                 "--prefix", "--tail=80"),
        _section("operator log", "-n", RELEASE_NAMESPACE, "logs",
                 f"deployment/{FULLNAME}-operator", "--tail=80"),
    ])


def _candidates(namespace: str, name: str) -> list[str]:
    items = kubectl_json("-n", namespace, "get", "deployments,services", "-l",
                         f"{LABEL_RECOMMENDATION_JOB}={name}")["items"]
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in items)


@pytest.mark.timeout(BUCKET_WITHIN_S + COMPLETE_WITHIN_S + GC_TIMEOUT_S + 300)
def test_recommendation_job_measures_candidates_on_kubernetes(namespace: str,
                                                              models_dir: Path,
                                                              tmp_path: Path) -> None:
    if DEPS_NAMESPACE is None or S3_SECRET is None:
        pytest.skip("a RecommendationJob's candidates read the model from an object store: "
                    "run e2e/run.sh with KUBEINFER_E2E_ASYNC=1 (the default), which deploys "
                    "one")
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / EXAMPLE).read_text())
    name = doc["metadata"]["name"]
    bucket = f"kubeinfer-{namespace}"
    model = models_dir / Path(doc["spec"]["model"]["uri"]).name
    assert model.is_file(), f"the example must name a model build_models.py builds: {model}"
    doc["spec"]["model"]["uri"] = f"s3://{bucket}/models/{model.name}"
    doc["spec"]["candidates"] = doc["spec"]["candidates"][:2]
    for cand in doc["spec"]["candidates"]:  # kind's node: small requests
        cand["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi"},
                             "limits": {"memory": "1Gi"}}
    doc["spec"]["load"] = {"sloP99Ms": 500, "startRate": 20, "maxRate": 80,
                           "stepSeconds": 1, "warmupSeconds": 0.5, "maxMinutes": 3}
    from kubeinfer_operator.api.recommendation_job import RecommendationJob
    from kubeinfer_operator.reconcile.recommend_validate import validate_recommendation_job

    RecommendationJob.model_validate(doc)
    validate_recommendation_job(name, namespace, doc["spec"])
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    key, secret = object_store_credentials()
    candidates = [c["name"] for c in doc["spec"]["candidates"]]

    try:
        with port_forward(DEPS_NAMESPACE, S3_SERVICE, S3_PORT) as s3_port:
            s3 = s3_client(s3_port, key, secret)
            wait_for(lambda: _bucket(s3, bucket), BUCKET_WITHIN_S, f"bucket {bucket}")
            s3.put_object(Bucket=bucket, Key=f"models/{model.name}", Body=model.read_bytes())

        kubectl("-n", namespace, "apply", "-f", str(manifest))
        wait_for(lambda: len(_candidates(namespace, name)) == 4 or None, 60,
                 "the candidates' Deployments and Services")
        kubectl("-n", namespace, "wait", "--for=condition=Complete", resource(name),
                f"--timeout={COMPLETE_WITHIN_S}s", timeout=COMPLETE_WITHIN_S + 30)
        obj = kubectl_json("-n", namespace, "get", resource(name))
        status = obj["status"]
        assert status["phase"] == "Complete", status
        assert status["recommended"] in candidates, status
        assert status["ranking"][0]["name"] == status["recommended"], status
        assert status["maxThroughput"] > 0, status
        endpoint = yaml.safe_load(status["recommendedEndpoint"])
        assert endpoint["kind"] == "Endpoint" and endpoint["spec"]["variants"], endpoint

        table = kubectl("-n", namespace, "get", "krj", name)
        header = table.splitlines()[0].split()
        assert header == ["NAME", "WINNER", "THROUGHPUT", "STATUS", "AGE"], table
        wait_for(lambda: not _candidates(namespace, name) or None, GC_TIMEOUT_S,
                 "the candidates to be deleted")

        uid = obj["metadata"]["uid"]
        assert _owned(namespace, uid), "no Job carries the RecommendationJob's ownerReference"
        kubectl("-n", namespace, "delete", resource(name), "--wait",
                f"--timeout={GC_TIMEOUT_S}s", timeout=GC_TIMEOUT_S + 30)
        wait_for(lambda: not _owned(namespace, uid), GC_TIMEOUT_S,
                 f"the Job and pod of {resource(name)} to be garbage-collected")
    except BaseException as exc:
        if isinstance(exc, Exception):
            exc.add_note(diagnostics(namespace, name))
        raise
