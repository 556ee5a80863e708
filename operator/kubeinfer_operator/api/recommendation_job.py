"""Pydantic models of the ``RecommendationJob`` custom resource (kubeinfer.io/v1alpha1).

SageMaker's Inference Recommender as a Kubernetes resource: the operator creates one
Deployment + Service per candidate (the model's variant with the candidate's
resources, threads, workers and replicas), waits for them, runs
``kubeinfer-runtime recommend`` as a Job against their Service URLs, writes the
ranked table and the recommended Endpoint into the status, and deletes the
candidates. The candidates, price table and load settings are the runtime
contract's own models (``kubeinfer_runtime.contract.recommend``), embedded, so a
candidates file for ``kubeinfer recommend`` and this spec use the same keys. The
spec is immutable once created (a CEL rule on the CRD).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubeinfer_operator.api.endpoint import (
    DNS_LABEL,
    LIST_MAP_BY_TYPE,
    Condition,
    ModelSource,
    ObjectMeta,
    _Spec,
)
from kubeinfer_runtime.contract.recommend import (
    Candidate,
    CandidateGrid,
    CandidateSearch,
    InstanceType,
    LoadSettings,
)

GROUP = "kubeinfer.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "RecommendationJob"
PLURAL = "recommendationjobs"
SINGULAR = "recommendationjob"
SHORT_NAMES = ["krj"]

#: Without activeDeadlineSeconds: the load test's own budget is 10 minutes by default.
DEFAULT_DEADLINE_S = 3600


class EndpointRef(_Spec):
    """An existing Endpoint whose variant is recommended for."""

    name: Annotated[str, Field(description="Name of the Endpoint (same namespace).",
                               min_length=1, max_length=63, pattern=DNS_LABEL)]
    variant: Annotated[str | None, Field(description="Its variant (default: the first).",
                                         min_length=1, max_length=63,
                                         pattern=DNS_LABEL)] = None


class RecommendationJobSpec(_Spec):
    """Desired state of a recommendation job (SageMaker CreateInferenceRecommendationsJob)."""

    model: Annotated[ModelSource | None, Field(
        description="The ONNX model, as a variant's model (format: onnx); exclusive with "
                    "endpointRef.")] = None
    endpointRef: Annotated[EndpointRef | None, Field(
        description="Recommend for this Endpoint's variant instead (its model, env and "
                    "placement); exclusive with model.")] = None
    compiledModelUri: Annotated[str | None, Field(
        description="Compiled artifact of the same model (a CompilationJob's "
                    "artifact.tar.gz), for candidates with artifact: compiled.",
        min_length=1, max_length=1024, json_schema_extra={"pattern": "^(s3|file)://.+"},
    )] = None
    candidates: Annotated[list[Candidate] | None, Field(
        description="Candidates, listed (exclusive with grid). Default: 1 and 2 threads, "
                    "and 2 workers.", min_length=1, max_length=16)] = None
    grid: Annotated[CandidateGrid | None, Field(
        description="Candidates as the cross product of lists (exclusive with "
                    "candidates); at most 16.")] = None
    instanceTypes: Annotated[list[InstanceType] | None, Field(
        description="Price table (default: an example table, not real prices).",
        max_length=64)] = None
    load: Annotated[LoadSettings, Field(description="How candidates are measured.")] = Field(
        default_factory=LoadSettings)
    payloads: Annotated[list[Annotated[str, Field(max_length=65536)]] | None, Field(
        description="Sample request bodies (default: one made from the model's input "
                    "signature).", max_length=16)] = None
    contentType: Annotated[str, Field(description="Content type of the payloads.",
                                      max_length=255)] = "application/json"
    activeDeadlineSeconds: Annotated[int | None, Field(
        description="Longest the whole job may run, candidates' start included; past it, "
                    "it fails (DeadlineExceeded). Default 3600.", ge=60, le=86400)] = None
    ttlSecondsAfterFinished: Annotated[int | None, Field(
        description="Seconds after the job completes or fails when its Kubernetes Job and "
                    "pod are deleted (the RecommendationJob and its status stay; the "
                    "candidates are deleted when the Job ends). Default: kept until the "
                    "RecommendationJob is deleted.", ge=0)] = None

    @model_validator(mode="after")
    def _one_source(self) -> RecommendationJobSpec:
        if (self.model is None) == (self.endpointRef is None):
            raise ValueError("set exactly one of model and endpointRef")
        if self.candidates is not None and self.grid is not None:
            raise ValueError("set candidates or grid, not both")
        if self.model is not None and self.model.format.value != "onnx":
            raise ValueError("model: point uri at the ONNX model (format: onnx) and the "
                             "compiled artifact at compiledModelUri")
        if len(self.search().expand()) > 16:
            raise ValueError("grid: at most 16 candidates (each is a Deployment)")
        return self

    def search(self) -> CandidateSearch:
        return CandidateSearch(candidates=self.candidates, grid=self.grid,
                               instanceTypes=self.instanceTypes, load=self.load,
                               payloads=self.payloads, contentType=self.contentType)

    @property
    def deadline_s(self) -> int:
        return self.activeDeadlineSeconds or DEFAULT_DEADLINE_S


class RankedCandidate(BaseModel):
    """One row of the ranked table, as ``kubectl describe`` shows it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The candidate.")
    state: str = Field(description="Measured, Screened (dropped by successive halving) or "
                                   "Failed.")
    maxThroughput: float | None = Field(default=None, description="Highest rate that held "
                                        "the SLO and error budget, requests/s.")
    p99Ms: float | None = Field(default=None, description="p99 latency at that rate, ms.")
    costPerMillion: float | None = Field(default=None, description="Cost of 1M inferences "
                                         "at that rate (from the price table).")


