"""Pydantic models of the ``TransformJob`` custom resource (kubeinfer.io/v1alpha1).

SageMaker's CreateTransformJob (Batch Transform) as a Kubernetes resource: score
a fixed dataset, in shards over ``resources.instanceCount`` parallel workers,
then stop. Field names follow CreateTransformJob's, in camelCase, so a SageMaker
user recognises every one; the model takes the shapes a production variant
takes (``api.endpoint``), or names an Endpoint's variant. These models are the
single source of ``crds/transformjobs.kubeinfer.io.yaml``, of local mode's
validation and of the operator's parsing. The spec is immutable once created
(a CEL rule on the CRD): the Jobs it becomes cannot change either.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubeinfer_operator.api.endpoint import (
    _ENV_NAME,
    DNS_LABEL,
    LIST_MAP_BY_TYPE,
    Condition,
    ContainerStep,
    ModelSource,
    ObjectMeta,
    ResourceRequirements,
    _Spec,
)
from kubeinfer_operator.api.placement import JobPodTemplate
from kubeinfer_runtime.contract.batch import (
    AssembleWith,
    BatchStrategy,
    CompressionType,
    DataType,
    JoinSource,
    SplitType,
)

GROUP = "kubeinfer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TransformJob"
PLURAL = "transformjobs"
SINGULAR = "transformjob"
SHORT_NAMES = ["ktj"]

#: SageMaker's bound on MaxPayloadInMB.
MAX_PAYLOAD_MB = 100
#: Content types SageMaker's input/output filters and join support.
FILTERABLE_TYPES = ("text/csv", "application/json", "application/jsonlines",
                    "application/x-jsonlines")
_DATA_URI = r"^(s3://[^/]+(/.*)?|file://.+)$"
#: SageMaker's bound on InputFilter / OutputFilter (JSONPath, 63 characters).
_MAX_FILTER = 63


def data_uri_problem(field: str, uri: str) -> str | None:
    """Why ``uri`` is not a data location (s3://bucket/prefix or file://path), or None."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            return f"{field}: {uri!r} names no bucket; write s3://bucket/prefix"
    elif parsed.scheme == "file":
        if not (parsed.netloc + parsed.path).strip("/"):
            return f"{field}: {uri!r} names no path; write file:///absolute/dir"
    else:
        return (f"{field}: {uri!r} has unsupported scheme {parsed.scheme or '(none)'!r}; "
                "use s3://bucket/prefix or file:///dir")
    if ".." in (parsed.netloc + parsed.path).split("/"):
        return f"{field}: {uri!r} contains '..'; name the location without it"
    return None


def _uri_field(description: str) -> object:
    return Field(description=description, min_length=1, max_length=1024,
                 json_schema_extra={"pattern": _DATA_URI})


class EndpointRef(_Spec):
    """Reuse the model of an Endpoint's production variant (copied when the job starts)."""

    name: Annotated[str, Field(description="The Endpoint's name, in the job's namespace.",
                               pattern=DNS_LABEL, min_length=1, max_length=63)]
    variant: Annotated[
        str | None,
        Field(description="The variant whose model to use (default: the Endpoint's only "
                          "variant; required when it has several).",
              pattern=DNS_LABEL, min_length=1, max_length=40),
    ] = None


class TransformInput(_Spec):
    """Where the records come from and how to cut them (SageMaker TransformInput)."""

    uri: Annotated[str, _uri_field(
        "Input: s3://bucket/prefix (every object under it, or the one object it names), "
        "or file:///dir (local mode; file://relative/dir resolves against the manifest's "
        "directory). With dataType ManifestFile, the manifest file.")]
    dataType: Annotated[
        DataType,
        Field(description="S3Prefix: uri is a prefix or an object. ManifestFile: uri is "
                          "a SageMaker manifest, [{\"prefix\": \"s3://b/p/\"}, \"key1\", ...]."),
    ] = DataType.S3_PREFIX
    contentType: Annotated[
        str | None,
        Field(description="MIME type of the records (text/csv, application/json, "
                          "application/jsonlines, ...), sent as each request's "
                          "Content-Type.", min_length=1, max_length=256),
    ] = None
    splitType: Annotated[
        SplitType,
        Field(description="How an object is cut into records: None (the whole object is "
                          "one record), Line, RecordIO or TFRecord."),
    ] = SplitType.NONE
    compressionType: Annotated[
        CompressionType, Field(description="None, or Gzip (objects are gzip files)."),
    ] = CompressionType.NONE

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = data_uri_problem("input.uri", uri)
        if problem:
            raise ValueError(problem)
        return uri


class TransformOutput(_Spec):
    """Where results go (SageMaker TransformOutput): one <key>.out per input object."""

    uri: Annotated[str, _uri_field(
        "Output prefix: s3://bucket/prefix or file:///dir. Input keys are mirrored under it "
        "(<key>.out); the job's own files live in <uri>/_kubeinfer/ and bad records in "
        "<uri>/_errors.jsonl.")]
    accept: Annotated[
        str | None,
        Field(description="MIME type asked of the model (each request's Accept).",
              min_length=1, max_length=256),
    ] = None
    assembleWith: Annotated[
        AssembleWith,
        Field(description="None: outputs concatenated as the model answered them. Line: one "
                          "output record per line."),
    ] = AssembleWith.NONE

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = data_uri_problem("output.uri", uri)
        if problem:
            raise ValueError(problem)
        return uri


class ModelClientConfig(_Spec):
    """How each request to the model is bounded (SageMaker ModelClientConfig)."""

    invocationsTimeoutInSeconds: Annotated[
        int, Field(description="Seconds one request may take.", ge=1, le=3600),
    ] = 600
    invocationsMaxRetries: Annotated[
        int, Field(description="Retries of a failed request.", ge=0, le=3),
    ] = 3


def _filter(description: str) -> object:
    return Field(description=description, min_length=1, max_length=_MAX_FILTER,
                 pattern=r"^\$")


class DataProcessing(_Spec):
    """Filter what reaches the model and join its answers with the input (SageMaker
    DataProcessing; JSON, JSON Lines and CSV only)."""

    inputFilter: Annotated[str, _filter(
        "JSONPath of the part of each record sent to the model: $ (all), $.features, "
        "$[1:5] (CSV columns 1 to 4, 0-based) ...")] = "$"
    joinSource: Annotated[
        JoinSource,
        Field(description="Input: each output record is joined with its input record (CSV: "
                          "the output's columns appended; JSON: SageMakerOutput added, or a "
                          "SageMakerInput/SageMakerOutput object when the input is not an "
                          "object)."),
    ] = JoinSource.NONE
    outputFilter: Annotated[str, _filter(
        "JSONPath of the part of each (joined) output record kept: $ (all), "
        "$['id','SageMakerOutput'], $[0,-1] ...")] = "$"

    @property
    def active(self) -> bool:
        return (self.inputFilter != "$" or self.outputFilter != "$"
                or self.joinSource is not JoinSource.NONE)


class TransformResources(ResourceRequirements):
    """The workers: how many run at once and what each may use."""

    instanceCount: Annotated[
        int,
        Field(description="Parallel workers (SageMaker InstanceCount); the input is cut into "
                          "a few shards per worker.", ge=1, le=1000),
    ] = 1


class ErrorPolicy(_Spec):
    """What a bad record does (beyond SageMaker: SageMaker fails the job on the first)."""

    maxFailedRecords: Annotated[
        int,
        Field(description="Bad records tolerated across the job; each is listed in "
                          "<output>/_errors.jsonl (object key, record number, byte offset, "
                          "the error; never its bytes). 0: the first fails the job.", ge=0),
    ] = 0


class TransformJobSpec(_Spec):
    """Desired state of a batch transform job (SageMaker CreateTransformJob)."""

    model: Annotated[
        ModelSource | None,
        Field(description="A model run in-process by each worker (set exactly one of model, "
                          "containers, endpointRef)."),
    ] = None
    containers: Annotated[
        list[ContainerStep] | None,
        Field(description="A serial pipeline of steps (model, handler or image), as a "
                          "variant's containers; a single image step is an image speaking "
                          "the SageMaker container contract (Kubernetes only), run beside "
                          "each worker with SAGEMAKER_BATCH=true.",
              min_length=1, max_length=15),
    ] = None
    endpointRef: Annotated[
        EndpointRef | None,
        Field(description="Use an Endpoint's variant's model (model or containers; not "
                          "multiModel)."),
    ] = None
    input: Annotated[TransformInput, Field(description="The records to transform.")]
    output: Annotated[TransformOutput, Field(description="Where the results go.")]
    batchStrategy: Annotated[
        BatchStrategy | None,
        Field(description="MultiRecord: as many records per request as fit in "
                          "maxPayloadInMB. SingleRecord: one record per request. Unset: "
                          "what an image model's GET /execution-parameters says, else "
                          "MultiRecord (as SageMaker)."),
    ] = None
    maxPayloadInMB: Annotated[
        int | None,
        Field(description="Largest request body in MB (0 to 100); a record larger than it "
                          "fails the job naming the record. 0: each object is sent whole "
                          "(splitType must be None). Unset: the image's "
                          "/execution-parameters, else 6.", ge=0, le=MAX_PAYLOAD_MB),
    ] = None
    maxConcurrentTransforms: Annotated[
        int | None,
        Field(description="Requests in flight per worker. Unset: the image's "
                          "/execution-parameters, else 1.", ge=1, le=1024),
    ] = None
    batchAcrossObjects: Annotated[
        bool,
        Field(description="Beyond SageMaker, which never puts records of two objects in "
                          "one request: small objects' records share MultiRecord requests "
                          "when each record's output is one line (splitType Line, "
                          "assembleWith Line, a line-per-record accept such as text/csv or "
                          "application/jsonlines), so outputs are the same as one request "
                          "per object. Set false for a model whose answers depend on what "
                          "else is in the request."),
    ] = True
    environment: Annotated[
        dict[str, Annotated[str, Field(max_length=10240)]],
        Field(description="Environment variables of the model (the image's container, or "
                          "the worker for in-process models), at most 16.", max_length=16),
    ] = Field(default_factory=dict)
    modelClientConfig: Annotated[
        ModelClientConfig, Field(description="Timeout and retries of each request."),
    ] = Field(default_factory=ModelClientConfig)
    dataProcessing: Annotated[
        DataProcessing, Field(description="Input/output filters and the join."),
    ] = Field(default_factory=DataProcessing)
    resources: Annotated[
        TransformResources,
        Field(description="Workers: instanceCount, and each one's requests and limits."),
    ] = Field(default_factory=TransformResources)
    errorPolicy: Annotated[
        ErrorPolicy, Field(description="How many bad records the job tolerates."),
    ] = Field(default_factory=ErrorPolicy)
    backoffLimitPerIndex: Annotated[
        int,
        Field(description="Retries of a shard whose worker failed for a reason that may pass "
                          "(crash, eviction, network). Bad input and a model that cannot "
                          "load are never retried.", ge=0, le=10),
    ] = 3
    activeDeadlineSeconds: Annotated[
        int | None,
        Field(description="Longest the whole job may run; past it, it fails "
                          "(DeadlineExceeded).", ge=1),
    ] = None
    ttlSecondsAfterFinished: Annotated[
        int | None,
        Field(description="Seconds after the job completes or fails when its Kubernetes "
                          "Jobs and pods are deleted (the TransformJob and its status stay). "
                          "Default: kept until the TransformJob is deleted.", ge=0),
    ] = None
    podTemplate: JobPodTemplate = None

    @field_validator("environment")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [k for k in env if len(k) > 1024 or not re.fullmatch(_ENV_NAME, k)]
        if bad:
            raise ValueError(f"spec.environment: {', '.join(map(repr, bad))} not valid "
                             "environment variable name(s); use letters, digits, '_', '-', '.', "
                             "not a digit or '..' first")
        return env

    @model_validator(mode="after")
    def _check(self) -> TransformJobSpec:
        given = [f for f in ("model", "containers", "endpointRef") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"spec.model, spec.containers, spec.endpointRef: set exactly one "
                             f"(this spec sets {', '.join(given) or 'none'})")
        if self.containers is not None:
            names = [c.name for c in self.containers]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"spec.containers: duplicate container name(s) "
                                 f"{', '.join(dupes)}; give each step a unique name")
        problems = spec_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _within(inner: str, outer: str) -> bool:
    """Whether location ``inner`` is ``outer`` or below it (same scheme and bucket)."""
    a, b = urlparse(inner), urlparse(outer)
    if a.scheme != b.scheme:
        return False
    pa = (a.netloc + "/" + a.path.strip("/")).rstrip("/") + "/"
    pb = (b.netloc + "/" + b.path.strip("/")).rstrip("/") + "/"
    return pa.startswith(pb)


