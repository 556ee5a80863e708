"""``spec.deploymentConfig``: deployment guardrails (SageMaker DeploymentConfig).

When a variant's model servers must be replaced (its model, image, env or
resources change: ``VariantPlan.server_hash``), the new ("green") fleet comes
up next to the old ("blue") one and traffic shifts to it in steps, each baked
while alarms are evaluated; a tripped alarm sends all traffic back to blue at
once. Field names follow SageMaker's ``DeploymentConfig``
(``BlueGreenUpdatePolicy``, ``RollingUpdatePolicy``, ``AutoRollbackConfiguration``)
in camelCase; SageMaker's CloudWatch alarms become conditions over the
gateway's own metrics (``errorRate``, ``latencyP99Ms``), a PromQL query, or
``disagreement``: while a step bakes, the gateway mirrors blue's requests to green
and green's to blue (``contract.shadow.MirrorRoute``) and compares the two
answers as it does for a shadow variant; the alarm trips when the share of pairs
that disagree is above its threshold.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: SageMaker's bounds (seconds): WaitIntervalInSeconds, TerminationWaitInSeconds 0-3600;
#: MaximumExecutionTimeoutInSeconds 600-28800 (we allow from 60: small test endpoints).
MAX_WAIT_S = 3600
MIN_EXECUTION_TIMEOUT_S = 60
MAX_EXECUTION_TIMEOUT_S = 28800
MAX_ALARMS = 10
MAX_QUERY = 4096


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class CapacitySizeType(StrEnum):
    #: A number of instances (replicas) of the variant.
    INSTANCE_COUNT = "InstanceCount"
    #: A percentage of the variant's capacity (replicas, and so traffic).
    CAPACITY_PERCENT = "CapacityPercent"


class CapacitySize(_Spec):
    """An amount of a variant's capacity (SageMaker CapacitySize)."""

    type: Annotated[
        CapacitySizeType,
        Field(description="InstanceCount: a number of replicas; CapacityPercent: a "
                          "percentage of the variant's replicas (and of its traffic)."),
    ]
    value: Annotated[
        int,
        Field(description="The count (InstanceCount) or the percentage, 1 to 100 "
                          "(CapacityPercent).", ge=1, le=1000),
    ]

    @model_validator(mode="after")
    def _percent(self) -> CapacitySize:
        if self.type is CapacitySizeType.CAPACITY_PERCENT and self.value > 100:
            raise ValueError(f"value {self.value} is above 100 for type CapacityPercent; "
                             "use 1 to 100")
        return self


class TrafficRoutingType(StrEnum):
    #: All traffic to green at once, then one bake.
    ALL_AT_ONCE = "AllAtOnce"
    #: canarySize to green, bake, then all.
    CANARY = "Canary"
    #: linearStepSize more to green per step, each step baked.
    LINEAR = "Linear"


class TrafficRoutingConfig(_Spec):
    """How traffic shifts from blue to green (SageMaker TrafficRoutingConfiguration)."""

    type: Annotated[
        TrafficRoutingType,
        Field(description="AllAtOnce: all traffic to green, then bake. Canary: canarySize "
                          "to green, bake, then all. Linear: linearStepSize more per step, "
                          "each step baked."),
    ]
    waitIntervalInSeconds: Annotated[
        int,
        Field(description="Bake time of each step, seconds (0 to 3600): alarms are "
                          "evaluated throughout, and a step passes only once every alarm had "
                          "enough requests to be evaluated.", ge=0, le=MAX_WAIT_S),
    ] = 0
    canarySize: Annotated[
        CapacitySize | None,
        Field(description="Canary only: the share of the variant sent to green first."),
    ] = None
    linearStepSize: Annotated[
        CapacitySize | None,
        Field(description="Linear only: the share added to green at each step."),
    ] = None

    @model_validator(mode="after")
    def _sizes(self) -> TrafficRoutingConfig:
        if ((self.canarySize is not None) != (self.type is TrafficRoutingType.CANARY)
                or (self.linearStepSize is not None) != (self.type is TrafficRoutingType.LINEAR)):
            raise ValueError("set canarySize exactly when type is Canary, linearStepSize "
                             "exactly when type is Linear")
        return self