class RecommendationJobStatus(BaseModel):
    """What the recommendation did (rolled up from its Job and the recommender's report)."""

    model_config = ConfigDict(extra="forbid")

    observedGeneration: int | None = Field(
        default=None, description="The metadata.generation the operator last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list, json_schema_extra=LIST_MAP_BY_TYPE,
        description="Running: candidates starting or being measured. Complete / Failed: how "
        "it ended (monotonic), with the reason and message.")
    phase: Literal["Pending", "StartingCandidates", "Measuring", "Complete", "Failed"] | None \
        = Field(default=None, description="Pending, StartingCandidates, Measuring, Complete "
                                          "or Failed.")
    model: str | None = Field(default=None, description="The model recommended for.")
    startTime: str | None = Field(default=None, description="When the operator started the "
                                                            "job (RFC 3339).")
    completionTime: str | None = Field(default=None, description="When the job completed or "
                                                                 "failed (RFC 3339).")
    candidatesAvailable: str | None = Field(default=None, description="Candidates whose "
                                            "Deployment is available, of all (e.g. 2/3).")
    recommended: str | None = Field(default=None, description="The winning candidate.")
    maxThroughput: float | None = Field(default=None, description="The winner's max "
                                        "throughput under the SLO, requests/s.")
    autoscalingTarget: float | None = Field(default=None, description="Suggested "
                                            "InvocationsPerReplica target, per minute.")
    reason: str | None = Field(default=None, description="Why the winner was chosen, or why "
                                                         "none was.")
    ranking: list[RankedCandidate] | None = Field(default=None, description="Every "
                                                  "candidate, best first.")
    recommendedEndpoint: str | None = Field(default=None, description="The recommended "
                                            "Endpoint as YAML (kubectl get krj NAME -o "
                                            "jsonpath='{.status.recommendedEndpoint}' | "
                                            "kubectl apply -f -).")


class RecommendationJob(BaseModel):
    """A whole RecommendationJob object as read from YAML or the Kubernetes API."""

    model_config = ConfigDict(extra="forbid")

    apiVersion: Literal["kubeinfer.io/v1alpha1"]
    kind: Literal["RecommendationJob"]
    metadata: ObjectMeta
    spec: RecommendationJobSpec
    status: RecommendationJobStatus | None = None

    @property
    def name(self) -> str:
        return self.metadata.name
