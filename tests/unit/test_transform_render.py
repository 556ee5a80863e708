"""A TransformJob's plan and Jobs: strict-valid, locked down, the runtime's own settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.api.endpoint import Endpoint
from kubeinfer_operator.api.transform_job import TransformJob
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.render.transform_jobs import render_job
from kubeinfer_operator.render.transform_names import (
    ANNOTATION_RUN_HASH,
    LABEL_TRANSFORM_JOB,
    Step,
)
from kubeinfer_operator.render.transform_plan import (
    ModelRefError,
    ResolvedModel,
    TransformPlan,
    model_from_endpoint,
    own_model,
    plan_transform,
)
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import PipelineSpec
from kubeinfer_runtime.contract.batch import (
    EXIT_BAD_INPUT,
    EXIT_MODEL_FAILED,
    BatchSettings,
)
from tests.support.kube_schema import schema_errors
from tests.support.kubelet import env_seen

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: TransformJob" in p.read_text())
UID = "0b6c2a3e-1111-4222-8333-944455556666"
SETTINGS = OperatorSettings(s3_secret_name="s3-creds", runtime_image="example.test/rt:1")


def doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "file://models/iris.onnx"},
                            "input": {"uri": "s3://data/in/", "contentType": "text/csv",
                                      "splitType": "Line"},
                            "output": {"uri": "s3://data/out/", "assembleWith": "Line"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob",
            "metadata": {"name": "score", "namespace": "ml"}, "spec": base}


def planned(d: dict[str, Any], model: ResolvedModel | None = None) -> TransformPlan:
    job = TransformJob.model_validate(d)
    resolved = model or own_model(job.spec)
    assert resolved is not None
    return plan_transform(job, resolved)


def jobs(plan: TransformPlan, settings: OperatorSettings = SETTINGS,
         shards: int = 7) -> dict[Step, dict[str, Any]]:
    return {s: render_job(plan, s, namespace="ml", uid=UID, settings=settings, shards=shards,
                          active_deadline_s=300) for s in Step}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """The env a container's process sees (the kubelet turns the escaped ``$$`` into ``$``)."""
    return env_seen(container)


def _on_s3(path: Path) -> dict[str, Any]:
    d: dict[str, Any] = yaml.safe_load(path.read_text())
    d["spec"]["input"]["uri"] = "s3://examples/in/"
    d["spec"]["output"]["uri"] = "s3://examples/out/"
    return d


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_renders_jobs_that_pass_kubernetes_validate_strict(path: Path) -> None:
    plan = planned(_on_s3(path))
    for settings in (OperatorSettings(), SETTINGS):
        for manifest in jobs(plan, settings).values():
            kubernetes_validate.validate(manifest, "1.33.0", strict=True)


@pytest.mark.parametrize("spec", [
    {"model": None, "containers": [{"name": "img", "image": "example.test/m:1"}]},
    {"model": None, "containers": [
        {"name": "pre", "handler": "iris_steps:preprocess", "codeUri": "file://handlers"},
        {"name": "model", "image": "example.test/m:1"},
        {"name": "post", "image": "example.test/post:1", "env": [{"name": "A", "value": "1"}]}]},
    {"resources": {"instanceCount": 12, "requests": {"cpu": "2", "memory": "4Gi"},
                   "limits": {"memory": "4Gi"}}, "errorPolicy": {"maxFailedRecords": 5}},
], ids=["image", "pipeline-with-images", "resources"])
def test_model_shapes_render_strict_valid(spec: dict[str, Any]) -> None:
    for manifest in jobs(planned(doc(**spec))).values():
        assert schema_errors(manifest) == [], manifest["metadata"]["name"]
        kubernetes_validate.validate(manifest, "1.33.0", strict=True)


