"""Pydantic models of the ``Endpoint`` custom resource (kubeinfer.io/v1alpha1).

These models are the single source of truth for the resource: the CRD in
``crds/`` is generated from them (``kubeinfer crds``), local mode validates
manifests with them, and the operator parses objects with them. Field
descriptions become the CRD's documentation (``kubectl explain``), so they are
written for users.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

GROUP = "kubeinfer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Endpoint"
PLURAL = "endpoints"
SINGULAR = "endpoint"
SHORT_NAMES = ["kie"]

#: RFC 1123 label: variant names become part of Deployment/Service names.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


class _Spec(BaseModel):
    """Base of every spec model: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class EndpointType(StrEnum):
    REAL_TIME = "RealTime"


class ModelFormat(StrEnum):
    ONNX = "onnx"


class ModelSource(_Spec):
    """Where a variant's model comes from and what format it is in."""

    uri: Annotated[
        str,
        Field(
            description=(
                "Model location: s3://bucket/key, or file:///absolute/path (a path inside "
                "the pod on Kubernetes). In local mode file://relative/path is resolved "
                "against the manifest's directory."
            ),
            min_length=1,
            # In the CRD only: the API server refuses other schemes outright;
            # pydantic's validator below gives the friendlier message.
            json_schema_extra={"pattern": "^(s3|file)://.+"},
        ),
    ]
    format: Annotated[ModelFormat, Field(description="Model format.")] = ModelFormat.ONNX

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = model_uri_problem(uri)
        if problem:
            raise ValueError(problem)
        return uri


def model_uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not a model URI we can read, or None when it is fine."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc or not parsed.path.strip("/"):
            return f"model URI {uri!r} must look like s3://bucket/path/to/model.onnx"
        return None
    if parsed.scheme == "file":
        if not (parsed.netloc + parsed.path).strip("/"):
            return f"model URI {uri!r} names no file: use file:///absolute/path/model.onnx"
        return None
    return (
        f"model URI {uri!r} has unsupported scheme {parsed.scheme or '(none)'!r}: "
        "use s3://bucket/key or file:///path"
    )


class ResourceRequirements(_Spec):
    """Compute resources of one model-server replica (Kubernetes quantities)."""

    requests: dict[str, Annotated[str, Field(pattern=_QUANTITY)]] = Field(
        default_factory=dict, description="Minimum resources, e.g. {cpu: 500m, memory: 512Mi}."
    )
    limits: dict[str, Annotated[str, Field(pattern=_QUANTITY)]] = Field(
        default_factory=dict, description="Maximum resources, e.g. {memory: 1Gi}."
    )


class EnvVar(_Spec):
    name: Annotated[str, Field(pattern=_ENV_NAME, min_length=1)]
    value: str = ""


class InferenceExecution(StrEnum):
    SERIAL = "Serial"
    DIRECT = "Direct"


#: ``module:function`` (dotted names allowed on both sides).
_HANDLER = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"


class MultiModelConfig(_Spec):
    """A multi-model variant: many models under one prefix, loaded on demand into an LRU cache."""

    prefix: Annotated[
        str,
        Field(
            description=(
                "Where the models live: s3://bucket/models/ or file:///models/. Requests "
                "name a model relative to it with the X-Amzn-SageMaker-Target-Model header "
                "(boto3 TargetModel=), e.g. tenant-42/model.onnx."
            ),
            min_length=1,
            json_schema_extra={"pattern": "^(s3|file)://.+"},
        ),
    ]
    cacheBytes: Annotated[
        int,
        Field(description="Memory budget for loaded models per replica, in bytes (measured "
                          "model size). Least recently used models are unloaded to make room.",
              ge=1),
    ] = 1 << 30
    diskCacheBytes: Annotated[
        int,
        Field(description="Local disk budget for downloaded model files per replica, in bytes.",
              ge=1),
    ] = 4 << 30

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, prefix: str) -> str:
        parsed = urlparse(prefix)
        if parsed.scheme not in ("s3", "file"):
            raise ValueError(f"multi-model prefix {prefix!r} must start with s3:// or file://")
        if parsed.scheme == "s3" and not parsed.netloc:
            raise ValueError(f"multi-model prefix {prefix!r} must look like s3://bucket/models/")
        if ".." in (parsed.netloc + parsed.path).split("/"):
            raise ValueError(f"multi-model prefix {prefix!r} contains '..'; remove it")
        return prefix


class ContainerStep(_Spec):
    """One step of a multi-container variant: a model, a Python handler, or an image."""

    name: Annotated[
        str,
        Field(description="Step name (DNS label): the container hostname that Direct "
                          "invocation targets (TargetContainerHostname).",
              pattern=DNS_LABEL, min_length=1, max_length=40),
    ]
    model: Annotated[
        ModelSource | None, Field(description="A model served by the kubeinfer runtime."),
    ] = None
    handler: Annotated[
        str | None,
        Field(description=(
            "A Python function module:function, called with (body: bytes, content_type) and "
            "returning (body: bytes, content_type), for pre- and post-processing."),
            pattern=_HANDLER),
    ] = None
    codeUri: Annotated[
        str | None,
        Field(description=(
            "Directory holding the handler's module, file:///dir (in the pod), or "
            "file://relative/dir (local mode: relative to the manifest)."),
            json_schema_extra={"pattern": "^file://.+"}),
    ] = None
    image: Annotated[
        str | None,
        Field(description=(
            "A container image speaking the SageMaker container contract (POST "
            "/invocations, GET /ping), run as an extra container in the variant's pod "
            "(Kubernetes only)."), min_length=1),
    ] = None
    port: Annotated[
        int | None,
        Field(description="Port the image listens on (default 8081 + the step's index); it "
                          "is also passed as SAGEMAKER_BIND_TO_PORT.", ge=1024, le=65535),
    ] = None
    env: Annotated[
        list[EnvVar], Field(description="Environment variables of the image's container."),
    ] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_kind(self) -> ContainerStep:
        kinds = [k for k in ("model", "handler", "image") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"step {self.name!r} sets {', '.join(kinds) or 'none'} of model, "
                             "handler, image; set exactly one")
        if self.codeUri is not None and self.handler is None:
            raise ValueError(f"step {self.name!r}: codeUri applies to handler steps only; "
                             "remove it")
        if (self.port is not None or self.env) and self.image is None:
            raise ValueError(f"step {self.name!r}: port and env apply to image steps only; "
                             "remove them")
        return self

    @property
    def kind(self) -> str:
        return "model" if self.model else "handler" if self.handler else "image"


