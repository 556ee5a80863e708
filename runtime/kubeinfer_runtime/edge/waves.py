"""The edge rollout state machine: PURE, no I/O, an explicit clock.

The fleet server's controller (``edge.controller``) loads the ``FleetConfig``, the
persisted :class:`RolloutState` and a :class:`DeviceView` of every registered device,
calls :func:`step` with ``now``, and stores what it returns: the new state and the
version each device should run. :func:`fleet_status` turns the same inputs into the
contract's ``FleetStatus``. Keeping every decision here lets the unit tests drive a
whole rollout step by step with a fake clock, and lets two server replicas agree by
construction (only the lease holder calls :func:`step`; see ``controller``).

Semantics (documented for users with the EdgeFleet kind):

* **a rollout** is the move of the fleet to ``config.current.version``; it starts when
  that version differs from the stored state's (a new version supersedes a rollout in
  progress: the new one starts from whatever devices run, and its rollback target is
  ``config.previous``);
* **the fleet** of a rollout is the devices whose target has a package in the new
  version; a device without one keeps the previous version (or nothing);
* **wave membership** is decided once per rollout: percentage waves are cumulative
  shares of the fleet, filled in the order of ``sha256(version:deviceId)`` (stable for
  a rollout, spread differently across rollouts so the same devices are not always
  first); a deviceSelector wave takes the devices whose labels include its selector
  and are not in an earlier wave. Devices in no wave form a tail that updates after
  the last wave. A device registering mid-rollout joins the first not-yet-passed
  selector wave it matches, else the wave in progress, else the tail;
* **a device's outcome** for the rollout: ``Succeeded`` once it runs the version (or
  reports a successful deployment of it), ``Failed`` when it reports a failed
  deployment of it, ``Stalled`` when it does neither within
  ``deviceDeploymentTimeoutSeconds`` of being assigned. Stalled counts as a failure
  and never blocks a wave; a stalled device that reports later gets its real outcome.
  Succeeded and Failed are final for the rollout;
* **a wave trips** when its failures exceed ``maxFailurePercent`` of its devices and
  at least ``minDevices`` of them (all of them, in a smaller wave) have an outcome;
  it **passes** when every device has an outcome, failures are within the bound and
  ``minDevices`` reported; the next wave starts ``bakeSeconds`` after it passed (the
  bake restarts if the wave stops passing, e.g. a late device joins it);
* **on a trip**: ``Rollback`` sets phase RolledBack and every device's desired
  version to the previous one; ``Pause`` sets phase Paused and freezes assignments
  (devices given the new version keep it, the others keep the previous one). Both
  stay until the config names another version;
* **the first version** (no ``previous``) and **no waves** go to every device at once:
  with no previous version there is nothing to compare against or roll back to, and
  a fleet serving nothing gains nothing from waiting. The rollout is Complete once
  every device has an outcome; failures are reported, never tripped on;
* **Complete**: every wave passed and every tail device has an outcome. Devices
  registering later get the version at once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from kubeinfer_runtime.contract.edge import (
    DeploymentOutcome,
    DeploymentResult,
    DesiredState,
    DeviceState,
    FleetConfig,
    FleetStatus,
    OnFailure,
    RolloutPhase,
    RolloutStatus,
    Wave,
    WaveStatus,
)

#: A device silent for this many heartbeat intervals is Offline in the status.
OFFLINE_AFTER_INTERVALS = 3


class Outcome(StrEnum):
    """A device's outcome in one rollout (absent from the state: pending)."""

    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    STALLED = "Stalled"


@dataclass(frozen=True)
class DeviceView:
    """What the state machine needs to know about one device (built from its record)."""

    device_id: str
    target: str
    labels: Mapping[str, str] = field(default_factory=dict)
    #: The version it serves ("" before its first install).
    version: str = ""
    updating: bool = False
    updating_to: str = ""
    last_deployment: DeploymentResult | None = None
    #: Server time of its last heartbeat (or registration).
    last_seen: float = 0.0
    registered_at: float = 0.0


class RolloutState(BaseModel):
    """The rollout as persisted between steps (one JSON value in Redis)."""

    model_config = ConfigDict(extra="ignore")

    version: str
    previous: str | None
    phase: RolloutPhase
    #: Index of the wave in progress; ``waves`` once every wave passed (the tail's turn).
    wave: int = 0
    #: Waves of this rollout (0 for a first version or an empty spec).
    waves: int = 0
    #: Device id -> wave index (``waves`` for the tail), decided once per rollout.
    members: dict[str, int] = Field(default_factory=dict)
    #: Device id -> when it was given the new version (its wave started, or it joined).
    assigned_at: dict[str, float] = Field(default_factory=dict)
    #: Device id -> its outcome so far (pending devices are absent).
    outcomes: dict[str, Outcome] = Field(default_factory=dict)
    #: When the wave in progress started passing (its bake started); None while not.
    passing_since: float | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    message: str = ""


