"""Where a local TransformJob keeps its state, and the files its runner and the CLI share.

``$KUBEINFER_HOME/jobs/<name>/`` (apart from endpoints' ``local/``, so names never
collide):

* ``job.json`` (``LocalJob``): written by ``kubeinfer up``: the rendered env of the
  batch processes and the job's bounds; the runner reads it once.
* ``state.json`` (``JobState``): written by the runner whenever something
  changes: phase, plan, each worker, the result. ``status`` and ``up`` read it.
* ``progress/worker-<i>.json``: each worker's running ``WorkerReport`` (the
  runtime rewrites it at most twice a second); ``reports/*.json``: each
  process's final report (the termination log, on Kubernetes).
* ``runner.lock``: flock'ed by the live runner (released by the kernel when it
  dies, even by SIGKILL); ``logs/``: one log per process.

The job's outputs, plan and done markers live under its output URI, not here:
removing this folder never loses work, and a later ``up`` resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubeinfer_operator.local.job_state import (
    JobDir,
    forget_dir,
    known_job_dirs,
    read_model,
    write_model,
)

# Re-exported: the runner, control and CLI ask this kind's module whether its runner lives.
from kubeinfer_operator.local.job_state import runner_alive as runner_alive
from kubeinfer_operator.local.paths import TRANSFORM_JOBS_DIR, kubeinfer_home
from kubeinfer_runtime.contract.batch import (
    ERRORS_NAME,
    STATE_FOLDER,
    JobSummary,
    PlanReport,
    WorkerReport,
)


def jobs_root(home: Path | None = None) -> Path:
    return (home or kubeinfer_home()) / TRANSFORM_JOBS_DIR


@dataclass(frozen=True)
class JobPaths(JobDir):
    """The shared files (``JobDir``) plus each process's log, report and progress file."""

    @classmethod
    def for_job(cls, name: str, home: Path | None = None) -> JobPaths:
        return cls(jobs_root(home) / name)

    def log_file(self, process: str) -> Path:
        return self.logs / f"{process}.log"

    def report_file(self, process: str) -> Path:
        return self.root / "reports" / f"{process}.json"

    def progress_file(self, index: int) -> Path:
        return self.root / "progress" / f"worker-{index}.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LocalJob(_Model):
    """What ``kubeinfer up`` hands the runner (rendered by the same pure plan as on a cluster)."""

    name: str
    #: ``KUBEINFER_*`` env of every batch process (``render.transform_plan``).
    env: dict[str, str]
    instance_count: int = Field(ge=1)
    max_failed_records: int = Field(default=0, ge=0)
    #: Restarts of a worker that failed for a reason that may pass (backoffLimitPerIndex).
    retries: int = Field(default=3, ge=0)
    active_deadline_s: int | None = None
    model: str = ""
    output_uri: str = ""
    #: Hash of spec and model: a running job is only ever joined by the same spec.
    run_hash: str
    #: The manifest file it came from (for the messages).
    source: str = ""


class JobPhase(StrEnum):
    STARTING = "Starting"
    PLANNING = "Planning"
    RUNNING = "Running"
    FINALIZING = "Finalizing"
    COMPLETE = "Complete"
    FAILED = "Failed"
    #: Stopped by ``kubeinfer down`` (or Ctrl-C): ``up`` resumes it.
    STOPPED = "Stopped"

    @property
    def finished(self) -> bool:
        return self in (JobPhase.COMPLETE, JobPhase.FAILED, JobPhase.STOPPED)


class WorkerState(_Model):
    index: int
    pid: int | None = None
    start_time: int | None = None
    #: pending, running, backoff, done, failed
    state: str = "pending"
    restarts: int = 0
    exit_code: int | None = None
    error: str = ""
    #: Counters of earlier attempts of this worker (the runtime's progress file holds the
    #: current attempt's only).
    earlier: WorkerReport = Field(default_factory=WorkerReport)


class ProcessRecord(_Model):
    """A planner or finalizer process (workers are ``WorkerState``)."""

    name: str
    pid: int | None = None
    start_time: int | None = None
    restarts: int = 0


class JobState(_Model):
    name: str
    runner_pid: int
    runner_start_time: int | None = None
    phase: JobPhase = JobPhase.STARTING
    reason: str = ""
    message: str = ""
    model: str = ""
    output_uri: str = ""
    plan: PlanReport | None = None
    workers: list[WorkerState] = Field(default_factory=list)
    step: ProcessRecord | None = None
    summary: JobSummary | None = None
    #: The first bad records (from <output>/_errors.jsonl or the reports; never their bytes).
    first_errors: list[str] = Field(default_factory=list)
    started_at: float = 0.0
    work_started_at: float | None = None
    finished_at: float | None = None
    updated_at: float = 0.0

    def pids(self) -> list[tuple[int, int | None]]:
        """(pid, start time) of every child process this state records."""
        out = [(w.pid, w.start_time) for w in self.workers if w.pid is not None]
        if self.step is not None and self.step.pid is not None:
            out.append((self.step.pid, self.step.start_time))
        return out


def write_job(paths: JobPaths, job: LocalJob) -> None:
    write_model(paths.job, job)


def read_job(paths: JobPaths) -> LocalJob | None:
    return read_model(paths.job, LocalJob)


def write_job_state(paths: JobPaths, state: JobState) -> None:
    write_model(paths.state, state)


def read_job_state(paths: JobPaths) -> JobState | None:
    return read_model(paths.state, JobState)


def read_progress(path: Path) -> WorkerReport | None:
    """A worker's progress or report file; None while missing or half-written."""
    try:
        return WorkerReport.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def known_jobs(home: Path | None = None) -> list[JobPaths]:
    return known_job_dirs(jobs_root(home), JobPaths)


def forget(paths: JobPaths) -> None:
    """Remove the job's local state (its outputs and done markers stay where they are)."""
    forget_dir(paths)


#: How many bad records ``up`` and ``status`` show.
FIRST_ERRORS = 5


def first_errors(output_uri: str, limit: int = FIRST_ERRORS) -> list[str]:
    """The first bad records of a ``file://`` job: ``<output>/_errors.jsonl`` once merged,
    else the shards' own lists. Each described by key, record and error; never its bytes."""
    parsed = urlparse(output_uri)
    if parsed.scheme != "file":
        return []
    root = Path(unquote(parsed.netloc + parsed.path))
    files = [root / ERRORS_NAME]
    if not files[0].is_file():
        files = sorted((root / STATE_FOLDER / "errors").glob("*.jsonl"))
    out: list[str] = []
    for path in files:
        try:
            with open(path, "rb") as fh:
                for raw in fh:
                    if len(out) >= limit:
                        return out
                    out.append(_describe_error(raw))
        except OSError:
            continue
    return out


def _describe_error(raw: bytes) -> str:
    try:
        item = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace").strip()[:300]
    if not isinstance(item, dict):
        return str(item)[:300]
    where = item.get("key") or item.get("object") or "?"
    parts = [str(where)]
    if item.get("record") is not None:
        parts.append(f"record {item['record']}")
    if item.get("offset") is not None:
        parts.append(f"byte offset {item['offset']}")
    return f"{', '.join(parts)}: {str(item.get('error') or item.get('message') or '')[:300]}"