def test_the_env_is_exactly_what_the_runtime_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"input": {"uri": "s3://data/in/", "contentType": "application/jsonlines",
                      "splitType": "Line", "compressionType": "Gzip"},
            "output": {"uri": "s3://data/out/", "accept": "application/json",
                       "assembleWith": "Line"},
            "batchStrategy": "SingleRecord", "maxPayloadInMB": 2, "maxConcurrentTransforms": 4,
            "modelClientConfig": {"invocationsTimeoutInSeconds": 30, "invocationsMaxRetries": 1},
            "dataProcessing": {"inputFilter": "$.features", "joinSource": "Input",
                               "outputFilter": "$['id','SageMakerOutput']"},
            "errorPolicy": {"maxFailedRecords": 9}, "resources": {"instanceCount": 3},
            "environment": {"OMP_NUM_THREADS": "1"}}
    plan = planned(doc(**spec))
    worker = jobs(plan)[Step.WORK]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(worker)
    assert env["OMP_NUM_THREADS"] == "1"  # in-process model: the job's environment is the worker's
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "5")  # what Kubernetes adds
    settings = BatchSettings()
    assert (settings.job, settings.input_uri, settings.output_uri) == (
        "score", "s3://data/in/", "s3://data/out/")
    assert settings.model_uri == "file://models/iris.onnx"
    assert (settings.split_type, settings.compression, settings.input_content_type) == (
        "Line", "Gzip", "application/jsonlines")
    assert (settings.accept, settings.assemble_with) == ("application/json", "Line")
    assert (settings.batch_strategy, settings.max_batch_payload_bytes,
            settings.max_concurrent_transforms) == ("SingleRecord", 2 * 1024 * 1024, 4)
    assert (settings.invocation_timeout_s, settings.invocation_retries) == (30.0, 1)
    assert (settings.input_filter, settings.join_source, settings.output_filter) == (
        "$.features", "Input", "$['id','SageMakerOutput']")
    assert (settings.max_failed_records, settings.instance_count) == (9, 3)
    assert settings.shards == "5"
    assert settings.report_file == "/dev/termination-log"


def test_rendering_never_reads_the_renderers_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-LEAK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-leak")
    monkeypatch.setenv("KUBEINFER_JOB", "other")
    monkeypatch.setenv("KUBEINFER_SHARDS", "9")
    text = json.dumps(jobs(planned(doc())))
    assert "LEAK" not in text and "leak" not in text
    assert '"KUBEINFER_SHARDS"' not in text and '"other"' not in text


def test_the_three_jobs() -> None:
    rendered = jobs(planned(doc(resources={"instanceCount": 3}, backoffLimitPerIndex=2)))
    planner, workers, finalizer = rendered[Step.PLAN], rendered[Step.WORK], rendered[Step.FINALIZE]
    assert [j["metadata"]["name"] for j in rendered.values()] == [
        "score-plan", "score-work", "score-finalize"]
    assert [j["spec"]["template"]["spec"]["containers"][0]["args"] for j in rendered.values()] \
        == [["batch", "plan"], ["batch", "work"], ["batch", "finalize"]]
    spec = workers["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 7, 3)
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (2, 0)
    assert spec["activeDeadlineSeconds"] == 300
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailIndex", "onExitCodes": {"containerName": "batch", "operator": "In",
                                                "values": [EXIT_BAD_INPUT]}},
        {"action": "FailJob", "onExitCodes": {"containerName": "batch", "operator": "In",
                                              "values": [EXIT_MODEL_FAILED]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                  "status": "True"}]}]
    for step in (planner, finalizer):
        assert (step["spec"]["completions"], step["spec"]["parallelism"],
                step["spec"]["backoffLimit"]) == (1, 1, 3)
        assert "completionMode" not in step["spec"]
        assert step["spec"]["podFailurePolicy"]["rules"][0]["action"] == "FailJob"
    # Fewer shards than workers: no idle pods asked for.
    few = jobs(planned(doc(resources={"instanceCount": 3})), shards=2)[Step.WORK]
    assert few["spec"]["parallelism"] == 2
    # Bad records tolerated: a failed index does not stop the others.
    tolerant = jobs(planned(doc(errorPolicy={"maxFailedRecords": 3})))[Step.WORK]
    assert "maxFailedIndexes" not in tolerant["spec"]


