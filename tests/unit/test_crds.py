"""The committed CRDs are exactly what the API models generate, and are structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

from kubeinfer_operator.api.crd import all_crds, to_yaml

REPO = Path(__file__).resolve().parents[2]


def test_committed_crds_match_generated() -> None:
    generated = all_crds()
    committed = {p.name for p in (REPO / "crds").glob("*.yaml")}
    assert committed == set(generated), "run `kubeinfer crds` to regenerate crds/"
    for name, crd in generated.items():
        assert (REPO / "crds" / name).read_text() == to_yaml(crd), (
            f"crds/{name} is stale: run `kubeinfer crds` and commit the result"
        )


def _walk(schema: Any, path: str = "") -> list[str]:
    """Constructs a Kubernetes structural schema must not contain."""
    bad: list[str] = []
    if isinstance(schema, dict):
        for key in ("$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"):
            if key in schema and not path.endswith("properties"):
                bad.append(f"{path}.{key}")
        if "properties" in schema and "additionalProperties" in schema:
            bad.append(f"{path}: properties and additionalProperties together")
        if "properties" in schema and schema.get("type") != "object":
            bad.append(f"{path}: properties without type: object")
        for k, v in schema.items():
            bad += _walk(v, f"{path}.{k}")
    elif isinstance(schema, list):
        for i, v in enumerate(schema):
            bad += _walk(v, f"{path}[{i}]")
    return bad


def test_crd_schemas_are_structural() -> None:
    for crd in all_crds().values():
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            assert _walk(schema) == []


def _spec_validator() -> jsonschema.Draft4Validator:
    crd = all_crds()["endpoints.kubeinfer.io.yaml"]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return jsonschema.Draft4Validator(schema)


def test_examples_pass_the_crd_schema() -> None:
    validator = _spec_validator()
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Endpoint":
                errors = [e.message for e in validator.iter_errors(doc)]
                assert errors == [], f"{path}: {errors}"


def test_crd_schema_refuses_structural_errors() -> None:
    validator = _spec_validator()
    doc = yaml.safe_load((REPO / "examples" / "realtime-endpoint.yaml").read_text())
    doc["spec"]["variants"][0]["weight"] = -1
    doc["spec"]["variants"][1]["model"]["uri"] = "http://x/m.onnx"
    messages = " ".join(e.message for e in validator.iter_errors(doc))
    assert "-1 is less than the minimum of 0" in messages
    assert "does not match '^(s3|file)://.+'" in messages


def test_printer_columns() -> None:
    crd = all_crds()["endpoints.kubeinfer.io.yaml"]
    names = [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert names[:2] == ["Type", "Ready"] and "URL" in names and "Age" in names


def _undescribed(schema: dict[str, Any], path: str) -> list[str]:
    """Properties below ``schema`` without a description (what `kubectl explain` shows)."""
    missing: list[str] = []
    for key, sub in schema.get("properties", {}).items():
        here = f"{path}.{key}".lstrip(".")
        if not sub.get("description"):
            missing.append(here)
        missing += _undescribed(sub, here)
    if isinstance(schema.get("items"), dict):
        missing += _undescribed(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        missing += _undescribed(schema["additionalProperties"], f"{path}.*")
    return missing


def test_every_field_has_a_description() -> None:
    for name, crd in all_crds().items():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["description"], name
        assert _undescribed(schema, "") == [], name


def test_keyed_lists_merge_by_their_key() -> None:
    """Server-side apply and `kubectl patch` merge these lists entry by entry."""
    keyed = {"endpoints.kubeinfer.io.yaml": [("spec", "variants", "name"),
                                             ("status", "variants", "name"),
                                             ("status", "conditions", "type")],
             "transformjobs.kubeinfer.io.yaml": [("status", "conditions", "type")],
             "compilationjobs.kubeinfer.io.yaml": [("status", "conditions", "type")],
             "recommendationjobs.kubeinfer.io.yaml": [("status", "conditions", "type")],
             "edgefleets.kubeinfer.io.yaml": [("spec", "targets", "name"),
                                              ("status", "conditions", "type")]}
    crds = all_crds()
    for name, lists in keyed.items():
        props = crds[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
        for part, field, key in lists:
            schema = props[part]["properties"][field]
            assert schema["x-kubernetes-list-type"] == "map", (name, part, field)
            assert schema["x-kubernetes-list-map-keys"] == [key], (name, part, field)
            # A map key must always be present: required in every item.
            assert key in schema["items"]["required"], (name, part, field)


def test_root_metadata_declares_only_the_name() -> None:
    for crd in all_crds().values():
        metadata = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][
            "metadata"]
        # The API server allows restrictions of metadata.name and generateName only.
        assert set(metadata.get("properties", {})) <= {"name", "generateName"}


def test_edge_fleet_printer_columns_and_short_name() -> None:
    crd = all_crds()["edgefleets.kubeinfer.io.yaml"]
    assert crd["spec"]["names"]["shortNames"] == ["kef"]
    columns = {c["name"]: c for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert [n for n, c in columns.items() if not c.get("priority")] == [
        "Version", "Devices", "Online", "Wave", "Age"]
    assert columns["Devices"]["jsonPath"] == ".status.devices"
    assert columns["Online"]["jsonPath"] == ".status.online"
    assert columns["Wave"]["jsonPath"] == ".status.wave"


def test_edge_fleet_example_passes_the_crd_schema() -> None:
    crd = all_crds()["edgefleets.kubeinfer.io.yaml"]
    validator = jsonschema.Draft4Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "edge-fleet.yaml").read_text())
            if d and d.get("kind") == "EdgeFleet"]
    assert docs
    for doc in docs:
        assert [e.message for e in validator.iter_errors(doc)] == []
    bad = dict(docs[0], spec={**docs[0]["spec"], "heartbeatIntervalSeconds": 0,
                              "targets": [{"name": "Bad_Name"}]})
    messages = " ".join(e.message for e in validator.iter_errors(bad))
    assert "less than the minimum of 1" in messages and "does not match" in messages
