"""Multi-model and multi-container variants on the operator side: API, plan, render, local.

One file for both features because they share the path through the operator:
the spec (``multiModel``, ``containers``, ``inferenceExecution``) is validated,
planned into the model server's ``KUBEINFER_*`` settings (read back here with
the runtime's own settings class, as the runtime does), and rendered.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error
from kubeinfer_operator.errors import SpecError
from kubeinfer_operator.local.manifest import parse_manifests
from kubeinfer_operator.render.k8s import Owner, render_endpoint
from kubeinfer_operator.render.plan import plan_endpoint
from kubeinfer_operator.settings import OperatorSettings
from kubeinfer_runtime.contract import InferenceExecution, ModelServerSettings
from tests.support.kube_schema import schema_errors

REPO = Path(__file__).resolve().parents[2]
OWNER = Owner(name="zoo", namespace="ml", uid="0b6c2a3e-1111-4222-8333-944455556666")


def _doc(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / name).read_text())
    return doc


def _problems(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        Endpoint.model_validate(doc)
    return format_validation_error(info.value)


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ModelServerSettings:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return ModelServerSettings()


def test_multi_model_plan_becomes_runtime_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _doc("multimodel-endpoint.yaml")
    plan = plan_endpoint(Endpoint.model_validate(doc), base_dir="/manifests")
    [variant] = plan.variants
    env = variant.server_env("zoo")
    assert "KUBEINFER_MODEL_URI" not in env
    settings = _settings(env, monkeypatch)
    assert settings.multi_model_prefix == "file:///manifests/models"
    assert (settings.cache_bytes, settings.disk_cache_bytes) == (268435456, 1073741824)
    assert variant.model_uri == "file:///manifests/models"  # what `kubeinfer status` shows
    bigger = copy.deepcopy(doc)
    bigger["spec"]["variants"][0]["multiModel"]["cacheBytes"] = 1 << 31
    other = plan_endpoint(Endpoint.model_validate(bigger), base_dir="/manifests").variants[0]
    assert other.server_hash != variant.server_hash  # a new budget rolls the servers


def test_serial_plan_becomes_a_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = plan_endpoint(Endpoint.model_validate(_doc("serial-pipeline.yaml")), base_dir="/m")
    [variant] = plan.variants
    settings = _settings(variant.server_env("iris-pipeline"), monkeypatch)
    assert settings.pipeline is not None
    assert settings.pipeline.execution is InferenceExecution.SERIAL
    steps = settings.pipeline.steps
    assert [(s.name, s.kind) for s in steps] == [
        ("pre", "handler"), ("iris", "model"), ("post", "handler")]
    assert steps[0].code_dir == "file:///m/handlers"
    assert steps[1].model_uri == "file:///m/models/iris.onnx"
    assert variant.model_uri == (
        "containers (Serial): pre (handler) → iris (model) → post (handler)")


def _with_image(execution: str = "Direct") -> dict[str, Any]:
    doc = _doc("serial-pipeline.yaml")
    variant = doc["spec"]["variants"][0]
    variant["inferenceExecution"] = execution
    variant["containers"].append({"name": "xgb", "image": "example.com/xgboost:1.7",
                                  "env": [{"name": "MODEL", "value": "m"}]})
    return doc


def test_image_steps_are_extra_containers_of_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _with_image()
    plan = plan_endpoint(Endpoint.model_validate(doc), generation=2)
    manifests = {(m["kind"], m["metadata"]["name"]): m
                 for m in render_endpoint(plan, OWNER, OperatorSettings())}
    deployment = manifests[("Deployment", "zoo-main")]
    assert schema_errors(deployment) == []
    runtime, step = deployment["spec"]["template"]["spec"]["containers"]
    assert step["name"] == "step-xgb" and step["image"] == "example.com/xgboost:1.7"
    assert step["ports"] == [{"name": "step-8084", "containerPort": 8084, "protocol": "TCP"}]
    assert {"name": "SAGEMAKER_BIND_TO_PORT", "value": "8084"} in step["env"]
    assert step["readinessProbe"]["httpGet"] == {"path": "/ping", "port": "step-8084"}
    env = {e["name"]: e["value"] for e in runtime["env"]}
    settings = _settings({k: v for k, v in env.items() if k != "KUBEINFER_PORT"}, monkeypatch)
    assert settings.pipeline is not None
    assert settings.pipeline.execution is InferenceExecution.DIRECT
    assert settings.pipeline.steps[3].url == "http://127.0.0.1:8084"


def test_local_mode_refuses_image_steps() -> None:
    text = yaml.safe_dump(_with_image())
    with pytest.raises(SpecError) as info:
        parse_manifests(text, source="p.yaml", base_dir="/m")
    assert "spec.variants[0].containers[3].image: image steps run only on Kubernetes" in str(
        info.value)
    assert "replace step 'xgb' with a model or handler step" in str(info.value)
    # Without the image step the same manifest is fine locally.
    [loaded] = parse_manifests(yaml.safe_dump(_doc("serial-pipeline.yaml")), source="p.yaml",
                               base_dir="/m")
    assert loaded.name == "iris-pipeline"


@pytest.mark.parametrize(("change", "expected"), [
    (lambda v: v.update(model={"uri": "s3://b/m.onnx"}),
     "sets model, multiModel of model, multiModel, containers; set exactly one"),
    (lambda v: v["multiModel"].update(prefix="http://x/"), "must start with s3:// or file://"),
    (lambda v: v["multiModel"].update(prefix="s3://b/../x/"), "contains '..'"),
    (lambda v: v["multiModel"].update(cacheBytes=0), "greater than or equal to 1"),
    (lambda v: v.update(inferenceExecution="Direct"), "inferenceExecution applies to "
                                                      "containers only"),
])
def test_multi_model_spec_errors(change: Any, expected: str) -> None:
    doc = _doc("multimodel-endpoint.yaml")
    change(doc["spec"]["variants"][0])
    assert expected in _problems(doc)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: c.append({"name": "x"}), "sets none of model, handler, image; set exactly one"),
    (lambda c: c.append({"name": "x", "handler": "m:f", "image": "i"}),
     "sets handler, image of model, handler, image"),
    (lambda c: c.append({"name": "pre", "handler": "m:f"}), "duplicate container name(s) pre"),
    (lambda c: c.append({"name": "x", "handler": "not a ref"}), "should match pattern"),
    (lambda c: c.append({"name": "x", "handler": "m:f", "port": 9000}),
     "port and env apply to image steps only"),
    (lambda c: c.append({"name": "x", "image": "i", "codeUri": "file:///c"}),
     "codeUri applies to handler steps only"),
    (lambda c: c.extend({"name": f"s{i}", "handler": "m:f"} for i in range(13)),
     "at most 15 items"),
    (lambda c: c.clear(), "at least 1 item"),
])
def test_container_spec_errors(change: Any, expected: str) -> None:
    doc = _doc("serial-pipeline.yaml")
    change(doc["spec"]["variants"][0]["containers"])
    assert expected in _problems(doc)


def test_semantic_validation_of_steps() -> None:
    from kubeinfer_operator.reconcile.validate import InvalidSpec, validate_endpoint

    doc = _with_image()
    containers = doc["spec"]["variants"][0]["containers"]
    containers[1]["model"]["uri"] = "s3://b/models/"
    containers.append({"name": "other", "image": "i", "port": 8084})
    with pytest.raises(InvalidSpec) as info:
        validate_endpoint("zoo", "ml", doc["spec"])
    problems = " ".join(info.value.problems)
    assert "spec.variants[0].containers[1].model.uri: model URI 's3://b/models/' names a " \
           "prefix" in problems
    assert "spec.variants[0].containers[4].port: 8084 is used by another image step" in problems
