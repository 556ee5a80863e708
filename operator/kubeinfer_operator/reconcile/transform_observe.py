"""What a TransformJob's Jobs and pods report, parsed: PURE.

The Job controller's status of each step's ``batch/v1`` Job (``JobView``), the
batch container's termination message of each pod (``PodView``: a report of
the runtime's contract, or the tail of its log), and what an exit status means
(``classify_exit``: the rules of the workers' podFailurePolicy, which local mode
follows too). ``reconcile.transform_status`` decides from these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubeinfer_operator.render.transform_names import (
    ANNOTATION_RUN_HASH,
    CONTAINER,
    INDEX_ANNOTATION,
    Step,
)
from kubeinfer_runtime.contract.batch import EXIT_BAD_INPUT, EXIT_MODEL_FAILED

#: Longest text kept from a report or log in a condition message.
MAX_DETAIL = 400

R = TypeVar("R", bound=BaseModel)


# -- what a process's exit status means (shared with local mode) --------------------------


class ExitKind(StrEnum):
    OK = "ok"
    #: Bad input: retrying cannot help; the shard (locally: the job) fails.
    BAD_INPUT = "bad-input"
    #: The model cannot load: the whole job fails at once.
    MODEL_FAILED = "model-failed"
    #: Anything else: retried (``backoffLimitPerIndex`` times).
    TRANSIENT = "transient"


def classify_exit(code: int | None) -> ExitKind:
    """What the workers' podFailurePolicy does with exit status ``code``."""
    if code == 0:
        return ExitKind.OK
    if code == EXIT_BAD_INPUT:
        return ExitKind.BAD_INPUT
    if code == EXIT_MODEL_FAILED:
        return ExitKind.MODEL_FAILED
    return ExitKind.TRANSIENT


# -- parsing what the API reports -----------------------------------------------------------


#: Kubernetes' largest ``completions`` of an Indexed Job: no index reaches it.
MAX_JOB_INDEXES = 100_000


def parse_indexes(text: str | None, limit: int = MAX_JOB_INDEXES) -> set[int]:
    """``"0-3,7"`` (an Indexed Job's completedIndexes / failedIndexes) → {0, 1, 2, 3, 7}.

    Only indexes below ``limit`` (the Job's completions) count: ``"0-999999999999"``
    must not become a set of a trillion numbers on the operator's one event loop."""
    limit = min(limit, MAX_JOB_INDEXES)
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            continue
        out.update(range(max(0, first), min(last + 1, limit)))
    return out


def parse_report(text: str | None, model: type[R]) -> R | None:
    """A report from a termination message; None when it is not one (a log tail, cut off).

    Unknown keys are ignored, so a newer runtime's report still reads.
    """
    try:
        data = json.loads(text or "")
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate({k: v for k, v in data.items() if k in model.model_fields})
    except ValidationError:
        return None


def detail(text: str | None) -> str:
    """What a failed process said, for a condition message: its report's error, else the
    last lines of its log (termination message FallbackToLogsOnError), bounded."""
    raw = (text or "").strip()
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        raw = str(data.get("error") or data.get("message") or "").strip()
    lines = [line.strip() for line in raw.splitlines() if line.strip()]
    out = " | ".join(lines[-3:])
    return out if len(out) <= MAX_DETAIL else "..." + out[-MAX_DETAIL:]


def int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


@dataclass(frozen=True)
class JobView:
    """What one ``batch/v1`` Job reports."""

    exists: bool = False
    run_hash: str | None = None
    succeeded: int = 0
    failed: int = 0
    active: int = 0
    completed_indexes: str = ""
    failed_indexes: str = ""
    complete: bool = False
    #: (reason, message) of its Failed condition.
    failure: tuple[str, str] | None = None
    start_time: str | None = None
    completion_time: str | None = None

    @property
    def finished(self) -> bool:
        return self.complete or self.failure is not None


def job_view(obj: Mapping[str, Any] | None) -> JobView:
    if obj is None:
        return JobView()
    status = obj.get("status") or {}
    conditions = {str(c.get("type")): c for c in status.get("conditions") or []
                  if isinstance(c, Mapping) and c.get("status") == "True"}
    failed = conditions.get("Failed")
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return JobView(
        exists=True,
        run_hash=annotations.get(ANNOTATION_RUN_HASH),
        succeeded=int_or_zero(status.get("succeeded")),
        failed=int_or_zero(status.get("failed")),
        active=int_or_zero(status.get("active")),
        completed_indexes=str(status.get("completedIndexes") or ""),
        failed_indexes=str(status.get("failedIndexes") or ""),
        complete="Complete" in conditions,
        failure=(str(failed.get("reason") or "Failed"), str(failed.get("message") or ""))
        if failed is not None else None,
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
    )


@dataclass(frozen=True)
class PodView:
    """One finished (or running) pod of a step: its index and what its batch container said."""

    name: str
    step: Step
    phase: str
    index: int | None = None
    exit_code: int | None = None
    #: The batch container's termination message (a report, or a log tail).
    message: str = ""
    finished_at: str = ""


def pod_view(obj: Mapping[str, Any], step: Step) -> PodView:
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    index_text = (meta.get("annotations") or {}).get(INDEX_ANNOTATION) or (
        meta.get("labels") or {}).get(INDEX_ANNOTATION)
    index = int(index_text) if isinstance(index_text, str) and index_text.isdigit() else None
    exit_code, message, finished_at = None, "", ""
    for c in status.get("containerStatuses") or []:
        if isinstance(c, Mapping) and c.get("name") == CONTAINER:
            terminated = (c.get("state") or {}).get("terminated") or (
                c.get("lastState") or {}).get("terminated") or {}
            if terminated:
                exit_code = terminated.get("exitCode")
                message = str(terminated.get("message") or "")
                finished_at = str(terminated.get("finishedAt") or "")
    return PodView(name=str(meta.get("name")), step=step, phase=str(status.get("phase") or ""),
                   index=index, exit_code=exit_code if isinstance(exit_code, int) else None,
                   message=message, finished_at=finished_at)


@dataclass(frozen=True)
class Observed:
    """The TransformJob's Jobs (by step) and their pods, as listed."""

    jobs: dict[Step, JobView] = field(default_factory=dict)
    pods: tuple[PodView, ...] = ()

    def job(self, step: Step) -> JobView:
        return self.jobs.get(step) or JobView()

    def pods_of(self, step: Step) -> list[PodView]:
        return [p for p in self.pods if p.step is step]


def parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        pass
    # RFC 3339 as other writers put it (fractional seconds as in MicroTime, an offset
    # instead of Z): a startTime left unread counted as "now", so a deadline never came.
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None or "T" not in text.upper():
        return None  # no zone: which clock it is on is unknown
    return parsed.astimezone(UTC)