class BlueGreenUpdatePolicy(_Spec):
    """Blue/green: a whole new fleet next to the old, traffic shifted in steps
    (SageMaker BlueGreenUpdatePolicy)."""

    trafficRouting: Annotated[
        TrafficRoutingConfig,
        Field(description="How traffic shifts to green (SageMaker "
                          "TrafficRoutingConfiguration)."),
    ]
    terminationWaitInSeconds: Annotated[
        int,
        Field(description="After all traffic is on green and baked, seconds blue stays up "
                          "(for a quick manual rollback) before it is removed (0 to 3600).",
              ge=0, le=MAX_WAIT_S),
    ] = 0
    maximumExecutionTimeoutInSeconds: Annotated[
        int | None,
        Field(description="Longest the whole rollout may take, seconds (60 to 28800, default "
                          "28800); past it, traffic goes back to blue and the rollout is "
                          "RolledBack (reason Timeout).",
              ge=MIN_EXECUTION_TIMEOUT_S, le=MAX_EXECUTION_TIMEOUT_S),
    ] = None


class RollingUpdatePolicy(_Spec):
    """Rolling: green replaces blue batch by batch (SageMaker RollingUpdatePolicy)."""

    maximumBatchSize: Annotated[
        CapacitySize,
        Field(description="Replicas (or percent of them) moved to green per batch; traffic "
                          "follows capacity."),
    ]
    waitIntervalInSeconds: Annotated[
        int,
        Field(description="Bake time of each batch, seconds (0 to 3600).", ge=0,
              le=MAX_WAIT_S),
    ] = 0
    maximumExecutionTimeoutInSeconds: Annotated[
        int | None,
        Field(description="Longest the whole rollout may take, seconds (60 to 28800, default "
                          "28800).", ge=MIN_EXECUTION_TIMEOUT_S, le=MAX_EXECUTION_TIMEOUT_S),
    ] = None
    rollbackMaximumBatchSize: Annotated[
        CapacitySize | None,
        Field(description="Accepted for SageMaker compatibility: a rollback always moves all "
                          "traffic back to blue at once (blue is never scaled below what "
                          "carries its traffic)."),
    ] = None


class Comparison(StrEnum):
    GREATER = "GreaterThanThreshold"
    GREATER_OR_EQUAL = "GreaterThanOrEqualToThreshold"
    LESS = "LessThanThreshold"
    LESS_OR_EQUAL = "LessThanOrEqualToThreshold"


class PromQLAlarm(_Spec):
    """An alarm on a PromQL query's value (SageMaker: a CloudWatch alarm)."""

    query: Annotated[
        str,
        Field(description="PromQL returning one number, sent to autoRollback.prometheusUrl; "
                          "{endpoint}, {variant} and {namespace} are replaced by the "
                          "Endpoint's and the green fleet's route names (as the gateway "
                          "labels its metrics) and the namespace; on Kubernetes every "
                          "selector must name the namespace.",
              min_length=1, max_length=MAX_QUERY),
    ]
    threshold: Annotated[float, Field(description="The value compared with the query's.")]
    comparison: Annotated[
        Comparison,
        Field(description="How the value trips the alarm (CloudWatch ComparisonOperator)."),
    ] = Comparison.GREATER


#: The kinds of alarm, one of which each ``Alarm`` sets.
ALARM_KINDS = ("errorRate", "latencyP99Ms", "promQL", "disagreement")
#: Share of each fleet's requests mirrored to the other while a disagreement alarm bakes.
DEFAULT_MIRROR_SAMPLING = 100.0


