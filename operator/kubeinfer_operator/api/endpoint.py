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

from kubeinfer_operator.api.async_config import AsyncConfig
from kubeinfer_operator.api.compile_options import ModelCompile
from kubeinfer_operator.api.cron import parse_cron
from kubeinfer_operator.api.data_capture import DataCapture
from kubeinfer_operator.api.deployment_config import MAX_QUERY, DeploymentConfig, RolloutStatus
from kubeinfer_operator.api.placement import GatewaySettings, PodTemplate, key_problem
from kubeinfer_runtime.contract.auth import AuthMode

GROUP = "kubeinfer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "Endpoint"
PLURAL = "endpoints"
SINGULAR = "endpoint"
SHORT_NAMES = ["kie"]

#: RFC 1123 label: variant names become part of Deployment/Service names.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: No '-' sign: the API server refuses negative resource quantities.
_QUANTITY = r"^(\+?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
#: The API server's env var names (apimachinery IsEnvVarName, strict until 1.32): letters,
#: digits, '_', '-', '.', no digit first, and not '.', '..' nor starting with '..'.
_ENV_NAME = r"^([-_a-zA-Z][-._a-zA-Z0-9]*|\.[-_a-zA-Z0-9][-._a-zA-Z0-9]*)$"


class _Spec(BaseModel):
    """Base of every spec model: unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _require_exactly_one(spec: BaseModel, what: str, fields: tuple[str, ...]) -> None:
    """Refuse ``spec`` unless exactly one of the alternative ``fields`` is set.

    ``what`` names the object in the message (``step 'pre'``); the message
    lists what is set and every alternative, so the user sees the fix.
    """
    given = [f for f in fields if getattr(spec, f) is not None]
    if len(given) != 1:
        raise ValueError(f"{what} sets {', '.join(given) or 'none'} of {', '.join(fields)}; "
                         "set exactly one")


class EndpointType(StrEnum):
    REAL_TIME = "RealTime"
    #: Scale to zero when idle; the gateway holds requests while a replica starts.
    SERVERLESS = "Serverless"
    #: Queued requests, object-store input and output, workers scaled on the backlog.
    ASYNC = "Async"


class ModelFormat(StrEnum):
    ONNX = "onnx"
    #: An artifact of ``kubeinfer compile`` or a CompilationJob (its ``artifact.tar.gz``,
    #: or the unpacked folder with ``manifest.json``): served by the backend its
    #: manifest names (TVM for a shared library, onnxruntime for an optimised or
    #: quantized ONNX model), after checking it was built for this CPU.
    COMPILED = "compiled"


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
    format: Annotated[
        ModelFormat,
        Field(description="onnx (an ONNX model) or compiled (an artifact of kubeinfer "
                          "compile or a CompilationJob: its artifact.tar.gz, or the unpacked "
                          "artifact folder)."),
    ] = ModelFormat.ONNX
    compile: Annotated[
        ModelCompile | None,
        Field(description="Variants only: compile the ONNX model for the node that serves it "
                          "before serving it (SageMaker Neo), cached by content; when nothing "
                          "beats onnxruntime fp32 the ONNX model is served and the variant's "
                          "status says why."),
    ] = None

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = model_uri_problem(uri)
        if problem:
            raise ValueError(problem)
        return uri

    @model_validator(mode="after")
    def _compile_onnx(self) -> ModelSource:
        if self.compile is not None and self.format is not ModelFormat.ONNX:
            raise ValueError(f"compile: compiles an ONNX model, and format {self.format.value} "
                             "is already compiled; remove compile or set format: onnx")
        return self


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

    @model_validator(mode="after")
    def _container_resources(self) -> ResourceRequirements:
        """What the API server refuses in a container's resources (``validateContainer
        ResourceName``, ``ValidateResourceRequirements``): a name that is neither cpu,
        memory, ephemeral-storage, hugepages-* nor an extended resource (domain/name); an
        extended resource (nvidia.com/gpu) that is not a whole number, or is requested
        without the same limit; hugepages requested without the same limit."""
        problems: list[str] = []
        for section, values in (("requests", self.requests), ("limits", self.limits)):
            for name, value in values.items():
                problem = resource_name_problem(name)
                if problem:
                    problems.append(f"{section}.{name}: {problem}")
                elif "/" in name and not _whole(value):
                    problems.append(f"{section}.{name}: {value!r} must be a whole number "
                                    "(an extended resource is counted in units, e.g. 1)")
        for name, value in self.requests.items():
            if not ("/" in name or name.startswith(_HUGEPAGES)) or resource_name_problem(name):
                continue
            limit = self.limits.get(name)
            if limit is None:
                problems.append(f"requests.{name}: {name} cannot be overcommitted: set "
                                f"limits.{name} too (or only the limit), equal to the request")
            elif "/" in name and _whole(limit) and _whole(value) and int(limit) != int(value):
                # (hugepages quantities are compared by the API server itself)
                problems.append(f"limits.{name}: {limit} must equal the request {value} "
                                f"({name} cannot be overcommitted)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


_HUGEPAGES = "hugepages-"


def _whole(quantity: str) -> bool:
    return re.fullmatch(r"\+?[0-9]+", quantity) is not None


#: The resources a container may name without a domain (``IsStandardContainerResourceName``).
CONTAINER_RESOURCES = frozenset({"cpu", "memory", "ephemeral-storage"})


def resource_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a container's resource on Kubernetes, or None."""
    if "/" not in name:
        if name in CONTAINER_RESOURCES or (name.startswith(_HUGEPAGES)
                                           and len(name) > len(_HUGEPAGES)):
            return None
        return ("is not a container resource: use cpu, memory, ephemeral-storage, "
                "hugepages-<size> or an extended resource such as nvidia.com/gpu")
    if name.startswith("requests.") or key_problem(name) or key_problem("requests." + name):
        return "is not a valid extended resource name (domain/name, e.g. nvidia.com/gpu)"
    return None


