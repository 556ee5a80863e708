"""Pydantic models of the ``CompilationJob`` custom resource (kubeinfer.io/v1alpha1).

SageMaker's CreateCompilationJob (Neo) as a Kubernetes resource: compile one
ONNX model for one target, measure every candidate against onnxruntime fp32 on
the machine that compiles, and publish only what passes the accuracy gate and
is at least as fast (else the ONNX model itself, and the status says why).
Field names follow CreateCompilationJob's where it has one (``stoppingCondition.
maxRuntimeInSeconds``), in camelCase; the compiler's own knobs (tuning budget,
quantization gate) are kubeinfer's. These models are the single source of
``crds/compilationjobs.kubeinfer.io.yaml``, of local mode's validation and of
the operator's parsing. The spec is immutable once created (a CEL rule on the
CRD): the Job it becomes cannot change either.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kubeinfer_operator.api import compile_options
from kubeinfer_operator.api.compile_options import (
    BatchSize,
    Quantization,
    batch_sizes_field,
    unique_sizes,
)
from kubeinfer_operator.api.endpoint import (
    _ENV_NAME,
    LIST_MAP_BY_TYPE,
    Condition,
    ObjectMeta,
    ResourceRequirements,
    _Spec,
    model_uri_problem,
)
from kubeinfer_operator.api.placement import JobPodTemplate
from kubeinfer_operator.api.transform_job import _DATA_URI, data_uri_problem
from kubeinfer_runtime.contract.compile import CandidateName, CompileTarget

GROUP = "kubeinfer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CompilationJob"
PLURAL = "compilationjobs"
SINGULAR = "compilationjob"
SHORT_NAMES = ["kcj"]

#: Without stoppingCondition the Job still ends: this long, plus twice the tuning budget.
DEFAULT_RUNTIME_S = 3600


class CompileModelSource(_Spec):
    """The ONNX model to compile (SageMaker InputConfig.S3Uri)."""

    uri: Annotated[
        str,
        Field(description="The ONNX model: s3://bucket/key, or file:///absolute/path (local "
                          "mode; file://relative/path resolves against the manifest's "
                          "directory).", min_length=1, max_length=1024,
              json_schema_extra={"pattern": "^(s3|file)://.+"}),
    ]

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = model_uri_problem(uri)
        if problem:
            raise ValueError(problem)
        return uri


class CompileOutput(_Spec):
    """Where the artifact goes (SageMaker OutputConfig.S3OutputLocation)."""

    uri: Annotated[
        str,
        Field(description="Output folder: s3://bucket/prefix or file:///dir. The job writes "
                          "<uri>/artifact/ (manifest.json and the chosen files), "
                          "<uri>/artifact.tar.gz (the same as one object: what a variant's "
                          "model.uri with format: compiled points at) and <uri>/report.json.",
              min_length=1, max_length=1024, json_schema_extra={"pattern": _DATA_URI}),
    ]

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        problem = data_uri_problem("output.uri", uri)
        if problem:
            raise ValueError(problem)
        return uri


class Tuning(compile_options.Tuning):
    """TVM MetaSchedule tuning (none by default: untuned TVM rarely beats onnxruntime)."""

    cacheUri: Annotated[
        str | None,
        Field(description="Object-store folder the tuning records are restored from and saved "
                          "to (s3://bucket/kubeinfer/tuning-cache), so later jobs reuse them.",
              min_length=1, max_length=1024, json_schema_extra={"pattern": _DATA_URI}),
    ] = None

    @field_validator("cacheUri")
    @classmethod
    def _check_uri(cls, uri: str | None) -> str | None:
        problem = data_uri_problem("tuning.cacheUri", uri) if uri is not None else None
        if problem:
            raise ValueError(problem)
        return uri


class StoppingCondition(_Spec):
    """How long the job may run (SageMaker StoppingCondition)."""

    maxRuntimeInSeconds: Annotated[
        int,
        Field(description="Longest the compilation may run; past it, it fails "
                          "(DeadlineExceeded).", ge=60, le=7 * 86400),
    ]


class CompilationJobSpec(_Spec):
    """Desired state of a compilation job (SageMaker CreateCompilationJob)."""

    model: Annotated[CompileModelSource, Field(description="The ONNX model to compile.")]
    target: Annotated[
        CompileTarget,
        Field(description="What the artifact runs on: native (the CPU of the machine that "
                          "compiles: on Kubernetes, the node the Job's pod lands on), x86-64, "
                          "x86-64-v3, haswell, skylake-avx512, znver4, aarch64 or armv7 "
                          "(cross-compiled and verified under emulation, not timed)."),
    ]
    output: Annotated[CompileOutput, Field(description="Where the artifact and report go.")]
    batchSizes: Annotated[
        list[BatchSize] | None,
        batch_sizes_field("Batch sizes compiled (TVM needs static shapes: one library each) "
                          "and measured; the first is the latency one, the last the "
                          "throughput one. Default [1]."),
    ] = None
    tuning: Annotated[Tuning, Field(description="TVM MetaSchedule tuning.")] = Field(
        default_factory=Tuning)
    quantization: Annotated[
        Quantization, Field(description="The INT8 candidate and its accuracy gate."),
    ] = Field(default_factory=Quantization)
    threads: Annotated[
        int,
        Field(description="Threads one inference uses while measuring (serve the artifact "
                          "with the same KUBEINFER_INTRA_OP_THREADS); also the default CPU "
                          "request.", ge=1, le=256),
    ] = 1
    resources: Annotated[
        ResourceRequirements,
        Field(description="The compiler's requests and limits (default: cpu = threads, "
                          "memory 1Gi, limit 4Gi)."),
    ] = Field(default_factory=ResourceRequirements)
    environment: Annotated[
        dict[str, Annotated[str, Field(max_length=10240)]],
        Field(description="Extra environment variables of the compiler, at most 16.",
              max_length=16),
    ] = Field(default_factory=dict)
    stoppingCondition: Annotated[
        StoppingCondition | None,
        Field(description="Time limit (default: 3600 s plus twice the tuning budget per "
                          "batch size)."),
    ] = None
    backoffLimit: Annotated[
        int,
        Field(description="Retries after a failure that may pass (crash, eviction, object "
                          "store unreachable). A bad model or bad settings are never "
                          "retried.", ge=0, le=10),
    ] = 2
    ttlSecondsAfterFinished: Annotated[
        int | None,
        Field(description="Seconds after the job completes or fails when its Kubernetes Job "
                          "and pod are deleted (the CompilationJob and its status stay). "
                          "Default: kept until the CompilationJob is deleted.", ge=0),
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

    @field_validator("batchSizes")
    @classmethod
    def _unique(cls, sizes: list[int] | None) -> list[int] | None:
        return unique_sizes("spec.batchSizes", sizes)

    @property
    def max_runtime_s(self) -> int:
        """The Job's activeDeadlineSeconds."""
        if self.stoppingCondition is not None:
            return self.stoppingCondition.maxRuntimeInSeconds
        return DEFAULT_RUNTIME_S + int(2 * self.tuning.budgetSeconds
                                       * len(self.batchSizes or [1]))


