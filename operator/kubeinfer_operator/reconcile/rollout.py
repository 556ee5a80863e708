"""Deployment guardrails: the blue/green and rolling rollout of one variant. PURE.

Representation. A variant ``v`` has two fleet slots, each a whole model-server
group of its own (Deployment + headless Service on Kubernetes): ``v`` and
``v-green`` (``fleet_names``). At rest one slot serves; when the variant's
``server_hash`` changes under a ``deploymentConfig``, the new fleet ("green")
comes up in the other slot next to the serving one ("blue"), and the route
table lists both as routes of the Endpoint, splitting the variant's weight
between them (``Decision.weights``). The slots alternate: after a successful
rollout the green slot serves and blue is removed, so nothing restarts twice.
Blue keeps running what it ran (its live Deployment is kept as it is, not
rendered from the new spec; only its replicas may change, for rolling).

One ``decide`` call per reconcile: previous ``RolloutState`` (from
``status.rollouts``), what the fleets run and how many replicas are ready, the
clock and the latest alarm evaluations in; the next state, fleets, weights,
condition and Events out. Phases::

    (none) ──hash changes──▶ Provisioning(k) ──green ready──▶ Baking(k)
    Baking(k) ──baked, alarms evaluable──▶ Provisioning(k+1) | Baking(k+1) | Terminating
    Terminating ──terminationWait──▶ Complete (green slot serves, blue removed)
    any of them ──alarm tripped / timeout──▶ RolledBack (all traffic on blue, green removed)
    Provisioning, Baking ──green cannot become ready──▶ RolledBack (reason GreenFailed)
    any of them ──spec changes again──▶ Provisioning(1) of the new hash (same green slot),
                                        or Complete on blue when it goes back to blue's hash

``RolledBack`` stays until the spec changes (the rolled-back hash is not tried again).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from kubeinfer_operator.api.deployment_config import (
    CapacitySize,
    CapacitySizeType,
    DeploymentConfig,
    TrafficRoutingType,
)

GREEN_SUFFIX = "-green"

#: Condition types (Endpoint ``status.conditions``).
CONDITION_ROLLED_BACK = "RolledBack"
#: Progressing reasons while a rollout runs / after one was rolled back.
REASON_ROLLING_OUT = "RollingOut"
REASON_ROLLED_BACK = "RolledBack"
#: RolledBack reasons: an alarm tripped, maximumExecutionTimeoutInSeconds passed, the
#: green fleet cannot become ready.
REASON_ALARM_TRIPPED = "AlarmTripped"
REASON_TIMEOUT = "Timeout"
REASON_GREEN_FAILED = "GreenFailed"
#: Event reasons.
EVENT_STARTED = "RolloutStarted"
EVENT_SHIFTED = "TrafficShifted"
EVENT_COMPLETE = "RolloutComplete"
EVENT_ROLLED_BACK = "RolledBack"
EVENT_SUPERSEDED = "RolloutSuperseded"


class Phase(StrEnum):
    PROVISIONING = "Provisioning"
    BAKING = "Baking"
    TERMINATING = "Terminating"
    COMPLETE = "Complete"
    ROLLED_BACK = "RolledBack"


TERMINAL = frozenset({Phase.COMPLETE, Phase.ROLLED_BACK})


def fleet_names(variant: str) -> tuple[str, str]:
    """The two slots of ``variant``: its own name and ``<variant>-green``."""
    return variant, variant + GREEN_SUFFIX


def other_fleet(variant: str, fleet: str) -> str:
    a, b = fleet_names(variant)
    return b if fleet == a else a


@dataclass(frozen=True)
class Step:
    """One step: green's share of the variant's traffic, and each fleet's replicas."""

    traffic: float
    green_replicas: int
    blue_replicas: int


@dataclass(frozen=True)
class AlarmEvaluation:
    """One alarm's latest evaluation over green's traffic.

    ``value`` None: not evaluable yet (fewer than minRequests in the window, no
    samples, Prometheus unanswered); the bake waits for it.
    """

    name: str
    kind: str
    threshold: float
    value: float | None
    tripped: bool = False
    requests: int | None = None
    detail: str = ""

    def describe(self) -> str:
        if self.value is None:
            return f"alarm {self.name}: not evaluable yet ({self.detail or 'no data'})"
        verdict = "tripped" if self.tripped else "ok"
        extra = f" over {self.requests} requests" if self.requests is not None else ""
        return (f"alarm {self.name}: {self.kind} {self.value:.4g} vs threshold "
                f"{self.threshold:.4g}{extra} ({verdict})")

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind,
                               "threshold": self.threshold, "tripped": self.tripped,
                               "message": self.describe()}
        if self.value is not None:
            out["value"] = self.value
        if self.requests is not None:
            out["requests"] = self.requests
        return out