#: Longest environment variable name (bounds what the CRD's CEL rules may cost).
MAX_ENV_NAME = 1024
#: Most environment variables of one container (bounds the CRD's CEL rules' cost).
MAX_ENV_VARS = 128


class EnvVar(_Spec):
    """One environment variable of a container."""

    name: Annotated[str, Field(description="Variable name: letters, digits, '_', '-' and '.', "
                                           "not starting with a digit nor '..' (nor '.' "
                                           "alone).",
                               pattern=_ENV_NAME, min_length=1, max_length=MAX_ENV_NAME)]
    value: Annotated[str, Field(description="Its value (default: the empty string).")] = ""


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
        Field(description="Local disk budget for downloaded model files, in bytes, per "
                          "model-server process (a replica runs KUBEINFER_WORKERS of them, "
                          "1 by default).", ge=1),
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
            "(Kubernetes only); no whitespace (the API server refuses pods whose image "
            "has leading or trailing whitespace)."), min_length=1, pattern=r"^\S+$"),
    ] = None
    port: Annotated[
        int | None,
        Field(description="Port the image listens on (default 8081 + the step's index); it "
                          "is also passed as SAGEMAKER_BIND_TO_PORT.", ge=1024, le=65535),
    ] = None
    env: Annotated[
        list[EnvVar], Field(description="Environment variables of the image's container "
                                        "(at most 128).", max_length=MAX_ENV_VARS),
    ] = Field(default_factory=list)
    resources: Annotated[
        ResourceRequirements | None,
        Field(description="Resources of the image's container (default: the operator's "
                          "default requests and memory limit); missing cpu and memory "
                          "requests and the memory limit are filled in."),
    ] = None

    @model_validator(mode="after")
    def _one_kind(self) -> ContainerStep:
        _require_exactly_one(self, f"step {self.name!r}", ("model", "handler", "image"))
        if self.codeUri is not None and self.handler is None:
            raise ValueError(f"step {self.name!r}: codeUri applies to handler steps only; "
                             "remove it")
        if (self.port is not None or self.env) and self.image is None:
            raise ValueError(f"step {self.name!r}: port and env apply to image steps only; "
                             "remove them")
        if self.resources is not None and self.image is None:
            raise ValueError(f"step {self.name!r}: resources apply to image steps only (the "
                             "variant's resources size the model server); remove it")
        return self

    @property
    def kind(self) -> str:
        return "model" if self.model else "handler" if self.handler else "image"


