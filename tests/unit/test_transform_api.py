"""The TransformJob API: defaults, SageMaker's rules, messages that name the field, the CRD."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from kubeinfer_operator.api.crd import IMMUTABLE_SPEC_MESSAGE, all_crds
from kubeinfer_operator.api.endpoint import format_validation_error
from kubeinfer_operator.api.transform_job import TransformJob
from kubeinfer_operator.reconcile.transform_validate import (
    InvalidTransformJob,
    validate_transform_job,
)
from kubeinfer_runtime.contract.batch import BatchSettings

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml")
                  if "kind: TransformJob" in p.read_text())
CRD = all_crds()["transformjobs.kubeinfer.io.yaml"]
SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"model": {"uri": "s3://models/iris.onnx"},
                            "input": {"uri": "s3://data/in/"},
                            "output": {"uri": "s3://data/out/"}}
    base.update(spec)
    return {"apiVersion": "kubeinfer.io/v1alpha1", "kind": "TransformJob",
            "metadata": {"name": "score"}, "spec": base}


def errors_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        TransformJob.model_validate(doc)
    return format_validation_error(exc.value)


def test_there_are_transform_examples_and_they_parse() -> None:
    assert [p.name for p in EXAMPLES] == ["transform-job.yaml", "transform-jsonl.yaml"]
    for path in EXAMPLES:
        parsed = TransformJob.model_validate(yaml.safe_load(path.read_text()))
        assert parsed.spec.model is not None


def test_defaults_are_sagemakers() -> None:
    spec = TransformJob.model_validate(job()).spec
    # Unset: an image model's /execution-parameters decides, else SageMaker's defaults.
    assert (spec.batchStrategy, spec.maxPayloadInMB, spec.maxConcurrentTransforms) == (
        None, None, None)
    unset = BatchSettings(model_uri="file:///m.onnx")
    assert (unset.effective_batch_strategy, unset.effective_max_payload_bytes,
            unset.effective_max_concurrent_transforms) == ("MultiRecord", 6 * 1024 * 1024, 1)
    assert spec.batchAcrossObjects is True
    assert (spec.input.splitType, spec.input.compressionType, spec.input.dataType) == (
        "None", "None", "S3Prefix")
    assert spec.output.assembleWith == "None"
    assert (spec.dataProcessing.inputFilter, spec.dataProcessing.joinSource,
            spec.dataProcessing.outputFilter) == ("$", "None", "$")
    assert (spec.modelClientConfig.invocationsTimeoutInSeconds,
            spec.modelClientConfig.invocationsMaxRetries) == (600, 3)
    assert (spec.resources.instanceCount, spec.errorPolicy.maxFailedRecords) == (1, 0)
    assert spec.ttlSecondsAfterFinished is None and spec.activeDeadlineSeconds is None


@pytest.mark.parametrize(("spec", "expected"), [
    ({"containers": [{"name": "a", "model": {"uri": "s3://m/a.onnx"}}]},
     "spec.model, spec.containers, spec.endpointRef: set exactly one (this spec sets model, "
     "containers)"),
    ({"model": None}, "set exactly one (this spec sets none)"),
    ({"maxPayloadInMB": 101}, "maxPayloadInMB: Input should be less than or equal to 100"),
    ({"modelClientConfig": {"invocationsMaxRetries": 4}},
     "modelClientConfig.invocationsMaxRetries: Input should be less than or equal to 3"),
    ({"modelClientConfig": {"invocationsTimeoutInSeconds": 3601}},
     "invocationsTimeoutInSeconds: Input should be less than or equal to 3600"),
    ({"input": {"uri": "http://x/in/"}}, "input.uri: 'http://x/in/' has unsupported scheme"),
    ({"input": {"uri": "s3://data/in/", "splitType": "Lines"}}, "input.splitType: Input should "
     "be 'None', 'Line', 'RecordIO' or 'TFRecord'"),
    ({"output": {"uri": "s3://data/in/out/"}},
     "spec.output.uri: 's3://data/in/out/' is inside the input 's3://data/in/', so outputs "
     "would be read as input by a later run; write outputs under another prefix"),
    ({"output": {"uri": "s3://data/in"}}, "is inside the input"),
    ({"dataProcessing": {"joinSource": "Input"}},
     "spec.input.contentType: (unset) cannot be filtered or joined; dataProcessing needs one "
     "of text/csv"),
    ({"input": {"uri": "s3://data/in/", "contentType": "application/x-recordio"},
      "dataProcessing": {"inputFilter": "$[0]"}}, "application/x-recordio cannot be filtered"),
    ({"dataProcessing": {"inputFilter": "features"}}, "inputFilter: String should match "
     "pattern '^\\$'"),
    ({"input": {"uri": "s3://data/in/", "splitType": "Line"}, "maxPayloadInMB": 0},
     "spec.maxPayloadInMB: 0 sends each object whole, which splitType Line contradicts"),
    ({"environment": {"1BAD": "x"}}, "'1BAD' not valid environment variable name"),
    ({"environment": {f"V{i}": "x" for i in range(17)}}, "at most 16 items"),
    ({"backoffLimitPerIndex": 11}, "backoffLimitPerIndex: Input should be less than or equal"),
    ({"resources": {"instanceCount": 0}}, "resources.instanceCount: Input should be greater"),
    ({"endpointRef": {"name": "Iris"}, "model": None}, "endpointRef.name: String should match"),
    ({"inputs": {}}, "spec.inputs: unknown field"),
], ids=lambda v: str(v)[:40])
def test_refusals_name_the_field_and_the_fix(spec: dict[str, Any], expected: str) -> None:
    assert expected in errors_of(job(**spec))


def test_what_sagemaker_accepts_is_accepted() -> None:
    ok = [
        # SplitType None with MultiRecord: one record per object, batched as SageMaker does.
        {"input": {"uri": "s3://data/in/", "splitType": "None"}, "batchStrategy": "MultiRecord"},
        {"input": {"uri": "s3://data/in/", "contentType": "application/jsonlines",
                   "splitType": "Line", "compressionType": "Gzip"},
         "dataProcessing": {"inputFilter": "$.features", "joinSource": "Input",
                            "outputFilter": "$['id','SageMakerOutput']"}},
        {"input": {"uri": "s3://data/in/", "contentType": "text/csv; charset=utf-8"},
         "dataProcessing": {"inputFilter": "$[1:]", "joinSource": "Input"}},
        {"input": {"uri": "s3://data/in.manifest", "dataType": "ManifestFile"},
         "output": {"uri": "s3://data/in.manifest-out/"}},
        # Siblings, not nested: in/ and in-out/ are different prefixes.
        {"output": {"uri": "s3://data/in-out/"}},
        {"maxPayloadInMB": 0},
        {"model": None, "endpointRef": {"name": "iris"}},
        {"model": None, "containers": [{"name": "img", "image": "example.test/m:1"}]},
        {"ttlSecondsAfterFinished": 0, "activeDeadlineSeconds": 60},
    ]
    for spec in ok:
        TransformJob.model_validate(job(**spec))


def test_kubernetes_refuses_file_data_and_local_mode_refuses_images() -> None:
    local = job(input={"uri": "file:///data/in/"}, output={"uri": "file:///data/out/"})
    with pytest.raises(InvalidTransformJob) as exc:
        validate_transform_job("score", "ml", local["spec"])
    message = str(exc.value)
    assert message.startswith("TransformJob ml/score is invalid: spec.input.uri: "
                              "'file:///data/in/' is a path inside one pod")
    assert "spec.output.uri" in message
    validate_transform_job("score", None, local["spec"], on_kubernetes=False)

    image = job(model=None, containers=[{"name": "img", "image": "example.test/m:1"}])
    validate_transform_job("score", "ml", image["spec"])
    with pytest.raises(InvalidTransformJob) as exc:
        validate_transform_job("score", None, image["spec"], on_kubernetes=False)
    assert "spec.containers[0].image: image steps run only on Kubernetes" in str(exc.value)


def test_names_quantities_and_ports_are_checked() -> None:
    with pytest.raises(InvalidTransformJob) as exc:
        validate_transform_job("9-" + "x" * 40, "ml", job(
            resources={"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
            model=None, containers=[{"name": "a", "image": "i:1", "port": 9000},
                                    {"name": "b", "image": "i:2", "port": 9000}])["spec"])
    problems = exc.value.problems
    assert any(p.startswith("metadata.name: '9-xxx") for p in problems)
    assert any("spec.resources.limits.memory: 1Gi is below the request 2Gi" in p
               for p in problems)
    assert any("spec.containers[1].port: 9000 is used by another image step" in p
               for p in problems)


# -- the CRD ---------------------------------------------------------------------------------


def test_crd_has_status_printer_columns_and_short_name() -> None:
    version = CRD["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Status", "Progress", "Records", "Age"]
    assert CRD["spec"]["names"]["shortNames"] == ["ktj"]
    status = SCHEMA["properties"]["status"]["properties"]
    assert {"phase", "progress", "records", "conditions", "shards", "shardsDone",
            "recordsPerSecond", "startTime", "completionTime"} <= set(status)


def test_crd_makes_the_spec_immutable_with_cel() -> None:
    rules = SCHEMA["properties"]["spec"]["x-kubernetes-validations"]
    assert {"rule": "self == oldSelf", "message": IMMUTABLE_SPEC_MESSAGE} in rules


def test_cel_rules_mean_what_they_say() -> None:
    celpy = pytest.importorskip("celpy", reason="cel-python evaluates the CRD's CEL rules")
    env = celpy.Environment()
    rules = {r["rule"]: env.program(env.compile(r["rule"]))
             for r in SCHEMA["properties"]["spec"]["x-kubernetes-validations"]}
    one = rules[next(r for r in rules if "filter" in r)]
    spec = celpy.json_to_cel(job()["spec"])
    assert bool(one.evaluate({"self": spec}))
    both = celpy.json_to_cel(job(endpointRef={"name": "x"})["spec"])
    assert not bool(one.evaluate({"self": both}))
    immutable = rules["self == oldSelf"]
    changed = celpy.json_to_cel(job(maxConcurrentTransforms=8)["spec"])
    assert bool(immutable.evaluate({"self": spec, "oldSelf": spec}))
    assert not bool(immutable.evaluate({"self": changed, "oldSelf": spec}))


def test_examples_and_refusals_against_the_crd_schema() -> None:
    validator = jsonschema.Draft4Validator(SCHEMA)
    for path in EXAMPLES:
        doc = yaml.safe_load(path.read_text())
        assert [e.message for e in validator.iter_errors(doc)] == [], path
    bad = copy.deepcopy(job(maxPayloadInMB=200, input={"uri": "ftp://x", "splitType": "Lines"}))
    messages = " ".join(e.message for e in validator.iter_errors(bad))
    assert "200 is greater than the maximum of 100" in messages
    assert "'Lines' is not one of" in messages
    assert "does not match" in messages
