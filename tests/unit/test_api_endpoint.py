"""The Endpoint API: valid manifests parse, invalid ones are refused naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubeinfer_operator.api.endpoint import Endpoint, format_validation_error

REPO = Path(__file__).resolve().parents[2]


def manifest(**spec_overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "apiVersion": "kubeinfer.io/v1alpha1",
        "kind": "Endpoint",
        "metadata": {"name": "iris"},
        "spec": {
            "type": "RealTime",
            "variants": [
                {"name": "a", "weight": 1, "model": {"uri": "s3://bucket/m.onnx"}},
                {"name": "b", "weight": 0, "model": {"uri": "file:///models/m.onnx"}},
            ],
        },
    }
    doc["spec"].update(spec_overrides)
    return doc


def errors_of(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as exc:
        Endpoint.model_validate(doc)
    return format_validation_error(exc.value)


def test_example_manifests_parse() -> None:
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Endpoint":
                ep = Endpoint.model_validate(doc)
                assert ep.spec.variants, path


def test_defaults_fill_in() -> None:
    doc = manifest()
    del doc["spec"]["type"]
    del doc["spec"]["variants"][0]["weight"]
    ep = Endpoint.model_validate(doc)
    assert ep.spec.type == "RealTime"
    v = ep.spec.variants[0]
    assert (v.weight, v.replicas, v.model.format) == (1.0, 1, "onnx")


def test_unknown_field_is_named() -> None:
    doc = manifest()
    doc["spec"]["variants"][0]["wieght"] = 2
    msg = errors_of(doc)
    assert "spec.variants[0].wieght: unknown field" in msg


def test_negative_weight_is_named() -> None:
    doc = manifest()
    doc["spec"]["variants"][1]["weight"] = -1
    assert "spec.variants[1].weight" in errors_of(doc)


def test_all_zero_weights_refused() -> None:
    doc = manifest()
    for v in doc["spec"]["variants"]:
        v["weight"] = 0
    msg = errors_of(doc)
    assert "all weights are 0" in msg and "spec.variants" in msg


def test_duplicate_variant_names_refused() -> None:
    doc = manifest()
    doc["spec"]["variants"][1]["name"] = "a"
    msg = errors_of(doc)
    assert "duplicate variant name(s) a" in msg


@pytest.mark.parametrize(
    ("uri", "hint"),
    [
        ("http://example.com/m.onnx", "unsupported scheme 'http'"),
        ("models/m.onnx", "unsupported scheme '(none)'"),
        ("s3://bucket-only", "s3://bucket/path/to/model.onnx"),
        ("s3:///key-without-bucket", "s3://bucket/path/to/model.onnx"),
        ("file://", "names no file"),
    ],
)
def test_bad_model_uris_refused(uri: str, hint: str) -> None:
    doc = manifest()
    doc["spec"]["variants"][0]["model"]["uri"] = uri
    msg = errors_of(doc)
    assert msg.startswith("spec.variants[0].model.uri: "), msg
    assert hint in msg


@pytest.mark.parametrize("name", ["Primary", "a_b", "-a", "x" * 41, ""])
def test_bad_variant_names_refused(name: str) -> None:
    doc = manifest()
    doc["spec"]["variants"][0]["name"] = name
    assert "spec.variants[0].name" in errors_of(doc)


def test_no_variants_refused() -> None:
    assert "spec.variants" in errors_of(manifest(variants=[]))


def test_unknown_type_refused() -> None:
    assert "spec.type" in errors_of(manifest(type="Realtime"))


def test_bad_resource_quantity_refused() -> None:
    doc = copy.deepcopy(manifest())
    doc["spec"]["variants"][0]["resources"] = {"requests": {"cpu": "lots"}}
    assert "spec.variants[0].resources.requests.cpu" in errors_of(doc)