class ProductionVariant(_Spec):
    """One production variant: a model served by N replicas, receiving a share of traffic."""

    name: Annotated[
        str,
        Field(
            description="Variant name (DNS label); clients pin it with TargetVariant.",
            pattern=DNS_LABEL,
            min_length=1,
            max_length=40,
        ),
    ]
    weight: Annotated[
        float,
        Field(
            description=(
                "Relative share of traffic (SageMaker InitialVariantWeight). The share is "
                "weight / sum of weights; 0 receives traffic only when targeted."
            ),
            ge=0,
        ),
    ] = 1.0
    model: Annotated[
        ModelSource | None,
        Field(description="The model this variant serves (set exactly one of model, "
                          "multiModel, containers)."),
    ] = None
    multiModel: Annotated[
        MultiModelConfig | None,
        Field(description="Serve many models from one prefix (a multi-model endpoint)."),
    ] = None
    containers: Annotated[
        list[ContainerStep] | None,
        Field(description="Steps of a multi-container variant (1 to 15), run as "
                          "inferenceExecution says.",
              min_length=1, max_length=15),
    ] = None
    inferenceExecution: Annotated[
        InferenceExecution | None,
        Field(description="Serial: each step's response is the next step's request. Direct: "
                          "the X-Amzn-SageMaker-Target-Container-Hostname header picks one step. "
                          "Only with containers; default Serial."),
    ] = None
    replicas: Annotated[
        int, Field(description="Model-server replicas (instances).", ge=1, le=1000)
    ] = 1
    resources: Annotated[
        ResourceRequirements,
        Field(description="Resources of each replica."),
    ] = Field(default_factory=ResourceRequirements)
    env: Annotated[
        list[EnvVar], Field(description="Extra environment variables for the model server.")
    ] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_source(self) -> ProductionVariant:
        given = [k for k in ("model", "multiModel", "containers") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"variant {self.name!r} sets {', '.join(given) or 'none'} of "
                             "model, multiModel, containers; set exactly one")
        if self.inferenceExecution is not None and self.containers is None:
            raise ValueError(f"variant {self.name!r}: inferenceExecution applies to containers "
                             "only; remove it")
        if self.containers is not None:
            names = [c.name for c in self.containers]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"variant {self.name!r}: duplicate container name(s) "
                                 f"{', '.join(dupes)}; give each step a unique name")
        return self


class EndpointSpec(_Spec):
    """Desired state of an inference endpoint."""

    type: Annotated[
        EndpointType,
        Field(description="Endpoint type. RealTime: synchronous, always-on replicas."),
    ] = EndpointType.REAL_TIME
    variants: Annotated[
        list[ProductionVariant],
        Field(
            description="Production variants; traffic is split by weight.",
            min_length=1,
            max_length=10,
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        ),
    ]

    @model_validator(mode="after")
    def _check_variants(self) -> EndpointSpec:
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"spec.variants: duplicate variant name(s) {', '.join(dupes)}; "
                             "give each variant a unique name")
        if sum(v.weight for v in self.variants) <= 0:
            raise ValueError("spec.variants[*].weight: all weights are 0; give at least one "
                             "variant a weight above 0")
        return self


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(BaseModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""
    lastTransitionTime: str
    observedGeneration: int | None = None


class VariantStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    desiredReplicas: int = 0
    readyReplicas: int = 0
    weight: float = 0.0


class EndpointStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list)
    url: str | None = Field(default=None, description="Base URL of the endpoint's gateway.")
    variants: list[VariantStatus] = Field(default_factory=list)
    readyVariants: str | None = Field(default=None, description="Ready/total variants.")


class ObjectMeta(BaseModel):
    """The part of metadata kubeinfer reads; the rest is kept as is."""

    model_config = ConfigDict(extra="allow")

    name: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)]
    namespace: str | None = None


class Endpoint(BaseModel):
    """A whole Endpoint object as read from YAML or the Kubernetes API."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["kubeinfer.io/v1alpha1"]
    kind: Literal["Endpoint"]
    metadata: ObjectMeta
    spec: EndpointSpec
    status: EndpointStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


def format_validation_error(exc: Any, prefix: str = "") -> str:
    """Turn a pydantic ValidationError into one line per problem, naming the field path.

    Example: ``spec.variants[0].weight: Input should be greater than or equal to 0``.
    """
    lines = []
    for err in exc.errors():
        loc = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                loc += f"[{part}]"
            else:
                loc += ("." if loc else "") + str(part)
        msg = re.sub(r"^Value error, ", "", err["msg"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check spelling and indentation)"
        lines.append(f"{loc or '(root)'}: {msg}")
    return "\n".join(lines)
