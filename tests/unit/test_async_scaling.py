"""The backlog scaling policy of async endpoints, against a fake clock."""

from __future__ import annotations

from kubeinfer_operator.reconcile.async_scaling import (
    BacklogPolicy,
    BacklogState,
    decide,
    wanted_replicas,
)

POLICY = BacklogPolicy(target_per_replica=5, min_replicas=0, max_replicas=4,
                       scale_out_cooldown_s=30, scale_in_cooldown_s=120)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def advance(self, s: float) -> float:
        self.t += s
        return self.t


def test_wanted_is_ceil_of_backlog_over_target_within_bounds() -> None:
    assert wanted_replicas(POLICY, 0) == 0
    assert wanted_replicas(POLICY, 1) == 1
    assert wanted_replicas(POLICY, 5) == 1
    assert wanted_replicas(POLICY, 6) == 2
    assert wanted_replicas(POLICY, 1000) == 4
    floor = BacklogPolicy(5, 2, 4, 30, 120)
    assert wanted_replicas(floor, 0) == 2


def test_scale_from_zero_is_immediate_even_inside_cooldown() -> None:
    clock = Clock()
    state = BacklogState(last_scale_out=clock.t - 1)  # a scale-out a second ago
    d = decide(POLICY, 0, 3, state, clock.t)
    assert d.desired == 1
    assert "no worker runs" in d.reason
    assert d.state.last_scale_out == clock.t


def test_scale_out_waits_for_its_cooldown() -> None:
    clock = Clock()
    d = decide(POLICY, 1, 12, BacklogState(), clock.t)
    assert d.desired == 3
    held = decide(POLICY, 3, 40, d.state, clock.advance(10))
    assert held.desired == 3 and "cooldown for 20s" in held.reason
    again = decide(POLICY, 3, 40, held.state, clock.advance(20))
    assert again.desired == 4


def test_scale_to_zero_only_after_a_quiet_stretch() -> None:
    clock = Clock()
    state = BacklogState()
    d = decide(POLICY, 2, 0, state, clock.t)
    assert d.desired == 2 and "low for 0s of 120s" in d.reason
    d = decide(POLICY, 2, 0, d.state, clock.advance(119))
    assert d.desired == 2
    d = decide(POLICY, 2, 0, d.state, clock.advance(1))
    assert d.desired == 0 and "idle queue" in d.reason
    assert d.state.last_scale_in == clock.t


def test_a_burst_resets_the_quiet_stretch() -> None:
    clock = Clock()
    d = decide(POLICY, 1, 0, BacklogState(), clock.t)
    d = decide(POLICY, 1, 0, d.state, clock.advance(100))
    d = decide(POLICY, 1, 4, d.state, clock.advance(1))  # work arrives: 1 worker is right
    assert d.desired == 1 and d.state.low_since is None
    d = decide(POLICY, 1, 0, d.state, clock.advance(100))
    assert d.desired == 1  # the quiet stretch starts over


def test_no_scale_in_right_after_a_scale_out() -> None:
    clock = Clock()
    out = decide(POLICY, 1, 20, BacklogState(), clock.t)
    assert out.desired == 4
    # Low for long enough, but the scale-out was only 10 s ago: hold.
    early = decide(POLICY, 4, 0, BacklogState(last_scale_out=clock.t - 10,
                                              low_since=clock.t - 500), clock.t)
    assert early.desired == 4
    # The backlog vanished: scale-in waits the full quiet stretch after that.
    d = decide(POLICY, 4, 0, out.state, clock.advance(40))
    d = decide(POLICY, 4, 0, d.state, clock.advance(119))
    assert d.desired == 4
    d = decide(POLICY, 4, 0, d.state, clock.advance(1))
    assert d.desired == 0


def test_bounds_are_enforced_at_once() -> None:
    policy = BacklogPolicy(5, 1, 2, 30, 120)
    clock = Clock()
    assert decide(policy, 0, 0, BacklogState(), clock.t).desired == 1
    over = decide(policy, 5, 100, BacklogState(last_scale_out=clock.t), clock.t)
    assert over.desired == 2 and "outside [1, 2]" in over.reason


def test_steady_backlog_keeps_replicas() -> None:
    d = decide(POLICY, 2, 10, BacklogState(low_since=5.0), 1000.0)
    assert d.desired == 2 and d.state.low_since is None