@dataclass(frozen=True)
class StepResult:
    state: RolloutState
    #: Device id -> the version it should run (None: no package for its target).
    desired: dict[str, str | None]
    #: Human-readable events of this step (Kubernetes message style), oldest first.
    events: tuple[str, ...] = ()


# -- helpers ------------------------------------------------------------------------------------


def _waves(config: FleetConfig) -> list[Wave]:
    """The waves in force: none for a first version (see the module docstring)."""
    return list(config.rollout.waves) if config.previous is not None else []


def _has_package(config: FleetConfig, version: str | None, target: str) -> bool:
    if version is None:
        return False
    for v in (config.current, config.previous):
        if v is not None and v.version == version:
            return target in v.packages
    return False


def _order_key(version: str, device_id: str) -> str:
    return hashlib.sha256(f"{version}:{device_id}".encode()).hexdigest()


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _in_fleet(config: FleetConfig, device: DeviceView) -> bool:
    return device.target in config.current.packages


def assign_waves(version: str, waves: Sequence[Wave],
                 devices: Sequence[DeviceView]) -> dict[str, int]:
    """Device id -> wave index (``len(waves)``: the tail) for a rollout starting now."""
    ordered = sorted(devices, key=lambda d: _order_key(version, d.device_id))
    total = len(ordered)
    members: dict[str, int] = {}
    for index, wave in enumerate(waves):
        if wave.deviceSelector is not None:
            selector = wave.deviceSelector
            for d in ordered:
                if d.device_id not in members and _matches(selector, d.labels):
                    members[d.device_id] = index
            continue
        assert wave.percentage is not None  # the model allows exactly one of the two
        # Cumulative: this wave brings the devices in waves so far up to its share.
        wanted = math.ceil(wave.percentage * total / 100 - 1e-9)
        for d in ordered:
            if len(members) >= wanted:
                break
            if d.device_id not in members:
                members[d.device_id] = index
    for d in ordered:
        members.setdefault(d.device_id, len(waves))
    return members


def _late_wave(state: RolloutState, waves: Sequence[Wave], device: DeviceView) -> int:
    """The wave a device seen for the first time mid-rollout joins."""
    for index in range(state.wave, len(waves)):
        selector = waves[index].deviceSelector
        if selector is not None and _matches(selector, device.labels):
            return index
    return state.wave if state.wave < len(waves) else len(waves)


def _observed(version: str, device: DeviceView) -> Outcome | None:
    """What the device itself says about ``version``: None while it has not said."""
    result = device.last_deployment
    if result is not None and result.version == version:
        return (Outcome.SUCCEEDED if result.outcome is DeploymentOutcome.SUCCEEDED
                else Outcome.FAILED)
    if device.version == version and not device.updating:
        return Outcome.SUCCEEDED
    return None


@dataclass
class _Tally:
    devices: int = 0
    succeeded: int = 0
    failed: int = 0

    @property
    def reported(self) -> int:
        return self.succeeded + self.failed

    @property
    def pending(self) -> int:
        return self.devices - self.reported

    def status(self, index: int) -> WaveStatus:
        n = self.devices
        return WaveStatus(index=index, devices=n, succeeded=self.succeeded, failed=self.failed,
                          pending=self.pending,
                          successPercent=round(100 * self.succeeded / n, 2) if n else 100.0,
                          failurePercent=round(100 * self.failed / n, 2) if n else 0.0)


def _tally(state: RolloutState, index: int) -> _Tally:
    t = _Tally()
    for device_id, wave in state.members.items():
        if wave != index:
            continue
        t.devices += 1
        outcome = state.outcomes.get(device_id)
        if outcome is Outcome.SUCCEEDED:
            t.succeeded += 1
        elif outcome is not None:  # Failed or Stalled
            t.failed += 1
    return t


# -- the step -----------------------------------------------------------------------------------


def _start(config: FleetConfig, devices: Sequence[DeviceView], now: float,
           events: list[str]) -> RolloutState:
    waves = _waves(config)
    version = config.current.version
    previous = config.previous.version if config.previous is not None else None
    fleet = [d for d in devices if _in_fleet(config, d)]
    state = RolloutState(version=version, previous=previous, phase=RolloutPhase.PROGRESSING,
                         wave=0, waves=len(waves), members=assign_waves(version, waves, fleet),
                         started_at=now)
    if previous is None:
        events.append(f"Rollout of version {version} started: first version, every device "
                      f"({len(fleet)}) at once")
    elif not waves:
        events.append(f"Rollout of version {version} started: no waves, every device "
                      f"({len(fleet)}) at once")
    else:
        events.append(f"Rollout of version {version} started from {previous}: "
                      f"{len(waves)} waves over {len(fleet)} devices")
    _assign_wave(state, 0, now)
    return state


