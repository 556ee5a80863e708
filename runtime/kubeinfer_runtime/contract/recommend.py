"""Inference Recommender's contract: candidates, price table, load settings, report.

A recommendation runs as one process, ``kubeinfer-runtime recommend --request
FILE`` (started by ``kubeinfer recommend``, or a RecommendationJob's pod with the
request in ``KUBEINFER_RECOMMEND_REQUEST``). It load-tests every candidate with
an open-loop Poisson generator at stepped rates, keeps the highest rate whose
p99 holds the SLO with errors under 0.1% (the candidate's max throughput),
prices it from the instance-type table, and ranks candidates by cost per 1M
inferences at that throughput.

Locally the process starts each candidate's model servers itself; on Kubernetes
the operator creates one Deployment + Service per candidate and hands their URLs
in ``Candidate.urls`` (the runtime never calls the Kubernetes API).

Field names are camelCase: the RecommendationJob CRD embeds these models, and a
candidates file uses the same keys. The operator imports this module (no heavy
dependencies here).
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Bad request (unreadable model, bad candidates): a retry cannot help.
EXIT_BAD_INPUT = 42
#: No candidate held the SLO at any rate, or every candidate failed.
EXIT_NO_RECOMMENDATION = 3
EXIT_FAILED = 1
#: Kubernetes reads at most 4 KiB of a termination message.
MAX_TERMINATION_BYTES = 4096
#: The error budget: a rate holds when errors are at most this share of requests.
MAX_ERROR_RATE = 0.001

_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_SUFFIX = {"": 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "Ki": 1024.0, "Mi": 1024.0 ** 2, "Gi": 1024.0 ** 3, "Ti": 1024.0 ** 4,
           "Pi": 1024.0 ** 5}


def quantity(value: str) -> float:
    """A Kubernetes quantity as a number (``500m`` -> 0.5, ``1Gi`` -> 1073741824)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?", value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 1Gi)")
    return float(m.group(1)) * _SUFFIX[m.group(2) or ""]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class InstanceType(_Strict):
    """One row of the price table (the example table's prices are illustrations, not quotes)."""

    name: Annotated[str, Field(description="Instance type name, e.g. c-2x4.", min_length=1,
                               max_length=63)]
    cpu: Annotated[float, Field(description="CPUs one instance of this type offers.", gt=0,
                                le=1024)]
    memory: Annotated[str, Field(description="Memory one instance offers (a Kubernetes "
                                             "quantity, e.g. 4Gi).", pattern=_QUANTITY)]
    pricePerHour: Annotated[float, Field(description="Price of one instance for an hour, in "
                                                     "any currency (used consistently).",
                                         ge=0)]

    @field_validator("memory")
    @classmethod
    def _parse(cls, v: str) -> str:
        quantity(v)
        return v


class Resources(_Strict):
    """A candidate replica's Kubernetes resources."""

    requests: Annotated[
        dict[str, Annotated[str, Field(pattern=_QUANTITY)]],
        Field(description="cpu and memory requests of one replica (they pick the instance "
                          "type: the cheapest that fits)."),
    ] = Field(default_factory=dict)
    limits: Annotated[
        dict[str, Annotated[str, Field(pattern=_QUANTITY)]],
        Field(description="cpu and memory limits of one replica. Locally a cpu limit pins "
                          "the replica to that many cores (rounded up)."),
    ] = Field(default_factory=dict)

    def cpu(self) -> float | None:
        raw = self.limits.get("cpu") or self.requests.get("cpu")
        return quantity(raw) if raw else None

    def memory(self) -> float | None:
        raw = self.requests.get("memory") or self.limits.get("memory")
        return quantity(raw) if raw else None


Artifact = Literal["onnx", "compiled"]


