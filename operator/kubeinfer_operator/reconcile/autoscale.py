"""Auto scaling and serverless scale-to-zero decisions: PURE, no I/O.

Both backends (the local supervisor and the Kubernetes operator) collect a
metrics window, call :func:`decide` (every endpoint type) or
:func:`decide_serverless` (``type: Serverless``) and carry out the returned
replica count; the ``reason`` string is what they record (state/events locally,
``status`` + a Kubernetes Event on a cluster). Everything that depends on time
takes ``now`` explicitly so every step is testable with a fake clock.

Semantics (documented for users in README.md, "Auto scaling"):

* **target tracking**: ``desired = ceil(current * value / target)`` per policy
  (``InvocationsPerReplica`` is per replica per minute, like SageMaker's
  ``SageMakerVariantInvocationsPerInstance``), ignored within a 10 % tolerance
  band so noise around the target does not move replicas;
* **step scaling**: the first step whose ``[lowerBound, upperBound)`` holds the
  metric value adds ``change`` replicas (negative removes);
* the largest proposal wins (scale out when any policy wants it, scale in only
  when all agree), clamped to ``[minReplicas, maxReplicas]``;
* **scheduled**: while the current minute matches an entry's cron expression,
  its ``minReplicas``/``maxReplicas`` replace the policy's (first match wins),
  e.g. ``* 9-17 * * 1-5`` raises the floor during office hours;
* **cooldowns**: no scale-out within ``scaleOutCooldown`` of the last
  scale-out; no scale-in within ``scaleInCooldown`` of the last scaling of
  either direction;
* **flapping protection**: a scale-in goes only down to the highest
  recommendation seen during the last ``scaleInCooldown`` seconds (the HPA's
  stabilization window), so a dip between two peaks does not remove replicas.

Bounds (min, max, schedule) are enforced at once, cooldowns notwithstanding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum

from kubeinfer_operator.api.cron import cron_matches

#: Target tracking ignores deviations within this fraction of the target.
TOLERANCE = 0.1


class Metric(StrEnum):
    #: Invocations per replica per minute, from the gateway's counters.
    INVOCATIONS_PER_REPLICA = "InvocationsPerReplica"
    #: Average CPU of the variant's model servers, percent of one core.
    CPU_UTILIZATION = "CPUUtilization"
    #: A PromQL query answered by the configured Prometheus server.
    CUSTOM = "Custom"


def metric_key(metric: Metric, query: str | None) -> str:
    """The key of a metric value in the ``metrics`` mapping handed to :func:`decide`."""
    return f"custom:{query}" if metric is Metric.CUSTOM else metric.value


@dataclass(frozen=True)
class TargetTracking:
    metric: Metric
    target: float
    query: str | None = None

    @property
    def key(self) -> str:
        return metric_key(self.metric, self.query)


@dataclass(frozen=True)
class Step:
    change: int
    lower: float | None = None
    upper: float | None = None

    def holds(self, value: float) -> bool:
        return ((self.lower is None or value >= self.lower)
                and (self.upper is None or value < self.upper))


@dataclass(frozen=True)
class StepScaling:
    metric: Metric
    steps: tuple[Step, ...]
    query: str | None = None

    @property
    def key(self) -> str:
        return metric_key(self.metric, self.query)


@dataclass(frozen=True)
class Scheduled:
    cron: str
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_tracking: tuple[TargetTracking, ...] = ()
    step_scaling: tuple[StepScaling, ...] = ()
    scheduled: tuple[Scheduled, ...] = ()
    scale_in_cooldown_s: float = 300.0
    scale_out_cooldown_s: float = 60.0
    #: Prometheus server answering Custom queries (None: Custom policies idle).
    prometheus_url: str | None = None

    def metric_keys(self) -> set[str]:
        return {p.key for p in self.target_tracking} | {p.key for p in self.step_scaling}


@dataclass(frozen=True)
class ScaleState:
    """What a policy remembers between decisions (kept by the caller)."""

    last_scale_out: float | None = None
    last_scale_in: float | None = None
    #: (time, recommendation) pairs inside the stabilization window.
    recommendations: tuple[tuple[float, int], ...] = ()

    @property
    def last_scale(self) -> float | None:
        times = [t for t in (self.last_scale_out, self.last_scale_in) if t is not None]
        return max(times) if times else None


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    state: ScaleState = field(default_factory=ScaleState)

    def changes(self, current: int) -> bool:
        return self.desired != current


# -- decisions -------------------------------------------------------------------------------


def bounds(policy: Policy, now: datetime) -> tuple[int, int, str]:
    """(min, max, where they come from) in force at ``now``."""
    for entry in policy.scheduled:
        if cron_matches(entry.cron, now):
            return entry.min_replicas, entry.max_replicas, f"schedule {entry.cron!r}"
    return policy.min_replicas, policy.max_replicas, "policy"


def _proposals(policy: Policy, current: int,
               metrics: Mapping[str, float | None]) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    base = max(current, 1)
    for tt in policy.target_tracking:
        value = metrics.get(tt.key)
        if value is None:
            continue
        ratio = value / tt.target
        if current > 0 and abs(ratio - 1) <= TOLERANCE:
            out.append((current, f"{tt.key} {value:.3g} is within 10% of target {tt.target:g}"))
            continue
        out.append((math.ceil(base * ratio - 1e-9),
                    f"{tt.key} {value:.3g} vs target {tt.target:g}"))
    for sp in policy.step_scaling:
        value = metrics.get(sp.key)
        if value is None:
            continue
        for step in sp.steps:
            if step.holds(value):
                out.append((current + step.change,
                            f"{sp.key} {value:.3g} is in step {_describe_step(step)}"))
                break
        else:
            out.append((current, f"{sp.key} {value:.3g} matches no step"))
    return out


def _describe_step(step: Step) -> str:
    lo = "-inf" if step.lower is None else f"{step.lower:g}"
    hi = "+inf" if step.upper is None else f"{step.upper:g}"
    return f"[{lo}, {hi}) change {step.change:+d}"


def decide(policy: Policy, current: int, metrics: Mapping[str, float | None],
           state: ScaleState, now: datetime, *, t: float | None = None) -> Decision:
    """Desired replicas of one variant at ``now``, with the reason and the new state.

    ``metrics`` maps :func:`metric_key` to the value over the caller's window
    (None or missing: unknown, that policy abstains). ``now`` must be
    timezone-aware or consistently naive; schedules read ``now``. Cooldowns and
    the stabilization window run on ``t`` (default ``now.timestamp()``): a
    long-lived caller passes a monotonic clock, as ``state`` keeps these stamps and
    a wall-clock step (NTP, VM resume) would otherwise hold scaling for as long as
    the step or drop every cooldown at once.
    """
    t = now.timestamp() if t is None else t
    lo, hi, source = bounds(policy, now)
    proposals = _proposals(policy, current, metrics)
    if proposals:
        wanted, why = max(proposals, key=lambda p: p[0])
    else:
        wanted, why = current, "no metric value yet"
    clamped = min(max(wanted, lo), hi)
    if clamped != wanted:
        why += f", clamped to [{lo}, {hi}] ({source})"

    # Remember the recommendation for flapping protection (stabilization window).
    window = policy.scale_in_cooldown_s
    history = tuple((ts, r) for ts, r in state.recommendations if t - ts < window)
    history += ((t, clamped),)
    state = replace(state, recommendations=history)

    if current < lo or current > hi:  # bounds apply at once, cooldowns notwithstanding
        return _done(clamped, current, f"replicas {current} outside [{lo}, {hi}] ({source})",
                     state, t)
    if clamped > current:
        last = state.last_scale_out
        if last is not None and t - last < policy.scale_out_cooldown_s:
            left = policy.scale_out_cooldown_s - (t - last)
            return Decision(current, f"{why}: wants {clamped}, scale-out cooldown "
                                     f"({left:.0f}s left)", state)
        return _done(clamped, current, why, state, t)
    if clamped < current:
        last = state.last_scale
        if last is not None and t - last < policy.scale_in_cooldown_s:
            left = policy.scale_in_cooldown_s - (t - last)
            return Decision(current, f"{why}: wants {clamped}, scale-in cooldown "
                                     f"({left:.0f}s left)", state)
        stable = max(r for _, r in history)
        if stable >= current:
            return Decision(current, f"{why}: wants {clamped}, but {stable} was recommended "
                                     f"within the last {window:g}s (flapping protection)", state)
        return _done(stable, current, why, state, t)
    return Decision(current, why, state)


def _done(desired: int, current: int, why: str, state: ScaleState, t: float) -> Decision:
    if desired > current:
        state = replace(state, last_scale_out=t)
        return Decision(desired, f"Scaled out from {current} to {desired}: {why}", state)
    if desired < current:
        state = replace(state, last_scale_in=t)
        return Decision(desired, f"Scaled in from {current} to {desired}: {why}", state)
    return Decision(current, why, state)


@dataclass(frozen=True)
class Serverless:
    provisioned: int
    idle_timeout_s: float


def decide_serverless(config: Serverless, policy: Policy | None, current: int,
                      metrics: Mapping[str, float | None], state: ScaleState,
                      last_activity: float | None, waiting: bool, now: datetime, *,
                      t: float | None = None) -> Decision:
    """Replicas of one serverless variant.

    ``waiting``: requests are held or in flight (the activator asked for
    capacity); ``last_activity``: when the variant last saw traffic (None:
    never). With traffic the variant keeps at least one replica (and follows
    ``policy`` above that); after ``idle_timeout_s`` without any it goes down to
    the provisioned replicas, which are never stopped. ``last_activity`` is on the
    clock of ``t`` (see :func:`decide`).
    """
    t = now.timestamp() if t is None else t
    floor = config.provisioned
    idle = not waiting and (last_activity is None or t - last_activity >= config.idle_timeout_s)
    if current == 0 and waiting:
        desired = max(1, floor)
        return _done(desired, current, "requests are waiting and no replica runs (cold start)",
                     state, t)
    if idle:
        if current > floor:
            since = ("no traffic yet" if last_activity is None
                     else f"no traffic for {t - last_activity:.0f}s")
            return _done(floor, current, f"{since} (idleTimeout {config.idle_timeout_s:g}s, "
                                         f"provisionedConcurrency {floor})", state, t)
        if current < floor:
            return _done(floor, current, f"provisionedConcurrency {floor} keeps replicas warm",
                         state, t)
        return Decision(current, "idle", state)
    active_floor = max(1, floor)
    if policy is not None:
        decision = decide(replace(policy, min_replicas=max(policy.min_replicas, active_floor),
                                  max_replicas=max(policy.max_replicas, active_floor)),
                          current, metrics, state, now, t=t)
        return decision
    if current < active_floor:
        return _done(active_floor, current, "traffic within idleTimeout", state, t)
    return Decision(current, "serving", state)