def _assign_wave(state: RolloutState, index: int, now: float) -> None:
    for device_id, wave in state.members.items():
        if wave == index and device_id not in state.assigned_at:
            state.assigned_at[device_id] = now


def _update_outcomes(config: FleetConfig, state: RolloutState,
                     by_id: Mapping[str, DeviceView], now: float) -> None:
    timeout = config.rollout.deviceDeploymentTimeoutSeconds
    for device_id, assigned in state.assigned_at.items():
        current = state.outcomes.get(device_id)
        if current in (Outcome.SUCCEEDED, Outcome.FAILED):
            continue  # final for this rollout
        device = by_id.get(device_id)
        seen = _observed(state.version, device) if device is not None else None
        if seen is not None:
            state.outcomes[device_id] = seen
        elif now - assigned >= timeout:
            state.outcomes[device_id] = Outcome.STALLED


def _advance(config: FleetConfig, state: RolloutState, now: float, events: list[str]) -> None:
    """Pass, bake, advance or trip the wave in progress; repeat while waves pass at once."""
    waves = _waves(config)
    while state.phase is RolloutPhase.PROGRESSING:
        if state.wave >= len(waves):
            tail = _tally(state, len(waves))
            if tail.pending == 0:
                state.phase = RolloutPhase.COMPLETE
                state.finished_at = now
                succeeded = sum(1 for o in state.outcomes.values() if o is Outcome.SUCCEEDED)
                state.message = (f"Version {state.version} reached every device "
                                 f"({succeeded} succeeded, {tail.failed} failed in the last "
                                 "group)")
                events.append(f"Rollout of version {state.version} is complete")
            return
        wave = waves[state.wave]
        t = _tally(state, state.wave)
        allowed = wave.maxFailurePercent * t.devices / 100
        enough = t.reported >= min(wave.minDevices, t.devices)
        label = f"Wave {state.wave + 1}/{len(waves)}"
        if t.failed > allowed + 1e-9 and enough:
            _trip(config, state, t, label, now, events)
            return
        if t.pending > 0 or not enough:
            state.passing_since = None
            state.message = (f"{label} of version {state.version}: {t.succeeded}/{t.devices} "
                             f"succeeded, {t.failed} failed, {t.pending} pending")
            return
        if state.passing_since is None:
            state.passing_since = now
            if wave.bakeSeconds > 0:
                events.append(f"{label} of version {state.version} passed "
                              f"({t.succeeded}/{t.devices} succeeded): baking for "
                              f"{wave.bakeSeconds}s")
        if now - state.passing_since < wave.bakeSeconds:
            state.message = (f"{label} of version {state.version} is baking "
                             f"({now - state.passing_since:.0f}/{wave.bakeSeconds}s)")
            return
        state.wave += 1
        state.passing_since = None
        _assign_wave(state, state.wave, now)
        following = (f"wave {state.wave + 1}" if state.wave < len(waves)
                     else "the remaining devices")
        events.append(f"{label} of version {state.version} done ({t.succeeded}/{t.devices} "
                      f"succeeded, {t.failed} failed): starting {following}")


def _trip(config: FleetConfig, state: RolloutState, t: _Tally, label: str, now: float,
          events: list[str]) -> None:
    failures = (f"{label} of version {state.version} tripped: {t.failed}/{t.devices} devices "
                f"failed or stalled, over maxFailurePercent "
                f"{config.rollout.waves[state.wave].maxFailurePercent:g}")
    state.finished_at = now
    if config.rollout.onFailure is OnFailure.ROLLBACK:
        state.phase = RolloutPhase.ROLLED_BACK
        state.message = (f"{failures}: every device rolled back to {state.previous}; fix the "
                         f"model and publish a new version")
    else:
        state.phase = RolloutPhase.PAUSED
        state.message = (f"{failures}: rollout paused; fix the devices or publish a new "
                         f"version")
    events.append(state.message)


def _join_late(config: FleetConfig, state: RolloutState, devices: Sequence[DeviceView],
               now: float, events: list[str]) -> None:
    """Give devices first seen during the rollout a wave (and the version, if it started)."""
    if state.phase is RolloutPhase.PAUSED or state.phase is RolloutPhase.ROLLED_BACK:
        return  # frozen: newcomers keep the previous version
    waves = _waves(config)
    for d in devices:
        if d.device_id in state.members or not _in_fleet(config, d):
            continue
        index = (_late_wave(state, waves, d) if state.phase is RolloutPhase.PROGRESSING
                 else len(waves))
        state.members[d.device_id] = index
        if index <= state.wave or state.phase is RolloutPhase.COMPLETE:
            state.assigned_at[d.device_id] = now
        where = f"wave {index + 1}" if index < len(waves) else "the last group"
        events.append(f"Device {d.device_id} joined version {state.version}'s rollout in "
                      f"{where}")