class Candidate(_Strict):
    """One deployment setting to measure."""

    name: Annotated[str, Field(description="Unique name (a DNS label): names the candidate's "
                                           "processes or Deployment.", pattern=_NAME,
                               max_length=40)]
    resources: Annotated[Resources, Field(description="Requests and limits of one "
                                                      "replica.")] = Field(
        default_factory=Resources)
    threads: Annotated[int, Field(description="onnxruntime intra-op threads of one "
                                              "inference (KUBEINFER_INTRA_OP_THREADS).",
                                  ge=1, le=64)] = 1
    workers: Annotated[int, Field(description="uvicorn worker processes per replica "
                                              "(KUBEINFER_WORKERS).", ge=1, le=32)] = 1
    replicas: Annotated[int, Field(description="Replicas serving the candidate.", ge=1,
                                   le=16)] = 1
    artifact: Annotated[Artifact, Field(description="onnx: the model as given; compiled: "
                                                    "the compiled artifact "
                                                    "(compiledModelUri).")] = "onnx"
    instanceType: Annotated[str | None, Field(description="Price the candidate as this "
                                                          "instance type (default: the "
                                                          "cheapest that fits its requests).",
                                              max_length=63)] = None
    urls: Annotated[list[str] | None, Field(description="Set by the operator: the URLs of "
                                                        "the candidate's Service (then no "
                                                        "process is started).",
                                            max_length=16)] = None


def _onnx_only() -> list[Artifact]:
    return ["onnx"]


class CandidateGrid(_Strict):
    """The cross product of these lists, one candidate per combination."""

    resources: Annotated[list[Resources], Field(description="Resource sizes to try.",
                                                min_length=1, max_length=8)] = Field(
        default_factory=lambda: [Resources()])
    threads: Annotated[list[Annotated[int, Field(ge=1, le=64)]],
                       Field(description="Intra-op thread counts to try.", min_length=1,
                             max_length=8)] = Field(default_factory=lambda: [1])
    workers: Annotated[list[Annotated[int, Field(ge=1, le=32)]],
                       Field(description="Workers per replica to try.", min_length=1,
                             max_length=8)] = Field(default_factory=lambda: [1])
    replicas: Annotated[list[Annotated[int, Field(ge=1, le=16)]],
                        Field(description="Replica counts to try.", min_length=1,
                              max_length=8)] = Field(default_factory=lambda: [1])
    artifacts: Annotated[list[Artifact], Field(description="onnx, compiled or both.",
                                               min_length=1, max_length=2)] = Field(
        default_factory=_onnx_only)

    def expand(self) -> list[Candidate]:
        out = []
        for res, th, wk, rp, art in itertools.product(self.resources, self.threads,
                                                      self.workers, self.replicas,
                                                      self.artifacts):
            cpu = res.requests.get("cpu") or res.limits.get("cpu") or "any"
            name = f"{art}-c{cpu}-t{th}-w{wk}-r{rp}".lower().replace(".", "p")
            out.append(Candidate(name=name, resources=res, threads=th, workers=wk,
                                 replicas=rp, artifact=art))
        return out


#: An example price table. NOT real prices: shaped like small cloud CPU instances.
DEFAULT_INSTANCE_TYPES = [
    InstanceType(name="c-1x2", cpu=1, memory="2Gi", pricePerHour=0.05),
    InstanceType(name="c-2x4", cpu=2, memory="4Gi", pricePerHour=0.10),
    InstanceType(name="c-4x8", cpu=4, memory="8Gi", pricePerHour=0.20),
    InstanceType(name="c-8x16", cpu=8, memory="16Gi", pricePerHour=0.40),
]


class LoadSettings(_Strict):
    """How candidates are measured."""

    sloP99Ms: Annotated[float, Field(description="The p99 latency a rate must hold, ms "
                                                 "(measured from each request's scheduled "
                                                 "send time).", gt=0, le=600000)] = 100.0
    startRate: Annotated[float, Field(description="First rate of each candidate's steps, "
                                                  "requests/s.", gt=0, le=1e6)] = 100.0
    rateFactor: Annotated[float, Field(description="Each step's rate is the last one's "
                                                   "times this.", gt=1, le=4)] = 1.5
    maxRate: Annotated[float, Field(description="Highest rate tried, requests/s.", gt=0,
                                    le=1e6)] = 4000.0
    stepSeconds: Annotated[float, Field(description="Length of one screening step, seconds "
                                                    "(survivors of successive halving run "
                                                    "steps twice as long each round, up to "
                                                    "4 times this).",
                                        gt=0, le=3600)] = 1.0
    warmupSeconds: Annotated[float, Field(description="Load before each candidate's first "
                                                      "step, not measured.", ge=0,
                                          le=600)] = 1.0
    search: Annotated[Literal["halving", "exhaustive"],
                      Field(description="halving: screen every candidate with short steps, "
                                        "then measure the better half again with longer "
                                        "steps until one is left; exhaustive: every "
                                        "candidate with the longest steps.")] = "halving"
    maxMinutes: Annotated[float, Field(description="Time budget of the whole search, "
                                                   "minutes: later rounds are skipped past "
                                                   "it.", gt=0, le=1440)] = 10.0
    maxConnections: Annotated[int, Field(description="Connections the generator opens per "
                                                     "target URL at most.", ge=1,
                                         le=4096)] = 64
    timeoutSeconds: Annotated[float, Field(description="A request not answered within this "
                                                       "counts as an error.", gt=0,
                                           le=600)] = 10.0
    headroom: Annotated[float, Field(description="Share of the measured max throughput per "
                                                 "replica the autoscaling target is set to.",
                                     gt=0, le=1)] = 0.7


