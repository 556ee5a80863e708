"""A fleet server's answer as the EdgeFleet status carries it (reconcile.edge_status.
bounded_fleet): any pod under the server's labels may answer, so maps, texts and counts
are bounded before they are written every refresh."""

from __future__ import annotations

import json

from kubeinfer_operator.reconcile import edge_status as es
from kubeinfer_runtime.contract.edge import FleetStatus


def hostile() -> FleetStatus:
    return FleetStatus.model_validate({
        "fleet": "f" * 100_000, "devices": 10 ** 40,
        "byState": {"Online": 3, **{f"s{i}": i for i in range(5000)}},
        "byVersion": {str(i) + ("v" * 5000): -i for i in range(5000)},
        "counters": {f"c{i}": 1 for i in range(5000)},
        "rollout": {"version": "v" * 100_000, "previousVersion": None, "phase": "Progressing",
                    "wave": 10 ** 30, "waves": -5, "message": "m" * 1_000_000,
                    "currentWave": {"index": 0, "devices": 10 ** 30, "succeeded": 1,
                                    "failed": 0, "pending": 0, "successPercent": 1e300,
                                    "failurePercent": -3.0}},
    })


def test_a_hostile_fleet_answer_is_bounded() -> None:
    fleet = es.bounded_fleet(hostile())
    assert len(fleet.byState) == len(fleet.byVersion) == len(fleet.counters) == es.MAX_FLEET_KEYS
    assert "s4999" in fleet.byState  # the largest counts are kept
    assert all(len(k) <= es.MAX_FLEET_TEXT and v >= 0 for k, v in fleet.byVersion.items())
    assert fleet.devices == es.MAX_FLEET_COUNT
    assert fleet.rollout is not None and fleet.rollout.currentWave is not None
    assert len(fleet.rollout.message) == len(fleet.rollout.version) == es.MAX_FLEET_TEXT
    assert fleet.rollout.waves == 0 and fleet.rollout.wave == es.MAX_FLEET_COUNT
    assert fleet.rollout.currentWave.successPercent == 100.0
    assert fleet.rollout.currentWave.failurePercent == 0.0
    assert len(json.dumps(fleet.model_dump(mode="json"))) < 50_000


def test_a_normal_answer_is_unchanged() -> None:
    fleet = FleetStatus.model_validate({
        "fleet": "f", "devices": 4, "byState": {"Online": 3, "Offline": 1},
        "byVersion": {"v1": 4}, "rollout": None, "counters": {"heartbeats": 9}})
    assert es.bounded_fleet(fleet) == fleet