@dataclass(frozen=True)
class RolloutState:
    """What ``status.rollouts[]`` records of one variant (times as epoch seconds)."""

    variant: str
    #: The slot serving before (blue) and the slot rolled to (green).
    blue: str
    green: str
    phase: Phase
    to_hash: str
    from_hash: str | None = None
    step: int = 0
    steps: int = 0
    traffic: float = 0.0
    started_at: float = 0.0
    step_started_at: float = 0.0
    message: str = ""
    last_evaluation: tuple[dict[str, Any], ...] = ()
    #: RolledBack only: why (``REASON_ALARM_TRIPPED``, ``REASON_TIMEOUT``,
    #: ``REASON_GREEN_FAILED``); the RolledBack condition's reason.
    reason: str = ""

    @property
    def serving(self) -> str:
        """The slot that serves when this rollout is over (or the one serving now)."""
        return self.green if self.phase is Phase.COMPLETE else self.blue

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "variant": self.variant, "phase": self.phase.value, "blueFleet": self.blue,
            "greenFleet": self.green, "toHash": self.to_hash, "step": self.step,
            "steps": self.steps, "trafficToGreen": round(self.traffic * 100, 2),
            "startedAt": _iso(self.started_at), "stepStartedAt": _iso(self.step_started_at),
            "message": self.message,
        }
        if self.from_hash:
            out["fromHash"] = self.from_hash
        if self.last_evaluation:
            out["lastAlarmEvaluation"] = list(self.last_evaluation)
        if self.reason:
            out["reason"] = self.reason
        return out

    @classmethod
    def from_status(cls, data: Mapping[str, Any]) -> RolloutState | None:
        """The rollout a status entry records, or None when it is not readable: status is
        ours, but a client granted the status subresource (or an older operator) may
        have written anything there, and the Endpoint must not stop reconciling for it."""
        try:
            state = cls(variant=str(data["variant"]), blue=str(data["blueFleet"]),
                        green=str(data["greenFleet"]), phase=Phase(data["phase"]),
                        to_hash=str(data["toHash"]), from_hash=data.get("fromHash"),
                        step=int(data.get("step", 0)), steps=int(data.get("steps", 0)),
                        traffic=float(data.get("trafficToGreen", 0)) / 100,
                        started_at=_epoch(data.get("startedAt")),
                        step_started_at=_epoch(data.get("stepStartedAt")),
                        message=str(data.get("message", "")),
                        last_evaluation=tuple(data.get("lastAlarmEvaluation") or ()),
                        reason=str(data.get("reason") or ""))
        except (KeyError, ValueError, TypeError, OverflowError):
            return None
        if not (0 <= state.step <= state.steps and math.isfinite(state.traffic)
                and 0.0 <= state.traffic <= 1.0):
            return None
        return state


def _iso(t: float) -> str:
    from datetime import UTC
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _epoch(value: Any) -> float:
    if not isinstance(value, str) or not value:
        return 0.0
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class Fleet:
    """What one slot's Deployment runs now (observed)."""

    server_hash: str | None
    ready: int = 0
    #: Why the fleet cannot become ready, when that is certain rather than slow (its
    #: model failed to load, a server crash-loops, the Deployment's progress deadline
    #: passed); None: it may still come up.
    failure: str | None = None


@dataclass(frozen=True)
class FleetPlan:
    """One slot to run: ``keep`` its live Deployment as is (blue: the old config) with
    ``replicas``, or render it from the current spec."""

    replicas: int
    keep: bool = False


@dataclass(frozen=True)
class Decision:
    state: RolloutState | None
    #: Slot -> what to run; slots not listed are removed.
    fleets: dict[str, FleetPlan]
    #: Slot -> share of the variant's weight (sums to 1).
    weights: dict[str, float]
    #: (reason, message, type) Events to post.
    events: tuple[tuple[str, str, str], ...] = ()
    #: When to look again at the latest (seconds), while a rollout runs.
    wake_s: float | None = None

    @property
    def active(self) -> bool:
        return self.state is not None and self.state.phase not in TERMINAL


