"""A TransformJob's Jobs never get more than activeDeadlineSeconds when the startTime in
status was written by an operator replica whose clock ran ahead (skew, failover)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kubeinfer_operator.reconcile.transform_observe import Observed
from kubeinfer_operator.reconcile.transform_status import JobInfo, decide
from kubeinfer_operator.render.transform_names import Step

T0 = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)


def test_a_start_time_from_a_clock_ahead_gives_no_extra_deadline() -> None:
    # The replica that started the job was 2 minutes ahead; this one is right.
    ahead = (T0 + timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    info = JobInfo(name="score", namespace="ml", generation=1, run_hash="run-1",
                   status={"startTime": ahead}, model="model s3://m/iris.onnx",
                   instance_count=2, active_deadline_s=60)
    d = decide(info, Observed(), T0)
    assert d.create is Step.PLAN
    assert d.active_deadline_s == 60


def test_rfc3339_times_with_fractions_or_offsets_are_read() -> None:
    from kubeinfer_operator.reconcile.transform_observe import parse_time

    want = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
    assert parse_time("2026-12-06T12:00:00Z") == want
    assert parse_time("2026-12-06T12:00:00.000000Z") == want
    assert parse_time("2026-12-06T12:00:00+00:00") == want
    assert parse_time("2026-12-06T13:00:00+01:00") == want
    assert parse_time("2026-12-06T12:00:00") is None  # no zone
    assert parse_time("garbage") is None


def test_a_start_time_with_fractional_seconds_still_counts_toward_the_deadline() -> None:
    info = JobInfo(name="score", namespace="ml", generation=1, run_hash="run-1",
                   status={"startTime": "2026-12-06T12:00:00.250Z"},
                   model="model s3://m/iris.onnx", instance_count=2, active_deadline_s=60)
    d = decide(info, Observed(), T0 + timedelta(seconds=61))
    assert d.status["phase"] == "Failed", d.status
