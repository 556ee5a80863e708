"""A variant whose model says ``compile``: the API, the init container, its status, and local
mode's rewrite of the variant to its artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error
from kubeinfer_operator.api.transform_job import TransformJobSpec
from kubeinfer_operator.local.compile_variants import (
    VariantOutcome,
    compiler_env,
    served,
    to_compile,
)
from kubeinfer_operator.local.manifest import LoadedEndpoint
from kubeinfer_operator.reconcile.compile_status import variant_compile_status
from kubeinfer_operator.reconcile.compile_validate import variant_compile_problems
from kubeinfer_operator.reconcile.transform_validate import spec_problems
from kubeinfer_operator.reconcile.validate import InvalidSpec, validate_endpoint
from kubeinfer_operator.render import k8s_meta as meta
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import ModelServerSettings
from kubeinfer_runtime.contract.compile import CandidateName, CompileReport, CompileSettings
from tests.support.kube_schema import schema_errors

UID = "0b6c2a3e-1111-4222-8333-944455556666"
SETTINGS = OperatorSettings(s3_secret_name="s3-creds", runtime_image="example.test/rt:1",
                            compiler_image="example.test/compiler:1")
COMPILE = {"target": "native", "batchSizes": [1, 64], "tuning": {"budgetSeconds": 30},
           "quantization": {"allowed": True}, "cacheUri": "s3://cache/compiled"}


def endpoint(model: dict[str, Any] | None = None, **variant: Any) -> dict[str, Any]:
    v = {"name": "primary", "weight": 1,
         "model": model or {"uri": "s3://models/mlp.onnx", "compile": COMPILE}, **variant}
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "Endpoint",
            "metadata": {"name": "mlp", "namespace": "ml"}, "spec": {"variants": [v]}}


def errors_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        Endpoint.model_validate(doc)
    return format_validation_error(exc.value)


def deployment(doc: dict[str, Any], settings: OperatorSettings = SETTINGS) -> dict[str, Any]:
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=1)
    manifests = render_endpoint(plan, Owner("mlp", "ml", UID), settings, ["primary"])
    found: dict[str, Any] = next(m for m in manifests if m["kind"] == "Deployment"
                                 and m["metadata"]["name"] == "mlp-primary")
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


# -- the API -----------------------------------------------------------------------------------


def test_compile_defaults_and_refusals() -> None:
    parsed = Endpoint.model_validate(endpoint({"uri": "s3://models/mlp.onnx",
                                               "compile": {}}))
    options = parsed.spec.variants[0].model.compile  # type: ignore[union-attr]
    assert options is not None
    assert (options.target.value, options.batchSizes, options.cacheUri) == ("native", None, None)
    assert "model: compile: compiles an ONNX model, and format compiled is already compiled" \
        in errors_of(endpoint({"uri": "s3://c/a.tar.gz", "format": "compiled",
                               "compile": {}}))
    assert ("model.compile.target: aarch64 is cross-compiled and cannot be timed where it is "
            "compiled") in errors_of(endpoint({"uri": "s3://m/x.onnx",
                                               "compile": {"target": "aarch64"}}))
    assert "model.compile.batchSizes: batchSizes: [1, 1] repeats a size" in errors_of(
        endpoint({"uri": "s3://m/x.onnx", "compile": {"batchSizes": [1, 1]}}))
    assert "model.compile.cacheUri: compile.cacheUri: 'http://c' has unsupported scheme" in \
        errors_of(endpoint({"uri": "s3://m/x.onnx", "compile": {"cacheUri": "http://c"}}))
    assert "model.compile.tuning.budget: unknown field" in errors_of(endpoint(
        {"uri": "s3://m/x.onnx", "compile": {"tuning": {"budget": 1}}}))


def test_only_a_variants_own_model_compiles() -> None:
    step = {"name": "m", "model": {"uri": "s3://m/x.onnx", "compile": {}}}
    with pytest.raises(InvalidSpec) as exc:
        validate_endpoint("mlp", "ml", {"variants": [{"name": "primary",
                                                      "containers": [step]}]})
    assert ("spec.variants[0].containers[0].model.compile: only a variant's own model "
            "compiles before it is served") in str(exc.value)
    spec = TransformJobSpec.model_validate({"model": {"uri": "s3://m/x.onnx", "compile": {}},
                                            "input": {"uri": "s3://d/in/"},
                                            "output": {"uri": "s3://d/out/"}})
    assert spec_problems(spec, on_kubernetes=True) == \
        ["spec.model.compile: a TransformJob runs its model as given; run a CompilationJob "
            "and give the job its artifact (model.format: compiled)"]


# -- Kubernetes: an init container of the model-server pod ---------------------------------


def test_the_model_server_pod_compiles_first(monkeypatch: pytest.MonkeyPatch) -> None:
    dep = deployment(endpoint())
    assert schema_errors(dep) == []
    kubernetes_validate.validate(dep, "1.33.0", strict=True)
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    server = pod["containers"][0]
    assert init["name"] == "compile" and init["args"] == ["compile"]
    assert init["image"] == "example.test/compiler:1"  # g++ for TVM; not the server
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert init["securityContext"] == server["securityContext"]
    assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert init["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"},
                                 "limits": {"memory": "4Gi"}}
    assert {"name": "compiled", "emptyDir": {}} in pod["volumes"]
    assert {"name": "compiled", "mountPath": "/var/run/kubeinfer/compiled",
            "readOnly": True} in server["volumeMounts"]
    assert {"name": "compiled", "mountPath": "/var/run/kubeinfer/compiled"} in \
        init["volumeMounts"]
    # The model server serves what the compiler published.
    served_env = env_of(server)
    assert (served_env["KUBEINFER_MODEL_URI"], served_env["KUBEINFER_MODEL_FORMAT"]) == (
        "file:///var/run/kubeinfer/compiled/artifact", "compiled")
    for name, value in served_env.items():
        monkeypatch.setenv(name, value)
    assert ModelServerSettings().model_format.value == "compiled"
    # The compiler reads exactly what the spec says.
    for name in list(served_env):
        monkeypatch.delenv(name)
    for name, value in env_of(init).items():
        monkeypatch.setenv(name, value)
    compiler = CompileSettings()
    assert (compiler.model_uri, compiler.target.value, compiler.batch_sizes) == (
        "s3://models/mlp.onnx", "native", [1, 64])
    assert (compiler.output_uri, compiler.artifact_cache_uri) == (
        "file:///var/run/kubeinfer/compiled", "s3://cache/compiled")
    assert (compiler.tuning_budget_s, compiler.allow_quantization, compiler.threads) == (
        30.0, True, 1)


def test_the_compile_options_are_part_of_the_server_hash() -> None:
    def server_hash(doc: dict[str, Any]) -> str:
        return plan_endpoint(Endpoint.model_validate(doc)).variants[0].server_hash

    base = server_hash(endpoint())
    assert server_hash(endpoint()) == base
    changed = endpoint({"uri": "s3://models/mlp.onnx", "compile": {**COMPILE, "target":
                                                                   "x86-64-v3"}})
    assert server_hash(changed) != base
    assert server_hash(endpoint({"uri": "s3://models/mlp.onnx"})) != base
    # Threads of the model server are the compiler's too.
    threaded = endpoint(env=[{"name": "KUBEINFER_INTRA_OP_THREADS", "value": "2"}])
    init = deployment(threaded)["spec"]["template"]["spec"]["initContainers"][0]
    assert env_of(init)["KUBEINFER_THREADS"] == "2"
    assert init["resources"]["requests"]["cpu"] == "2"


def test_a_variant_without_compile_has_no_init_container() -> None:
    pod = deployment(endpoint({"uri": "s3://models/mlp.onnx"}))["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert all(v["name"] != "compiled" for v in pod["volumes"])


def test_kubernetes_refuses_a_relative_model_to_compile() -> None:
    plan = plan_endpoint(Endpoint.model_validate(endpoint(
        {"uri": "file://models/mlp.onnx", "compile": {
            "quantization": {"calibrationUri": "file://data/c.npz"}}})))
    assert variant_compile_problems(plan) == [
        "spec.variants[0].model.uri: 'file://models/mlp.onnx' is a relative path, which the "
        "compiler cannot resolve inside the pod; use s3://bucket/key or an absolute "
        "file:///path inside the runtime image",
        "spec.variants[0].model.compile.quantization.calibrationUri: 'file://data/c.npz' is a "
        "relative path, which the compiler cannot resolve inside the pod; use s3://bucket/key "
        "or an absolute file:///path inside the runtime image"]
    baked = plan_endpoint(Endpoint.model_validate(endpoint(
        {"uri": "file:///srv/kubeinfer/models/mlp.onnx", "compile": {}})))
    assert variant_compile_problems(baked) == []


# -- status: the init container's report ---------------------------------------------------


REPORT = CompileReport(ok=True, artifact_uri="s3://cache/compiled/k1/artifact.tar.gz",
                       artifact_dir_uri="file:///var/run/kubeinfer/compiled/artifact",
                       target="native", target_cpu="znver4",
                       chosen=CandidateName.ORT_FP32, backend="onnx", speedup=1.0,
                       max_abs_diff=0.0, artifact_cache_hit=True,
                       reason="no candidate was at least 1.05x faster")


def pod(name: str, server_hash: str, *, code: int | None, message: str = "",
        at: str = "2026-12-06T12:00:05Z") -> dict[str, Any]:
    state = ({"running": {}} if code is None else
             {"terminated": {"exitCode": code, "message": message, "finishedAt": at}})
    return {"metadata": {"name": name, "annotations": {meta.ANNOTATION_SERVER_HASH:
                                                       server_hash}},
            "status": {"phase": "Pending" if code is None else "Running",
                       "initContainerStatuses": [{"name": "compile", "state": state}]}}


def test_the_variants_status_says_what_its_pods_compiled() -> None:
    assert variant_compile_status([], "h1") is None
    assert variant_compile_status([pod("old", "h0", code=0)], "h1") is None
    compiling = variant_compile_status([pod("p1", "h1", code=None)], "h1")
    assert compiling is not None and compiling["phase"] == "Compiling"
    assert "in pod p1 (init container compile)" in compiling["message"]
    done = variant_compile_status([
        pod("p0", "h0", code=42, message='{"ok": false, "error": "old spec"}'),
        pod("p1", "h1", code=0, message=REPORT.model_dump_json()),
        pod("p2", "h1", code=None)], "h1")
    assert done == {
        "phase": "Compiled", "pod": "p1",
        "message": "onnxruntime fp32 kept on native (znver4): no candidate was at least 1.05x "
                   "faster",
        "chosen": "onnxruntime-fp32", "backend": "onnx",
        "artifactUri": "s3://cache/compiled/k1/artifact.tar.gz", "speedup": 1.0,
        "maxAbsDiff": 0.0, "cacheHit": True}
    failed = variant_compile_status([pod("p3", "h1", code=42, message=(
        '{"ok": false, "error": "Model s3://models/mlp.onnx not found: fix the URI"}'))], "h1")
    assert failed == {"phase": "Failed", "pod": "p3", "message": (
        "Compiling the model failed in pod p3: Model s3://models/mlp.onnx not found: fix the "
        "URI (kubectl logs p3 -c compile)")}


# -- local mode: compiled before the supervisor gets the endpoint ----------------------------


def test_local_mode_serves_the_artifact_in_place(tmp_path: Path) -> None:
    doc = endpoint({"uri": "file://models/mlp.onnx", "compile": {"batchSizes": [1, 8]}})
    item = LoadedEndpoint(Endpoint.model_validate(doc), doc, str(tmp_path))
    ((index, variant, step),) = to_compile(item)
    assert (index, variant) == (0, "primary")
    env = compiler_env(step, tmp_path / "r.json", tmp_path / "work", home=tmp_path / "home")
    assert env["KUBEINFER_MODEL_URI"] == f"file://{tmp_path}/models/mlp.onnx"
    assert env["KUBEINFER_ARTIFACT_CACHE_URI"] == f"file://{tmp_path}/home/compile-cache/artifacts"
    assert "KUBEINFER_OUTPUT_URI" not in env  # the cache entry is the artifact
    assert env["KUBEINFER_TUNING_CACHE_DIR"] == f"{tmp_path}/home/compile-cache/tuning"
    report = REPORT.model_copy(update={
        "artifact_dir_uri": f"file://{tmp_path}/home/compile-cache/artifacts/k1/artifact"})
    outcome = VariantOutcome("mlp", "primary", tmp_path / "log", report=report)
    assert outcome.served_uri == f"file://{tmp_path}/home/compile-cache/artifacts/k1/artifact"
    assert outcome.text().endswith(f"(from the artifact cache); serving {outcome.served_uri}")
    rewritten = served(item, {0: outcome})
    model = rewritten.endpoint.spec.variants[0].model
    assert model is not None and model.format.value == "compiled" and model.compile is None
    assert model.uri == outcome.served_uri
    assert doc["spec"]["variants"][0]["model"]["compile"]  # the original is untouched
    assert served(item, {}) is item
    # An artifact cache in the object store: the tarball is what is served.
    remote = VariantOutcome("mlp", "primary", tmp_path / "log",
                            report=REPORT.model_copy(update={
                                "artifact_dir_uri": "s3://cache/compiled/k1/artifact"}))
    assert remote.served_uri == "s3://cache/compiled/k1/artifact.tar.gz"


@pytest.mark.parametrize("where", ["none", "variant", "shadow", "both"])
def test_the_clis_compile_check_agrees_with_the_plan(where: str, tmp_path: Path) -> None:
    """``up`` imports the compile step only when ``LoadedEndpoint.compiles`` says a model
    compiles: it must say so exactly when the plan has a compile step."""
    compiled = {"uri": "file://models/mlp.onnx", "compile": {"batchSizes": [1, 8]}}
    plain = {"uri": "file://models/mlp.onnx"}
    doc = endpoint(compiled if where in ("variant", "both") else plain)
    doc["spec"]["shadowVariants"] = [{
        "name": "shadow", "samplingPercentage": 50,
        "model": compiled if where in ("shadow", "both") else plain}]
    item = LoadedEndpoint(Endpoint.model_validate(doc), doc, str(tmp_path))
    assert item.compiles is bool(to_compile(item)) is (where != "none")
