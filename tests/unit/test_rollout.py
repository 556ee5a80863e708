"""The guarded-rollout state machine (reconcile.rollout) and its alarms, step by step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubeinfer_operator.api.deployment_config import Alarm, DeploymentConfig
from kubeinfer_operator.reconcile import rollout as ro
from kubeinfer_operator.reconcile.rollout_alarms import (
    FleetCounters,
    FleetWindow,
    evaluate,
    parse_fleet_metrics,
    quantile,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD, NEW, NEWER = "h-old", "h-new", "h-newer"


def config(routing: dict[str, Any] | None = None, *, rolling: dict[str, Any] | None = None,
           termination: int = 0, timeout: int | None = None,
           alarms: list[dict[str, Any]] | None = None) -> DeploymentConfig:
    data: dict[str, Any] = {}
    if rolling is not None:
        data["rolling"] = rolling
    else:
        bg: dict[str, Any] = {"trafficRouting": routing, "terminationWaitInSeconds": termination}
        if timeout:
            bg["maximumExecutionTimeoutInSeconds"] = timeout
        data["blueGreen"] = bg
    if alarms is not None:
        data["autoRollback"] = {"alarms": alarms}
    return DeploymentConfig.model_validate(data)


CANARY = {"type": "Canary", "waitIntervalInSeconds": 10,
          "canarySize": {"type": "CapacityPercent", "value": 25}}


class Run:
    """Drives ``decide`` like the operator does: state carried between calls."""

    def __init__(self, cfg: DeploymentConfig | None, replicas: int = 4) -> None:
        self.cfg, self.replicas = cfg, replicas
        self.state: ro.RolloutState | None = None
        self.fleets: dict[str, ro.Fleet] = {"a": ro.Fleet(OLD, replicas)}
        self.events: list[str] = []

    def tick(self, s: float, desired: str = NEW,
             evaluations: tuple[ro.AlarmEvaluation, ...] = ()) -> ro.Decision:
        d = ro.decide(variant="a", config=self.cfg, replicas=self.replicas,
                      desired_hash=desired, previous=self.state, fleets=self.fleets,
                      now=T0 + timedelta(seconds=s), evaluations=evaluations)
        self.state = d.state
        self.events += [e[0] for e in d.events]
        # The Deployment controller: fleets rendered from the spec run it at once.
        for name, fp in d.fleets.items():
            if not fp.keep:
                self.fleets[name] = ro.Fleet(desired, fp.replicas)
        self.fleets = {n: f for n, f in self.fleets.items() if n in d.fleets}
        return d


def ok(name: str = "err") -> ro.AlarmEvaluation:
    return ro.AlarmEvaluation(name, "errorRate", 0.1, 0.0, requests=100)


def test_without_deployment_config_the_variant_just_updates() -> None:
    run = Run(None)
    d = run.tick(0)
    assert d.fleets == {"a": ro.FleetPlan(4)} and d.weights == {"a": 1.0} and d.state is None


def test_canary_shifts_bakes_then_completes_and_alternates_slots() -> None:
    run = Run(config(CANARY))
    d = run.tick(0)
    assert d.state is not None and d.state.phase is ro.Phase.PROVISIONING
    assert d.fleets == {"a": ro.FleetPlan(4, keep=True), "a-green": ro.FleetPlan(4)}
    assert d.weights == {"a": 1.0, "a-green": 0.0}
    d = run.tick(1)  # green ready: canary share
    assert d.state and d.state.phase is ro.Phase.BAKING and d.weights["a-green"] == 0.25
    assert run.tick(5).weights["a-green"] == 0.25  # still baking
    d = run.tick(11)
    assert d.state and (d.state.step, d.weights["a-green"]) == (2, 1.0)
    d = run.tick(22)
    assert d.state and d.state.phase is ro.Phase.COMPLETE
    assert d.fleets == {"a-green": ro.FleetPlan(4)} and d.weights == {"a-green": 1.0}
    assert run.events == ["RolloutStarted", "TrafficShifted", "TrafficShifted",
                          "RolloutComplete"]
    # The next change rolls into the slot 'a'.
    d = run.tick(30, desired=NEWER)
    assert d.state and (d.state.blue, d.state.green) == ("a-green", "a")


def test_linear_steps_each_baked() -> None:
    run = Run(config({"type": "Linear", "waitIntervalInSeconds": 5,
                      "linearStepSize": {"type": "InstanceCount", "value": 1}}))
    run.tick(0)
    shares = [run.tick(1 + 6 * k).weights.get("a-green") for k in range(4)]
    assert shares == [0.25, 0.5, 0.75, 1.0]
    assert run.tick(30).state.phase is ro.Phase.COMPLETE  # type: ignore[union-attr]


def test_all_at_once_then_termination_wait() -> None:
    run = Run(config({"type": "AllAtOnce", "waitIntervalInSeconds": 5}, termination=20))
    run.tick(0)
    assert run.tick(1).weights == {"a": 0.0, "a-green": 1.0}
    d = run.tick(7)
    assert d.state and d.state.phase is ro.Phase.TERMINATING and "a" in d.fleets
    assert run.tick(20).state.phase is ro.Phase.TERMINATING  # type: ignore[union-attr]
    assert run.tick(28).fleets == {"a-green": ro.FleetPlan(4)}


def test_rolling_moves_capacity_batch_by_batch() -> None:
    run = Run(config(rolling={"maximumBatchSize": {"type": "InstanceCount", "value": 2},
                              "waitIntervalInSeconds": 5}))
    d = run.tick(0)
    assert d.fleets == {"a": ro.FleetPlan(4, keep=True), "a-green": ro.FleetPlan(2)}
    d = run.tick(1)
    assert d.weights["a-green"] == 0.5 and d.fleets["a"].replicas == 2
    d = run.tick(7)  # next batch: green grows first, blue keeps 2 until it is ready
    assert d.state and d.state.step == 2
    d = run.tick(8)
    assert d.weights["a-green"] == 1.0 and d.fleets["a"].replicas == 0
    assert run.tick(14).fleets == {"a-green": ro.FleetPlan(4)}


def tripped() -> ro.AlarmEvaluation:
    return ro.AlarmEvaluation("err", "errorRate", 0.1, 0.5, tripped=True, requests=40)


def test_a_tripped_alarm_rolls_back_at_every_step() -> None:
    for trip_at in (1, 2):
        run = Run(config({"type": "Linear", "waitIntervalInSeconds": 5,
                          "linearStepSize": {"type": "CapacityPercent", "value": 50}},
                         alarms=[{"name": "err", "errorRate": 0.1}]))
        run.tick(0)
        run.tick(1, evaluations=(ok(),))
        if trip_at == 2:
            d = run.tick(7, evaluations=(ok(),))
            assert d.state and d.state.step == 2
        d = run.tick(8, evaluations=(tripped(),))
        assert d.state and d.state.phase is ro.Phase.ROLLED_BACK
        assert d.weights == {"a": 1.0} and d.fleets == {"a": ro.FleetPlan(4, keep=True)}
        assert "errorRate 0.5 vs threshold 0.1" in d.state.message
        assert run.events[-1] == "RolledBack"
        cond = ro.conditions({"a": d}, 3)[0]
        assert cond["status"] == "True" and "alarm err" in cond["message"]
        # The same spec is not retried; blue keeps serving.
        again = run.tick(60)
        assert again.state and again.state.phase is ro.Phase.ROLLED_BACK
        assert again.weights == {"a": 1.0}


def test_a_tripped_alarm_during_termination_wait_rolls_back() -> None:
    run = Run(config({"type": "AllAtOnce", "waitIntervalInSeconds": 0}, termination=60,
                     alarms=[{"name": "err", "errorRate": 0.1}]))
    run.tick(0)
    run.tick(1, evaluations=(ok(),))
    assert run.tick(2, evaluations=(ok(),)).state.phase is ro.Phase.TERMINATING  # type: ignore[union-attr]
    assert run.tick(3, evaluations=(tripped(),)).weights == {"a": 1.0}


def test_no_data_extends_the_bake_until_the_timeout() -> None:
    run = Run(config(CANARY, timeout=60, alarms=[{"name": "err", "errorRate": 0.1}]))
    run.tick(0)
    run.tick(1)
    none = ro.AlarmEvaluation("err", "errorRate", 0.1, None, requests=3, detail="3/20 requests")
    d = run.tick(30, evaluations=(none,))
    assert d.state and d.state.step == 1 and "bake extended" in d.state.message
    d = run.tick(61, evaluations=(none,))
    assert d.state and d.state.phase is ro.Phase.ROLLED_BACK
    assert "maximumExecutionTimeoutInSeconds" in d.state.message


def test_a_green_fleet_that_never_gets_ready_times_out() -> None:
    run = Run(config(CANARY, timeout=60))
    run.tick(0)
    run.fleets["a-green"] = ro.Fleet(NEW, 0)
    d = ro.decide(variant="a", config=run.cfg, replicas=4, desired_hash=NEW,
                  previous=run.state, fleets=run.fleets, now=T0 + timedelta(seconds=61))
    assert d.state and d.state.phase is ro.Phase.ROLLED_BACK and d.weights == {"a": 1.0}


def test_a_green_fleet_that_cannot_become_ready_rolls_back_at_once() -> None:
    for phase_at in ("provisioning", "baking"):
        run = Run(config(CANARY))  # the default timeout: 8 hours
        run.tick(0)
        if phase_at == "baking":
            assert run.tick(1).state.phase is ro.Phase.BAKING  # type: ignore[union-attr]
        why = "model server a-green-0 is not ready: model failed to load"
        # A failure reported for a fleet running another spec is not this rollout's.
        run.fleets["a-green"] = ro.Fleet(OLD, 0, why)
        d = ro.decide(variant="a", config=run.cfg, replicas=4, desired_hash=NEW,
                      previous=run.state, fleets=run.fleets, now=T0 + timedelta(seconds=2))
        assert d.state and d.state.phase is not ro.Phase.ROLLED_BACK
        run.fleets["a-green"] = ro.Fleet(NEW, 0, why)
        d = ro.decide(variant="a", config=run.cfg, replicas=4, desired_hash=NEW,
                      previous=run.state, fleets=run.fleets, now=T0 + timedelta(seconds=2))
        assert d.state and d.state.phase is ro.Phase.ROLLED_BACK, phase_at
        assert d.weights == {"a": 1.0} and d.fleets == {"a": ro.FleetPlan(4, keep=True)}
        assert d.state.reason == ro.REASON_GREEN_FAILED
        assert f"fleet a-green cannot become ready: {why}" in d.state.message
        assert d.events[0][0] == "RolledBack" and d.events[0][2] == "Warning"
        cond = ro.conditions({"a": d}, 3)[0]
        assert (cond["status"], cond["reason"]) == ("True", "GreenFailed")
        assert ro.RolloutState.from_status(d.state.to_status()) == d.state


def test_a_new_spec_supersedes_the_rollout_in_the_same_green_slot() -> None:
    run = Run(config(CANARY))
    run.tick(0)
    run.tick(1)
    d = run.tick(3, desired=NEWER)
    assert d.state and d.state.to_hash == NEWER and d.state.phase is ro.Phase.PROVISIONING
    assert set(d.fleets) == {"a", "a-green"} and d.weights == {"a": 1.0, "a-green": 0.0}
    assert "RolloutSuperseded" in run.events
    # Back to blue's own hash: the rollout ends, green goes.
    d = run.tick(4, desired=OLD)
    assert d.fleets == {"a": ro.FleetPlan(4)} and d.state and d.state.phase is ro.Phase.COMPLETE


def test_state_round_trips_through_status() -> None:
    run = Run(config(CANARY))
    run.tick(0)
    state = run.tick(1).state
    assert state is not None
    assert ro.RolloutState.from_status(state.to_status()) == state


METRICS = """
# TYPE kubeinfer_gateway_invocations counter
kubeinfer_gateway_invocations_total{endpoint="ep",variant="a-green"} %(inv)s
kubeinfer_gateway_invocations_total{endpoint="ep",variant="a"} 999
# TYPE kubeinfer_gateway_errors counter
kubeinfer_gateway_errors_total{endpoint="ep",variant="a-green",code="ModelError"} %(err)s
kubeinfer_gateway_errors_total{endpoint="ep",variant="a-green",code="ValidationError"} 7
# TYPE kubeinfer_gateway_upstream_latency_seconds histogram
%(buckets)s
"""
BUCKET = ('kubeinfer_gateway_upstream_latency_seconds_bucket{endpoint="ep",variant="a-green",'
          'le="%s"} %s')


def scrape(inv: int, err: int, fast: int) -> FleetCounters:
    buckets = "\n".join(BUCKET % (le, n) for le, n in (("0.01", fast), ("1.0", inv),
                                                        ("+Inf", inv)))
    text = METRICS % {"inv": inv, "err": err, "buckets": buckets}
    return parse_fleet_metrics(text, "ep")["a-green"]


def test_alarms_need_min_requests_then_evaluate_error_rate_and_p99() -> None:
    window = FleetWindow()
    window.add(0, {"pod": scrape(100, 0, 100)})
    window.add(5, {"pod": scrape(110, 5, 110)})
    err = Alarm(name="err", errorRate=0.1, minRequests=20)
    first = evaluate(err, window, since=0)
    assert first.value is None and first.requests == 10
    window.add(10, {"pod": scrape(140, 20, 130)})
    e = evaluate(err, window, since=0)
    assert e.tripped and e.value == 0.5 and e.requests == 40
    slow = evaluate(Alarm(name="slow", latencyP99Ms=100, minRequests=20), window, since=0)
    assert slow.tripped and slow.value is not None and slow.value > 100


def test_a_restarted_gateway_pod_never_counts_twice() -> None:
    window = FleetWindow()
    window.add(0, {"p1": scrape(100, 2, 100), "p2": scrape(50, 0, 50)})
    window.add(5, {"p1": scrape(3, 1, 0), "p2": scrape(60, 0, 60)})  # p1 restarted
    got = window.delta(60, 0)
    assert got is not None and got[1].invocations == 10 and got[1].errors == 0


def test_quantile_interpolates_like_prometheus() -> None:
    assert quantile(0.5, ((0.1, 50.0), (0.2, 100.0), (float("inf"), 100.0))) == 0.1
    assert quantile(0.99, ()) is None


def test_promql_alarm_compares_its_value() -> None:
    alarm = Alarm.model_validate({"name": "q", "promQL": {
        "query": "x", "threshold": 5, "comparison": "LessThanThreshold"}})
    assert evaluate(alarm, None, since=0, promql_value=3).tripped
    assert evaluate(alarm, None, since=0, promql_value=None).value is None


PAIRS = """
# TYPE kubeinfer_shadow_compared counter
kubeinfer_shadow_compared_total{endpoint="ep",variant="a",peer="a-green"} %(ab)s
kubeinfer_shadow_compared_total{endpoint="ep",variant="a-green",peer="a"} %(ba)s
kubeinfer_shadow_compared_total{endpoint="ep",variant="a-green",peer="shadow1"} 500
kubeinfer_shadow_compared_total{endpoint="other",variant="a",peer="a-green"} 700
# TYPE kubeinfer_shadow_disagreed counter
kubeinfer_shadow_disagreed_total{endpoint="ep",variant="a",peer="a-green"} %(dab)s
kubeinfer_shadow_disagreed_total{endpoint="ep",variant="a-green",peer="a"} %(dba)s
kubeinfer_shadow_disagreed_total{endpoint="ep",variant="a-green",peer="shadow1"} 400
"""


def pairs(ab: int, ba: int, dab: int, dba: int) -> dict[str, FleetCounters]:
    return parse_fleet_metrics(PAIRS % {"ab": ab, "ba": ba, "dab": dab, "dba": dba}, "ep")


def test_mirrored_pairs_count_for_both_fleets_and_never_a_shadows() -> None:
    got = pairs(100, 20, 5, 1)
    # Both directions between a and a-green; the shadow's and the other endpoint's never.
    assert got["a-green"].compared == 120 and got["a-green"].disagreed == 6
    assert got["a"].compared == 120 and got["a"].disagreed == 6
    assert "shadow1" not in got


def test_disagreement_alarm_needs_min_pairs_then_trips_on_the_percentage() -> None:
    alarm = Alarm(name="dis", disagreement=0.02, minRequests=200)
    assert alarm.kind == "disagreement" and alarm.threshold == 0.02
    window = FleetWindow()
    window.add(0, {"pod": pairs(0, 0, 0, 0)["a-green"]})
    window.add(5, {"pod": pairs(100, 0, 5, 0)["a-green"]})
    first = evaluate(alarm, window, since=0)
    assert first.value is None and first.requests == 100 and not first.tripped
    assert "100/200 mirrored pairs" in first.describe()
    window.add(10, {"pod": pairs(150, 50, 5, 0)["a-green"]})
    low = evaluate(alarm, window, since=0)  # 5 of 200: 2.5%
    assert low.tripped and low.value == 0.025 and low.requests == 200
    lenient = evaluate(Alarm(name="d", disagreement=0.05, minRequests=200), window, since=0)
    assert lenient.value == 0.025 and not lenient.tripped
    # Two gateway pods add up; a restarted one never counts twice.
    window2 = FleetWindow()
    window2.add(0, {"p1": pairs(100, 0, 0, 0)["a-green"], "p2": pairs(100, 0, 0, 0)["a-green"]})
    window2.add(5, {"p1": pairs(3, 0, 3, 0)["a-green"], "p2": pairs(300, 0, 0, 0)["a-green"]})
    got = window2.delta(60, 0)
    assert got is not None and got[1].compared == 200


def test_disagreement_alarm_validation() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set exactly one"):
        Alarm.model_validate({"name": "x", "disagreement": 0.01, "errorRate": 0.1})
    with pytest.raises(ValidationError, match="mirrorSamplingPercentage"):
        Alarm.model_validate({"name": "x", "errorRate": 0.1, "mirrorSamplingPercentage": 50})
    with pytest.raises(ValidationError):
        Alarm.model_validate({"name": "x", "disagreement": 1.5})
    cfg = config(CANARY, alarms=[{"name": "d", "disagreement": 0.01},
                                 {"name": "e", "disagreement": 0.02,
                                  "mirrorSamplingPercentage": 10}])
    assert cfg.mirror_sampling == 100.0
    assert config(CANARY, alarms=[{"name": "e", "errorRate": 0.1}]).mirror_sampling is None


def test_disagreement_mirrors_both_ways_only_while_baking() -> None:
    from kubeinfer_operator.reconcile.rollout_alarms import mirrors

    cfg = config(CANARY, alarms=[{"name": "d", "disagreement": 0.01,
                                  "mirrorSamplingPercentage": 25}])
    run = Run(cfg)
    provisioning = run.tick(0).state
    assert provisioning is not None and provisioning.phase is ro.Phase.PROVISIONING
    assert mirrors(cfg, provisioning) == []
    baking = run.tick(1).state
    assert baking is not None and baking.phase is ro.Phase.BAKING
    got = mirrors(cfg, baking)
    assert {(m.source, m.peer, m.sampling_percentage) for m in got} == {
        ("a", "a-green", 25.0), ("a-green", "a", 25.0)}
    assert mirrors(config(CANARY), baking) == []  # no disagreement alarm: no copies
    dis = ro.AlarmEvaluation("d", "disagreement", 0.01, 0.05, tripped=True, requests=400)
    rolled = run.tick(2, evaluations=(dis,))
    assert rolled.state is not None and rolled.state.phase is ro.Phase.ROLLED_BACK
    assert rolled.weights == {"a": 1.0}
    assert "disagreement 0.05 vs threshold 0.01 over 400 requests" in rolled.state.message
    assert mirrors(cfg, rolled.state) == []


@pytest.mark.parametrize(("key", "value"), [
    ("step", float("inf")), ("step", -1), ("step", 99), ("steps", "x"),
    ("trafficToGreen", "nan"), ("trafficToGreen", float("inf")), ("trafficToGreen", 250),
    ("trafficToGreen", -5), ("phase", "Sideways"), ("startedAt", "yesterday"),
])
def test_an_unreadable_status_entry_is_no_rollout(key: str, value: object) -> None:
    """Status is ours, but whoever may write it (or an older operator) can put anything
    there: such an entry reads as no rollout, never as an exception or a NaN weight."""
    good = {"variant": "v", "blueFleet": "v", "greenFleet": "v-green", "phase": "Baking",
            "toHash": "h", "step": 1, "steps": 2, "trafficToGreen": 10.0}
    assert ro.RolloutState.from_status(good) is not None
    assert ro.RolloutState.from_status({**good, key: value}) is None
