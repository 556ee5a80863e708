"""The edge rollout state machine (``edge.waves``), step by step with a fake clock."""

from __future__ import annotations

import base64
from dataclasses import replace

from kubeinfer_runtime.contract.edge import (
    DeploymentOutcome,
    DeploymentResult,
    FleetConfig,
    FleetVersion,
    OnFailure,
    PackageRef,
    RolloutPhase,
    RolloutSpec,
    Wave,
)
from kubeinfer_runtime.edge.waves import (
    DeviceView,
    Outcome,
    RolloutState,
    assign_waves,
    fleet_status,
    step,
)

KEY = base64.b64encode(bytes(32)).decode()
T0 = 1_000_000.0


def _version(name: str, targets: tuple[str, ...] = ("arm64",)) -> FleetVersion:
    return FleetVersion(version=name, packages={
        t: PackageRef(uri=f"file:///p/{name}/{t}.tar", sha256="0" * 64, size=1, signature="s")
        for t in targets})


def _config(current: str = "v2", previous: str | None = "v1", waves: list[Wave] | None = None,
            on_failure: OnFailure = OnFailure.ROLLBACK, timeout: int = 60) -> FleetConfig:
    return FleetConfig(
        name="fleet", current=_version(current),
        previous=_version(previous) if previous else None,
        rollout=RolloutSpec(waves=waves or [], onFailure=on_failure,
                            deviceDeploymentTimeoutSeconds=timeout),
        heartbeatIntervalSeconds=10, publicKey=KEY)


def _fleet(n: int, version: str = "v1", **labels: str) -> dict[str, DeviceView]:
    return {f"d{i:02d}": DeviceView(f"d{i:02d}", "arm64", dict(labels), version=version,
                                    last_seen=T0, registered_at=T0) for i in range(n)}


class Sim:
    """Devices that do what they are told: install the desired version, or fail it."""

    def __init__(self, config: FleetConfig, devices: dict[str, DeviceView]) -> None:
        self.config = config
        self.devices = devices
        self.state: RolloutState | None = None
        self.desired: dict[str, str | None] = {}
        self.events: list[str] = []
        self.now = T0
        self.failing: set[str] = set()
        self.silent: set[str] = set()

    def step(self, advance: float = 1.0) -> None:
        self.now += advance
        result = step(self.config, self.state, list(self.devices.values()), self.now)
        self.state, self.desired = result.state, result.desired
        self.events.extend(result.events)

    def report(self) -> None:
        """Each device acts on its desired version (one heartbeat)."""
        for dev_id, version in self.desired.items():
            d = self.devices[dev_id]
            if dev_id in self.silent:
                continue
            d = replace(d, last_seen=self.now)
            if version is not None and version != d.version:
                if dev_id in self.failing:
                    d = replace(d, last_deployment=DeploymentResult(
                        version=version, outcome=DeploymentOutcome.FAILED))
                else:
                    d = replace(d, version=version, last_deployment=DeploymentResult(
                        version=version, outcome=DeploymentOutcome.SUCCEEDED))
            self.devices[dev_id] = d

    def on(self, version: str) -> set[str]:
        return {k for k, v in self.desired.items() if v == version}

    @property
    def phase(self) -> RolloutPhase:
        assert self.state is not None
        return self.state.phase


def _members(sim: Sim, wave: int) -> set[str]:
    assert sim.state is not None
    return {k for k, v in sim.state.members.items() if v == wave}


def test_assignment_is_cumulative_stable_and_spread() -> None:
    devices = list(_fleet(10).values())
    waves = [Wave(percentage=10), Wave(percentage=50), Wave(percentage=100)]
    a = assign_waves("v2", waves, devices)
    sizes = [sum(1 for w in a.values() if w == i) for i in range(4)]
    assert sizes == [1, 4, 5, 0]
    assert assign_waves("v2", waves, list(reversed(devices))) == a  # order-independent
    # Another version orders the fleet differently (deterministic: sha256 of version:id).
    assert assign_waves("v3", waves, devices) != a


