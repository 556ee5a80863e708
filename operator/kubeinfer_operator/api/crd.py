"""Generate CustomResourceDefinitions from the pydantic API models.

Kubernetes needs a *structural* OpenAPI v3 schema: no ``$ref``, no ``anyOf``
with null, no ``const``, no ``title``. Pydantic emits JSON Schema 2020-12, so
this module rewrites it. The output is committed under ``crds/`` and a test
fails when the committed files drift from what this module generates.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from kubeinfer_operator.api import endpoint as ep

_DROP_KEYS = {"title"}


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    if isinstance(schema, list):
        return [_inline(s, defs) for s in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = schema["$ref"].rsplit("/", 1)[-1]
        merged = copy.deepcopy(defs[target])
        # Sibling keywords next to $ref (description, default) win over the target's.
        merged.update({k: v for k, v in schema.items() if k != "$ref"})
        return _inline(merged, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP_KEYS or key == "$defs":
            continue
        out[key] = _inline(value, defs)
    return out


def _structural(schema: Any) -> Any:
    """Rewrite JSON-Schema constructs Kubernetes does not accept."""
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _structural(v) for k, v in schema.items()}
    any_of = schema.get("anyOf")
    if isinstance(any_of, list):
        non_null = [s for s in any_of if s.get("type") != "null"]
        if len(non_null) == 1 and len(non_null) < len(any_of):
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            merged = {**non_null[0], **rest, "nullable": True}
            if merged.get("default", ...) is None:
                del merged["default"]
            return merged
    if "properties" in schema and schema.get("additionalProperties") is False:
        # Kubernetes forbids additionalProperties next to properties; unknown
        # fields are refused by the API server's strict field validation instead
        # (kubectl's default) and pruned otherwise.
        del schema["additionalProperties"]
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    if "enum" in schema and "type" not in schema:
        schema["type"] = "string"
    if schema.get("type") == "object" and "properties" not in schema and (
        "additionalProperties" not in schema
    ):
        schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(mode="validation")
    defs = raw.pop("$defs", {})
    result: dict[str, Any] = _structural(_inline(raw, defs))
    return result


def endpoint_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(ep.EndpointSpec)
    spec_schema["x-kubernetes-validations"] = [
        {
            "rule": "self.variants.exists(v, v.weight > 0.0)",
            "message": "spec.variants[*].weight: all weights are 0; give at least one "
            "variant a weight above 0",
        }
    ]
    status_schema = openapi_schema(ep.EndpointStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{ep.PLURAL}.{ep.GROUP}"},
        "spec": {
            "group": ep.GROUP,
            "names": {
                "kind": ep.KIND,
                "listKind": f"{ep.KIND}List",
                "plural": ep.PLURAL,
                "singular": ep.SINGULAR,
                "shortNames": ep.SHORT_NAMES,
                "categories": ["kubeinfer"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": ep.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
                        {
                            "name": "Ready",
                            "type": "string",
                            "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status",
                        },
                        {"name": "Variants", "type": "string",
                         "jsonPath": ".status.readyVariants"},
                        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
                        {"name": "Age", "type": "date",
                         "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An inference endpoint: SageMaker CreateEndpoint "
                            "as a Kubernetes resource.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD object, for every kind this operator serves."""
    crd = endpoint_crd()
    return {f"{crd['metadata']['name']}.yaml": crd}


def to_yaml(obj: dict[str, Any]) -> str:
    header = "# Generated by `kubeinfer crds` from kubeinfer_operator.api; do not edit.\n"
    return header + yaml.safe_dump(obj, sort_keys=False, width=100)
