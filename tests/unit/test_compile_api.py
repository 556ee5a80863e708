"""The CompilationJob API: defaults, refusals that name the field and the fix, the CRD."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from kubeinfer_operator.api.compilation_job import CompilationJob
from kubeinfer_operator.api.crd import IMMUTABLE_COMPILE_SPEC_MESSAGE, all_crds
from kubeinfer_operator.api.endpoint import format_validation_error
from kubeinfer_operator.reconcile.compile_validate import (
    InvalidCompilationJob,
    validate_compilation_job,
)
from kubeinfer_runtime.contract.compile import CompileTarget

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: CompilationJob" in p.read_text())
CRD = all_crds()["compilationjobs.kubeinfer.io.yaml"]
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/mlp.onnx"}, "target": "native",
                            "output": {"uri": "s3://compiled/mlp/"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "CompilationJob",
            "metadata": {"name": "mlp"}, "spec": base}


def errors_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        CompilationJob.model_validate(doc)
    return format_validation_error(exc.value)


def test_the_example_parses() -> None:
    assert [p.name for p in EXAMPLES] == ["compile-job.yaml"]
    parsed = CompilationJob.model_validate(yaml.safe_load(EXAMPLES[0].read_text()))
    assert parsed.spec.target is CompileTarget.NATIVE
    assert parsed.spec.quantization.allowed and parsed.spec.batchSizes == [1, 64]


def test_defaults() -> None:
    spec = CompilationJob.model_validate(job()).spec
    assert (spec.tuning.budgetSeconds, spec.tuning.trials, spec.tuning.cacheUri) == (
        0.0, None, None)
    assert (spec.quantization.allowed, spec.quantization.calibrationUri,
            spec.quantization.minTop1Agreement) == (False, None, 0.99)
    assert (spec.batchSizes, spec.threads, spec.backoffLimit) == (None, 1, 2)
    assert spec.stoppingCondition is None and spec.ttlSecondsAfterFinished is None
    # No stoppingCondition: an hour, plus twice the tuning budget per batch size.
    assert spec.max_runtime_s == 3600
    tuned = CompilationJob.model_validate(job(tuning={"budgetSeconds": 300},
                                              batchSizes=[1, 64])).spec
    assert tuned.max_runtime_s == 3600 + 2 * 300 * 2
    capped = CompilationJob.model_validate(job(stoppingCondition={
        "maxRuntimeInSeconds": 600})).spec
    assert capped.max_runtime_s == 600


@pytest.mark.parametrize(("spec", "expected"), [
    ({"target": "pentium"}, "spec.target: Input should be 'native', 'x86-64'"),
    ({"target": None}, "spec.target: Input should be 'native'"),
    ({"model": {"uri": "http://x/m.onnx"}}, "spec.model.uri: model URI 'http://x/m.onnx' has "
     "unsupported scheme 'http'"),
    ({"model": {"uri": "s3://bucket"}}, "spec.model.uri: model URI 's3://bucket' must look like "
     "s3://bucket/path/to/model.onnx"),
    ({"output": {"uri": "ftp://x/out"}}, "spec.output.uri: output.uri: 'ftp://x/out' has "
     "unsupported scheme 'ftp'; use s3://bucket/prefix or file:///dir"),
    ({"batchSizes": []}, "spec.batchSizes: List should have at least 1 item"),
    ({"batchSizes": [1, 0]}, "spec.batchSizes[1]: Input should be greater than or equal to 1"),
    ({"batchSizes": [1, 64, 1]}, "spec.batchSizes: [1, 64, 1] repeats a size; list each once"),
    ({"batchSizes": list(range(1, 10))}, "spec.batchSizes: List should have at most 8 items"),
    ({"tuning": {"budgetSeconds": -1}}, "spec.tuning.budgetSeconds: Input should be greater "
     "than or equal to 0"),
    ({"tuning": {"trials": 0}}, "spec.tuning.trials: Input should be greater than or equal "
     "to 1"),
    ({"tuning": {"cacheUri": "http://cache"}}, "spec.tuning.cacheUri: tuning.cacheUri: "
     "'http://cache' has unsupported scheme 'http'"),
    ({"quantization": {"minTop1Agreement": 1.5}}, "spec.quantization.minTop1Agreement: Input "
     "should be less than or equal to 1"),
    ({"quantization": {"calibrationUri": "s3://data"}}, "spec.quantization.calibrationUri: "
     "quantization.calibrationUri: 's3://data' must look like s3://bucket/key"),
    ({"quantization": {"allow": True}}, "spec.quantization.allow: unknown field"),
    ({"stoppingCondition": {"maxRuntimeInSeconds": 5}}, "spec.stoppingCondition."
     "maxRuntimeInSeconds: Input should be greater than or equal to 60"),
    ({"threads": 0}, "spec.threads: Input should be greater than or equal to 1"),
    ({"backoffLimit": 11}, "spec.backoffLimit: Input should be less than or equal to 10"),
    ({"environment": {"1BAD": "x"}}, "'1BAD' not valid environment variable name"),
    ({"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits.memory: String "
     "should match pattern"),
    ({"targets": ["native"]}, "spec.targets: unknown field"),
], ids=lambda v: str(v)[:40])
def test_refusals_name_the_field_and_the_fix(spec: dict[str, Any], expected: str) -> None:
    assert expected in errors_of(job(**spec))


def test_model_and_target_are_required() -> None:
    doc = job()
    del doc["spec"]["model"], doc["spec"]["target"]
    text = errors_of(doc)
    assert "spec.model: Field required" in text and "spec.target: Field required" in text


def test_what_sagemaker_accepts_is_accepted() -> None:
    for spec in (
        {"target": "aarch64", "output": {"uri": "s3://compiled/arm/"}},
        {"target": "x86-64-v3", "batchSizes": [1, 8, 64], "threads": 2,
         "tuning": {"budgetSeconds": 120, "trials": 64,
                    "cacheUri": "s3://compiled/tuning-cache"}},
        {"quantization": {"allowed": True, "calibrationUri": "s3://data/calib.npz",
                          "minTop1Agreement": 0.98}},
        {"resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "6Gi"}},
         "environment": {"OMP_NUM_THREADS": "2"}, "ttlSecondsAfterFinished": 0,
         "stoppingCondition": {"maxRuntimeInSeconds": 900}, "backoffLimit": 0},
    ):
        CompilationJob.model_validate(job(**spec))


def test_kubernetes_refuses_file_outputs_and_relative_paths_local_mode_does_not() -> None:
    local = job(model={"uri": "file://models/mlp.onnx"},
                output={"uri": "file:///tmp/compiled/"},
                quantization={"allowed": True, "calibrationUri": "file://data/calib.npz"})
    with pytest.raises(InvalidCompilationJob) as exc:
        validate_compilation_job("mlp", "ml", local["spec"])
    message = str(exc.value)
    assert message.startswith("CompilationJob ml/mlp is invalid: spec.output.uri: "
                              "'file:///tmp/compiled/' is a path inside the compiler's pod")
    assert "use s3://bucket/prefix (kubeinfer up -f runs file:// jobs locally)" in message
    assert "spec.model.uri: 'file://models/mlp.onnx' is a relative path" in message
    assert "spec.quantization.calibrationUri: 'file://data/calib.npz' is a relative" in message
    validate_compilation_job("mlp", None, local["spec"], on_kubernetes=False)
    # An absolute path inside the runtime image is fine on Kubernetes (baked models).
    baked = job(model={"uri": "file:///srv/kubeinfer/models/mlp.onnx"})
    validate_compilation_job("mlp", "ml", baked["spec"])


def test_names_quantities_and_traversal_are_checked() -> None:
    with pytest.raises(InvalidCompilationJob) as exc:
        validate_compilation_job("9-" + "x" * 40, "ml", job(
            resources={"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
            model={"uri": "s3://models/../secret.onnx"})["spec"])
    problems = exc.value.problems
    assert any(p.startswith("metadata.name: '9-xxx") for p in problems)
    assert any("spec.resources.limits.memory: 1Gi is below the request 2Gi" in p
               for p in problems)
    assert any("spec.model.uri: model URI 's3://models/../secret.onnx' contains '..'" in p
               for p in problems)


# -- the CRD ---------------------------------------------------------------------------------


def test_crd_has_status_printer_columns_and_short_name() -> None:
    version = CRD["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Target", "Status", "Backend", "Speedup", "Age"]
    assert columns["Target"]["jsonPath"] == ".spec.target"
    assert columns["Speedup"] == {"name": "Speedup", "type": "number",
                                  "jsonPath": ".status.speedup"}
    assert CRD["spec"]["names"]["shortNames"] == ["kcj"]
    assert CRD["spec"]["names"]["categories"] == ["kubeinfer"]
    status = SCHEMA["properties"]["status"]["properties"]
    assert {"phase", "conditions", "observedGeneration", "artifactUri", "sha256", "backend",
            "chosen", "speedup", "maxAbsDiff", "top1Agreement", "verification", "reason",
            "candidates", "startTime", "completionTime"} <= set(status)
    assert SCHEMA["properties"]["spec"]["properties"]["target"]["enum"] == [
        t.value for t in CompileTarget]


def test_crd_makes_the_spec_immutable_with_cel() -> None:
    rules = SCHEMA["properties"]["spec"]["x-kubernetes-validations"]
    # (the spec's other rules are api.cel_rules', run by tests/unit/test_cel_rules.py)
    assert rules[0] == {"rule": "self == oldSelf", "message": IMMUTABLE_COMPILE_SPEC_MESSAGE}
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")
    env = celpy.Environment()
    immutable = env.program(env.compile("self == oldSelf"))
    spec = celpy.json_to_cel(job()["spec"])
    changed = celpy.json_to_cel(job(target="aarch64")["spec"])
    assert bool(immutable.evaluate({"self": spec, "oldSelf": spec}))
    assert not bool(immutable.evaluate({"self": changed, "oldSelf": spec}))


def test_example_and_refusals_against_the_crd_schema() -> None:
    validator = jsonschema.Draft4Validator(SCHEMA)
    for path in EXAMPLES:
        doc = yaml.safe_load(path.read_text())
        assert [e.message for e in validator.iter_errors(doc)] == [], path
    bad = copy.deepcopy(job(target="pentium", batchSizes=[0], model={"uri": "http://m"},
                            tuning={"budgetSeconds": -1},
                            quantization={"minTop1Agreement": 0}))
    messages = " ".join(e.message for e in validator.iter_errors(bad))
    assert "'pentium' is not one of" in messages
    assert "0 is less than the minimum of 1" in messages
    assert "does not match '^(s3|file)://.+'" in messages
    assert "-1 is less than the minimum of 0" in messages
    # gt=0 becomes OpenAPI's minimum + exclusiveMinimum: true, as the API server reads it.
    assert "0 is less than or equal to the minimum of 0" in messages
