"""The ``spec.async`` block of an Endpoint (``type: Async``): SageMaker's AsyncInferenceConfig.

Its own module so the Endpoint model stays readable; ``api.endpoint`` imports
it. Field descriptions become ``kubectl explain`` text.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kubeinfer_runtime.contract import (
    ASYNC_DEFAULT_INVOCATION_TIMEOUT_S,
    ASYNC_DEFAULT_MAX_QUEUED,
    ASYNC_MAX_INVOCATION_TIMEOUT_S,
    ASYNC_MAX_QUEUED,
    ASYNC_MAX_REQUEST_TTL_S,
)
from kubeinfer_runtime.contract.locations import (
    default_input_paths,
    normalize_prefix,
    prefix_problem,
)

_LOCATION = "^(s3://[^/]+/.*|file:///.+)$"
_PREFIX = "^(s3://[^/]+(/.*)?|file:///.+)$"
_URL = "^https?://.+"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _location_problem(value: str, field: str) -> str | None:
    if ".." in value.split("/"):
        return f"{field} {value!r} contains '..': name the location without parent segments"
    return None


class AsyncNotification(_Spec):
    """Webhooks POSTed a JSON notification per finished request (SageMaker's SNS topics).

    Delivery is at least once: receivers deduplicate by ``inferenceId``.
    """

    successUrl: Annotated[str | None, Field(description="Receives Completed notifications.",
                                            pattern=_URL)] = None
    errorUrl: Annotated[str | None, Field(description="Receives Failed notifications.",
                                          pattern=_URL)] = None


class AsyncScaling(_Spec):
    """Scale the workers on the queue backlog (SageMaker's ApproximateBacklogSizePerInstance)."""

    targetBacklogPerReplica: Annotated[
        float, Field(description="Backlog (queued + in flight) each worker should carry; "
                                 "replicas = ceil(backlog / target).", ge=0.1)] = 5.0
    minReplicas: Annotated[
        int, Field(description="Fewest workers; 0 scales to zero when the queue is idle.",
                   ge=0, le=1000)] = 0
    maxReplicas: Annotated[int, Field(description="Most workers.", ge=1, le=1000)] = 4
    scaleOutCooldown: Annotated[
        float, Field(description="Seconds after a scale-out before the next one (scaling "
                                 "from zero is immediate).", ge=0)] = 30.0
    scaleInCooldown: Annotated[
        float, Field(description="Seconds the backlog must stay low before workers are "
                                 "removed, and after any scaling before a scale-in.",
                     ge=0)] = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> AsyncScaling:
        if self.minReplicas > self.maxReplicas:
            raise ValueError(f"minReplicas {self.minReplicas} exceeds maxReplicas "
                             f"{self.maxReplicas}; lower minReplicas or raise maxReplicas")
        return self


class AsyncConfig(_Spec):
    """Asynchronous inference: requests are queued, inputs and outputs are objects."""

    outputPath: Annotated[
        str, Field(description="Where outputs go: <outputPath>/<InferenceId>.out "
                               "(s3://bucket/prefix or file:///dir).", pattern=_LOCATION)]
    failurePath: Annotated[
        str | None, Field(description="Where failure objects go: <failurePath>/<InferenceId>"
                                      "-error.out (default: <outputPath>/failures).",
                          pattern=_LOCATION)] = None
    inputPath: Annotated[
        list[Annotated[str, Field(pattern=_PREFIX, max_length=1024)]],
        Field(description="Folders InputLocation may name (s3://bucket/prefix/ or "
                          "file:///dir/); the gateway refuses any other input with 400 and "
                          "the workers check again. Default: the bucket of outputPath "
                          "(s3://bucket/), or for a file:// outputPath its parent folder.",
              max_length=16)] = Field(default_factory=list)
    maxInputBytes: Annotated[
        int, Field(description="Largest input object a worker reads, in bytes (SageMaker: "
                               "1 GB); bigger inputs fail without being read whole.",
                   ge=1, le=1 << 40)] = 1 << 30
    maxQueuedRequests: Annotated[
        int, Field(description="Most requests queued or in progress at once; past it "
                               "InvokeEndpointAsync answers 429 ThrottlingException "
                               "(Retry-After) instead of queuing, so callers cannot fill the "
                               "Redis async endpoints share (about 1 KB a request there).",
                   ge=1, le=ASYNC_MAX_QUEUED)] = ASYNC_DEFAULT_MAX_QUEUED
    notification: Annotated[
        AsyncNotification, Field(description="Webhooks notified of each outcome.")
    ] = Field(default_factory=AsyncNotification)
    maxConcurrentInvocationsPerReplica: Annotated[
        int, Field(description="Requests one worker processes at once.", ge=1, le=1000)] = 4
    maxRetries: Annotated[
        int, Field(description="Attempts after the first, for failures that may pass (a "
                               "crash, a timeout), before a request is dead-lettered with a "
                               "failure object. A bad input or a model error fails at once; "
                               "an unreachable object store or webhook is waited out (see "
                               "transientRetryBudget).", ge=0, le=100)] = 3
    transientRetryBudget: Annotated[
        float, Field(description="Seconds a request may spend failing on an unreachable object "
                                 "store, Redis or webhook (retried with backoff, workers "
                                 "pausing new work) before those failures count against "
                                 "maxRetries.", ge=0, le=86400)] = 600.0
    requestTTL: Annotated[
        int, Field(description="Default seconds a request may wait in the queue "
                               "(RequestTTLSeconds overrides it per request).",
                   ge=60, le=ASYNC_MAX_REQUEST_TTL_S)] = ASYNC_MAX_REQUEST_TTL_S
    invocationTimeout: Annotated[
        int, Field(description="Default seconds one inference may take "
                               "(InvocationTimeoutSeconds overrides it per request).",
                   ge=1, le=ASYNC_MAX_INVOCATION_TIMEOUT_S)] = ASYNC_DEFAULT_INVOCATION_TIMEOUT_S
    visibilityTimeout: Annotated[
        float, Field(description="Seconds after which a request held by a worker that stopped "
                                 "responding (crashed, killed) is handed to another.",
                     ge=1, le=3600)] = 60.0
    scaling: Annotated[
        AsyncScaling, Field(description="Worker scaling on the backlog, to and from zero.")
    ] = Field(default_factory=AsyncScaling)

    @field_validator("outputPath", "failurePath")
    @classmethod
    def _no_dotdot(cls, value: str | None) -> str | None:
        if value is not None:
            problem = _location_problem(value, "location")
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("inputPath")
    @classmethod
    def _confining(cls, value: list[str]) -> list[str]:
        for i, prefix in enumerate(value):
            problem = prefix_problem(prefix, f"inputPath[{i}]")
            if problem:
                raise ValueError(problem)
        return value

    @property
    def input_paths(self) -> list[str]:
        """The folders inputs may come from, the default applied (normalized)."""
        return [normalize_prefix(p) for p in self.inputPath or default_input_paths(
            self.outputPath)]

    @property
    def failure_path(self) -> str:
        return self.failurePath or self.outputPath.rstrip("/") + "/failures"
