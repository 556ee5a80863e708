"""A TransformJob's next step and status, from what its Jobs and pods report: PURE.

The state machine (one call of ``decide`` per reconcile; the clock is an argument;
what the Jobs and pods report is parsed by ``reconcile.transform_observe``):

    (nothing) ──create planner──▶ Planning ──PlanReport──▶ create workers (completions =
    shards) ──▶ Running ──all indexes done──▶ create finalizer ──▶ Finalizing ──JobSummary──▶
    Complete | Failed

* Each step is one ``batch/v1`` Job; what it reports is read from its pods'
  termination messages (``PlanReport``, ``WorkerReport``, ``JobSummary`` of the
  runtime's contract) and its own status (``completedIndexes``,
  ``failedIndexes``, ``Complete``/``Failed`` conditions).
* ``Complete`` and ``Failed`` are monotonic: once either is True the status
  never changes again (API conventions for Jobs); only the TTL clean-up of the
  Jobs follows.
* What was learnt is kept in the status (shard count, counters), so a Job or pod
  deleted early (by hand, by pod GC) never makes the job forget its plan.
* Every Job carries the run hash (spec + pinned model): a Job rendered from
  another spec fails the job (``SpecChanged``) instead of mixing two runs.
* Records and bytes while running are the sums of the finished workers'
  reports (one per index: the last pod that succeeded); the finalizer's summary
  replaces them with the totals of every done shard (resumed shards included).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kubeinfer_operator.reconcile.job_status import COMPLETE as COMPLETE
from kubeinfer_operator.reconcile.job_status import FAILED as FAILED
from kubeinfer_operator.reconcile.job_status import StatusBuilder
from kubeinfer_operator.reconcile.job_status import is_terminal as is_terminal
from kubeinfer_operator.reconcile.status import condition, timestamp
from kubeinfer_operator.reconcile.transform_observe import (
    ExitKind,
    JobView,
    Observed,
    PodView,
    classify_exit,
    detail,
    int_or_zero,
    parse_indexes,
    parse_report,
    parse_time,
)
from kubeinfer_operator.render.transform_names import (
    CONTAINER,
    REASON_BAD_INPUT,
    REASON_COMPLETED,
    REASON_DEADLINE,
    REASON_MODEL_FAILED,
    REASON_NO_REPORT,
    REASON_SPEC_CHANGED,
    Step,
    job_name,
)
from kubeinfer_runtime.contract.batch import (
    EXIT_BAD_INPUT,
    EXIT_MODEL_FAILED,
    JobSummary,
    PlanReport,
    WorkerReport,
)

RUNNING = "Running"

PHASE_PENDING = "Pending"
PHASE_PLANNING = "Planning"
PHASE_RUNNING = "Running"
PHASE_FINALIZING = "Finalizing"


@dataclass(frozen=True)
class JobInfo:
    """The TransformJob itself: what the decision needs of it."""

    name: str
    namespace: str
    generation: int
    run_hash: str
    status: Mapping[str, Any]
    model: str = ""
    instance_count: int = 1
    active_deadline_s: int | None = None
    ttl_s: int | None = None


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    #: The Job to create now (None: nothing to create).
    create: Step | None = None
    #: The workers' completions, when ``create`` is WORK.
    shards: int = 0
    #: What is left of the job's activeDeadlineSeconds, for the Job created.
    active_deadline_s: int | None = None
    #: Jobs to delete (stopped on failure, or cleaned up after the TTL).
    delete: tuple[Step, ...] = ()
    #: Finished, and nothing is left to clean up: no further sync can change anything.
    done: bool = False

    @property
    def terminal(self) -> bool:
        return is_terminal(self.status)


# -- the decision ---------------------------------------------------------------------------


class _Builder(StatusBuilder[JobInfo]):
    """The new status, built from the old one (what was learnt stays)."""

    def __init__(self, info: JobInfo, now: datetime) -> None:
        super().__init__(info, now)
        #: When the workers started and ended (their Job's times): the rate's window.
        self.work_start: str | None = None
        self.work_end: datetime | None = None

    def counters(self, **values: int | None) -> None:
        for key, value in values.items():
            if value is not None:
                self.status[key] = value

    def running(self, phase: str, reason: str, message: str) -> dict[str, Any]:
        gen = self.info.generation
        return self.finish([condition(RUNNING, True, reason, message, gen)], phase)

    def failed(self, reason: str, message: str) -> dict[str, Any]:
        gen = self.info.generation
        self.status["completionTime"] = timestamp(self.now)
        self._rate()
        return self.finish([condition(RUNNING, False, FAILED, message, gen),
                            condition(FAILED, True, reason, message, gen)], FAILED)

    def complete(self, message: str) -> dict[str, Any]:
        gen = self.info.generation
        self.status["completionTime"] = timestamp(self.now)
        self._rate()
        return self.finish([condition(RUNNING, False, COMPLETE, message, gen),
                            condition(COMPLETE, True, REASON_COMPLETED, message, gen)], COMPLETE)

    def _rate(self) -> None:
        start = parse_time(self.work_start or self.status.get("startTime"))
        end = self.work_end or parse_time(self.status.get("completionTime")) or self.now
        records = self.status.get("records")
        if start is not None and isinstance(records, int) and end > start:
            self.status["recordsPerSecond"] = round(records / (end - start).total_seconds(), 1)

    def progress(self, done: int, shards: int) -> None:
        self.status["shardsDone"] = done
        self.status["progress"] = f"{done}/{shards}"


def _unfinished(observed: Observed) -> tuple[Step, ...]:
    return tuple(s for s in Step if observed.job(s).exists and not observed.job(s).finished)


def _existing(observed: Observed) -> tuple[Step, ...]:
    return tuple(s for s in Step if observed.job(s).exists)


def _remaining_deadline(info: JobInfo, b: _Builder) -> int | None:
    if info.active_deadline_s is None:
        return None
    start = parse_time(b.status.get("startTime")) or b.now
    # startTime may have been written by an operator replica whose clock ran ahead (a
    # failover) or before a step back: never a negative elapsed time, so a Job is never
    # created with more than the spec's activeDeadlineSeconds.
    return info.active_deadline_s - max(0, int((b.now - start).total_seconds()))


def _failed_pod(pods: Iterable[PodView]) -> PodView | None:
    """The most telling failed pod: a model that cannot load, then bad input, then the last."""
    failed = sorted((p for p in pods if p.phase == "Failed" or p.exit_code not in (None, 0)),
                    key=lambda p: p.finished_at, reverse=True)
    rank = {EXIT_MODEL_FAILED: 0, EXIT_BAD_INPUT: 1}
    # min() keeps the first of equals: the latest pod of the most telling kind.
    return min(failed, key=lambda p: rank.get(p.exit_code or -1, 2), default=None)


def _step_failure(info: JobInfo, step: Step, job: JobView,
                  pods: list[PodView]) -> tuple[str, str]:
    """Reason and message of a failed step, naming the shard, the pod and what it said."""
    pod = _failed_pod(pods)
    name = job_name(info.name, step)
    job_reason, job_message = job.failure or ("Failed", "")
    if pod is None:
        return job_reason, (f"Job {info.namespace}/{name} failed ({job_reason}): "
                            f"{job_message or 'no pod reported why'}")
    kind = classify_exit(pod.exit_code)
    reason = {ExitKind.BAD_INPUT: REASON_BAD_INPUT,
              ExitKind.MODEL_FAILED: REASON_MODEL_FAILED}.get(kind, job_reason)
    what = {Step.PLAN: "Planning", Step.FINALIZE: "Finalizing"}.get(step) or (
        f"Shard {pod.index}" if pod.index is not None else "A worker")
    said = detail(pod.message) or f"exit code {pod.exit_code}"
    return reason, (f"{what} failed: {said} (pod {info.namespace}/{pod.name}, exit code "
                    f"{pod.exit_code}; kubectl logs -n {info.namespace} {pod.name} -c "
                    f"{CONTAINER})")


def _worker_totals(pods: list[PodView]) -> WorkerReport | None:
    """The finished workers' reports summed, one per index (its last successful pod)."""
    latest: dict[int | str, tuple[str, WorkerReport]] = {}
    for pod in pods:
        if pod.phase != "Succeeded":
            continue
        report = parse_report(pod.message, WorkerReport)
        if report is None:
            continue
        key: int | str = pod.index if pod.index is not None else pod.name
        if key not in latest or latest[key][0] < pod.finished_at:
            latest[key] = (pod.finished_at, report)
    if not latest:
        return None
    reports = [r for _, r in latest.values()]
    return WorkerReport(records=sum(r.records for r in reports),
                        failed_records=sum(r.failed_records for r in reports),
                        bytes_in=sum(r.bytes_in for r in reports),
                        bytes_out=sum(r.bytes_out for r in reports))