#: SageMaker serverless memory sizes (MemorySizeInMB: 1024 to 6144 in 1 GB steps).
_SERVERLESS_MEMORY = r"^[1-6]Gi$"


class ServerlessConfig(_Spec):
    """A serverless endpoint: no replica while idle, started on demand (SageMaker
    ServerlessConfig)."""

    memory: Annotated[
        str,
        Field(description="Memory of each replica, 1Gi to 6Gi (SageMaker MemorySizeInMB); "
                          "becomes the model server's memory request and limit.",
              pattern=_SERVERLESS_MEMORY),
    ] = "2Gi"
    maxConcurrency: Annotated[
        int,
        Field(description="Requests in flight (held ones included) across the endpoint; "
                          "more are refused with 429 ThrottlingException.", ge=1, le=200),
    ] = 20
    provisionedConcurrency: Annotated[
        int,
        Field(description="Replicas kept warm at all times, never scaled to zero.",
              ge=0, le=200),
    ] = 0
    idleTimeout: Annotated[
        float,
        Field(description="Seconds without traffic after which a variant scales to its "
                          "provisioned replicas (zero by default).", ge=1, le=86400),
    ] = 300.0
    coldStartTimeout: Annotated[
        float,
        Field(description="Seconds the gateway holds a request while a replica starts before "
                          "answering 503 ServiceUnavailable.", ge=1, le=600),
    ] = 60.0

    @model_validator(mode="after")
    def _provisioned_fits(self) -> ServerlessConfig:
        if self.provisionedConcurrency > self.maxConcurrency:
            raise ValueError(f"provisionedConcurrency {self.provisionedConcurrency} exceeds "
                             f"maxConcurrency {self.maxConcurrency}; lower it or raise "
                             "maxConcurrency")
        return self


#: A Secret's name (DNS-1123 subdomain).
_SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class AuthConfig(_Spec):
    """How callers authenticate to the Endpoint's gateway."""

    mode: Annotated[
        AuthMode | None,
        Field(description="SigV4: requests signed with AWS Signature Version 4, as boto3 and "
                          "the SageMaker SDK sign them (service sagemaker). Token: "
                          "Authorization: Bearer <token>. None: no authentication (put the "
                          "gateway behind your own). Default: the cluster's default (Helm "
                          "value runtime.auth.defaultMode); local mode: None."),
    ] = None
    secretName: Annotated[
        str | None,
        Field(description="Secret in the Endpoint's namespace holding the accepted "
                          "credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and/or "
                          "credentials (an AWS credentials file, several keys), for SigV4; "
                          "token or tokens (one per line) for Token. Default: the keys the "
                          "chart generated (SigV4) or its token (Token). Local mode: the "
                          "folder ~/.kubeinfer/secrets/<secretName>/ (kubeinfer secret "
                          "create).",
              pattern=_SECRET_NAME, max_length=253),
    ] = None
    regions: Annotated[
        list[Annotated[str, Field(pattern=r"^[a-z0-9-]{1,32}$")]],
        Field(description="SigV4 only: the regions a request may be signed for (default: "
                          "any).", max_length=32),
    ] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fits_mode(self) -> AuthConfig:
        if self.mode is AuthMode.NONE and (self.secretName or self.regions):
            raise ValueError("auth.secretName and auth.regions apply to modes SigV4 and Token; "
                             "remove them or set auth.mode")
        if self.mode is AuthMode.TOKEN and self.regions:
            raise ValueError("auth.regions applies to mode SigV4 only; remove it")
        return self


class ScalingMetric(StrEnum):
    INVOCATIONS_PER_REPLICA = "InvocationsPerReplica"
    CPU_UTILIZATION = "CPUUtilization"
    CUSTOM = "Custom"


class _MetricRef(_Spec):
    metric: Annotated[
        ScalingMetric,
        Field(description="InvocationsPerReplica (per replica per minute, from the gateway), "
                          "CPUUtilization (percent of one core, from the model servers) or "
                          "Custom (the PromQL query in query, from autoscaling.prometheusUrl)."),
    ]
    query: Annotated[
        str | None,
        Field(description="PromQL query returning one number (metric: Custom only); "
                          "{namespace} is replaced by the Endpoint's namespace, and on "
                          "Kubernetes every selector must name it.",
              min_length=1, max_length=MAX_QUERY),
    ] = None

    @model_validator(mode="after")
    def _query_iff_custom(self) -> _MetricRef:
        if (self.metric is ScalingMetric.CUSTOM) != (self.query is not None):
            raise ValueError("set query exactly when metric is Custom")
        return self