def test_three_waves_advance_with_bake() -> None:
    waves = [Wave(percentage=20, bakeSeconds=30), Wave(percentage=60, bakeSeconds=30),
             Wave(percentage=100)]
    sim = Sim(_config(waves=waves), _fleet(10))
    sim.step()
    assert sim.phase is RolloutPhase.PROGRESSING
    first = _members(sim, 0)
    assert len(first) == 2 and sim.on("v2") == first
    assert sim.on("v1") == set(sim.devices) - first
    sim.report()
    sim.step()  # wave 1 passed: baking
    assert sim.state is not None and sim.state.wave == 0
    assert sim.state.passing_since == sim.now
    sim.step(29)
    assert sim.state.wave == 0 and sim.on("v2") == first
    sim.step(1)  # 30 s baked
    assert sim.state.wave == 1
    second = _members(sim, 1)
    assert len(second) == 4 and sim.on("v2") == first | second
    sim.report()
    sim.step()
    sim.step(30)
    assert sim.state.wave == 2
    assert sim.on("v2") == set(sim.devices)
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.COMPLETE
    assert sim.state.finished_at == sim.now
    status = fleet_status(sim.config, sim.state, list(sim.devices.values()), sim.now)
    assert status.byVersion == {"v2": 10}
    assert status.byState["Online"] == 10
    assert status.rollout is not None and status.rollout.phase is RolloutPhase.COMPLETE
    assert any("complete" in e for e in sim.events)


def test_trip_rolls_every_device_back() -> None:
    waves = [Wave(percentage=30, maxFailurePercent=40), Wave(percentage=100)]
    sim = Sim(_config(waves=waves), _fleet(10))
    sim.step()
    first = sorted(_members(sim, 0))
    assert len(first) == 3
    sim.failing = {first[0]}  # 1/3 = 33 % <= 40 %: tolerated
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.PROGRESSING and sim.state is not None
    assert sim.state.wave == 1
    second = _members(sim, 1)
    sim.failing = set(sorted(second)[:3])  # 3/7 = 43 % > 0 %
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.ROLLED_BACK
    assert sim.on("v1") == set(sim.devices)
    assert "rolled back to v1" in sim.state.message
    status = fleet_status(sim.config, sim.state, list(sim.devices.values()), sim.now)
    assert status.byState["Failed"] == 4
    sim.step(1000)  # stays rolled back until a new version
    assert sim.phase is RolloutPhase.ROLLED_BACK and sim.on("v1") == set(sim.devices)


def test_pause_freezes_assignments() -> None:
    waves = [Wave(percentage=50), Wave(percentage=100)]
    sim = Sim(_config(waves=waves, on_failure=OnFailure.PAUSE), _fleet(4))
    sim.step()
    first = _members(sim, 0)
    sim.failing = {sorted(first)[0]}
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.PAUSED
    assert sim.on("v2") == first
    late = DeviceView("late", "arm64", version="v1", last_seen=sim.now)
    sim.devices["late"] = late
    sim.step(500)
    assert sim.phase is RolloutPhase.PAUSED and sim.on("v2") == first
    assert sim.desired["late"] == "v1"


def test_stalled_device_counts_as_failure_and_never_blocks() -> None:
    waves = [Wave(percentage=50, maxFailurePercent=50), Wave(percentage=100)]
    sim = Sim(_config(waves=waves, timeout=60), _fleet(4))
    sim.step()
    first = sorted(_members(sim, 0))
    sim.silent = {first[0]}
    sim.report()
    sim.step(30)
    assert sim.state is not None and sim.state.wave == 0  # waiting for the silent one
    sim.step(30)  # 60 s after assignment: stalled, 1/2 = 50 % tolerated
    assert sim.state.outcomes[first[0]] is Outcome.STALLED
    assert sim.state.wave == 1
    sim.report()  # the others heartbeat
    status = fleet_status(sim.config, sim.state, list(sim.devices.values()), sim.now)
    assert status.byState["Offline"] == 1  # silent for 61 s > 3 x 10 s
    sim.devices[first[0]] = replace(sim.devices[first[0]], last_seen=sim.now)
    status = fleet_status(sim.config, sim.state, list(sim.devices.values()), sim.now)
    assert status.byState["Stalled"] == 1


def test_stalled_devices_trip_a_wave() -> None:
    sim = Sim(_config(waves=[Wave(percentage=50), Wave(percentage=100)], timeout=60),
              _fleet(4))
    sim.step()
    sim.silent = set(sim.devices)
    sim.step(60)
    assert sim.phase is RolloutPhase.ROLLED_BACK
    assert sim.on("v1") == set(sim.devices)