class Alarm(_Spec):
    """One rollback alarm: a condition over green's traffic (set exactly one of errorRate,
    latencyP99Ms, promQL, disagreement)."""

    name: Annotated[
        str,
        Field(description="Alarm name (SageMaker AlarmName), shown in status and Events.",
              pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$", min_length=1, max_length=63),
    ]
    errorRate: Annotated[
        float | None,
        Field(description="Trips when green's share of error answers (model errors and 5xx) "
                          "over windowSeconds is above this fraction, 0 to 1.", ge=0, le=1),
    ] = None
    latencyP99Ms: Annotated[
        float | None,
        Field(description="Trips when green's 99th percentile model latency (the gateway's "
                          "upstream round trip) over windowSeconds is above this, ms.", gt=0),
    ] = None
    promQL: Annotated[
        PromQLAlarm | None,
        Field(description="Trips when a PromQL query's value compares with its threshold."),
    ] = None
    disagreement: Annotated[
        float | None,
        Field(description="Trips when green and blue disagree on more than this fraction "
                          "(0 to 1, as errorRate) of the requests both answered over "
                          "windowSeconds: while "
                          "a step bakes the gateway mirrors each fleet's requests to the other "
                          "(mirrorSamplingPercentage of them) and compares the two answers as "
                          "for a shadow variant (same label or argmax; numbers within "
                          "tolerance).", ge=0, le=1),
    ] = None
    mirrorSamplingPercentage: Annotated[
        float | None,
        Field(description="disagreement only: the percentage of each fleet's requests copied "
                          "to the other fleet while a step bakes (default 100; the largest of "
                          "the disagreement alarms applies). Copies are sent off the request "
                          "path and add that share of load to each fleet.", gt=0, le=100),
    ] = None
    windowSeconds: Annotated[
        int,
        Field(description="errorRate, latencyP99Ms and disagreement: the window, seconds (10 "
                          "to 3600).",
              ge=10, le=MAX_WAIT_S),
    ] = 60
    minRequests: Annotated[
        int,
        Field(description="errorRate, latencyP99Ms and disagreement: fewer requests to green "
                          "(disagreement: fewer compared pairs) in the window and the alarm "
                          "cannot be evaluated yet; the bake waits for them (bounded by "
                          "maximumExecutionTimeoutInSeconds).", ge=1,
              le=1_000_000),
    ] = 20

    @model_validator(mode="after")
    def _one_kind(self) -> Alarm:
        given = [f for f in ALARM_KINDS if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"alarm {self.name!r} sets {', '.join(given) or 'none'} of "
                             f"{', '.join(ALARM_KINDS)}; set exactly one")
        if self.mirrorSamplingPercentage is not None and self.disagreement is None:
            raise ValueError(f"alarm {self.name!r} sets mirrorSamplingPercentage without "
                             "disagreement; remove it or make it a disagreement alarm")
        return self

    @property
    def kind(self) -> str:
        return next(f for f in ALARM_KINDS if getattr(self, f) is not None)

    @property
    def threshold(self) -> float:
        """The threshold of the alarm's kind (promQL: the query's)."""
        value = self.promQL.threshold if self.promQL is not None else getattr(self, self.kind)
        return float(value)


class AutoRollbackConfig(_Spec):
    """Alarms that roll a deployment back (SageMaker AutoRollbackConfiguration)."""

    alarms: Annotated[
        list[Alarm],
        Field(description="Alarms evaluated while green takes traffic; any tripped alarm "
                          "rolls back (at most 10).", max_length=MAX_ALARMS,
              json_schema_extra={"x-kubernetes-list-type": "map",
                                 "x-kubernetes-list-map-keys": ["name"]}),
    ] = Field(default_factory=list)
    prometheusUrl: Annotated[
        str | None,
        Field(description="Prometheus server answering promQL alarms, e.g. "
                          "http://prometheus:9090 (the operator's outbound policy applies).",
              pattern="^https?://", max_length=2048),
    ] = None

    @model_validator(mode="after")
    def _prometheus(self) -> AutoRollbackConfig:
        names = [a.name for a in self.alarms]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate alarm name(s) {', '.join(dupes)}; give each alarm a "
                             "unique name")
        if self.prometheusUrl is None and any(a.promQL is not None for a in self.alarms):
            raise ValueError("a promQL alarm needs prometheusUrl; set it to your Prometheus "
                             "server")
        return self