def _size(size: CapacitySize, replicas: int) -> tuple[float, int]:
    """(traffic share, replicas) of a capacity size of a ``replicas``-strong variant."""
    if size.type is CapacitySizeType.INSTANCE_COUNT:
        count = min(size.value, replicas)
        return count / replicas, count
    share = size.value / 100
    return share, min(replicas, max(1, math.ceil(share * replicas)))


def plan_steps(config: DeploymentConfig, replicas: int) -> list[Step]:
    """The traffic steps of a rollout of a ``replicas``-strong variant."""
    replicas = max(replicas, 1)
    if config.rolling is not None:
        _, batch = _size(config.rolling.maximumBatchSize, replicas)
        steps = []
        green = 0
        while green < replicas:
            green = min(replicas, green + batch)
            steps.append(Step(green / replicas, green, replicas - green))
        return steps
    assert config.blueGreen is not None
    routing = config.blueGreen.trafficRouting
    full = Step(1.0, replicas, replicas)
    if routing.type is TrafficRoutingType.ALL_AT_ONCE:
        return [full]
    if routing.type is TrafficRoutingType.CANARY:
        assert routing.canarySize is not None
        share, _ = _size(routing.canarySize, replicas)
        return [Step(share, replicas, replicas), full] if share < 1 else [full]
    assert routing.linearStepSize is not None
    share, _ = _size(routing.linearStepSize, replicas)
    out, k = [], 1
    while k * share < 1 - 1e-9:
        out.append(Step(k * share, replicas, replicas))
        k += 1
    return [*out, full]


def _wait_s(config: DeploymentConfig) -> int:
    if config.rolling is not None:
        return config.rolling.waitIntervalInSeconds
    assert config.blueGreen is not None
    return config.blueGreen.trafficRouting.waitIntervalInSeconds


def _termination_wait_s(config: DeploymentConfig) -> int:
    return config.blueGreen.terminationWaitInSeconds if config.blueGreen else 0


def _steady(serving: str, replicas: int, state: RolloutState | None,
            events: tuple[tuple[str, str, str], ...] = ()) -> Decision:
    return Decision(state, {serving: FleetPlan(replicas)}, {serving: 1.0}, events)


def decide(*, variant: str, config: DeploymentConfig | None, replicas: int,
           desired_hash: str, previous: RolloutState | None, fleets: Mapping[str, Fleet],
           now: datetime, evaluations: Sequence[AlarmEvaluation] = ()) -> Decision:
    """The next step of ``variant``'s rollout (see the module docstring)."""
    t = now.timestamp()
    serving = previous.serving if previous is not None else variant
    if previous is not None and previous.phase not in TERMINAL:
        return _in_progress(previous, config, replicas, desired_hash, fleets, t, evaluations)
    blue = fleets.get(serving)
    if blue is None or blue.server_hash is None or blue.server_hash == desired_hash \
            or config is None:
        # Nothing serves yet, it already runs this spec, or no guardrails: as without
        # a deploymentConfig (a plain rolling update of the serving Deployment).
        return _steady(serving, replicas, previous)
    if previous is not None and previous.phase is Phase.ROLLED_BACK \
            and previous.to_hash == desired_hash:
        return Decision(previous, {serving: FleetPlan(replicas, keep=True)}, {serving: 1.0})
    return _start(variant, config, replicas, desired_hash, serving, blue.server_hash, t,
                  fleets)


def _start(variant: str, config: DeploymentConfig, replicas: int, desired_hash: str,
           blue: str, from_hash: str | None, t: float, fleets: Mapping[str, Fleet],
           events: tuple[tuple[str, str, str], ...] = ()) -> Decision:
    steps = plan_steps(config, replicas)
    green = other_fleet(variant, blue)
    state = RolloutState(variant=variant, blue=blue, green=green, phase=Phase.PROVISIONING,
                         to_hash=desired_hash, from_hash=from_hash, step=1, steps=len(steps),
                         started_at=t, step_started_at=t,
                         message=f"Variant {variant}: starting fleet {green} next to {blue}")
    started = (EVENT_STARTED, f"Variant {variant}: rolling out fleet {green} (server hash "
               f"{desired_hash}) next to {blue} in {len(steps)} step(s)", "Normal")
    return _provision(state, config, replicas, steps, fleets, t, (*events, started))


def _fleets(state: RolloutState, blue_replicas: int, green_replicas: int) -> dict[str, FleetPlan]:
    return {state.blue: FleetPlan(blue_replicas, keep=True),
            state.green: FleetPlan(green_replicas)}


