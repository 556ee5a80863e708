"""A RecommendationJob's next step and status, from its candidates, Job and pods: PURE.

    (nothing) ─create candidates─▶ StartingCandidates ─all available (or the wait is
    over: the recommender then fails the dead ones fast)─create Job─▶ Measuring
        ─Job Complete + summary─▶ Complete   ─Job Failed─▶ Failed

The recommender's compact summary (``RecommendReport.termination_message``) is its
pod's termination message. Once the Job has ended the candidates are deleted.
``Complete`` and ``Failed`` are monotonic; only the TTL clean-up of the Job follows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kubeinfer_operator.api.recommendation_job import RankedCandidate
from kubeinfer_operator.reconcile.compile_status import PodView
from kubeinfer_operator.reconcile.job_status import COMPLETE as COMPLETE
from kubeinfer_operator.reconcile.job_status import FAILED as FAILED
from kubeinfer_operator.reconcile.job_status import StatusBuilder
from kubeinfer_operator.reconcile.job_status import is_terminal as is_terminal
from kubeinfer_operator.reconcile.status import condition, timestamp
from kubeinfer_operator.reconcile.transform_observe import (
    JobView,
    detail,
    parse_report,
    parse_time,
)
from kubeinfer_runtime.contract.recommend import EXIT_BAD_INPUT, EXIT_NO_RECOMMENDATION

RUNNING = "Running"
PHASE_PENDING = "Pending"
PHASE_STARTING = "StartingCandidates"
PHASE_MEASURING = "Measuring"

REASON_INVALID_SPEC = "InvalidSpec"
REASON_SPEC_CHANGED = "SpecChanged"
REASON_DEADLINE = "DeadlineExceeded"
REASON_BAD_INPUT = "BadInput"
REASON_NO_RECOMMENDATION = "NoRecommendation"
REASON_NO_REPORT = "NoReport"
REASON_RECOMMENDED = "Recommended"
#: How long the candidates may take to become available before the Job runs anyway.
CANDIDATE_WAIT_S = 600


class Summary(BaseModel):
    """The recommender's termination message (``RecommendReport.termination_message``)."""

    model_config = ConfigDict(extra="ignore")

    recommended: str | None = None
    reason: str = ""
    autoscalingTarget: float | None = None
    ranking: list[RankedCandidate] = Field(default_factory=list)


@dataclass(frozen=True)
class JobInfo:
    name: str
    namespace: str
    generation: int
    run_hash: str
    status: Mapping[str, Any]
    model: str = ""
    candidates: int = 0
    deadline_s: int | None = None
    ttl_s: int | None = None


@dataclass(frozen=True)
class Observed:
    #: Candidate Deployments found, by index: available or not.
    available: Mapping[int, bool] = field(default_factory=dict)
    job: JobView = field(default_factory=JobView)
    pods: tuple[PodView, ...] = ()


@dataclass(frozen=True)
class Decision:
    status: dict[str, Any]
    create_candidates: bool = False
    create_job: bool = False
    delete_candidates: bool = False
    delete_job: bool = False
    done: bool = False


