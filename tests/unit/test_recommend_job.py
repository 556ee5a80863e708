"""A RecommendationJob: its API, its candidates and Job (strict-valid), its status roll-up."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from kubeinfer_operator.api.crd import all_crds
from kubeinfer_operator.api.recommendation_job import RecommendationJob
from kubeinfer_operator.reconcile import recommend_status as rs
from kubeinfer_operator.reconcile.compile_status import PodView
from kubeinfer_operator.reconcile.recommend_validate import (
    MAX_PAYLOADS_JSON_BYTES,
    InvalidRecommendationJob,
    validate_recommendation_job,
)
from kubeinfer_operator.reconcile.transform_observe import JobView
from kubeinfer_operator.render import recommend_jobs as rjobs
from kubeinfer_operator.render.transform_names import ANNOTATION_RUN_HASH
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.recommend import (
    EXIT_NO_RECOMMENDATION,
    RecommendRequest,
)
from kubeinfer_runtime.recommend import servers
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
UID = "0b6c2a3e-1111-4222-8333-944455556666"
SETTINGS = OperatorSettings(s3_secret_name="s3-creds", runtime_image="example.test/rt:1")
CRD = all_crds()["recommendationjobs.kubeinfer.io.yaml"]
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/mlp.onnx"},
                            "candidates": [{"name": "t1"}, {"name": "t2", "threads": 2},
                                           {"name": "r2", "replicas": 2}]}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "RecommendationJob",
            "metadata": {"name": "mlp", "namespace": "ml"},
            "spec": {k: v for k, v in base.items() if v is not None}}


def planned(d: dict[str, Any], endpoint: dict[str, Any] | None = None) -> rjobs.RecommendPlan:
    return rjobs.plan_recommend(RecommendationJob.model_validate(d), "ml", endpoint)


def test_the_example_parses_and_passes_the_crd_schema() -> None:
    d = yaml.safe_load((REPO / "examples" / "recommendation-job.yaml").read_text())
    job = RecommendationJob.model_validate(d)
    assert [c.name for c in job.spec.search().expand()] == ["t1-1cpu", "t2-2cpu", "r2-1cpu"]
    assert list(jsonschema.Draft4Validator(SCHEMA).iter_errors(d)) == []
    validate_recommendation_job("mlp-sizing", "ml", d["spec"])


def test_crd_names_columns_and_immutability() -> None:
    names = CRD["spec"]["names"]
    assert (names["kind"], names["shortNames"]) == ("RecommendationJob", ["krj"])
    columns = [c["name"] for c in CRD["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Winner", "Throughput", "Status", "Age"]
    rules = SCHEMA["properties"]["spec"]["x-kubernetes-validations"]
    assert any(r["rule"] == "self == oldSelf" for r in rules)


def _undescribed(schema: Any, path: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(schema, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if "description" not in sub:
                out.append(f"{path}.{key}")
            out += _undescribed(sub, f"{path}.{key}")
        if isinstance(schema.get("items"), dict):
            out += _undescribed(schema["items"], f"{path}[]")
    return out


def test_every_field_is_described() -> None:
    assert _undescribed(SCHEMA["properties"]["spec"]) == []
    assert _undescribed(SCHEMA["properties"]["status"]) == []


@pytest.mark.parametrize(("spec", "words"), [
    ({"model": None}, "exactly one of model and endpointRef"),
    ({"endpointRef": {"name": "mlp"}}, "exactly one of model and endpointRef"),
    ({"grid": {"threads": [1, 2]}}, "candidates or grid"),
    ({"candidates": None, "grid": {"threads": [1, 2, 3, 4], "workers": [1, 2, 3],
                                   "replicas": [1, 2]}}, "at most 16"),
    ({"model": {"uri": "s3://m/a.tar.gz", "format": "compiled"}}, "compiledModelUri"),
])
def test_refusals(spec: dict[str, Any], words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        RecommendationJob.model_validate(doc(**spec))


def test_validation_names_fields() -> None:
    with pytest.raises(InvalidRecommendationJob) as exc:
        validate_recommendation_job("mlp", "ml", doc(
            model={"uri": "file://models/mlp.onnx"},
            candidates=[{"name": "a", "resources": {"requests": {"cpu": "2"},
                                                     "limits": {"cpu": "1"}}}])["spec"])
    text = str(exc.value)
    assert "spec.candidates[0].resources" in text and "spec.model.uri" in text


def test_candidates_are_strict_valid_owned_and_sized() -> None:
    plan = planned(doc())
    for i, cand in enumerate(plan.candidates):
        deployment, service = rjobs.render_candidate(plan, i, uid=UID, settings=SETTINGS)
        for obj in (deployment, service):
            kubernetes_validate.validate(obj, "1.33.0", strict=True)
            assert obj["metadata"]["name"] == f"mlp-c{i}"
            assert obj["metadata"]["ownerReferences"][0]["kind"] == "RecommendationJob"
            assert obj["metadata"]["labels"][rjobs.LABEL_RECOMMENDATION_JOB] == "mlp"
        assert deployment["spec"]["replicas"] == cand.replicas
        pod = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        assert service["spec"]["selector"] == selector
        assert "clusterIP" not in service["spec"]  # kube-proxy balances the replicas
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["KUBEINFER_INTRA_OP_THREADS"] == str(cand.threads)
        assert env["KUBEINFER_MODEL_URI"] == "s3://models/mlp.onnx"
        # The recommender reads the signature from GET /v2/models/<its model name>.
        assert env["KUBEINFER_MODEL_NAME"] == servers.MODEL_NAME


def test_candidates_answer_only_their_load_generator() -> None:
    """With NetworkPolicies on, the candidates' model servers take inference traffic from
    the job's own load generator alone (as an Endpoint's take it from its gateway)."""
    plan = planned(doc())
    assert rjobs.render_candidates_policy(plan, uid=UID, settings=SETTINGS) is None
    fenced = SETTINGS.model_copy(update={"network_policy": True})
    policy = rjobs.render_candidates_policy(plan, uid=UID, settings=fenced)
    assert policy is not None
    kubernetes_validate.validate(policy, "1.33.0", strict=True)
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "RecommendationJob"
    fenced_pods = policy["spec"]["podSelector"]["matchLabels"]
    job_pods = rjobs.render_job(plan, uid=UID, settings=fenced)["spec"]["template"]
    (inference, metrics) = policy["spec"]["ingress"]
    allowed = inference["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= job_pods["metadata"]["labels"].items()
    assert metrics["ports"][0]["port"] != inference["ports"][0]["port"]
    for i in range(len(plan.candidates)):
        deployment, _ = rjobs.render_candidate(plan, i, uid=UID, settings=fenced)
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert fenced_pods.items() <= pod_labels.items()
        assert not allowed.items() <= pod_labels.items()  # candidates cannot call each other
    # Deleted with the candidates: it carries the job's selector.
    assert rjobs.selector("mlp").items() <= policy["metadata"]["labels"].items()


def test_the_job_is_strict_valid_and_carries_the_request_with_urls() -> None:
    plan = planned(doc(activeDeadlineSeconds=900))
    job = rjobs.render_job(plan, uid=UID, settings=SETTINGS)
    assert schema_errors(job) == []
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    assert job["metadata"]["name"] == "mlp-recommend"
    assert job["metadata"]["annotations"][ANNOTATION_RUN_HASH] == plan.run_hash
    assert job["spec"]["activeDeadlineSeconds"] == 900
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "recommend"
    (env,) = container["env"]
    request = RecommendRequest.model_validate_json(env["value"])
    assert [c.urls for c in request.candidates] == [
        [f"http://mlp-c{i}.ml.svc:{SETTINGS.runtime_port}"] for i in range(3)]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert EXIT_NO_RECOMMENDATION in rules[0]["onExitCodes"]["values"]


def test_the_load_generator_calls_only_the_candidates_services() -> None:
    """``urls`` belongs to the runtime's contract (the operator fills it); in a spec it
    is refused, naming the field, and the Job never carries a URL a tenant wrote."""
    hostile = doc(candidates=[{"name": "t1", "urls": ["http://169.254.169.254"]},
                              {"name": "t2", "urls": ["http://kubernetes.default.svc:443"]}])
    with pytest.raises(InvalidRecommendationJob) as exc:
        validate_recommendation_job("mlp", "ml", hostile["spec"])
    assert [p for p in exc.value.problems if ".urls" in p] == [
        f"spec.candidates[{i}].urls: set by the operator (the candidate's own Service in "
        "this namespace, the only address the load generator calls); remove it"
        for i in range(2)]
    # Rendered anyway (an operator that skipped validation): the Services' URLs only.
    job = rjobs.render_job(planned(hostile), uid=UID, settings=SETTINGS)
    (env,) = job["spec"]["template"]["spec"]["containers"][0]["env"]
    request = RecommendRequest.model_validate_json(env["value"])
    assert [c.urls for c in request.candidates] == [
        [f"http://mlp-c{i}.ml.svc:{SETTINGS.runtime_port}"] for i in range(2)]
    assert "169.254" not in env["value"] and "kubernetes.default" not in env["value"]


def test_endpoint_ref_uses_the_endpoints_variant() -> None:
    endpoint = {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
                "metadata": {"name": "shop", "namespace": "ml"},
                "spec": {"variants": [
                    {"name": "a", "model": {"uri": "s3://m/a.onnx"}},
                    {"name": "b", "model": {"uri": "s3://m/b.onnx"},
                     "env": [{"name": "KUBEINFER_LOG_LEVEL", "value": "debug"}]}]}}
    plan = planned(doc(model=None, endpointRef={"name": "shop", "variant": "b"}), endpoint)
    assert plan.request.modelUri == "s3://m/b.onnx" and plan.variant == "b"
    deployment, _ = rjobs.render_candidate(plan, 1, uid=UID, settings=SETTINGS)
    env = {e["name"]: e.get("value")
           for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBEINFER_LOG_LEVEL"] == "debug" and env["KUBEINFER_INTRA_OP_THREADS"] == "2"
    with pytest.raises(rjobs.RecommendSpecError, match="no variant"):
        planned(doc(model=None, endpointRef={"name": "shop", "variant": "zz"}), endpoint)


# -- status -------------------------------------------------------------------------------

SUMMARY = {"recommended": "t2", "reason": "t2 holds 450 req/s at the lowest cost",
           "autoscalingTarget": 18900.0,
           "ranking": [{"name": "t2", "state": "Measured", "maxThroughput": 450.0,
                        "p99Ms": 8.1, "costPerMillion": 0.06},
                       {"name": "t1", "state": "Screened", "maxThroughput": 200.0,
                        "p99Ms": 9.0, "costPerMillion": 0.07},
                       {"name": "r2", "state": "Failed", "maxThroughput": 0.0,
                        "p99Ms": None, "costPerMillion": None}]}


def info(status: dict[str, Any] | None = None, **kw: Any) -> rs.JobInfo:
    return rs.JobInfo(name="mlp", namespace="ml", generation=1, run_hash="h",
                      status=status or {}, model="model s3://m", candidates=3,
                      deadline_s=3600, **kw)


def ended_pod(code: int, message: str) -> PodView:
    return PodView(name="mlp-recommend-x", phase="Succeeded" if code == 0 else "Failed",
                   exit_code=code, message=message, finished_at="2026-01-01T00:01:00Z")


def test_the_state_machine_from_nothing_to_complete() -> None:
    d = rs.decide(info(), rs.Observed(), NOW)
    assert d.create_candidates and not d.create_job
    assert d.status["phase"] == rs.PHASE_STARTING
    some = rs.Observed(available={0: True, 1: False, 2: True})
    d = rs.decide(info(d.status), some, NOW)
    assert not d.create_candidates and not d.create_job
    assert d.status["candidatesAvailable"] == "2/3"
    # Not all available: the Job runs anyway after the wait (dead ones fail fast there).
    later = NOW + timedelta(seconds=rs.CANDIDATE_WAIT_S)
    assert rs.decide(info(d.status), some, later).create_job
    all_up = rs.Observed(available={0: True, 1: True, 2: True})
    d = rs.decide(info(d.status), all_up, NOW)
    assert d.create_job and d.status["phase"] == rs.PHASE_MEASURING
    running = rs.Observed(available=all_up.available, job=JobView(exists=True, run_hash="h"))
    d = rs.decide(info(d.status), running, NOW)
    assert not d.create_job and d.status["phase"] == rs.PHASE_MEASURING
    done = rs.Observed(available=all_up.available,
                       job=JobView(exists=True, run_hash="h", complete=True, succeeded=1),
                       pods=(ended_pod(0, json.dumps(SUMMARY)),))
    d = rs.decide(info(d.status), done, NOW, endpoint_yaml=lambda s: f"winner: {s.recommended}")
    assert d.delete_candidates and d.status["phase"] == "Complete"
    assert (d.status["recommended"], d.status["maxThroughput"]) == ("t2", 450.0)
    assert [r["name"] for r in d.status["ranking"]] == ["t2", "t1", "r2"]
    assert d.status["recommendedEndpoint"] == "winner: t2"
    complete = next(c for c in d.status["conditions"] if c["type"] == "Complete")
    assert complete["status"] == "True" and complete["reason"] == rs.REASON_RECOMMENDED
    # Terminal: candidates deleted until none is left, then done.
    again = rs.decide(info(d.status), rs.Observed(available={0: True}), NOW)
    assert again.status == d.status and again.delete_candidates and not again.done
    assert rs.decide(info(d.status), rs.Observed(), NOW).done


def test_no_recommendation_and_failures() -> None:
    base = rs.Observed(available={0: True, 1: True, 2: True})
    none = {**SUMMARY, "recommended": None, "reason": "no candidate held p99 <= 5 ms"}
    failed = rs.Observed(available=base.available,
                         job=JobView(exists=True, run_hash="h",
                                     failure=("PodFailurePolicy", "exit 3")),
                         pods=(ended_pod(EXIT_NO_RECOMMENDATION, json.dumps(none)),))
    d = rs.decide(info(), failed, NOW)
    cond = next(c for c in d.status["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == rs.REASON_NO_RECOMMENDATION and "p99 <= 5 ms" in cond["message"]
    assert d.delete_candidates and len(d.status["ranking"]) == 3
    deadline = rs.Observed(job=JobView(exists=True, run_hash="h",
                                       failure=("DeadlineExceeded", "")))
    d = rs.decide(info(), deadline, NOW)
    assert d.status["conditions"][-1]["reason"] == rs.REASON_DEADLINE
    other = rs.Observed(job=JobView(exists=True, run_hash="other"))
    d = rs.decide(info(), other, NOW)
    assert any(c["reason"] == rs.REASON_SPEC_CHANGED for c in d.status["conditions"])
    no_report = rs.Observed(job=JobView(exists=True, run_hash="h", complete=True),
                            pods=(ended_pod(0, "Traceback ..."),))
    d = rs.decide(info(), no_report, NOW)
    assert any(c["reason"] == rs.REASON_NO_REPORT for c in d.status["conditions"])


def test_up_points_a_recommendation_job_to_kubeinfer_recommend() -> None:
    from typer.testing import CliRunner

    from kubeinfer_operator.cli import app

    result = CliRunner().invoke(app, ["up", "-f", str(REPO / "examples" /
                                                      "recommendation-job.yaml")])
    assert result.exit_code == 2
    assert "kubeinfer recommend -f" in " ".join(result.output.split())


def test_the_job_takes_the_operators_default_placement() -> None:
    settings = SETTINGS.model_copy(update={"default_pod_template": {
        "tolerations": [{"key": "load-test", "operator": "Exists"}]}})
    job = rjobs.render_job(planned(doc()), uid=UID, settings=settings)
    assert job["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "load-test", "operator": "Exists"}]
    assert schema_errors(job) == []


#: Linux's limit on one environment string ("NAME=value" and its NUL): MAX_ARG_STRLEN.
MAX_ARG_STRLEN = 131072


def _largest(payloads: list[str]) -> dict[str, Any]:
    """A job with every list the CRD bounds at its longest: 16 candidates, 64 instance
    types, names as long as they may be, URIs of 1,000."""
    name = "n" * 60
    return doc(model={"uri": "s3://models/" + "m" * 983 + ".onnx"},
               compiledModelUri="s3://" + "c" * 995,
               candidates=[{"name": f"{'c' * 38}{i:02d}", "threads": 2, "replicas": 2,
                            "instanceType": f"{name}{i:02d}",
                            "resources": {"requests": {"cpu": "1500m", "memory": "2048Mi"},
                                          "limits": {"cpu": "1500m", "memory": "2048Mi"}}}
                           for i in range(16)],
               instanceTypes=[{"name": f"{name}{i:02d}", "cpu": 1.5, "memory": "2048Mi",
                               "pricePerHour": 0.123456789} for i in range(64)],
               payloads=payloads)


def test_payloads_that_would_not_fit_the_pods_environment_are_invalid_on_kubernetes(
        ) -> None:
    """The load test's request travels in one environment variable, and Linux starts no
    process with one over 128 KiB: two 64 KiB payloads made a pod that never started."""
    quotes = '"' * 30_000  # each escaped to two bytes in the request's JSON
    with pytest.raises(InvalidRecommendationJob) as caught:
        validate_recommendation_job("mlp", "ml", doc(payloads=[quotes, quotes])["spec"])
    [problem] = caught.value.problems
    assert problem.startswith("spec.payloads: 120") and "fewer or smaller" in problem
    # Local mode hands the request over in a file: no such bound there.
    validate_recommendation_job("mlp", "ml", doc(payloads=[quotes, quotes])["spec"],
                                on_kubernetes=False)


def test_at_the_bound_the_largest_request_still_fits_one_environment_variable() -> None:
    payload = "x" * (MAX_PAYLOADS_JSON_BYTES // 2 - 8)
    d = _largest([payload, payload])
    validate_recommendation_job("mlp", "ml", d["spec"])  # accepted: within the bound
    job = rjobs.render_job(planned(d), uid=UID, settings=SETTINGS)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    (env,) = container["env"]
    assert len(f"{env['name']}={env['value']}".encode()) + 1 <= MAX_ARG_STRLEN