class TargetTrackingPolicy(_MetricRef):
    """Keep the metric near target by adding or removing replicas."""

    target: Annotated[float, Field(description="Target value of the metric.", gt=0)]


class StepAdjustment(_Spec):
    """One band of a step scaling policy: the metric's range and the change it makes."""

    lowerBound: Annotated[
        float | None, Field(description="Applies when the metric is >= this (none: -inf)."),
    ] = None
    upperBound: Annotated[
        float | None, Field(description="Applies when the metric is < this (none: +inf)."),
    ] = None
    change: Annotated[
        int, Field(description="Replicas to add (negative: remove).", ge=-1000, le=1000),
    ]


class StepScalingPolicy(_MetricRef):
    """Add or remove a fixed number of replicas depending on the metric's band."""

    steps: Annotated[
        list[StepAdjustment],
        Field(description="Bands of the metric (1 to 20) and the replicas each adds or "
                          "removes; the band holding the current value applies.",
              min_length=1, max_length=20),
    ]


class ScheduledScaling(_Spec):
    """Replica bounds that replace the variant's own while a cron schedule is in force."""

    cron: Annotated[
        str,
        Field(description="Five-field cron expression (UTC) of the minutes during which these "
                          "bounds apply, e.g. '* 9-17 * * 1-5' for office hours.",
              min_length=9),
    ]
    minReplicas: Annotated[int, Field(description="Fewest replicas while the schedule is in "
                                                  "force.", ge=0, le=1000)]
    maxReplicas: Annotated[int, Field(description="Most replicas while the schedule is in "
                                                  "force.", ge=1, le=1000)]

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, cron: str) -> str:
        parse_cron(cron)
        return cron

    @model_validator(mode="after")
    def _ordered(self) -> ScheduledScaling:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"schedule {self.cron!r}: minReplicas {self.minReplicas} exceeds "
                             f"maxReplicas {self.maxReplicas}")
        return self


class AutoScaling(_Spec):
    """Scale a variant's replicas with its load (SageMaker Application Auto Scaling)."""

    minReplicas: Annotated[
        int, Field(description="Fewest replicas the scaler leaves (SageMaker MinCapacity); 0 "
                               "lets the variant scale to zero.", ge=0, le=1000),
    ] = 1
    maxReplicas: Annotated[
        int, Field(description="Most replicas the scaler adds (SageMaker MaxCapacity).",
                   ge=1, le=1000),
    ]
    targetTracking: Annotated[
        list[TargetTrackingPolicy],
        Field(description="Policies keeping a metric near a target (at most 20); with "
                          "several, the largest replica count wins.", max_length=20),
    ] = Field(default_factory=list)
    stepScaling: Annotated[
        list[StepScalingPolicy],
        Field(description="Policies adding or removing replicas by the metric's band (at "
                          "most 20).", max_length=20),
    ] = Field(default_factory=list)
    scheduled: Annotated[
        list[ScheduledScaling],
        Field(description="Replica bounds by time of day or week (at most 50); the first "
                          "schedule in force replaces minReplicas and maxReplicas.",
              max_length=50),
    ] = Field(default_factory=list)
    scaleInCooldown: Annotated[
        float, Field(description="Seconds after any scaling before a scale-in.", ge=0),
    ] = 300.0
    scaleOutCooldown: Annotated[
        float, Field(description="Seconds after a scale-out before the next one.", ge=0),
    ] = 60.0
    prometheusUrl: Annotated[
        str | None,
        Field(description="Prometheus server answering Custom queries, e.g. "
                          "http://prometheus:9090.", pattern="^https?://"),
    ] = None

    @model_validator(mode="after")
    def _ordered(self) -> AutoScaling:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"minReplicas {self.minReplicas} exceeds maxReplicas "
                             f"{self.maxReplicas}; lower minReplicas or raise maxReplicas")
        custom = [p for p in [*self.targetTracking, *self.stepScaling]
                  if p.metric is ScalingMetric.CUSTOM]
        if custom and self.prometheusUrl is None:
            raise ValueError("a Custom metric needs prometheusUrl; set it to your Prometheus "
                             "server")
        return self