class CandidateSearch(_Strict):
    """What to try and how to measure it: a candidates file, or a RecommendationJob's spec."""

    candidates: Annotated[list[Candidate] | None, Field(description="Candidates, listed "
                                                                    "(exclusive with grid).",
                                                        min_length=1, max_length=64)] = None
    grid: Annotated[CandidateGrid | None, Field(description="Candidates as the cross "
                                                            "product of lists (exclusive "
                                                            "with candidates).")] = None
    instanceTypes: Annotated[list[InstanceType] | None,
                             Field(description="Price table (default: an example table, "
                                               "not real prices).", max_length=64)] = None
    load: Annotated[LoadSettings, Field(description="How to measure.")] = Field(
        default_factory=LoadSettings)
    payloads: Annotated[list[Annotated[str, Field(max_length=1 << 20)]] | None,
                        Field(description="Sample request bodies (default: one made from "
                                          "the model's input signature).",
                              max_length=64)] = None
    contentType: Annotated[str, Field(description="Content type of the payloads.",
                                      max_length=255)] = "application/json"

    @model_validator(mode="after")
    def _one(self) -> CandidateSearch:
        if self.candidates is not None and self.grid is not None:
            raise ValueError("set candidates or grid, not both")
        return self

    def expand(self) -> list[Candidate]:
        """The candidates to measure (default: 1 and 2 threads, and 2 workers)."""
        if self.candidates is not None:
            return list(self.candidates)
        if self.grid is not None:
            return self.grid.expand()
        return [Candidate(name="threads-1"), Candidate(name="threads-2", threads=2),
                Candidate(name="workers-2", workers=2)]


