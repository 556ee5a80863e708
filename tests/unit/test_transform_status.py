"""The TransformJob state machine, step by step, on an explicit clock.

Each test feeds ``decide`` what the Jobs and pods report at one moment, applies
the decision the way the handler does (the new status becomes the old one) and
checks what the operator does next and what ``kubectl get ktj`` would show.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubeinfer_operator.reconcile.transform_observe import (
    ExitKind,
    JobView,
    Observed,
    PodView,
    classify_exit,
    detail,
    job_view,
    parse_indexes,
    parse_report,
    pod_view,
)
from kubeinfer_operator.reconcile.transform_status import (
    Decision,
    JobInfo,
    decide,
    invalid_status,
    is_terminal,
    waiting_status,
)
from kubeinfer_operator.render.transform_names import Step
from kubeinfer_runtime.contract.batch import JobSummary, PlanReport, WorkerReport

T0 = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
HASH = "run-1"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def info(status: dict[str, Any] | None = None, **kw: Any) -> JobInfo:
    return JobInfo(name="score", namespace="ml", generation=1, run_hash=HASH,
                   status=status or {}, model="model s3://m/iris.onnx", instance_count=2,
                   **kw)


def job(*, complete: bool = False, failure: tuple[str, str] | None = None,
        **kw: Any) -> JobView:
    return JobView(exists=True, run_hash=HASH, complete=complete, failure=failure, **kw)


def pod(step: Step, message: str = "", *, index: int | None = None, code: int = 0,
        at_: str = "2026-12-06T12:00:05Z", name: str = "") -> PodView:
    return PodView(name=name or f"score-{step.value}-{index}", step=step,
                   phase="Succeeded" if code == 0 else "Failed", index=index, exit_code=code,
                   message=message, finished_at=at_)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


class Run:
    """A TransformJob through reconciles: the status written by one is read by the next."""

    def __init__(self, **kw: Any) -> None:
        self.info = info(**kw)

    def step(self, now: datetime, jobs: dict[Step, JobView] | None = None,
             pods: tuple[PodView, ...] = ()) -> Decision:
        d = decide(self.info, Observed(jobs=jobs or {}, pods=pods), now)
        self.info = replace(self.info, status=d.status)
        return d


PLAN = PlanReport(shards=4, objects=2, bytes=4000).model_dump_json()


def test_a_job_from_start_to_complete() -> None:
    run = Run()
    d = run.step(at(0))
    assert (d.create, d.status["phase"], d.status["startTime"]) == (
        Step.PLAN, "Planning", "2026-12-06T12:00:00Z")
    assert cond(d.status, "Running")["reason"] == "Planning"
    assert d.status["model"] == "model s3://m/iris.onnx"

    # Duplicate event while the planner runs: nothing new is created, nothing changes.
    again = run.step(at(1), {Step.PLAN: job(active=1)})
    assert again.create is None and again.status == d.status

    # The planner's report sizes the workers.
    d = run.step(at(3), {Step.PLAN: job(complete=True, succeeded=1)}, (pod(Step.PLAN, PLAN),))
    assert (d.create, d.shards) == (Step.WORK, 4)
    assert (d.status["shards"], d.status["objects"], d.status["inputBytes"]) == (4, 2, 4000)
    assert (d.status["phase"], d.status["progress"]) == ("Running", "0/4")
    assert cond(d.status, "Running")["message"] == "Transforming 4 shard(s) with 2 worker(s)"

    # Progress: two indexes done, their reports summed.
    report = WorkerReport(shards_done=1, records=100, bytes_in=1000, bytes_out=300)
    workers = job(active=2, succeeded=2, completed_indexes="0,2",
                  start_time="2026-12-06T12:00:04Z")
    pods = (pod(Step.WORK, report.model_dump_json(), index=0),
            pod(Step.WORK, report.model_dump_json(), index=2))
    d = run.step(at(14), {Step.PLAN: job(complete=True), Step.WORK: workers}, pods)
    assert d.create is None
    assert (d.status["progress"], d.status["shardsDone"], d.status["records"]) == ("2/4", 2, 200)
    assert (d.status["bytesIn"], d.status["bytesOut"]) == (2000, 600)
    assert d.status["recordsPerSecond"] == 20.0  # 200 records in the workers' first 10 s
    assert cond(d.status, "Running")["message"] == "2/4 shards done"

    # A retried index counts once (its last successful pod).
    retried = pod(Step.WORK, report.model_dump_json(), index=2, at_="2026-12-06T12:00:09Z",
                  name="score-work-2-again")
    d = run.step(at(15), {Step.PLAN: job(complete=True), Step.WORK: workers}, (*pods, retried))
    assert d.status["records"] == 200

    # All indexes done: the finalizer.
    done = replace(workers, complete=True, active=0, succeeded=4, completed_indexes="0-3",
                   completion_time="2026-12-06T12:00:20Z")
    d = run.step(at(21), {Step.PLAN: job(complete=True), Step.WORK: done}, pods)
    assert (d.create, d.status["phase"], d.status["progress"]) == (
        Step.FINALIZE, "Finalizing", "4/4")

    summary = JobSummary(objects=2, shards=4, records=400, failed_records=3, bytes_in=4000,
                         bytes_out=1200)
    d = run.step(at(25), {Step.PLAN: job(complete=True), Step.WORK: done,
                          Step.FINALIZE: job(complete=True)},
                 (pod(Step.FINALIZE, summary.model_dump_json()),))
    assert d.terminal and d.create is None and d.delete == ()
    assert d.status["phase"] == "Complete"
    assert (d.status["records"], d.status["failedRecords"], d.status["bytesOut"]) == (400, 3, 1200)
    assert d.status["completionTime"] == "2026-12-06T12:00:25Z"
    assert d.status["recordsPerSecond"] == 25.0  # 400 records between 12:00:04 and 12:00:20
    complete = cond(d.status, "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "Completed")
    assert complete["message"] == ("400 record(s) from 2 object(s) in 4 shard(s); 3 bad "
                                   "record(s) in _errors.jsonl")
    assert cond(d.status, "Running")["status"] == "False"
    assert not any(c["type"] == "Failed" for c in d.status["conditions"])

    # Monotonic: nothing the Jobs say later changes it; no TTL, so nothing left to do.
    later = run.step(at(99), {Step.WORK: replace(done, complete=False,
                                                 failure=("X", "y"))})
    assert later.status == d.status and later.done and later.delete == ()


def test_no_input_skips_the_workers() -> None:
    run = Run()
    run.step(at(0))
    empty = PlanReport(shards=0, objects=0, bytes=0).model_dump_json()
    d = run.step(at(1), {Step.PLAN: job(complete=True)}, (pod(Step.PLAN, empty),))
    assert d.create is Step.FINALIZE and d.status["progress"] == "0/0"


def test_the_plan_is_remembered_when_the_planner_is_gone() -> None:
    run = Run()
    run.step(at(0))
    run.step(at(1), {Step.PLAN: job(complete=True)}, (pod(Step.PLAN, PLAN),))
    # Planner Job and pod deleted (by hand, pod GC): no second plan; the workers' Job is made
    # again if it is missing too.
    d = run.step(at(2), {})
    assert (d.create, d.shards) == (Step.WORK, 4)


@pytest.mark.parametrize("written", [-3, True, False, "4", 4.0])
def test_a_shard_count_that_is_no_plan_is_planned_again(written: object) -> None:
    """status.shards is the operator's, but a client granted the status subresource may
    write anything there; only a count the planner could have made is taken as the plan."""
    run = Run(status={"shards": written})
    d = run.step(at(0))
    assert d.create is Step.PLAN and d.status["phase"] == "Planning"


def test_a_bad_shard_fails_the_job_naming_it() -> None:
    run = Run()
    run.step(at(0))
    run.step(at(1), {Step.PLAN: job(complete=True)}, (pod(Step.PLAN, PLAN),))
    error = "in/a.csv record 17 (byte offset 1234): 7340032 bytes, over maxPayloadInMB 6"
    bad = WorkerReport(error=error).model_dump_json()
    workers = job(failed=1, succeeded=1, completed_indexes="0", failed_indexes="3",
                  failure=("FailedIndexes", "Job has failed indexes"))
    d = run.step(at(5), {Step.PLAN: job(complete=True), Step.WORK: workers, Step.FINALIZE:
                         JobView()},
                 (pod(Step.WORK, bad, index=3, code=42, name="score-work-3-x"),
                  pod(Step.WORK, "not json: a log line", index=1, code=1)))
    assert d.terminal and d.status["phase"] == "Failed"
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "BadInput"
    assert failed["message"] == (f"Shard 3 failed: {error} (pod ml/score-work-3-x, exit code 42; "
                                 "kubectl logs -n ml score-work-3-x -c batch)")
    assert (d.status["shardsFailed"], d.status["progress"]) == (1, "1/4")
    assert d.create is None and d.delete == ()  # the failed Job has stopped itself


def test_a_model_that_cannot_load_is_the_reason_whatever_else_failed() -> None:
    run = Run()
    run.step(at(0))
    run.step(at(1), {Step.PLAN: job(complete=True)}, (pod(Step.PLAN, PLAN),))
    pods = (pod(Step.WORK, "Traceback\nOSError: disk", index=0, code=1, at_="2026-12-06T12:00:09Z"),
            pod(Step.WORK, "Traceback ...\nModelLoadError: not an ONNX model", index=1, code=43,
                at_="2026-12-06T12:00:03Z"))
    d = run.step(at(10), {Step.PLAN: job(complete=True),
                          Step.WORK: job(failure=("PodFailurePolicy", "exit 43"))}, pods)
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "ModelFailed"
    assert failed["message"].startswith("Shard 1 failed: Traceback ... | ModelLoadError: not an "
                                        "ONNX model (pod ml/score-work-1")


def test_a_failed_job_without_pods_says_what_the_job_said() -> None:
    run = Run()
    run.step(at(0))
    d = run.step(at(3), {Step.PLAN: job(failure=("BackoffLimitExceeded",
                                                 "Job has reached the specified backoff limit"))})
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert failed["message"] == ("Job ml/score-plan failed (BackoffLimitExceeded): Job has "
                                 "reached the specified backoff limit")


def test_a_planner_without_a_report_fails_clearly() -> None:
    run = Run()
    run.step(at(0))
    d = run.step(at(1), {Step.PLAN: job(complete=True)}, (pod(Step.PLAN, "starting...\n"),))
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "NoReport" and "runtime image matches" in failed["message"]


def test_too_many_bad_records_fail_at_the_finalizer() -> None:
    run = Run()
    run.step(at(0))
    run.step(at(1), {Step.PLAN: job(complete=True)}, (pod(Step.PLAN, PLAN),))
    done = job(complete=True, completed_indexes="0-3")
    summary = JobSummary(records=100, failed_records=11, failed=True,
                         reason="TooManyFailedRecords",
                         message="11 records failed, more than errorPolicy.maxFailedRecords "
                                 "10; see s3://data/out/_errors.jsonl")
    d = run.step(at(9), {Step.PLAN: job(complete=True), Step.WORK: done,
                         Step.FINALIZE: job(failure=("PodFailurePolicy", "exit 42"))},
                 (pod(Step.FINALIZE, summary.model_dump_json(), code=42),))
    failed = cond(d.status, "Failed")
    assert (failed["reason"], failed["message"]) == ("TooManyFailedRecords", summary.message)
    assert (d.status["records"], d.status["failedRecords"]) == (100, 11)


def test_the_deadline_fails_the_job_and_stops_its_jobs() -> None:
    run = Run(active_deadline_s=60)
    d = run.step(at(0))
    assert d.active_deadline_s == 60
    d = run.step(at(20), {Step.PLAN: job(complete=True)}, (pod(Step.PLAN, PLAN),))
    assert d.create is Step.WORK and d.active_deadline_s == 40  # what is left of it
    d = run.step(at(61), {Step.PLAN: job(complete=True), Step.WORK: job(active=2)})
    assert cond(d.status, "Failed")["reason"] == "DeadlineExceeded"
    assert d.delete == (Step.WORK,)


def test_a_job_from_another_spec_fails_the_run() -> None:
    run = Run()
    run.step(at(0))
    d = run.step(at(1), {Step.PLAN: replace(job(active=1), run_hash="run-0")})
    failed = cond(d.status, "Failed")
    assert failed["reason"] == "SpecChanged" and "score-plan" in failed["message"]
    assert d.delete == (Step.PLAN,)


def test_ttl_deletes_the_jobs_once_due_then_nothing_is_left_to_do() -> None:
    run = Run(ttl_s=30)
    done = {Step.PLAN: job(complete=True), Step.FINALIZE: job(complete=True)}
    run.step(at(0))
    run.step(at(1), {Step.PLAN: job(complete=True)},
             (pod(Step.PLAN, PlanReport(shards=0, objects=0, bytes=0).model_dump_json()),))
    d = run.step(at(2), done, (pod(Step.FINALIZE, JobSummary().model_dump_json()),))
    assert d.terminal
    assert run.step(at(20), done).delete == ()
    due = run.step(at(33), done)
    assert due.delete == (Step.PLAN, Step.FINALIZE) and not due.done
    assert run.step(at(34), {}).done


def test_waiting_and_invalid() -> None:
    waiting = waiting_status(info(), "EndpointNotFound", "spec.endpointRef: Endpoint ml/iris "
                             "does not exist; create it", at(0))
    assert waiting["phase"] == "Pending" and not is_terminal(waiting)
    assert "startTime" not in waiting
    assert cond(waiting, "Running")["status"] == "False"
    # The condition keeps its transition time while the reason stays.
    again = waiting_status(info(waiting), "EndpointNotFound", "x", at(30))
    assert cond(again, "Running")["lastTransitionTime"] == "2026-12-06T12:00:00Z"

    invalid = invalid_status(info(waiting), "InvalidSpec", "TransformJob ml/score is invalid: "
                             "spec.input.uri: ...", at(40))
    assert is_terminal(invalid) and cond(invalid, "Failed")["reason"] == "InvalidSpec"


# -- parsing ----------------------------------------------------------------------------------


def test_parse_indexes() -> None:
    assert parse_indexes("0-3,7") == {0, 1, 2, 3, 7}
    assert parse_indexes("") == set() and parse_indexes(None) == set()
    assert parse_indexes("5") == {5} and parse_indexes("1-2,x,4") == {1, 2, 4}


def test_reports_are_read_leniently_and_errors_never_get_long() -> None:
    assert parse_report('{"shards": 3, "objects": 1, "bytes": 9, "new": 1}',
                        PlanReport) == PlanReport(shards=3, objects=1, bytes=9)
    assert parse_report("Traceback...", PlanReport) is None
    assert parse_report('{"shards": -1}', PlanReport) is None
    assert detail('{"error": "record 3 of a.csv is too large"}') == \
        "record 3 of a.csv is too large"
    assert detail("a\n\nb\nc\nd") == "b | c | d"
    assert len(detail("x" * 5000)) <= 403


def test_classify_exit_matches_the_pod_failure_policy() -> None:
    assert [classify_exit(c) for c in (0, 42, 43, 1, 137, None)] == [
        ExitKind.OK, ExitKind.BAD_INPUT, ExitKind.MODEL_FAILED, ExitKind.TRANSIENT,
        ExitKind.TRANSIENT, ExitKind.TRANSIENT]


def test_job_and_pod_views_from_api_objects() -> None:
    api_job = {"metadata": {"annotations": {"kubeinfer.io/run-hash": "h"}},
               "status": {"succeeded": 3, "failed": 1, "active": 2, "completedIndexes": "0-2",
                          "failedIndexes": "4", "startTime": "2026-12-06T12:00:00Z",
                          "conditions": [{"type": "FailureTarget", "status": "True"},
                                         {"type": "Failed", "status": "True",
                                          "reason": "FailedIndexes", "message": "m"},
                                         {"type": "Complete", "status": "False"}]}}
    view = job_view(api_job)
    assert (view.run_hash, view.succeeded, view.failed, view.active) == ("h", 3, 1, 2)
    assert view.failure == ("FailedIndexes", "m") and not view.complete and view.finished
    assert job_view(None) == JobView()
    api_pod = {"metadata": {"name": "score-work-4-abc",
                            "annotations": {"batch.kubernetes.io/job-completion-index": "4"}},
               "status": {"phase": "Failed", "containerStatuses": [
                   {"name": "step-model", "state": {"running": {}}},
                   {"name": "batch", "state": {"terminated": {
                       "exitCode": 42, "message": "{}", "finishedAt": "2026-12-06T12:01:00Z"}}}]}}
    assert pod_view(api_pod, Step.WORK) == PodView(
        name="score-work-4-abc", step=Step.WORK, phase="Failed", index=4, exit_code=42,
        message="{}", finished_at="2026-12-06T12:01:00Z")


@pytest.mark.parametrize("status", [
    {"conditions": [{"type": "Complete", "status": "True"}]},
    {"conditions": [{"type": "Failed", "status": "True"}]},
])
def test_terminal(status: dict[str, Any]) -> None:
    assert is_terminal(status)
    assert not is_terminal({"conditions": [{"type": "Running", "status": "False"}]})


def test_parse_indexes_stays_within_the_jobs_completions() -> None:
    # A hostile or corrupt status must not make a trillion-element set on the event loop.
    assert len(parse_indexes("0-999999999999")) == 100_000
    assert parse_indexes("2-999999999999,-5--1", limit=4) == {2, 3}