class AdmissionLimits(_Spec):
    """How much of a burst the gateway lets through to a real-time variant; the rest is
    refused at once with 429 ThrottlingException (boto3 retries it with backoff)."""

    maxInFlightPerReplica: Annotated[
        int | None,
        Field(description="Requests sent to each ready replica at a time (default: as many "
                          "as the replicas finish within half a second at their measured "
                          "rate, at least 8 each).", ge=1, le=10000),
    ] = None
    maxQueueWaitSeconds: Annotated[
        float | None,
        Field(description="Longest a request waits at the gateway for its turn before 429 "
                          "(default: the gateway's, 1 s).", ge=0, le=60),
    ] = None


class VariantFleet(_Spec):
    """What a production or shadow variant runs: a model served by N replicas."""

    name: Annotated[
        str,
        Field(
            description="Variant name (DNS label); clients pin it with TargetVariant.",
            pattern=DNS_LABEL,
            min_length=1,
            max_length=40,
        ),
    ]
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
        list[EnvVar], Field(description="Extra environment variables for the model server "
                                        "(at most 128).", max_length=MAX_ENV_VARS)
    ] = Field(default_factory=list)
    autoscaling: Annotated[
        AutoScaling | None,
        Field(description="Scale replicas with load; replicas is then the starting count."),
    ] = None
    admission: Annotated[
        AdmissionLimits | None,
        Field(description="Real-time endpoints: requests in flight per replica and the "
                          "longest wait at the gateway; beyond them, 429 at once."),
    ] = None
    podTemplate: Annotated[
        PodTemplate | None,
        Field(description="Placement and identity of this variant's pods (Kubernetes only): "
                          "nodeSelector, tolerations, affinity, topologySpreadConstraints, "
                          "priorityClassName, serviceAccountName, imagePullSecrets, labels, "
                          "annotations; over the operator's default podTemplate, field by "
                          "field."),
    ] = None

    @model_validator(mode="after")
    def _one_source(self) -> VariantFleet:
        _require_exactly_one(self, f"variant {self.name!r}",
                             ("model", "multiModel", "containers"))
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


class ProductionVariant(VariantFleet):
    """One production variant: a model served by N replicas, receiving a share of traffic."""

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


class ShadowVariant(VariantFleet):
    """A shadow variant (SageMaker ShadowProductionVariants): its own model servers get a
    sampled copy of answered production requests; its answers are compared with
    production's and discarded, never returned to a client. With ``autoscaling`` it
    scales on the copies it is offered (InvocationsPerReplica), its CPU or a PromQL
    query, never to zero."""

    name: Annotated[
        str,
        Field(
            description="Shadow variant name (DNS label), unique across variants and shadow "
                        "variants; it labels the comparison in status.shadow and metrics.",
            pattern=DNS_LABEL,
            min_length=1,
            max_length=40,
        ),
    ]
    samplingPercentage: Annotated[
        float,
        Field(description="Share of answered production requests copied to this shadow, 0 "
                          "to 100 (SageMaker SamplingPercentage); each request is drawn at "
                          "random.", ge=0, le=100),
    ] = 100.0
    timeoutSeconds: Annotated[
        float,
        Field(description="Longest the gateway waits for the shadow's answer to a copy; "
                          "past it the copy counts as a shadow error. Production never "
                          "waits for it.", gt=0, le=3600),
    ] = 10.0

    @model_validator(mode="after")
    def _fleet_limits(self) -> ShadowVariant:
        if self.admission is not None:
            raise ValueError(f"shadow variant {self.name!r}: admission applies to production "
                             "variants (a shadow's copies are bounded by the gateway's queue "
                             "per shadow); remove it")
        scaling = self.autoscaling
        if scaling is not None and (scaling.minReplicas < 1
                                    or any(s.minReplicas < 1 for s in scaling.scheduled)):
            # Copies are sampled off answered requests and never held for a cold start:
            # a shadow at zero would drop every one (and never see load to scale out on).
            raise ValueError(f"shadow variant {self.name!r}: autoscaling cannot scale a "
                             "shadow to zero (its copies would all be dropped); set "
                             "minReplicas (and each schedule's) to 1 or more")
        return self


