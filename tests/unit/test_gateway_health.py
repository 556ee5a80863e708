"""Upstream health state transitions (gateway/health.py)."""

from __future__ import annotations

import pytest

from kubeinfer_runtime.gateway.health import HealthTable, Transition

U1, U2 = "http://u1:1", "http://u2:2"


def test_new_upstreams_are_routable_until_proven_otherwise() -> None:
    health = HealthTable()
    assert health.track([U1, U2]) == [U1, U2]
    assert health.down == set()
    assert health.is_up(U1)


def test_goes_down_after_fall_failed_checks_and_up_after_rise_good_ones() -> None:
    health = HealthTable(fall=2, rise=2)
    health.track([U1])
    assert health.record_check(U1, False) is None
    assert health.is_up(U1)
    assert health.record_check(U1, False) is Transition.WENT_DOWN
    assert health.down == {U1}
    assert health.record_check(U1, False) is None  # already down: no new transition
    assert health.record_check(U1, True) is None
    assert not health.is_up(U1)
    assert health.record_check(U1, True) is Transition.CAME_UP
    assert health.down == set()


def test_a_good_check_resets_the_failure_count() -> None:
    health = HealthTable(fall=2)
    health.track([U1])
    health.record_check(U1, False)
    health.record_check(U1, True)
    assert health.record_check(U1, False) is None
    assert health.is_up(U1)


def test_unreachable_takes_an_upstream_out_at_once_and_a_check_brings_it_back() -> None:
    health = HealthTable(fall=3, rise=1)
    health.track([U1, U2])
    assert health.mark_unreachable(U1) is Transition.WENT_DOWN
    assert health.mark_unreachable(U1) is None
    assert health.down == {U1}
    assert health.record_check(U1, True) is Transition.CAME_UP
    assert health.down == set()


def test_retracking_keeps_state_of_kept_upstreams_and_forgets_removed_ones() -> None:
    health = HealthTable()
    health.track([U1, U2])
    health.mark_unreachable(U1)
    health.mark_unreachable(U2)
    assert health.track([U1, "http://u3:3"]) == ["http://u3:3"]
    assert health.down == {U1}
    assert sorted(health.tracked()) == [U1, "http://u3:3"]
    # Results for an upstream no longer tracked (check raced a reload) are ignored.
    assert health.record_check(U2, True) is None
    assert health.mark_unreachable(U2) is None
    assert U2 not in health.down


def test_thresholds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HealthTable(fall=0)