def test_jobs_are_owned_labelled_and_locked_down() -> None:
    plan = planned(doc())
    for step, job in jobs(plan).items():
        meta = job["metadata"]
        assert meta["ownerReferences"] == [{
            "apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob", "name": "score",
            "uid": UID, "controller": True, "blockOwnerDeletion": True}]
        assert meta["labels"][LABEL_TRANSFORM_JOB] == "score"
        assert meta["labels"]["app.kubernetes.io/component"] == step.component
        assert meta["annotations"] == {ANNOTATION_RUN_HASH: plan.run_hash}
        pod = job["spec"]["template"]["spec"]
        assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]
        assert pod["restartPolicy"] == "Never"
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        (container,) = pod["containers"]
        assert container["image"] == "example.test/rt:1"
        assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}
        assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        # S3 credentials by reference only, as the Endpoint's model servers get them.
        assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert not any(e["name"].startswith("AWS_") for e in container["env"])
    no_secret = jobs(plan, OperatorSettings())[Step.WORK]
    assert "envFrom" not in no_secret["spec"]["template"]["spec"]["containers"][0]


def test_resources_go_where_the_model_runs() -> None:
    resources = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
    in_process = jobs(planned(doc(resources=resources)))
    assert in_process[Step.WORK]["spec"]["template"]["spec"]["containers"][0]["resources"] == \
        resources
    defaults = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert in_process[Step.PLAN]["spec"]["template"]["spec"]["containers"][0]["resources"] == \
        defaults
    image = jobs(planned(doc(model=None, resources=resources,
                             containers=[{"name": "m", "image": "example.test/m:1"}])))
    pod = image[Step.WORK]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["resources"] == resources
    assert pod["containers"][0]["resources"] == defaults


