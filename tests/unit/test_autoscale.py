"""Auto scaling policies step by step with a fake clock (``reconcile.autoscale``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubeinfer_operator.api.cron import cron_matches, parse_cron
from kubeinfer_operator.reconcile.autoscale import (
    Decision,
    Metric,
    Policy,
    ScaleState,
    Scheduled,
    Serverless,
    Step,
    StepScaling,
    TargetTracking,
    decide,
    decide_serverless,
)

IPR = Metric.INVOCATIONS_PER_REPLICA.value
CPU = Metric.CPU_UTILIZATION.value
# A Wednesday.
T0 = datetime(2026, 11, 18, 12, 0, 0, tzinfo=UTC)


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def tick(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def tracking(target: float = 100.0, **kw: float) -> Policy:
    return Policy(min_replicas=1, max_replicas=10,
                  target_tracking=(TargetTracking(Metric.INVOCATIONS_PER_REPLICA, target),),
                  scale_in_cooldown_s=kw.get("scale_in", 300.0),
                  scale_out_cooldown_s=kw.get("scale_out", 60.0))


def test_target_tracking_scales_out_proportionally() -> None:
    d = decide(tracking(), 2, {IPR: 250.0}, ScaleState(), T0)
    assert d.desired == 5  # ceil(2 * 250 / 100)
    assert d.reason.startswith("Scaled out from 2 to 5: InvocationsPerReplica 250")
    assert d.state.last_scale_out == T0.timestamp()


def test_within_tolerance_keeps_replicas() -> None:
    d = decide(tracking(), 3, {IPR: 108.0}, ScaleState(), T0)
    assert d.desired == 3 and "within 10%" in d.reason
    assert d.state.last_scale_out is None


def test_no_metrics_keeps_replicas() -> None:
    d = decide(tracking(), 3, {IPR: None}, ScaleState(), T0)
    assert (d.desired, d.reason) == (3, "no metric value yet")


def test_clamped_to_max_and_min() -> None:
    assert decide(tracking(), 2, {IPR: 10_000.0}, ScaleState(), T0).desired == 10
    d = decide(tracking(scale_in=0), 4, {IPR: 0.0}, ScaleState(), T0)
    assert d.desired == 1 and "clamped to [1, 10] (policy)" in d.reason


def test_scale_out_cooldown_then_allowed() -> None:
    clock = Clock()
    policy = tracking(scale_out=60)
    d = decide(policy, 1, {IPR: 300.0}, ScaleState(), clock.now)
    assert d.desired == 3
    # More load 30 s later: still inside the scale-out cooldown.
    d2 = decide(policy, 3, {IPR: 200.0}, d.state, clock.tick(30))
    assert d2.desired == 3 and "scale-out cooldown (30s left)" in d2.reason
    # At 60 s the cooldown has passed.
    d3 = decide(policy, 3, {IPR: 200.0}, d2.state, clock.tick(30))
    assert d3.desired == 6


def test_scale_in_waits_for_cooldown_after_any_scaling() -> None:
    clock = Clock()
    policy = tracking(scale_in=120, scale_out=0)
    d = decide(policy, 1, {IPR: 400.0}, ScaleState(), clock.now)
    assert d.desired == 4
    # Load gone right after the scale-out: no scale-in for 120 s.
    d = decide(policy, 4, {IPR: 0.0}, d.state, clock.tick(60))
    assert d.desired == 4 and "scale-in cooldown (60s left)" in d.reason
    d = decide(policy, 4, {IPR: 0.0}, d.state, clock.tick(59))
    assert d.desired == 4 and "scale-in cooldown" in d.reason
    d = decide(policy, 4, {IPR: 0.0}, d.state, clock.tick(62))
    assert d.desired == 1 and d.reason.startswith("Scaled in from 4 to 1")
    assert d.state.last_scale_in == clock.now.timestamp()


def test_flapping_protection_keeps_peak_within_window() -> None:
    clock = Clock()
    policy = tracking(scale_in=100, scale_out=0)
    state = ScaleState(last_scale_out=(clock.now - timedelta(seconds=1000)).timestamp())
    # A peak asks for 4 while 4 run (hold), then a dip asks for 1.
    d = decide(policy, 4, {IPR: 100.0}, state, clock.now)
    assert d.desired == 4
    d = decide(policy, 4, {IPR: 20.0}, d.state, clock.tick(10))
    assert d.desired == 4 and "flapping protection" in d.reason
    # Once the peak left the 100 s window the dip's recommendation wins.
    d = decide(policy, 4, {IPR: 20.0}, d.state, clock.tick(95))
    assert d.desired == 1


def test_flapping_protection_scales_in_to_the_window_peak() -> None:
    clock = Clock()
    policy = tracking(scale_in=100, scale_out=0)
    state = ScaleState(last_scale_out=(clock.now - timedelta(seconds=1000)).timestamp())
    d = decide(policy, 6, {IPR: 50.0}, state, clock.now)  # wants 3
    assert d.desired == 3
    d = decide(policy, 3, {IPR: 10.0}, d.state, clock.tick(10))  # wants 1, cooldown
    assert d.desired == 3


def test_step_scaling_bands() -> None:
    steps = (Step(-1, upper=20), Step(1, lower=70, upper=90), Step(3, lower=90))
    policy = Policy(min_replicas=1, max_replicas=10, scale_in_cooldown_s=0,
                    scale_out_cooldown_s=0,
                    step_scaling=(StepScaling(Metric.CPU_UTILIZATION, steps),))
    assert decide(policy, 2, {CPU: 95.0}, ScaleState(), T0).desired == 5
    assert decide(policy, 2, {CPU: 80.0}, ScaleState(), T0).desired == 3
    assert decide(policy, 2, {CPU: 90.0}, ScaleState(), T0).desired == 5  # lower bound inclusive
    d = decide(policy, 2, {CPU: 50.0}, ScaleState(), T0)
    assert d.desired == 2 and "matches no step" in d.reason
    assert decide(policy, 2, {CPU: 5.0}, ScaleState(), T0).desired == 1


def test_largest_proposal_wins() -> None:
    policy = Policy(min_replicas=1, max_replicas=10, scale_out_cooldown_s=0,
                    target_tracking=(TargetTracking(Metric.INVOCATIONS_PER_REPLICA, 100),
                                     TargetTracking(Metric.CPU_UTILIZATION, 50)))
    d = decide(policy, 2, {IPR: 100.0, CPU: 150.0}, ScaleState(), T0)
    assert d.desired == 6 and "CPUUtilization" in d.reason


def test_custom_metric_key() -> None:
    policy = Policy(min_replicas=1, max_replicas=10, scale_out_cooldown_s=0,
                    target_tracking=(TargetTracking(Metric.CUSTOM, 10, query="sum(q)"),))
    assert policy.metric_keys() == {"custom:sum(q)"}
    assert decide(policy, 1, {"custom:sum(q)": 35.0}, ScaleState(), T0).desired == 4


def test_schedule_boundaries() -> None:
    policy = Policy(min_replicas=1, max_replicas=10, scale_in_cooldown_s=600,
                    scheduled=(Scheduled("* 9-17 * * 1-5", 4, 10),))
    wed = datetime(2026, 11, 18, tzinfo=UTC)
    before = wed.replace(hour=8, minute=59, second=59)
    start = wed.replace(hour=9)
    last = wed.replace(hour=17, minute=59)
    after = wed.replace(hour=18)
    assert decide(policy, 1, {}, ScaleState(), before).desired == 1
    d = decide(policy, 1, {}, ScaleState(), start)
    assert d.desired == 4 and "schedule '* 9-17 * * 1-5'" in d.reason
    assert decide(policy, 4, {}, ScaleState(), last).desired == 4
    # Bounds apply at once when the window closes, cooldown notwithstanding,
    # only when replicas are outside them: 4 is inside [1, 10], so it stays.
    d = decide(policy, 4, {IPR: 0.0}, ScaleState(last_scale_out=last.timestamp()), after)
    assert d.desired == 4 and "cooldown" not in d.reason
    # Saturday: not in the schedule.
    saturday = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert decide(policy, 1, {}, ScaleState(), saturday).desired == 1


def test_schedule_lowers_max_at_once() -> None:
    policy = Policy(min_replicas=1, max_replicas=10, scale_in_cooldown_s=600,
                    scheduled=(Scheduled("0-29 * * * *", 1, 2),))
    state = ScaleState(last_scale_out=T0.timestamp())
    d = decide(policy, 5, {}, state, T0 + timedelta(seconds=5))
    assert d.desired == 2 and "outside [1, 2]" in d.reason


def test_cron_parsing() -> None:
    assert parse_cron("*/15 0 1,15 * 0")[0] == frozenset({0, 15, 30, 45})
    assert cron_matches("30 12 * * 3", T0.replace(minute=30))  # Wednesday is 3
    assert not cron_matches("30 12 * * 3", T0.replace(minute=31))
    assert cron_matches("0 12 * * 7", datetime(2026, 11, 22, 12, 0, tzinfo=UTC))  # Sunday
    # Both day fields restricted: either matches (standard cron).
    assert cron_matches("0 12 1 * 3", T0)
    for bad, why in [("* * * *", "5 fields"), ("61 * * * *", "outside 0-59"),
                     ("* 5-2 * * *", "outside"), ("*/0 * * * *", "positive"),
                     ("x * * * *", "not a number")]:
        with pytest.raises(ValueError, match=why):
            parse_cron(bad)


SL = Serverless(provisioned=0, idle_timeout_s=60)


def test_serverless_cold_start_ignores_cooldowns() -> None:
    state = ScaleState(last_scale_in=T0.timestamp())
    d = decide_serverless(SL, None, 0, {}, state, None, True, T0)
    assert d.desired == 1 and "cold start" in d.reason


def test_serverless_idles_to_zero_after_timeout() -> None:
    clock = Clock()
    active = clock.now.timestamp()
    d = decide_serverless(SL, None, 1, {}, ScaleState(), active, False, clock.tick(59))
    assert d.desired == 1
    d = decide_serverless(SL, None, 1, {}, d.state, active, False, clock.tick(1))
    assert d.desired == 0 and "no traffic for 60s" in d.reason


def test_serverless_provisioned_stays_warm() -> None:
    config = Serverless(provisioned=2, idle_timeout_s=10)
    d = decide_serverless(config, None, 0, {}, ScaleState(), None, False, T0)
    assert d.desired == 2 and "provisionedConcurrency 2" in d.reason
    d = decide_serverless(config, None, 3, {}, ScaleState(), 0.0, False, T0)
    assert d.desired == 2
    d = decide_serverless(config, None, 2, {}, ScaleState(), 0.0, False, T0)
    assert d.desired == 2 and d.reason == "idle"


def test_serverless_follows_policy_while_busy() -> None:
    policy = tracking(scale_out=0)
    d = decide_serverless(SL, policy, 1, {IPR: 300.0}, ScaleState(), T0.timestamp(), True, T0)
    assert d.desired == 3


def test_decision_changes() -> None:
    assert Decision(2, "x").changes(1) and not Decision(1, "x").changes(1)
