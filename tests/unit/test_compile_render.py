"""A CompilationJob's plan and Job: strict-valid, locked down, the compiler's own settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubeinfer_operator.api.compilation_job import CompilationJob
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.render.compile_jobs import (
    LABEL_COMPILATION_JOB,
    render_job,
)
from kubeinfer_operator.render.compile_plan import CompilePlan, plan_compile
from kubeinfer_operator.render.transform_names import ANNOTATION_RUN_HASH
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract.compile import EXIT_BAD_INPUT, CompileSettings
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
UID = "0b6c2a3e-1111-4222-8333-944455556666"
SETTINGS = OperatorSettings(s3_secret_name="s3-creds", runtime_image="example.test/rt:1",
                            compiler_image="example.test/compiler:1")


def doc(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/mlp.onnx"}, "target": "native",
                            "output": {"uri": "s3://compiled/mlp/"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob",
            "metadata": {"name": "mlp", "namespace": "ml"}, "spec": base}


def planned(d: dict[str, Any], base_dir: str | None = None) -> CompilePlan:
    return plan_compile(CompilationJob.model_validate(d), base_dir=base_dir)


def rendered(plan: CompilePlan, settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
    return render_job(plan, namespace="ml", uid=UID, settings=settings)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def container_of(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _example_on_s3() -> dict[str, Any]:
    d: dict[str, Any] = yaml.safe_load((REPO / "examples" / "compile-job.yaml").read_text())
    d["spec"]["model"]["uri"] = "s3://examples/models/mlp.onnx"
    d["spec"]["output"]["uri"] = "s3://examples/compiled/mlp/"
    return d


@pytest.mark.parametrize("spec", [
    {},
    {"target": "aarch64", "batchSizes": [1, 8, 64], "threads": 4,
     "tuning": {"budgetSeconds": 60, "trials": 32, "cacheUri": "s3://cache/tuning"},
     "quantization": {"allowed": True, "calibrationUri": "s3://data/calib.npz"},
     "resources": {"requests": {"cpu": "4", "memory": "2Gi"}, "limits": {"memory": "8Gi"}},
     "environment": {"OMP_NUM_THREADS": "4"}, "stoppingCondition": {"maxRuntimeInSeconds": 900},
     "backoffLimit": 0, "ttlSecondsAfterFinished": 60},
], ids=["minimal", "everything"])
def test_jobs_pass_kubernetes_validate_strict(spec: dict[str, Any]) -> None:
    for settings in (OperatorSettings(), SETTINGS):
        job = rendered(planned(doc(**spec)), settings)
        assert schema_errors(job) == []
        kubernetes_validate.validate(job, "1.33.0", strict=True)
    example = rendered(planned(_example_on_s3()))
    kubernetes_validate.validate(example, "1.33.0", strict=True)


def test_the_env_is_exactly_what_the_compiler_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = planned(doc(target="x86-64-v3", batchSizes=[1, 64], threads=2,
                       tuning={"budgetSeconds": 30, "trials": 16,
                               "cacheUri": "s3://cache/tuning"},
                       quantization={"allowed": True, "calibrationUri": "s3://data/c.npz",
                                     "minTop1Agreement": 0.97},
                       environment={"OMP_NUM_THREADS": "2"}))
    env = env_of(container_of(rendered(plan)))
    assert env["OMP_NUM_THREADS"] == "2"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = CompileSettings()
    assert (settings.model_uri, settings.output_uri) == ("s3://models/mlp.onnx",
                                                         "s3://compiled/mlp/")
    assert settings.target.value == "x86-64-v3"
    assert settings.batch_sizes == [1, 64] and settings.threads == 2
    assert (settings.tuning_budget_s, settings.tuning_trials, settings.tuning_cache_uri) == (
        30.0, 16, "s3://cache/tuning")
    assert (settings.allow_quantization, settings.calibration_uri,
            settings.min_top1_agreement) == (True, "s3://data/c.npz", 0.97)
    # Kubernetes makes the termination log; the compiler writes its report there.
    assert settings.report_file == "/dev/termination-log"
    assert plan.artifact_uri == "s3://compiled/mlp/artifact.tar.gz"


def test_rendering_never_reads_the_renderers_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-LEAK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-leak")
    monkeypatch.setenv("KUBEINFER_TUNING_BUDGET_S", "999")
    monkeypatch.setenv("KUBEINFER_MEASURE_S", "7")
    text = json.dumps(rendered(planned(doc())))
    assert "LEAK" not in text and "leak" not in text
    assert '"999' not in text and "KUBEINFER_MEASURE_S" not in text


def test_the_job() -> None:
    plan = planned(doc(backoffLimit=1, stoppingCondition={"maxRuntimeInSeconds": 900}))
    job = rendered(plan)
    assert job["metadata"]["name"] == "mlp-compile"
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"],
            spec["activeDeadlineSeconds"]) == (1, 1, 1, 900)
    assert "completionMode" not in spec and "ttlSecondsAfterFinished" not in spec
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onExitCodes": {"containerName": "compile", "operator": "In",
                                              "values": [EXIT_BAD_INPUT]}},
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget",
                                                  "status": "True"}]}]
    container = container_of(job)
    assert container["args"] == ["compile"] and container["name"] == "compile"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # Without stoppingCondition the Job still ends.
    assert rendered(planned(doc()))["spec"]["activeDeadlineSeconds"] == 3600


def test_the_job_is_owned_labelled_and_locked_down() -> None:
    plan = planned(doc())
    job = rendered(plan)
    meta = job["metadata"]
    assert meta["ownerReferences"] == [{
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob", "name": "mlp",
        "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"][LABEL_COMPILATION_JOB] == "mlp"
    assert meta["labels"]["app.kubernetes.io/component"] == "compiler"
    assert meta["annotations"] == {ANNOTATION_RUN_HASH: plan.run_hash}
    pod = job["spec"]["template"]["spec"]
    assert job["spec"]["template"]["metadata"]["labels"] == meta["labels"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = container_of(job)
    assert container["image"] == "example.test/compiler:1"  # g++ for TVM; not the server
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    # Scratch space and the tuning cache live under /tmp, an emptyDir.
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    # S3 credentials by reference only, as TransformJob and model-server pods get them.
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert not any(e["name"].startswith("AWS_") for e in container["env"])
    assert "envFrom" not in container_of(rendered(plan, OperatorSettings()))


def test_resources_default_to_a_cpu_per_measuring_thread() -> None:
    assert container_of(rendered(planned(doc(threads=2))))["resources"] == {
        "requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}
    own = {"requests": {"cpu": "4", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}
    assert container_of(rendered(planned(doc(resources=own))))["resources"] == own


@pytest.mark.parametrize(("resources", "expected"), [
    # CPU only: the compiler's memory request and limit are added.
    ({"requests": {"cpu": "1"}},
     {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "4Gi"}}),
    # A limit without a request: the request is the limit, as Kubernetes defaults it.
    ({"limits": {"cpu": "2", "memory": "2Gi"}},
     {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}}),
    # A request above the default limit: the limit is the request, never below it.
    ({"requests": {"memory": "16Gi"}},
     {"requests": {"memory": "16Gi", "cpu": "2"}, "limits": {"memory": "16Gi"}}),
], ids=["cpu-only", "limits-only", "big-memory"])
def test_partial_resources_are_completed_with_a_memory_limit(
        resources: dict[str, Any], expected: dict[str, Any]) -> None:
    job = rendered(planned(doc(threads=2, resources=resources)))
    assert container_of(job)["resources"] == expected
    kubernetes_validate.validate(job, "1.33.0", strict=True)


def test_the_plan_refuses_env_it_sets_itself() -> None:
    for name in ("KUBEINFER_MODEL_URI", "KUBEINFER_TARGET", "KUBEINFER_REPORT_FILE",
                 "KUBEINFER_WORK_DIR"):
        with pytest.raises(SpecError) as exc:
            planned(doc(environment={name: "x"}))
        assert (f"spec.environment.{name}: {name} is set by the operator; remove it from the "
                "spec") in str(exc.value)
    # The compiler's other knobs stay reachable through the environment.
    plan = planned(doc(environment={"KUBEINFER_MEASURE_S": "0.2"}))
    assert plan.env["KUBEINFER_MEASURE_S"] == "0.2"


def test_local_mode_resolves_relative_file_uris() -> None:
    plan = planned(doc(model={"uri": "file://models/mlp.onnx"},
                       output={"uri": "file://out/mlp/"},
                       quantization={"allowed": True, "calibrationUri": "file://data/c.npy"}),
                   base_dir="/home/me/examples")
    assert plan.env["KUBEINFER_MODEL_URI"] == "file:///home/me/examples/models/mlp.onnx"
    assert plan.env["KUBEINFER_OUTPUT_URI"] == "file:///home/me/examples/out/mlp"
    assert plan.env["KUBEINFER_CALIBRATION_URI"] == "file:///home/me/examples/data/c.npy"
    assert plan.output_uri == "file:///home/me/examples/out/mlp"


def test_run_hash_follows_the_spec() -> None:
    a = planned(doc())
    assert planned(doc()).run_hash == a.run_hash
    assert planned(doc(target="aarch64")).run_hash != a.run_hash
    assert planned(doc(tuning={"budgetSeconds": 10})).run_hash != a.run_hash


# -- serving the artifact: a variant's model with format: compiled ---------------------------


def test_a_variant_serves_a_compiled_artifact(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubeinfer_operator.api.endpoint import Endpoint
    from kubeinfer_operator.render.k8s import Owner, render_endpoint
    from kubeinfer_operator.render.plan import plan_endpoint
    from kubeinfer_runtime.contract import ModelFormat, ModelServerSettings

    endpoint = Endpoint.model_validate({
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
        "metadata": {"name": "mlp", "namespace": "ml"},
        "spec": {"variants": [
            {"name": "compiled", "weight": 1,
             "model": {"uri": "s3://compiled/mlp/artifact.tar.gz", "format": "compiled"}},
            {"name": "onnx", "weight": 0, "model": {"uri": "s3://models/mlp.onnx"}}]}})
    plan = plan_endpoint(endpoint, generation=1)
    manifests = render_endpoint(plan, Owner("mlp", "ml", UID), SETTINGS, ["compiled", "onnx"])
    deployment = next(m for m in manifests if m["kind"] == "Deployment"
                      and m["metadata"]["name"] == "mlp-compiled")
    kubernetes_validate.validate(deployment, "1.33.0", strict=True)
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    assert (env["KUBEINFER_MODEL_URI"], env["KUBEINFER_MODEL_FORMAT"]) == (
        "s3://compiled/mlp/artifact.tar.gz", "compiled")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert ModelServerSettings().model_format is ModelFormat.COMPILED
    # Another format than the artifact's restarts the model servers (a new pod template).
    other = plan_endpoint(Endpoint.model_validate({**endpoint.model_dump(mode="json"),
                                                   "spec": {"variants": [{
                                                       "name": "compiled", "weight": 1,
                                                       "model": {"uri": "s3://compiled/mlp/"
                                                                        "artifact.tar.gz"}}]}}))
    assert other.variants[0].server_hash != plan.variants[0].server_hash


def test_pod_template_places_the_compile_pod() -> None:
    # target native compiles for the CPU of the node the pod lands on: nodeSelector
    # picks that node's kind.
    template = {"nodeSelector": {"node.kubernetes.io/instance-type": "c7i.4xlarge"},
                "tolerations": [{"key": "compile", "operator": "Exists"}],
                "labels": {"team": "ml"}}
    job = rendered(planned(doc(podTemplate=template)))
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == template["nodeSelector"]
    assert pod["tolerations"] == template["tolerations"]
    assert job["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    assert pod["automountServiceAccountToken"] is False
    assert schema_errors(job) == []
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    assert planned(doc(podTemplate=template)).run_hash != planned(doc()).run_hash