def test_new_version_supersedes_rollout_in_progress() -> None:
    waves = [Wave(percentage=50), Wave(percentage=100)]
    sim = Sim(_config(waves=waves), _fleet(4))
    sim.step()
    sim.report()  # two devices on v2
    sim.config = _config(current="v3", previous="v2", waves=waves)
    sim.step()
    assert sim.state is not None and sim.state.version == "v3"
    assert sim.state.previous == "v2" and sim.state.wave == 0
    assert sim.phase is RolloutPhase.PROGRESSING
    first = _members(sim, 0)
    assert sim.on("v3") == first
    assert sim.on("v2") == set(sim.devices) - first
    assert any("superseded" in e for e in sim.events)
    sim.report()
    sim.step()
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.COMPLETE
    assert {d.version for d in sim.devices.values()} == {"v3"}


def test_min_devices_delays_a_trip() -> None:
    waves = [Wave(percentage=100, minDevices=3)]
    sim = Sim(_config(waves=waves), _fleet(4))
    sim.step()
    ids = sorted(sim.devices)
    sim.silent = set(ids[1:])
    sim.failing = {ids[0]}
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.PROGRESSING  # 1 failure, 1 reporting < 3
    sim.silent = {ids[3]}
    sim.failing = {ids[0]}
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.ROLLED_BACK  # 3 reporting, 1 failed > 0 %


def test_device_selector_waves() -> None:
    devices = _fleet(2, ring="canary") | {
        f"p{i}": DeviceView(f"p{i}", "arm64", {"ring": "prod"}, version="v1", last_seen=T0)
        for i in range(3)} | {"x": DeviceView("x", "arm64", {}, version="v1", last_seen=T0)}
    waves = [Wave(deviceSelector={"ring": "canary"}), Wave(deviceSelector={"ring": "prod"})]
    sim = Sim(_config(waves=waves), devices)
    sim.step()
    assert sim.on("v2") == {"d00", "d01"}
    sim.report()
    sim.step()
    assert sim.on("v2") == {"d00", "d01", "p0", "p1", "p2"}
    assert sim.desired["x"] == "v1"  # in no wave: after the last one
    sim.report()
    sim.step()
    assert sim.desired["x"] == "v2"
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.COMPLETE


def test_late_registration_joins_wave_in_progress_or_tail() -> None:
    waves = [Wave(percentage=50, bakeSeconds=10), Wave(percentage=100)]
    sim = Sim(_config(waves=waves), _fleet(4))
    sim.step()
    sim.devices["late1"] = DeviceView("late1", "arm64", version="v1", last_seen=sim.now)
    sim.step()
    assert sim.state is not None and sim.state.members["late1"] == 0
    assert sim.desired["late1"] == "v2"
    sim.report()
    sim.step()  # wave 1 passes, baking
    sim.step(10)
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.COMPLETE
    sim.devices["late2"] = DeviceView("late2", "arm64", version="", last_seen=sim.now)
    sim.step()
    assert sim.desired["late2"] == "v2"
    assert sim.state.members["late2"] == 2


def test_first_version_goes_everywhere_at_once() -> None:
    sim = Sim(_config(current="v1", previous=None,
                      waves=[Wave(percentage=10), Wave(percentage=100)]), _fleet(5, version=""))
    sim.step()
    assert sim.state is not None and sim.state.waves == 0
    assert sim.on("v1") == set(sim.devices)
    sim.failing = {"d00"}
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.COMPLETE  # a first version never trips
    assert sim.on("v1") == set(sim.devices)


def test_device_without_package_for_its_target() -> None:
    devices = _fleet(2) | {"amd": DeviceView("amd", "x86", version="", last_seen=T0)}
    sim = Sim(_config(waves=[Wave(percentage=100)]), devices)
    sim.step()
    assert sim.desired["amd"] is None
    assert sim.state is not None and "amd" not in sim.state.members
    sim.report()
    sim.step()
    assert sim.phase is RolloutPhase.COMPLETE


def test_state_round_trips_through_json() -> None:
    sim = Sim(_config(waves=[Wave(percentage=50), Wave(percentage=100)]), _fleet(4))
    sim.step()
    assert sim.state is not None
    again = RolloutState.model_validate_json(sim.state.model_dump_json())
    assert again == sim.state
    sim.state = again
    sim.report()
    sim.step()
    assert sim.state.wave == 1