def test_partial_resources_are_completed_with_a_memory_limit() -> None:
    # 1,000 workers asking for CPU only must not each grow without bound on shared nodes.
    plan = planned(doc(resources={"instanceCount": 1000, "requests": {"cpu": "100m"}}))
    work = jobs(plan, shards=1000)[Step.WORK]
    assert work["spec"]["parallelism"] == 1000
    assert work["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    # A memory request above the default limit: the limit is the request, never below it.
    big = planned(doc(model=None, resources={"requests": {"memory": "3Gi"},
                                             "limits": {"cpu": "2"}},
                      containers=[{"name": "m", "image": "example.test/m:1"}]))
    for job in jobs(big).values():
        pod = job["spec"]["template"]["spec"]
        for container in pod["containers"] + pod.get("initContainers", []):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
            assert "memory" in resources["limits"], container["name"]
        kubernetes_validate.validate(job, "1.33.0", strict=True)
    sidecar = jobs(big)[Step.WORK]["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["resources"] == {"requests": {"memory": "3Gi", "cpu": "2"},
                                    "limits": {"cpu": "2", "memory": "3Gi"}}


def test_a_pipeline_with_image_steps_calls_them_on_localhost() -> None:
    plan = planned(doc(model=None, containers=[
        {"name": "pre", "handler": "iris_steps:preprocess", "codeUri": "file://handlers"},
        {"name": "model", "image": "example.test/m:1"}]))
    pipeline = PipelineSpec.model_validate_json(plan.env["KUBEINFER_PIPELINE"])
    assert [(s.name, s.handler, s.url) for s in pipeline.steps] == [
        ("pre", "iris_steps:preprocess", None), ("model", None, "http://127.0.0.1:8082")]
    assert "KUBEINFER_MODEL_URL" not in plan.env and "KUBEINFER_MODEL_URI" not in plan.env
    sidecar = jobs(plan)[Step.WORK]["spec"]["template"]["spec"]["initContainers"][0]
    assert sidecar["name"] == "step-model" and sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/ping", "port": "step-8082"}
    assert env_of(sidecar)["SAGEMAKER_BIND_TO_PORT"] == "8082"


def test_the_operator_refuses_env_it_sets_itself() -> None:
    # KUBEINFER_START_GATE: a step would wait on a stdin nobody writes to (local runner only).
    for name in ("KUBEINFER_INPUT_URI", "JOB_COMPLETION_INDEX", "SAGEMAKER_BATCH",
                 "KUBEINFER_START_GATE"):
        with pytest.raises(SpecError) as exc:
            planned(doc(environment={name: "x"}))
        assert (f"spec.environment.{name}: {name} is set by the operator; remove it from the "
                "spec") in str(exc.value)


def test_run_hash_follows_the_spec_and_the_model() -> None:
    a = planned(doc())
    assert planned(doc()).run_hash == a.run_hash
    assert planned(doc(maxConcurrentTransforms=2)).run_hash != a.run_hash
    other = ResolvedModel(source="x", model={"uri": "s3://m/other.onnx"})  # type: ignore[arg-type]
    assert planned(doc(), other).run_hash != a.run_hash


ENDPOINT = Endpoint.model_validate(yaml.safe_load(
    (REPO / "examples" / "realtime-endpoint.yaml").read_text()))


def test_endpoint_ref_copies_the_variants_model() -> None:
    job = TransformJob.model_validate(doc(model=None, endpointRef={"name": "iris",
                                                                   "variant": "canary"}))
    model = model_from_endpoint(job.spec, ENDPOINT, "ml")
    assert model.source == "Endpoint iris variant canary: model file://models/iris-v2.onnx"
    assert plan_transform(job, model).env["KUBEINFER_MODEL_URI"] == "file://models/iris-v2.onnx"
    # Pinned as JSON and read back identically.
    assert ResolvedModel.model_validate_json(model.to_json()) == model


@pytest.mark.parametrize(("ref", "message"), [
    ({"name": "iris"}, "spec.endpointRef.variant: Endpoint ml/iris has variants primary, "
                       "canary; name the one whose model to use"),
    ({"name": "iris", "variant": "blue"}, "Endpoint ml/iris has no variant 'blue' (it has "
                                          "primary, canary); fix the name"),
])
def test_endpoint_ref_problems_name_the_fix(ref: dict[str, Any], message: str) -> None:
    job = TransformJob.model_validate(doc(model=None, endpointRef=ref))
    with pytest.raises(ModelRefError) as exc:
        model_from_endpoint(job.spec, ENDPOINT, "ml")
    assert message in str(exc.value)
    with pytest.raises(ModelRefError) as exc:
        model_from_endpoint(job.spec, None, "ml")
    assert "spec.endpointRef: Endpoint ml/iris does not exist" in str(exc.value)


def test_a_multi_model_variant_cannot_be_referenced() -> None:
    mme = Endpoint.model_validate(yaml.safe_load(
        (REPO / "examples" / "multimodel-endpoint.yaml").read_text()))
    job = TransformJob.model_validate(doc(model=None, endpointRef={"name": mme.name}))
    with pytest.raises(ModelRefError) as exc:
        model_from_endpoint(job.spec, mme, "ml")
    assert "is multi-model; a TransformJob runs one model" in str(exc.value)


POD_TEMPLATE: dict[str, Any] = {
    "nodeSelector": {"node-pool": "batch"},
    "tolerations": [{"key": "batch", "operator": "Exists", "effect": "NoSchedule"}],
    "serviceAccountName": "scorer",
    "priorityClassName": "low",
    "labels": {"team": "risk"},
    "annotations": {"cost-center": "42"},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
}


def test_pod_template_places_every_jobs_pods_over_the_operators_default() -> None:
    settings = SETTINGS.model_copy(update={"default_pod_template": {
        "nodeSelector": {"kubernetes.io/arch": "amd64"},
        "imagePullSecrets": [{"name": "registry"}]}})
    plan = planned(doc(podTemplate=POD_TEMPLATE))
    for step, job in jobs(plan, settings).items():
        template = job["spec"]["template"]
        pod = template["spec"]
        assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64", "node-pool": "batch"}
        assert pod["tolerations"] == POD_TEMPLATE["tolerations"]
        assert pod["imagePullSecrets"] == [{"name": "registry"}]
        assert (pod["serviceAccountName"], pod["priorityClassName"]) == ("scorer", "low")
        # The ServiceAccount lends its cloud identity (storage access), never its API token.
        assert pod["automountServiceAccountToken"] is False
        # A spread without a selector counts this step's pods.
        [spread] = pod["topologySpreadConstraints"]
        selected = spread["labelSelector"]["matchLabels"]
        assert selected["app.kubernetes.io/component"] == step.component
        assert "team" not in selected  # the operator's labels select, not the user's
        assert template["metadata"]["labels"]["team"] == "risk"
        assert template["metadata"]["labels"]["app.kubernetes.io/component"] == \
            step.component  # the operator's labels stay
        assert template["metadata"]["annotations"] == {"cost-center": "42"}
        assert schema_errors(job) == []
        kubernetes_validate.validate(job, "1.33.0", strict=True)
    # Without one: the operator's default alone, and still no API token.
    pod = jobs(planned(doc()), settings)[Step.WORK]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    assert pod["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in pod
