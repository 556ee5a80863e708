"""Local guarded rollouts across a wall-clock step: the bake window runs on a clock
that never steps (wall clock read once, monotonic time added)."""

from __future__ import annotations

import types
from typing import Any, cast

from kubeinfer_operator.api.deployment_config import DeploymentConfig
from kubeinfer_operator.local.rollout import LocalRollouts, steady_wall_clock
from kubeinfer_operator.reconcile import rollout as ro

WALL0 = 1_800_000_000.0


class Clocks:
    def __init__(self) -> None:
        self.wall, self.mono = WALL0, 100.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def test_steady_wall_clock_ignores_steps_of_the_wall_clock() -> None:
    c = Clocks()
    clock = steady_wall_clock(c.time, c.monotonic)
    assert clock() == WALL0
    c.wall += 7200  # NTP step (or a VM resumed with its clock corrected)
    c.mono += 5
    assert clock() == WALL0 + 5
    c.wall -= 86400
    c.mono += 5
    assert clock() == WALL0 + 10


CANARY = DeploymentConfig.model_validate({"blueGreen": {"trafficRouting": {
    "type": "Canary", "waitIntervalInSeconds": 600,
    "canarySize": {"type": "CapacityPercent", "value": 25}}}})


async def test_a_step_forward_does_not_end_a_local_bake_at_once() -> None:
    c = Clocks()
    events: list[str] = []
    sup = types.SimpleNamespace(event=lambda message, level="info": events.append(message))
    rollouts = LocalRollouts(cast(Any, sup), clock=steady_wall_clock(c.time, c.monotonic))
    fleets = {"a": ro.Fleet("old", 4)}

    async def enact(v: str, target: Any, decision: ro.Decision) -> None:
        return None

    def fleet(slot: str) -> ro.Fleet | None:
        return fleets.get(slot)

    rollouts._fleet = fleet  # type: ignore[method-assign]
    rollouts._enact = enact  # type: ignore[method-assign]
    rollouts.config = CANARY
    rollouts.targets["a"] = cast(Any, types.SimpleNamespace(replicas=4, server_hash="new"))
    await rollouts._step("a")
    assert rollouts.states["a"].phase is ro.Phase.PROVISIONING
    fleets["a-green"] = ro.Fleet("new", 4)
    c.mono += 1
    await rollouts._step("a")
    phase: ro.Phase = rollouts.states["a"].phase
    assert phase is ro.Phase.BAKING
    # 10 s into a 600 s bake the wall clock jumps two hours ahead: still baking the canary.
    c.mono += 10
    c.wall += 7200
    await rollouts._step("a")
    state = rollouts.states["a"]
    assert (state.phase, state.step, state.traffic) == (ro.Phase.BAKING, 1, 0.25), events
