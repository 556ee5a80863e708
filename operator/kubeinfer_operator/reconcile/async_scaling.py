"""Worker scaling of async endpoints on the queue backlog: PURE, takes a clock.

The backlog (queued + in flight, ``contract.AsyncBacklog.total``) is the
signal — SageMaker's ApproximateBacklogSizePerInstance scaled to a target. The
local supervisor and the operator both call :func:`decide` every few seconds
and carry out the returned replica count (start/stop worker processes, or
patch the worker Deployment's replicas).

Rules:

* wanted = ceil(backlog / targetBacklogPerReplica), clamped to [min, max];
  any backlog at all wants at least one worker (when max allows);
* scaling out from zero is immediate (requests are waiting and nobody serves
  them); further scale-outs wait ``scale_out_cooldown_s`` after the last one;
* scaling in (to zero included) happens only after the backlog has wanted
  fewer workers for ``scale_in_cooldown_s`` without interruption, and not
  within ``scale_in_cooldown_s`` of a scale-out — so a burst's tail does not
  flap workers;
* bounds are enforced at once (a replica count outside [min, max] after a
  spec change is corrected without cooldown).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class BacklogPolicy:
    target_per_replica: float
    min_replicas: int
    max_replicas: int
    scale_out_cooldown_s: float
    scale_in_cooldown_s: float


@dataclass(frozen=True)
class BacklogState:
    """What the policy remembers between rounds (kept by the caller)."""

    last_scale_out: float | None = None
    last_scale_in: float | None = None
    #: When the backlog first wanted fewer workers than running, this stretch.
    low_since: float | None = None


@dataclass(frozen=True)
class BacklogDecision:
    desired: int
    reason: str
    state: BacklogState


def wanted_replicas(policy: BacklogPolicy, backlog: int) -> int:
    wanted = math.ceil(backlog / policy.target_per_replica) if backlog > 0 else 0
    return min(max(wanted, policy.min_replicas), policy.max_replicas)


def decide(policy: BacklogPolicy, current: int, backlog: int, state: BacklogState,
           now: float) -> BacklogDecision:
    """How many workers to run now, why, and the state to pass next time."""
    wanted = wanted_replicas(policy, backlog)
    per = f"backlog {backlog} (target {policy.target_per_replica:g} per worker)"
    if current < policy.min_replicas or current > policy.max_replicas:
        bounded = min(max(current, policy.min_replicas), policy.max_replicas)
        return BacklogDecision(bounded, f"{current} worker(s) outside [{policy.min_replicas}, "
                               f"{policy.max_replicas}]: scaling to {bounded}",
                               replace(state, low_since=None, last_scale_out=now
                                       if bounded > current else state.last_scale_out))
    if wanted > current:
        held = state.last_scale_out is not None and current > 0 and \
            now - state.last_scale_out < policy.scale_out_cooldown_s
        if held:
            left = policy.scale_out_cooldown_s - (now - (state.last_scale_out or now))
            return BacklogDecision(current, f"{per} wants {wanted} worker(s); scale-out "
                                   f"cooldown for {left:.0f}s more",
                                   replace(state, low_since=None))
        why = "no worker runs" if current == 0 else f"{current} run"
        return BacklogDecision(wanted, f"{per}, {why}: scaling out to {wanted}",
                               BacklogState(last_scale_out=now,
                                            last_scale_in=state.last_scale_in))
    if wanted < current:
        low_since = state.low_since if state.low_since is not None else now
        since_out = None if state.last_scale_out is None else now - state.last_scale_out
        low_for = now - low_since
        if low_for < policy.scale_in_cooldown_s or (
                since_out is not None and since_out < policy.scale_in_cooldown_s):
            return BacklogDecision(current, f"{per} wants {wanted} worker(s); low for "
                                   f"{low_for:.0f}s of {policy.scale_in_cooldown_s:g}s before "
                                   "scaling in", replace(state, low_since=low_since))
        what = "idle queue" if backlog == 0 else per
        return BacklogDecision(wanted, f"{what} for {low_for:.0f}s: scaling in to {wanted}",
                               BacklogState(last_scale_out=state.last_scale_out,
                                            last_scale_in=now))
    return BacklogDecision(current, f"{per}: {current} worker(s) is right",
                           replace(state, low_since=None))