def _provision(state: RolloutState, config: DeploymentConfig, replicas: int,
               steps: list[Step], fleets: Mapping[str, Fleet], t: float,
               events: tuple[tuple[str, str, str], ...]) -> Decision:
    """Step ``state.step`` waits for green's replicas before traffic moves."""
    step = steps[state.step - 1]
    before = steps[state.step - 2] if state.step > 1 else Step(0.0, 0, replicas)
    green = fleets.get(state.green)
    ready = green.ready if green is not None and green.server_hash == state.to_hash else 0
    if ready < step.green_replicas:
        state = replace(state, phase=Phase.PROVISIONING, traffic=before.traffic,
                        message=f"Variant {state.variant}: step {state.step}/{state.steps}: "
                                f"waiting for fleet {state.green} ({ready}/"
                                f"{step.green_replicas} replicas ready)")
        return Decision(state, _fleets(state, before.blue_replicas, step.green_replicas),
                        _weights(state), events, wake_s=1.0)
    state = replace(state, phase=Phase.BAKING, traffic=step.traffic, step_started_at=t,
                    message=_baking_message(state.variant, state.step, state.steps,
                                            step.traffic, state.green))
    shifted = (EVENT_SHIFTED, state.message, "Normal")
    return Decision(state, _fleets(state, step.blue_replicas, step.green_replicas),
                    _weights(state), (*events, shifted), wake_s=1.0)


def _baking_message(variant: str, step: int, steps: int, traffic: float, green: str) -> str:
    return (f"Variant {variant}: step {step}/{steps}: {traffic * 100:.4g}% of traffic on "
            f"fleet {green}, baking")


def _weights(state: RolloutState) -> dict[str, float]:
    return {state.blue: 1.0 - state.traffic, state.green: state.traffic}


def _rollback(state: RolloutState, replicas: int, reason: str, why: str) -> Decision:
    message = (f"Variant {state.variant}: rolled back to fleet {state.blue} at step "
               f"{state.step}/{state.steps}: {why}; all traffic is on {state.blue}. Fix the "
               f"new model and change the spec to try again")
    rolled = replace(state, phase=Phase.ROLLED_BACK, traffic=0.0, message=message,
                     reason=reason)
    return Decision(rolled, {state.blue: FleetPlan(replicas, keep=True)}, {state.blue: 1.0},
                    ((EVENT_ROLLED_BACK, message, "Warning"),))


