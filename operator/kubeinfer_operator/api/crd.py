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

from kubeinfer_operator.api import cel_rules
from kubeinfer_operator.api import compilation_job as cj
from kubeinfer_operator.api import edge_fleet as ef
from kubeinfer_operator.api import endpoint as ep
from kubeinfer_operator.api import recommendation_job as rj
from kubeinfer_operator.api import transform_job as tj

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
    for bound, keyword in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        # JSON Schema 2020-12 gives the bound itself; OpenAPI v3 (Draft 4) a flag beside it.
        if isinstance(schema.get(bound), int | float) and not isinstance(schema[bound], bool):
            schema[keyword] = schema.pop(bound)
            schema[bound] = True
    if "const" in schema:
        schema["enum"] = [schema.pop("const")]
    if "enum" in schema and "type" not in schema:
        schema["type"] = "string"
    if schema.get("type") == "string" and isinstance(schema.get("enum"), list) and (
        "maxLength" not in schema
    ):
        # Redundant for validation, but the API server sizes strings by maxLength (not by
        # enum) when it estimates what a CEL rule comparing them may cost.
        schema["maxLength"] = max(len(str(v)) for v in schema["enum"])
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


#: What ``kubectl explain <kind>`` says of the fields every object has.
_API_VERSION = ("APIVersion defines the versioned schema of this representation of an object "
                "(kubeinfer.io/v1alpha1). Servers should convert recognized schemas to the "
                "latest internal value, and may reject unrecognized values.")
_KIND = ("Kind is a string value representing the REST resource this object represents. "
         "Servers may infer this from the endpoint the client submits requests to. In "
         "CamelCase; cannot be updated.")
_METADATA = ("Standard object metadata: name, namespace, labels, annotations. The name "
             "becomes part of the names of the objects the operator creates.")

_NAME = ("Name of the object, unique in its namespace: a letter first, then lowercase letters, "
         "digits and '-', at most 40 characters (the operator adds suffixes to it).")


def _crd(*, plural: str, group: str, kind: str, singular: str, short_names: list[str],
         version: str, description: str, spec_schema: dict[str, Any],
         status_schema: dict[str, Any], columns: list[dict[str, Any]],
         rules: tuple[cel_rules.CelRule, ...]) -> dict[str, Any]:
    root: dict[str, Any] = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": _API_VERSION},
            "kind": {"type": "string", "description": _KIND},
            # Root metadata may declare name (and generateName) only; declaring it lets the
            # name rule's fieldPath (.metadata.name) point at it, and its maxLength (the API
            # server's own limit) bounds the cost of that rule's regex.
            "metadata": {"type": "object", "description": _METADATA,
                         "properties": {"name": {"type": "string", "maxLength": 253,
                                                 "description": _NAME}}},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    cel_rules.attach(root, rules)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": ["kubeinfer"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def endpoint_crd() -> dict[str, Any]:
    return _crd(
        plural=ep.PLURAL, group=ep.GROUP, kind=ep.KIND, singular=ep.SINGULAR,
        short_names=ep.SHORT_NAMES, version=ep.VERSION,
        description="An inference endpoint: SageMaker CreateEndpoint as a Kubernetes resource.",
        spec_schema=openapi_schema(ep.EndpointSpec),
        status_schema=openapi_schema(ep.EndpointStatus), rules=cel_rules.ENDPOINT_RULES,
        columns=[
            {"name": "Type", "type": "string", "jsonPath": ".spec.type"},
            {
                "name": "Ready",
                "type": "string",
                "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status",
            },
            {"name": "Variants", "type": "string", "jsonPath": ".status.readyVariants"},
            {"name": "URL", "type": "string", "jsonPath": ".status.url"},
            _AGE,
        ],
    )


#: The API server refuses any change of a TransformJob's spec (its Jobs cannot change).
IMMUTABLE_SPEC_MESSAGE = ("spec is immutable: a TransformJob runs the spec it was created with; "
                          "delete it and create a new one (outputs and done shards are kept)")