def desired_versions(config: FleetConfig, state: RolloutState,
                     devices: Sequence[DeviceView]) -> dict[str, str | None]:
    """Device id -> version it should run under ``state`` (None: no package for it)."""
    out: dict[str, str | None] = {}
    rolled_back = state.phase is RolloutPhase.ROLLED_BACK
    for d in devices:
        new = (not rolled_back and (
            d.device_id in state.assigned_at
            # Never downgrade a device that already runs the new version.
            or d.version == state.version))
        version = state.version if new else state.previous
        if not _has_package(config, version, d.target):
            # No package of that version for this target: the other one, if it has one.
            other = state.previous if new else state.version
            version = other if (not rolled_back and _has_package(config, other, d.target)) \
                else None
        out[d.device_id] = version
    return out


def desired_state(config: FleetConfig, version: str | None,
                  target: str) -> DesiredState | None:
    """What a heartbeat answers for ``version`` on ``target`` (None: no such package)."""
    for v in (config.current, config.previous):
        if v is not None and v.version == version and target in v.packages:
            ref = v.packages[target]
            return DesiredState(version=v.version, target=target,
                                packageUrl=f"/v1/packages/{v.version}/{target}",
                                sha256=ref.sha256, size=ref.size, signature=ref.signature)
    return None


def step(config: FleetConfig, state: RolloutState | None, devices: Sequence[DeviceView],
         now: float) -> StepResult:
    """One controller step: the new state, each device's desired version, the events."""
    events: list[str] = []
    if state is None or state.version != config.current.version:
        if state is not None and state.phase is RolloutPhase.PROGRESSING:
            events.append(f"Rollout of version {state.version} superseded by version "
                          f"{config.current.version}")
        state = _start(config, devices, now, events)
    else:
        state = state.model_copy(deep=True)
        # The operator may fix the rollback target without a new version.
        state.previous = config.previous.version if config.previous is not None else None
    by_id = {d.device_id: d for d in devices}
    _join_late(config, state, devices, now, events)
    if state.phase is RolloutPhase.PROGRESSING:
        _update_outcomes(config, state, by_id, now)
        _advance(config, state, now, events)
    return StepResult(state, desired_versions(config, state, devices), tuple(events))


# -- status -------------------------------------------------------------------------------------


def device_state(config: FleetConfig, state: RolloutState | None, device: DeviceView,
                 now: float) -> DeviceState:
    """The device's state in the fleet's status (Offline first: it explains the rest)."""
    if now - device.last_seen > OFFLINE_AFTER_INTERVALS * config.heartbeatIntervalSeconds:
        return DeviceState.OFFLINE
    outcome = state.outcomes.get(device.device_id) if state is not None else None
    if outcome is Outcome.FAILED:
        return DeviceState.FAILED
    if outcome is Outcome.STALLED:
        return DeviceState.STALLED
    if device.updating:
        return DeviceState.UPDATING
    result = device.last_deployment
    if (result is not None and result.outcome is DeploymentOutcome.FAILED
            and result.version != device.version):
        return DeviceState.FAILED
    return DeviceState.ONLINE


def rollout_status(config: FleetConfig, state: RolloutState) -> RolloutStatus:
    current = None
    if state.phase is RolloutPhase.PROGRESSING or state.wave < state.waves:
        index = min(state.wave, state.waves)
        current = _tally(state, index).status(index)
    return RolloutStatus(version=state.version, previousVersion=state.previous,
                         phase=state.phase, wave=state.wave, waves=state.waves,
                         currentWave=current, message=state.message,
                         startedAt=state.started_at, finishedAt=state.finished_at)


def fleet_status(config: FleetConfig, state: RolloutState | None,
                 devices: Sequence[DeviceView], now: float,
                 counters: Mapping[str, int] | None = None) -> FleetStatus:
    by_state = {s.value: 0 for s in DeviceState}
    by_version: dict[str, int] = {}
    for d in devices:
        by_state[device_state(config, state, d, now).value] += 1
        key = d.version or "(none)"
        by_version[key] = by_version.get(key, 0) + 1
    return FleetStatus(fleet=config.name, devices=len(devices), byState=by_state,
                       byVersion=dict(sorted(by_version.items())),
                       rollout=rollout_status(config, state) if state is not None else None,
                       counters=dict(counters or {}))