class RecommendRequest(_Strict):
    """Everything one recommendation needs (``--request FILE`` / KUBEINFER_RECOMMEND_REQUEST)."""

    modelUri: Annotated[str, Field(description="The ONNX model (file:// or s3://).",
                                   min_length=1)]
    compiledModelUri: Annotated[str | None, Field(description="The compiled artifact of the "
                                                              "same model (candidates with "
                                                              "artifact: compiled).")] = None
    contentType: Annotated[str, Field(description="Content type of the payloads.")] = (
        "application/json")
    payloads: Annotated[list[str] | None, Field(description="Sample request bodies, sent in "
                                                            "turn (default: one generated "
                                                            "from the model's input "
                                                            "signature).",
                                                max_length=64)] = None
    candidates: Annotated[list[Candidate], Field(description="Candidates to measure.",
                                                 min_length=1, max_length=64)]
    instanceTypes: Annotated[list[InstanceType], Field(description="Price table.",
                                                       max_length=64)] = Field(
        default_factory=lambda: list(DEFAULT_INSTANCE_TYPES))
    load: Annotated[LoadSettings, Field(description="How to measure.")] = Field(
        default_factory=LoadSettings)
    startTimeoutSeconds: Annotated[float, Field(description="A candidate that cannot start "
                                                            "and answer one request within "
                                                            "this fails.", gt=0,
                                                le=600)] = 60.0

    @model_validator(mode="after")
    def _check(self) -> RecommendRequest:
        names = [c.name for c in self.candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidates: duplicate names {', '.join(dupes)}")
        if self.compiledModelUri is None and any(c.artifact == "compiled"
                                                 for c in self.candidates):
            raise ValueError("candidates with artifact: compiled need compiledModelUri")
        known = {t.name for t in self.instanceTypes}
        unknown = sorted({c.instanceType for c in self.candidates
                          if c.instanceType and c.instanceType not in known})
        if unknown:
            raise ValueError(f"candidates name instance types not in instanceTypes: "
                             f"{', '.join(unknown)}")
        return self


# -- report ----------------------------------------------------------------------------------


class Quantile(_Strict):
    """A latency quantile with its 95% confidence interval, ms."""

    value: float = Field(description="The quantile, ms.")
    low: float = Field(description="Lower end of its 95% confidence interval, ms.")
    high: float = Field(description="Upper end of its 95% confidence interval, ms.")


class StepResult(_Strict):
    """One rate step of one candidate."""

    targetRate: float = Field(description="Rate asked for, requests/s.")
    achievedRate: float = Field(description="Rate the generator sent at, requests/s "
                                            "(requests over the time sending took).")
    seconds: float = Field(default=0.0, description="Scheduled length of the step, s.")
    requests: int = Field(description="Requests sent.")
    errors: int = Field(description="Requests failed or timed out.")
    p50: Quantile = Field(description="Median latency.")
    p90: Quantile = Field(description="90th percentile latency.")
    p99: Quantile = Field(description="99th percentile latency.")
    p999: Quantile = Field(description="99.9th percentile latency.")
    cpuPercent: float = Field(description="CPU the candidate's processes used (100 = one "
                                          "core); 0 when not measurable (remote).")
    memoryBytes: int = Field(description="Resident memory of the candidate's processes.")
    held: bool = Field(description="p99 within the SLO and errors within 0.1%.")
    limitedBy: Literal["slo", "errors", "generator"] | None = Field(
        default=None, description="Why the step did not hold: p99 over the SLO, errors over "
        "0.1%, or the generator fell behind its schedule by over 5% of the step (the "
        "candidate's real limit is then higher than reported).")


class CandidateResult(_Strict):
    """What was measured for one candidate."""

    name: str = Field(description="The candidate.")
    candidate: Candidate = Field(description="Its settings.")
    state: Literal["Measured", "Screened", "Failed"] = Field(
        description="Measured: in the last round; Screened: dropped by successive halving; "
                    "Failed: could not start or answer.")
    rounds: int = Field(default=0, description="Rounds it was measured in.")
    steps: list[StepResult] = Field(default_factory=list, description="Its last round's "
                                                                      "steps.")
    maxThroughput: float = Field(default=0.0, description="Highest rate that held the SLO "
                                                          "and error budget, requests/s.")
    atMax: StepResult | None = Field(default=None, description="The step at max throughput.")
    instanceType: str | None = Field(default=None, description="Instance type it is priced "
                                                               "as.")
    costPerHour: float | None = Field(default=None, description="Price of its replicas for "
                                                                "an hour.")
    costPerMillion: float | None = Field(default=None, description="Cost of 1M inferences "
                                                                   "at max throughput.")
    error: str | None = Field(default=None, description="Why it failed (with its log's "
                                                        "last lines).")


class RecommendReport(_Strict):
    """The ranked result of a recommendation."""

    sloP99Ms: float = Field(description="The SLO used.")
    search: str = Field(description="halving or exhaustive.")
    seconds: float = Field(description="Wall-clock seconds the search took.")
    ranking: list[str] = Field(description="Candidate names, best first (failed ones last).")
    recommended: str | None = Field(description="The best candidate (unset: none held the "
                                                "SLO).")
    reason: str = Field(description="Why it was chosen, or why none was.")
    autoscalingTarget: float | None = Field(default=None, description="Suggested "
                                            "InvocationsPerReplica target, per minute.")
    results: list[CandidateResult] = Field(description="Every candidate, in ranking order.")

    def result(self, name: str) -> CandidateResult:
        return next(r for r in self.results if r.name == name)

    def termination_message(self) -> str:
        """A compact JSON summary under 4 KiB (the ranked table, no steps)."""
        import json

        rows = [{"name": r.name, "state": r.state, "maxThroughput": round(r.maxThroughput, 1),
                 "p99Ms": round(r.atMax.p99.value, 2) if r.atMax else None,
                 "costPerMillion": (round(r.costPerMillion, 4)
                                    if r.costPerMillion is not None else None)}
                for r in self.results]
        doc = {"recommended": self.recommended, "reason": self.reason[:400],
               "autoscalingTarget": self.autoscalingTarget, "ranking": rows}
        text = json.dumps(doc, separators=(",", ":"))
        while len(text.encode()) > MAX_TERMINATION_BYTES and rows:
            rows.pop()
            text = json.dumps(doc, separators=(",", ":"))
        return text


def per_million(cost_per_hour: float | None, rps: float) -> float | None:
    if cost_per_hour is None or rps <= 0 or math.isnan(rps):
        return None
    return cost_per_hour / (rps * 3600.0) * 1e6