def spec_problems(spec: TransformJobSpec) -> list[str]:
    """What SageMaker (or our job layout) refuses in a structurally valid spec."""
    problems: list[str] = []
    processing = spec.dataProcessing
    content = (spec.input.contentType or "").split(";")[0].strip().lower()
    if processing.active and content not in FILTERABLE_TYPES:
        problems.append(
            f"spec.input.contentType: {spec.input.contentType or '(unset)'} cannot be "
            "filtered or joined; dataProcessing needs one of " + ", ".join(FILTERABLE_TYPES)
            + " (or remove the filters and joinSource)")
    if spec.maxPayloadInMB == 0 and spec.input.splitType is not SplitType.NONE:
        problems.append(
            f"spec.maxPayloadInMB: 0 sends each object whole, which splitType "
            f"{spec.input.splitType.value} contradicts; set splitType None or a payload "
            "limit of 1 to 100 MB")
    if spec.input.dataType is DataType.S3_PREFIX and _within(spec.output.uri, spec.input.uri):
        problems.append(
            f"spec.output.uri: {spec.output.uri!r} is inside the input "
            f"{spec.input.uri!r}, so outputs would be read as input by a later run; "
            "write outputs under another prefix")
    return problems


class TransformJobStatus(BaseModel):
    """What the job did so far (rolled up from its Jobs and their workers' reports)."""

    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = Field(
        default=None, description="The metadata.generation the operator last acted on; the "
        "conditions describe that spec.")
    conditions: list[Condition] = Field(
        default_factory=list, json_schema_extra=LIST_MAP_BY_TYPE,
        description="Running: the job's Jobs are at work. Complete / Failed: how it ended "
        "(monotonic: once True, never changed), with the reason and message.")
    phase: str | None = Field(default=None, description="Pending, Planning, Running, "
                                                        "Finalizing, Complete or Failed.")
    progress: str | None = Field(default=None, description="Shards done / shards.")
    model: str | None = Field(default=None, description="The model the job runs.")
    startTime: str | None = Field(default=None, description="When the operator started the "
                                                            "job (RFC 3339).")
    completionTime: str | None = Field(default=None, description="When the job completed or "
                                                                 "failed (RFC 3339).")
    objects: int | None = Field(default=None, description="Input objects.")
    inputBytes: int | None = Field(default=None, description="Bytes of input, as listed.")
    shards: int | None = Field(default=None, description="Pieces of the input the planner "
                                                         "cut, each one worker pod's work.")
    shardsDone: int | None = Field(default=None, description="Shards finished (their outputs "
                                                             "written).")
    shardsFailed: int | None = Field(default=None, description="Shards whose worker failed "
                                                               "for good (retries spent).")
    records: int | None = Field(default=None, description="Records transformed so far.")
    failedRecords: int | None = Field(default=None, description="Bad records so far, each "
                                                                "listed in "
                                                                "<output>/_errors.jsonl.")
    bytesIn: int | None = Field(default=None, description="Bytes of records sent to the "
                                                          "model so far.")
    bytesOut: int | None = Field(default=None, description="Bytes of output written so far.")
    recordsPerSecond: float | None = Field(default=None, description="Records per second "
                                                                     "since the workers "
                                                                     "started.")


class TransformJob(BaseModel):
    """A whole TransformJob object as read from YAML or the Kubernetes API."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["kubeinfer.io/v1alpha1"]
    kind: Literal["TransformJob"]
    metadata: ObjectMeta
    spec: TransformJobSpec
    status: TransformJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name