class EndpointSpec(_Spec):
    """Desired state of an inference endpoint."""

    type: Annotated[
        EndpointType,
        Field(description="Endpoint type. RealTime: synchronous, always-on replicas. "
                          "Serverless: scales to zero when idle (set serverless). "
                          "Async: queued requests with object-store input/output (set async)."),
    ] = EndpointType.REAL_TIME
    async_: Annotated[
        AsyncConfig | None,
        Field(alias="async",
              description="Asynchronous inference settings (type: Async only; required there)."),
    ] = None
    serverless: Annotated[
        ServerlessConfig | None,
        Field(description="Serverless settings (type: Serverless only; defaults apply when "
                          "omitted)."),
    ] = None
    auth: Annotated[
        AuthConfig | None,
        Field(description="How callers authenticate (default: the cluster's default mode "
                          "with the chart's generated credentials; local mode: none)."),
    ] = None
    gateway: Annotated[
        GatewaySettings | None,
        Field(description="The gateway's pods: placement and identity (podTemplate)."),
    ] = None
    dataCapture: Annotated[
        DataCapture | None,
        Field(description="Capture a sample of requests and responses in SageMaker's "
                          "capture format (SageMaker DataCaptureConfig); RealTime and "
                          "Serverless endpoints."),
    ] = None
    deploymentConfig: Annotated[
        DeploymentConfig | None,
        Field(description="Deployment guardrails (SageMaker DeploymentConfig): a variant "
                          "whose model servers change rolls out blue/green or in batches, "
                          "with alarms that roll it back. Unset: a plain rolling update of "
                          "the variant's Deployment."),
    ] = None
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
    shadowVariants: Annotated[
        list[ShadowVariant],
        Field(
            description="Shadow variants (SageMaker ShadowProductionVariants): each gets a "
                        "sampled copy of answered production requests, off the client's path; "
                        "both answers are compared (status.shadow). RealTime and Serverless "
                        "endpoints; names unique across variants and shadow variants.",
            max_length=10,
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        ),
    ] = Field(default_factory=list)

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
        _check_async(self)
        _check_shadows(self)
        if self.deploymentConfig is not None:
            _check_guardrails(self, self.deploymentConfig)
        if self.serverless is not None and self.type is not EndpointType.SERVERLESS:
            raise ValueError(f"spec.serverless applies to type Serverless only (type is "
                             f"{self.type.value}); remove it or set type: Serverless")
        if self.dataCapture is not None and self.type is EndpointType.ASYNC:
            raise ValueError("spec.dataCapture applies to RealTime and Serverless endpoints; "
                             "remove it (Async endpoints keep every input and output in the "
                             "object store already)")
        return self


def _check_guardrails(spec: EndpointSpec, config: DeploymentConfig) -> None:
    """Where ``deploymentConfig`` works: RealTime endpoints (an Async endpoint's workers
    share one queue, a Serverless variant's replicas follow its own traffic), and
    ``rolling`` on one variant only (SageMaker excludes rolling deployments of
    multi-variant and Serverless endpoints too). Autoscaled variants roll out as
    SageMaker's do: scaling holds while a rollout runs, green starts at blue's current
    replicas, and scaling goes on with the fleet that serves after it."""
    if spec.type is not EndpointType.REAL_TIME:
        raise ValueError(f"spec.deploymentConfig applies to RealTime endpoints (type is "
                         f"{spec.type.value}); remove it: {spec.type.value} endpoints update "
                         "their variants in place")
    if config.rolling is not None and len(spec.variants) > 1:
        raise ValueError("spec.deploymentConfig.rolling applies to endpoints with one variant "
                         "(as in SageMaker); use deploymentConfig.blueGreen, or keep one of "
                         "spec.variants")
    _check_fleet_names(spec)


def _check_shadows(spec: EndpointSpec) -> None:
    """Shadows: synchronous endpoints only, names unique across variants and shadows."""
    if not spec.shadowVariants:
        return
    if spec.type is EndpointType.ASYNC:
        raise ValueError("spec.shadowVariants applies to RealTime and Serverless endpoints; "
                         "remove it (an Async endpoint's requests are queued, not answered "
                         "synchronously), or test the model on a separate Async endpoint")
    production = {v.name for v in spec.variants}
    names = [s.name for s in spec.shadowVariants]
    clash = sorted({n for n in names if n in production or names.count(n) > 1})
    if clash:
        raise ValueError(f"spec.shadowVariants: name(s) {', '.join(clash)} already used by a "
                         "variant or another shadow variant; give each a unique name")