def _summary(pods: list[PodView]) -> JobSummary | None:
    for pod in sorted(pods, key=lambda p: p.finished_at, reverse=True):
        summary = parse_report(pod.message, JobSummary)
        if summary is not None:
            return summary
    return None


def _keep_max(b: _Builder, key: str, value: int) -> None:
    old = b.status.get(key)
    b.status[key] = max(value, old) if isinstance(old, int) else value


def decide(info: JobInfo, observed: Observed, now: datetime) -> Decision:
    """The status of the TransformJob and the one thing to do next."""
    if is_terminal(info.status):
        completed = parse_time((info.status or {}).get("completionTime"))
        due = (info.ttl_s is not None and completed is not None
               and (now - completed).total_seconds() >= info.ttl_s)
        existing = _existing(observed)
        return Decision(dict(info.status), delete=existing if due else (),
                        done=info.ttl_s is None or (due and not existing))
    b = _Builder(info, now)
    b.status.setdefault("startTime", timestamp(now))
    b.work_start = observed.job(Step.WORK).start_time
    b.work_end = parse_time(observed.job(Step.WORK).completion_time)
    changed = [s for s in _existing(observed) if observed.job(s).run_hash != info.run_hash]
    if changed:
        names = ", ".join(job_name(info.name, s) for s in changed)
        return Decision(b.failed(REASON_SPEC_CHANGED,
                                 f"Job(s) {names} were made from another spec or model than the "
                                 "TransformJob's now; a TransformJob is immutable: delete it "
                                 "and create it again (done shards are kept)"),
                        delete=_unfinished(observed))
    remaining = _remaining_deadline(info, b)
    if remaining is not None and remaining <= 0:
        return Decision(b.failed(REASON_DEADLINE,
                                 f"The job ran longer than activeDeadlineSeconds "
                                 f"({info.active_deadline_s}); raise it or add instances"),
                        delete=_unfinished(observed))
    # -- plan
    planned = b.status.get("shards")
    # A count another client wrote there (a bool, a negative number) is no plan: plan again.
    if not isinstance(planned, int) or isinstance(planned, bool) or planned < 0:
        planner = observed.job(Step.PLAN)
        pods = observed.pods_of(Step.PLAN)
        if not planner.exists:
            return Decision(b.running(PHASE_PLANNING, "Planning",
                                      "Listing the input and cutting it into shards"),
                            create=Step.PLAN, active_deadline_s=remaining)
        if planner.failure is not None:
            return Decision(b.failed(*_step_failure(info, Step.PLAN, planner, pods)))
        if not planner.complete:
            return Decision(b.running(PHASE_PLANNING, "Planning",
                                      "Listing the input and cutting it into shards"))
        report = next((r for p in pods if p.phase == "Succeeded"
                       and (r := parse_report(p.message, PlanReport)) is not None), None)
        if report is None:
            return Decision(b.failed(
                REASON_NO_REPORT,
                f"Job {info.namespace}/{job_name(info.name, Step.PLAN)} completed but no pod "
                "left a PlanReport in its termination message; check that the runtime image "
                "matches the operator's version"))
        b.counters(shards=report.shards, objects=report.objects, inputBytes=report.bytes,
                   shardsDone=0, shardsFailed=0)
        b.progress(0, report.shards)
    shards = int(b.status["shards"])
    # -- work
    workers = observed.job(Step.WORK)
    finalizing = observed.job(Step.FINALIZE).exists
    if shards > 0 and not finalizing:
        pods = observed.pods_of(Step.WORK)
        totals = _worker_totals(pods)
        if totals is not None:
            for key, value in (("records", totals.records),
                               ("failedRecords", totals.failed_records),
                               ("bytesIn", totals.bytes_in), ("bytesOut", totals.bytes_out)):
                _keep_max(b, key, value)
        if workers.exists:
            done = len(parse_indexes(workers.completed_indexes, shards))
            b.progress(max(done, int_or_zero(b.status.get("shardsDone"))), shards)
            b.status["shardsFailed"] = len(parse_indexes(workers.failed_indexes, shards))
            b._rate()
        if not workers.exists:
            return Decision(b.running(PHASE_RUNNING, "Running",
                                      f"Transforming {shards} shard(s) with "
                                      f"{min(shards, info.instance_count)} worker(s)"),
                            create=Step.WORK, shards=shards, active_deadline_s=remaining)
        if workers.failure is not None:
            return Decision(b.failed(*_step_failure(info, Step.WORK, workers, pods)),
                            delete=_unfinished(observed))
        if not workers.complete:
            return Decision(b.running(PHASE_RUNNING, "Running",
                                      f"{b.status['progress']} shards done"))
        b.progress(shards, shards)
    # -- finalize
    finalizer = observed.job(Step.FINALIZE)
    pods = observed.pods_of(Step.FINALIZE)
    if not finalizer.exists:
        return Decision(b.running(PHASE_FINALIZING, "Finalizing",
                                  "Assembling outputs and merging the error list"),
                        create=Step.FINALIZE, active_deadline_s=remaining)
    if not finalizer.finished:
        return Decision(b.running(PHASE_FINALIZING, "Finalizing",
                                  "Assembling outputs and merging the error list"))
    summary = _summary(pods)
    if summary is not None:
        b.counters(objects=summary.objects, shards=summary.shards, records=summary.records,
                   failedRecords=summary.failed_records, bytesIn=summary.bytes_in,
                   bytesOut=summary.bytes_out)
    if summary is not None and summary.failed:
        return Decision(b.failed(summary.reason or REASON_BAD_INPUT,
                                 summary.message or "Too many records failed; see "
                                 "<output>/_errors.jsonl"))
    if finalizer.failure is not None:
        return Decision(b.failed(*_step_failure(info, Step.FINALIZE, finalizer, pods)))
    records = b.status.get("records") or 0
    failed = b.status.get("failedRecords") or 0
    message = (f"{records} record(s) from {b.status.get('objects', 0)} object(s) in "
               f"{shards} shard(s)" + (f"; {failed} bad record(s) in _errors.jsonl"
                                       if failed else ""))
    return Decision(b.complete(message))


def invalid_status(info: JobInfo, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """Failed at once: the spec (immutable) can never run."""
    return _Builder(info, now).failed(reason, message)


def waiting_status(info: JobInfo, reason: str, message: str, now: datetime) -> dict[str, Any]:
    """Not started, waiting for something outside the job (an Endpoint to exist)."""
    b = _Builder(info, now)
    return b.finish([condition(RUNNING, False, reason, message, info.generation)],
                    PHASE_PENDING)