def _in_progress(state: RolloutState, config: DeploymentConfig | None, replicas: int,
                 desired_hash: str, fleets: Mapping[str, Fleet], t: float,
                 evaluations: Sequence[AlarmEvaluation]) -> Decision:
    if desired_hash != state.to_hash or config is None:
        blue = fleets.get(state.blue)
        if config is None or desired_hash == state.from_hash or blue is None:
            # Back to what blue runs (or guardrails removed): blue serves, green goes.
            msg = (f"Variant {state.variant}: rollout to {state.to_hash} superseded; fleet "
                   f"{state.blue} serves")
            done = replace(state, phase=Phase.COMPLETE, green=state.blue, traffic=0.0,
                           message=msg)
            return _steady(state.blue, replicas, done, ((EVENT_SUPERSEDED, msg, "Normal"),))
        msg = (f"Variant {state.variant}: rollout to {state.to_hash} superseded by "
               f"{desired_hash}; traffic back on {state.blue}, fleet {state.green} restarts")
        return _start(state.variant, config, replicas, desired_hash, state.blue,
                      state.from_hash, t, {state.blue: blue},
                      ((EVENT_SUPERSEDED, msg, "Normal"),))
    evaluated = tuple(e.to_status() for e in evaluations)
    if evaluated:
        state = replace(state, last_evaluation=evaluated)
    if state.phase in (Phase.BAKING, Phase.TERMINATING):
        for e in evaluations:
            if e.tripped:
                return _rollback(state, replicas, REASON_ALARM_TRIPPED, e.describe())
    green = fleets.get(state.green)
    if (state.phase in (Phase.PROVISIONING, Phase.BAKING) and green is not None
            and green.server_hash == state.to_hash and green.failure):
        # Blue serves throughout; waiting for maximumExecutionTimeoutInSeconds (8 h by
        # default) would only keep the rollout stuck.
        return _rollback(state, replicas, REASON_GREEN_FAILED,
                         f"fleet {state.green} cannot become ready: {green.failure}")
    if state.phase is not Phase.TERMINATING and t - state.started_at >= config.timeout_s:
        return _rollback(state, replicas, REASON_TIMEOUT,
                         f"maximumExecutionTimeoutInSeconds ({config.timeout_s} s) passed")
    steps = plan_steps(config, replicas)
    if state.steps != len(steps):  # replicas changed: re-plan, keep the progress made
        state = replace(state, steps=len(steps), step=min(state.step, len(steps)))
    if state.phase is Phase.PROVISIONING:
        return _provision(state, config, replicas, steps, fleets, t, ())
    step = steps[state.step - 1]
    if state.phase is Phase.TERMINATING:
        if t - state.step_started_at >= _termination_wait_s(config):
            msg = (f"Variant {state.variant}: fleet {state.green} serves all traffic; fleet "
                   f"{state.blue} removed")
            done = replace(state, phase=Phase.COMPLETE, traffic=1.0, message=msg)
            return _steady(state.green, replicas, done, ((EVENT_COMPLETE, msg, "Normal"),))
        return Decision(state, _fleets(state, step.blue_replicas, step.green_replicas),
                        _weights(state), wake_s=1.0)
    # Baking.
    baked = t - state.step_started_at >= _wait_s(config)
    waiting = [e for e in evaluations if e.value is None]
    if config.alarms and not evaluations:
        waiting = [AlarmEvaluation(a.name, a.kind, 0.0, None, detail="not evaluated yet")
                   for a in config.alarms]
    if not baked or waiting:
        if baked:
            state = replace(state, message=_baking_message(
                state.variant, state.step, state.steps, state.traffic, state.green)
                + "; bake extended: " + "; ".join(e.describe() for e in waiting))
        return Decision(state, _fleets(state, step.blue_replicas, step.green_replicas),
                        _weights(state), wake_s=1.0)
    if state.step < state.steps:
        state = replace(state, step=state.step + 1, step_started_at=t)
        return _provision(state, config, replicas, steps, fleets, t, ())
    if config.rolling is not None or _termination_wait_s(config) == 0:
        msg = (f"Variant {state.variant}: fleet {state.green} serves all traffic; fleet "
               f"{state.blue} removed")
        done = replace(state, phase=Phase.COMPLETE, traffic=1.0, message=msg)
        return _steady(state.green, replicas, done, ((EVENT_COMPLETE, msg, "Normal"),))
    msg = (f"Variant {state.variant}: all traffic on fleet {state.green}; fleet {state.blue} "
           f"removed in {_termination_wait_s(config)} s")
    state = replace(state, phase=Phase.TERMINATING, step_started_at=t, message=msg)
    return Decision(state, _fleets(state, step.blue_replicas, step.green_replicas),
                    _weights(state), ((EVENT_SHIFTED, msg, "Normal"),), wake_s=1.0)


def conditions(decisions: Mapping[str, Decision], generation: int) -> list[dict[str, Any]]:
    """The ``RolledBack`` condition (True naming each rolled-back variant, its alarm, value
    and threshold; False otherwise) for Endpoints with a deploymentConfig."""
    rolled = [d.state for d in decisions.values()
              if d.state is not None and d.state.phase is Phase.ROLLED_BACK]
    if rolled:
        reasons = {s.reason for s in rolled}
        # One cause (AlarmTripped, Timeout, GreenFailed) is the reason; several variants
        # rolled back for different causes: RolledBack, each named in the message.
        reason = reasons.pop() if len(reasons) == 1 and "" not in reasons else REASON_ROLLED_BACK
        return [{"type": CONDITION_ROLLED_BACK, "status": "True", "reason": reason,
                 "message": "; ".join(s.message for s in rolled if s),
                 "observedGeneration": generation}]
    return [{"type": CONDITION_ROLLED_BACK, "status": "False", "reason": "NoRollback",
             "message": "No rollout was rolled back", "observedGeneration": generation}]


def progressing(decisions: Mapping[str, Decision], generation: int) -> dict[str, Any] | None:
    """Progressing=True reason RollingOut while a rollout runs (None: none runs)."""
    active = [d.state for d in decisions.values() if d.active and d.state is not None]
    if not active:
        return None
    return {"type": "Progressing", "status": "True", "reason": REASON_ROLLING_OUT,
            "message": "; ".join(s.message for s in active), "observedGeneration": generation}