def _check_fleet_names(spec: EndpointSpec) -> None:
    """Under a deploymentConfig, variant ``v``'s green fleet is named ``v-green``."""
    names = {v.name for v in spec.variants}
    taken = sorted(n for n in names if n.endswith("-green") and n[:-len("-green")] in names)
    if taken:
        raise ValueError(f"spec.variants: {', '.join(taken)} would share its name with the "
                         "green fleet of another variant under deploymentConfig; rename it")


def _check_async(spec: EndpointSpec) -> None:
    """``type: Async`` needs ``async`` and one variant, scaled by ``async.scaling`` only."""
    is_async = spec.type is EndpointType.ASYNC
    if spec.async_ is not None and not is_async:
        raise ValueError(f"spec.async applies to type Async only (type is {spec.type.value}); "
                         "remove it or set type: Async")
    if not is_async:
        return
    if spec.async_ is None:
        raise ValueError("spec.async is required for type Async: set at least "
                         "async.outputPath (s3://bucket/prefix)")
    if len(spec.variants) != 1:
        raise ValueError(f"spec.variants: an Async endpoint takes exactly one variant (got "
                         f"{len(spec.variants)}); split them into separate endpoints")
    if spec.variants[0].autoscaling is not None:
        raise ValueError("spec.variants[0].autoscaling: Async endpoints scale on the queue "
                         "backlog; use spec.async.scaling instead")
    if spec.variants[0].model is None:
        # The async worker loads one model in-process (runtime.queue); a pipeline or a
        # multi-model variant would start with no model and fail to load ("URI ''").
        raise ValueError("spec.variants[0]: an Async endpoint's workers serve one model: set "
                         "model (multiModel and containers run on RealTime and Serverless "
                         "endpoints)")


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(BaseModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="What the condition reports, e.g. Ready; unique in the list.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word a program can match on, e.g. "
                                    "ProgressDeadlineExceeded.")
    message: str = Field(default="", description="What a person should know: the object, "
                                                 "the field and the fix.")
    lastTransitionTime: str = Field(description="When status last changed (RFC 3339).")
    observedGeneration: int | None = Field(default=None, description="The "
                                           "metadata.generation this condition was computed "
                                           "for; older means stale.")