def summary_status(summary: Summary, *, endpoint_yaml: Callable[[Summary], str | None]
                   ) -> dict[str, Any]:
    """The status fields a summary fills (None values left out)."""
    winner = next((r for r in summary.ranking if r.name == summary.recommended), None)
    fields: dict[str, Any] = {
        "recommended": summary.recommended,
        "maxThroughput": winner.maxThroughput if winner else None,
        "autoscalingTarget": summary.autoscalingTarget,
        "reason": summary.reason or None,
        "ranking": [r.model_dump(exclude_none=True) for r in summary.ranking] or None,
        "recommendedEndpoint": endpoint_yaml(summary) if summary.recommended else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


class _Builder(StatusBuilder[JobInfo]):
    def running(self, reason: str, message: str, phase: str) -> dict[str, Any]:
        gen = self.info.generation
        return self.finish([condition(RUNNING, True, reason, message, gen)], phase)

    def ended(self, type_: str, reason: str, message: str) -> dict[str, Any]:
        gen = self.info.generation
        self.status["completionTime"] = timestamp(self.now)
        return self.finish([condition(RUNNING, False, type_, message, gen),
                            condition(type_, True, reason, message, gen)], type_)


def _latest(pods: tuple[PodView, ...]) -> PodView | None:
    ended = [p for p in pods if p.exit_code is not None]
    return max(ended, key=lambda p: p.finished_at, default=None)


def decide(info: JobInfo, observed: Observed, now: datetime, *,
           endpoint_yaml: Callable[[Summary], str | None] = lambda _: None) -> Decision:
    """The status of the RecommendationJob and what to do next."""
    job = observed.job
    if is_terminal(info.status):
        completed = parse_time((info.status or {}).get("completionTime"))
        due = (info.ttl_s is not None and completed is not None
               and (now - completed).total_seconds() >= info.ttl_s)
        return Decision(dict(info.status), delete_job=due and job.exists,
                        delete_candidates=bool(observed.available),
                        done=not observed.available and (info.ttl_s is None
                                                         or (due and not job.exists)))
    b = _Builder(info, now)
    b.status.setdefault("startTime", timestamp(now))
    jname = f"{info.namespace}/{info.name}-recommend"
    if job.exists and job.run_hash != info.run_hash:
        return Decision(b.ended(FAILED, REASON_SPEC_CHANGED,
                                f"Job {jname} was made from another spec; a "
                                "RecommendationJob is immutable: delete it and create it "
                                "again"), delete_job=not job.finished, delete_candidates=True)
    ready = sum(1 for ok in observed.available.values() if ok)
    b.status["candidatesAvailable"] = f"{ready}/{info.candidates}"
    if not job.exists:
        started = parse_time(b.status.get("startTime")) or now
        waited = (now - started).total_seconds()
        if info.deadline_s is not None and waited >= info.deadline_s:
            return Decision(b.ended(FAILED, REASON_DEADLINE,
                                    f"The candidates did not start within "
                                    f"{info.deadline_s} s"), delete_candidates=True)
        missing = len(observed.available) < info.candidates
        if missing or (ready < info.candidates and waited < CANDIDATE_WAIT_S):
            return Decision(b.running(PHASE_STARTING, f"Starting candidates: {ready}/"
                                      f"{info.candidates} available", PHASE_STARTING),
                            create_candidates=missing)
        return Decision(b.running(PHASE_MEASURING, f"Measuring {info.candidates} candidates "
                                  f"of {info.model or 'the model'}", PHASE_MEASURING),
                        create_job=True)
    pod = _latest(observed.pods)
    summary = parse_report(pod.message, Summary) if pod is not None else None
    if job.failure is not None:
        job_reason, job_message = job.failure
        if job_reason == REASON_DEADLINE:
            reason, message = REASON_DEADLINE, (f"The recommendation ran longer than "
                                                f"{info.deadline_s or '?'} s (Job {jname}); "
                                                "raise spec.activeDeadlineSeconds or lower "
                                                "spec.load.maxMinutes")
        elif pod is not None and pod.exit_code == EXIT_NO_RECOMMENDATION and summary:
            b.status.update(summary_status(summary, endpoint_yaml=endpoint_yaml))
            reason, message = REASON_NO_RECOMMENDATION, summary.reason or "no candidate " \
                "held the SLO"
        elif pod is not None:
            reason = REASON_BAD_INPUT if pod.exit_code == EXIT_BAD_INPUT else job_reason
            message = (f"The recommender failed: {detail(pod.message) or pod.exit_code} "
                       f"(kubectl logs -n {info.namespace} {pod.name})")
        else:
            reason, message = job_reason, f"Job {jname} failed: {job_message or '?'}"
        return Decision(b.ended(FAILED, reason, message), delete_candidates=True)
    if not job.complete:
        return Decision(b.running(PHASE_MEASURING, f"Measuring {info.candidates} candidates "
                                  f"of {info.model or 'the model'}", PHASE_MEASURING))
    if summary is None or summary.recommended is None:
        return Decision(b.ended(FAILED, REASON_NO_REPORT,
                                f"Job {jname} completed but its pod left no recommendation "
                                "in its termination message; check that the runtime image "
                                "matches the operator's version"), delete_candidates=True)
    b.status.update(summary_status(summary, endpoint_yaml=endpoint_yaml))
    return Decision(b.ended(COMPLETE, REASON_RECOMMENDED,
                            f"{summary.recommended}: {summary.reason}"),
                    delete_candidates=True)


def invalid_status(info: JobInfo, reason: str, message: str, now: datetime) -> dict[str, Any]:
    return _Builder(info, now).ended(FAILED, reason, message)