def transform_job_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(tj.TransformJobSpec)
    spec_schema["x-kubernetes-validations"] = [
        {"rule": "self == oldSelf", "message": IMMUTABLE_SPEC_MESSAGE},
    ]
    return _crd(
        plural=tj.PLURAL, group=tj.GROUP, kind=tj.KIND, singular=tj.SINGULAR,
        short_names=tj.SHORT_NAMES, version=tj.VERSION,
        description="A batch transform job: SageMaker CreateTransformJob as a Kubernetes "
                    "resource.",
        spec_schema=spec_schema, status_schema=openapi_schema(tj.TransformJobStatus),
        rules=cel_rules.TRANSFORM_JOB_RULES,
        columns=[
            {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
            {"name": "Records", "type": "integer", "jsonPath": ".status.records"},
            _AGE,
        ],
    )


#: The API server refuses any change of a CompilationJob's spec (its Job cannot change).
IMMUTABLE_COMPILE_SPEC_MESSAGE = ("spec is immutable: a CompilationJob runs the spec it was "
                                  "created with; delete it and create a new one (the tuning "
                                  "cache keeps what tuning found)")


def compilation_job_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(cj.CompilationJobSpec)
    spec_schema["x-kubernetes-validations"] = [
        {"rule": "self == oldSelf", "message": IMMUTABLE_COMPILE_SPEC_MESSAGE},
    ]
    return _crd(
        plural=cj.PLURAL, group=cj.GROUP, kind=cj.KIND, singular=cj.SINGULAR,
        short_names=cj.SHORT_NAMES, version=cj.VERSION,
        description="A model compilation job: SageMaker CreateCompilationJob (Neo) as a "
                    "Kubernetes resource.",
        spec_schema=spec_schema, status_schema=openapi_schema(cj.CompilationJobStatus),
        rules=cel_rules.COMPILATION_JOB_RULES,
        columns=[
            {"name": "Target", "type": "string", "jsonPath": ".spec.target"},
            {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Backend", "type": "string", "jsonPath": ".status.backend"},
            {"name": "Speedup", "type": "number", "jsonPath": ".status.speedup"},
            _AGE,
        ],
    )


#: The API server refuses any change of a RecommendationJob's spec (its candidates and Job
#: cannot change).
IMMUTABLE_RECOMMEND_SPEC_MESSAGE = ("spec is immutable: a RecommendationJob runs the spec it "
                                    "was created with; delete it and create a new one")


def recommendation_job_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(rj.RecommendationJobSpec)
    spec_schema["x-kubernetes-validations"] = [
        {"rule": "self == oldSelf", "message": IMMUTABLE_RECOMMEND_SPEC_MESSAGE},
    ]
    return _crd(
        plural=rj.PLURAL, group=rj.GROUP, kind=rj.KIND, singular=rj.SINGULAR,
        short_names=rj.SHORT_NAMES, version=rj.VERSION,
        description="An inference recommendation job: SageMaker Inference Recommender as a "
                    "Kubernetes resource.",
        spec_schema=spec_schema, status_schema=openapi_schema(rj.RecommendationJobStatus),
        rules=cel_rules.RECOMMENDATION_JOB_RULES,
        columns=[
            {"name": "Winner", "type": "string", "jsonPath": ".status.recommended"},
            {"name": "Throughput", "type": "number", "jsonPath": ".status.maxThroughput"},
            {"name": "Status", "type": "string", "jsonPath": ".status.phase"},
            _AGE,
        ],
    )


def edge_fleet_crd() -> dict[str, Any]:
    return _crd(
        plural=ef.PLURAL, group=ef.GROUP, kind=ef.KIND, singular=ef.SINGULAR,
        short_names=ef.SHORT_NAMES, version=ef.VERSION,
        description="A fleet of edge devices running one model: SageMaker Edge Manager "
                    "(device fleet, packaging, over-the-air rollout in waves, edge data "
                    "capture) as a Kubernetes resource.",
        spec_schema=openapi_schema(ef.EdgeFleetSpec),
        status_schema=openapi_schema(ef.EdgeFleetStatus), rules=cel_rules.EDGE_FLEET_RULES,
        columns=[
            {"name": "Version", "type": "string", "jsonPath": ".status.version"},
            {"name": "Devices", "type": "integer", "jsonPath": ".status.devices"},
            {"name": "Online", "type": "integer", "jsonPath": ".status.online"},
            {"name": "Wave", "type": "string", "jsonPath": ".status.wave"},
            {"name": "Status", "type": "string", "jsonPath": ".status.phase",
             "priority": 1},
            _AGE,
        ],
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD object, for every kind this operator serves."""
    return {f"{crd['metadata']['name']}.yaml": crd
            for crd in (endpoint_crd(), transform_job_crd(), compilation_job_crd(),
                        recommendation_job_crd(), edge_fleet_crd())}


def to_yaml(obj: dict[str, Any]) -> str:
    header = "# Generated by `kubeinfer crds` from kubeinfer_operator.api; do not edit.\n"
    return header + yaml.safe_dump(obj, sort_keys=False, width=100)