#: ``status.conditions`` as the API server should merge it: one entry per type
#: (a list-map, so server-side apply and strategic merges key on ``type``).
LIST_MAP_BY_TYPE: dict[str, Any] = {"x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["type"]}
#: ``status.variants``: one entry per variant name.
LIST_MAP_BY_NAME: dict[str, Any] = {"x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["name"]}


class VariantCompileStatus(BaseModel):
    """What a variant's compile step did (``model.compile``), from its newest pod."""

    model_config = ConfigDict(extra="forbid")

    phase: str = Field(description="Compiling, Compiled or Failed.")
    message: str = Field(default="", description="What was chosen, how it compares with "
                                                 "onnxruntime fp32 and why; or why it failed.")
    pod: str | None = Field(default=None, description="The pod whose compile step this "
                                                      "reports.")
    chosen: str | None = Field(default=None, description="The candidate served; "
                                                         "onnxruntime-fp32: the ONNX model.")
    backend: str | None = Field(default=None, description="tvm or onnx.")
    speedup: float | None = Field(default=None, description="vs onnxruntime fp32.")
    maxAbsDiff: float | None = Field(default=None, description="Largest absolute difference "
                                                               "of the served candidate's "
                                                               "outputs from onnxruntime fp32.")
    top1Agreement: float | None = Field(default=None, description="Share of rows whose top-1 "
                                                                  "class matches fp32's "
                                                                  "(quantized candidates).")
    artifactUri: str | None = Field(default=None, description="Where the compiled artifact "
                                                              "was cached (compile.cacheUri).")
    cacheHit: bool | None = Field(default=None, description="The artifact came from "
                                                            "compile.cacheUri.")


class VariantStatus(BaseModel):
    """What one variant runs now: its replicas, weight and last scaling decision."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The variant (spec.variants[*].name).")
    desiredReplicas: int = Field(default=0, description="Replicas the operator asks for.")
    readyReplicas: int = Field(default=0, description="Replicas whose pods are ready.")
    weight: float = Field(default=0.0, description="Traffic weight in the route table.")
    lastScaling: str | None = Field(default=None, description="Why the scaler last changed "
                                                              "this variant's replicas.")
    compiled: VariantCompileStatus | None = Field(default=None, description="model.compile: "
                                                  "what the compile step chose.")


class ShadowStatus(BaseModel):
    """One shadow variant's running comparison with production (totals since the gateways
    started), read from the gateways' metrics."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The shadow variant (spec.shadowVariants[*].name).")
    copiesSent: int = Field(default=0, description="Copies the shadow answered.")
    copiesFailed: int = Field(default=0, description="Copies the shadow did not answer "
                              "(timed out, refused, no ready model server).")
    copiesDropped: int = Field(default=0, description="Copies never sent: the gateway's "
                               "queue for the shadow was full (the shadow is too slow).")
    requestsCompared: int = Field(default=0, description="Requests both sides answered "
                                  "with 2xx, compared.")
    agreementPercent: float | None = Field(default=None, description="Share of compared "
                                           "requests whose answers agree: same labels or "
                                           "argmax, or numbers within tolerance.")
    productionErrors: int = Field(default=0, description="Error answers of production to "
                                  "sampled requests.")
    shadowErrors: int = Field(default=0, description="Error answers (or none) of the shadow "
                              "to copies.")
    productionLatencyP50Ms: float | None = Field(default=None, description="Production's "
                                                 "median latency on sampled requests, ms.")
    productionLatencyP99Ms: float | None = Field(default=None, description="Production's "
                                                 "99th percentile latency, ms.")
    shadowLatencyP50Ms: float | None = Field(default=None, description="The shadow's median "
                                             "latency on copies, ms.")
    shadowLatencyP99Ms: float | None = Field(default=None, description="The shadow's 99th "
                                             "percentile latency, ms.")
    meanMaxAbsDiff: float | None = Field(default=None, description="Numeric answers: mean "
                                         "over requests of the largest absolute difference.")
    meanMaxRelDiff: float | None = Field(default=None, description="Numeric answers: mean "
                                         "over requests of the largest relative difference.")


class EndpointStatus(BaseModel):
    """What the operator observed of the Endpoint: conditions, URL and each variant."""

    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = Field(
        default=None, description="The metadata.generation the operator last acted on; the "
        "conditions describe that spec. Below metadata.generation: not reconciled yet.")
    conditions: list[Condition] = Field(
        default_factory=list, json_schema_extra=LIST_MAP_BY_TYPE,
        description="Ready: the gateway and every variant have rolled out this generation and "
        "are available. Progressing: True while Deployments roll out. Reconciling / Stalled: "
        "kstatus's pair (work left / stuck until a person acts: InvalidSpec, "
        "ProgressDeadlineExceeded, NameConflict, RejectedByAPI). VariantReady-<variant>: one "
        "per variant, with its Deployment's reason and message.")
    url: str | None = Field(default=None, description="Base URL of the endpoint's gateway.")
    variants: list[VariantStatus] = Field(
        default_factory=list, json_schema_extra=LIST_MAP_BY_NAME,
        description="Per variant, one entry by name: replicas, weight and what the scaler "
        "last did.")
    readyVariants: str | None = Field(default=None, description="Rolled-out/total variants.")
    rollouts: list[RolloutStatus] = Field(
        default_factory=list, json_schema_extra={"x-kubernetes-list-type": "map",
                                                 "x-kubernetes-list-map-keys": ["variant"]},
        description="spec.deploymentConfig: each variant's latest guarded rollout (phase, "
        "step, traffic on green, last alarm evaluation).")
    shadow: list[ShadowStatus] = Field(
        default_factory=list, json_schema_extra=LIST_MAP_BY_NAME,
        description="spec.shadowVariants: each shadow's running comparison with production "
        "(kubeinfer shadow report NAME shows the same).")


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