class DeploymentConfig(_Spec):
    """How a variant's new model servers replace the old (SageMaker DeploymentConfig)."""

    blueGreen: Annotated[
        BlueGreenUpdatePolicy | None,
        Field(description="Blue/green traffic shifting (SageMaker BlueGreenUpdatePolicy); "
                          "set exactly one of blueGreen, rolling."),
    ] = None
    rolling: Annotated[
        RollingUpdatePolicy | None,
        Field(description="Batch-by-batch replacement (SageMaker RollingUpdatePolicy)."),
    ] = None
    autoRollback: Annotated[
        AutoRollbackConfig | None,
        Field(description="Alarms that send all traffic back to blue (SageMaker "
                          "AutoRollbackConfiguration)."),
    ] = None

    @model_validator(mode="after")
    def _one_policy(self) -> DeploymentConfig:
        given = [f for f in ("blueGreen", "rolling") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"deploymentConfig sets {', '.join(given) or 'none'} of blueGreen, "
                             "rolling; set exactly one")
        return self

    @property
    def alarms(self) -> list[Alarm]:
        return self.autoRollback.alarms if self.autoRollback else []

    @property
    def mirror_sampling(self) -> float | None:
        """Percent of each fleet's requests mirrored to the other while a step bakes (None:
        no disagreement alarm, no mirroring)."""
        shares = [a.mirrorSamplingPercentage or DEFAULT_MIRROR_SAMPLING
                  for a in self.alarms if a.disagreement is not None]
        return max(shares) if shares else None

    @property
    def timeout_s(self) -> int:
        policy = self.blueGreen or self.rolling
        assert policy is not None
        return policy.maximumExecutionTimeoutInSeconds or MAX_EXECUTION_TIMEOUT_S


class AlarmEvaluationStatus(BaseModel):
    """One alarm's latest evaluation."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="The alarm (deploymentConfig.autoRollback.alarms[*].name).")
    kind: str = Field(description="errorRate, latencyP99Ms, promQL or disagreement.")
    threshold: float = Field(description="The alarm's threshold.")
    value: float | None = Field(default=None, description="The value measured (absent: not "
                                                          "evaluable yet).")
    requests: int | None = Field(default=None, description="Requests to green in the window "
                                                           "(disagreement: pairs compared).")
    tripped: bool = Field(default=False, description="Whether the alarm tripped.")
    message: str = Field(default="", description="The evaluation in words.")


class RolloutStatus(BaseModel):
    """One variant's guarded rollout (``spec.deploymentConfig``)."""

    model_config = ConfigDict(extra="forbid")

    variant: str = Field(description="The variant rolling out.")
    phase: str = Field(description="Provisioning (green starting), Baking (step k of n), "
                                   "Terminating (all traffic on green, blue kept for "
                                   "terminationWaitInSeconds), Complete or RolledBack.")
    blueFleet: str = Field(description="The fleet serving before (route and Deployment "
                                       "<endpoint>-<fleet>).")
    greenFleet: str = Field(description="The fleet rolled out.")
    toHash: str = Field(description="Server hash of the spec rolled out.")
    fromHash: str | None = Field(default=None, description="Server hash blue runs.")
    step: int = Field(default=0, description="Current step, from 1.")
    steps: int = Field(default=0, description="Number of traffic steps.")
    trafficToGreen: float = Field(default=0.0, description="Percent of the variant's traffic "
                                                           "on green.")
    startedAt: str | None = Field(default=None, description="When the rollout started.")
    stepStartedAt: str | None = Field(default=None, description="When the step started.")
    message: str = Field(default="", description="What is happening, in words.")
    reason: str | None = Field(default=None, description="Why a RolledBack rollout was "
                                                         "rolled back: AlarmTripped, Timeout "
                                                         "or GreenFailed (the green fleet "
                                                         "cannot become ready).")
    lastAlarmEvaluation: list[AlarmEvaluationStatus] = Field(
        default_factory=list, description="Each alarm's latest evaluation.")