class CandidateStatus(BaseModel):
    """One candidate the compiler measured, as ``kubectl describe`` shows it."""

    model_config = ConfigDict(extra="forbid")

    name: CandidateName = Field(description="The candidate: onnxruntime-fp32 (the baseline), "
                                            "onnxruntime-optimized, onnxruntime-int8, "
                                            "tvm-untuned or tvm-tuned.")
    speedup: float | None = Field(default=None, description="Speed over onnxruntime fp32 "
                                                            "(geometric mean over batch sizes; "
                                                            "unset: not timed).")
    maxAbsDiff: float | None = Field(default=None, description="Largest absolute difference "
                                                               "of its outputs from "
                                                               "onnxruntime fp32's.")
    top1Agreement: float | None = Field(default=None, description="Share of rows whose top-1 "
                                                                  "class matches fp32's.")
    accurate: bool = Field(default=False, description="Passed the accuracy gate "
                                                      "(max-abs-diff, or top-1 agreement for "
                                                      "INT8).")
    chosen: bool = Field(default=False, description="This candidate is the one published.")
    note: str = Field(default="", description="Why it was not chosen, or what failed.")


class CompilationJobStatus(BaseModel):
    """What the compilation did (rolled up from its Job and the compiler's report)."""

    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = Field(
        default=None, description="The metadata.generation the operator last acted on; the "
        "conditions describe that spec.")
    conditions: list[Condition] = Field(
        default_factory=list, json_schema_extra=LIST_MAP_BY_TYPE,
        description="Running: the compiler's Job is at work. Complete / Failed: how it ended "
        "(monotonic: once True, never changed), with the reason and message.")
    phase: str | None = Field(default=None, description="Pending, Compiling, Complete or "
                                                        "Failed.")
    model: str | None = Field(default=None, description="The model compiled.")
    startTime: str | None = Field(default=None, description="When the operator started the "
                                                            "job (RFC 3339).")
    completionTime: str | None = Field(default=None, description="When the job completed or "
                                                                 "failed (RFC 3339).")
    artifactUri: str | None = Field(default=None, description="<output>/artifact.tar.gz: "
                                                              "serve it with format: compiled.")
    sha256: str | None = Field(default=None, description="sha256 of the artifact tarball.")
    sourceSha256: str | None = Field(default=None, description="sha256 of the ONNX model.")
    target: str | None = Field(default=None, description="The target compiled for "
                                                         "(spec.target); targetCpu names its "
                                                         "CPU.")
    targetCpu: str | None = Field(default=None, description="The target's CPU as LLVM "
                                                            "names it.")
    chosen: str | None = Field(default=None, description="The candidate published.")
    backend: str | None = Field(default=None, description="What serves the artifact: tvm or "
                                                          "onnx.")
    speedup: float | None = Field(default=None, description="The artifact's speedup over "
                                                            "onnxruntime fp32 (unset: not "
                                                            "timed).")
    maxAbsDiff: float | None = Field(default=None, description="Largest absolute difference "
                                                               "from onnxruntime fp32.")
    top1Agreement: float | None = Field(default=None, description="Share of rows whose "
                                                                  "top-1 matches fp32's.")
    verification: str | None = Field(default=None, description="How correctness and speed "
                                                               "were established.")
    reason: str | None = Field(default=None, description="Why the chosen candidate won, or "
                                                         "why the ONNX model is served.")
    tvmStatus: str | None = Field(default=None, description="Set when TVM cannot import the "
                                                            "model (the ops it lacks).")
    batchSizes: list[int] | None = Field(default=None, description="The batch sizes compiled "
                                                                   "and measured.")
    tuningTrials: int | None = Field(default=None, description="MetaSchedule trials run "
                                                               "(0 with a warm tuning cache).")
    tuningCacheHit: bool | None = Field(default=None, description="Tuning records came from "
                                                                  "tuning.cacheUri.")
    compileSeconds: float | None = Field(default=None, description="Wall-clock seconds the "
                                                                   "compiler ran.")
    candidates: list[CandidateStatus] | None = Field(default=None, description="Every "
                                                     "candidate measured, with its speed, "
                                                     "accuracy and why it won or lost.")


class CompilationJob(BaseModel):
    """A whole CompilationJob object as read from YAML or the Kubernetes API."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["kubeinfer.io/v1alpha1"]
    kind: Literal["CompilationJob"]
    metadata: ObjectMeta
    spec: CompilationJobSpec
    status: CompilationJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name
