"""Where a local CompilationJob keeps its state, and the files its runner and the CLI share.

``$KUBEINFER_HOME/compile-jobs/<name>/`` (apart from TransformJobs' ``jobs/`` and
endpoints' ``local/``, so names never collide and no kind reads another's state):

* ``job.json`` (``LocalCompileJob``): written by ``kubeinfer up``: the rendered env
  of the compiler and the job's bounds; the runner reads it once.
* ``state.json`` (``CompileState``): written by the runner whenever something
  changes: phase, attempts, the compiler's pid, the result.
* ``report.json``: the compiler's ``CompileReport`` (its termination log on
  Kubernetes); ``logs/``: the runner's and the compiler's logs (the compiler's
  progress lines and its candidates table); ``work/``: its scratch space.
* ``runner.lock``: flock'ed by the live runner (released by the kernel when it
  dies, even by SIGKILL).

The artifact itself lives under the job's output URI, and tuning records in
``$KUBEINFER_HOME/compile-cache/tuning`` (shared by every local compilation, so a
recompile with a warm cache runs no new trials): removing this folder loses no
artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from kubeinfer_operator.local.job_state import (
    JobDir,
    forget_dir,
    known_job_dirs,
    read_model,
    write_model,
)

# Re-exported: the runner, control and CLI ask this kind's module whether its runner lives.
from kubeinfer_operator.local.job_state import runner_alive as runner_alive
from kubeinfer_operator.local.paths import COMPILE_JOBS_DIR, kubeinfer_home
from kubeinfer_operator.reconcile.transform_observe import parse_report
from kubeinfer_runtime.contract.compile import CompileReport


def compile_jobs_root(home: Path | None = None) -> Path:
    return (home or kubeinfer_home()) / COMPILE_JOBS_DIR


def compile_cache_root(home: Path | None = None) -> Path:
    """Shared by local compilations: tuning records, and artifacts by content."""
    return (home or kubeinfer_home()) / "compile-cache"


@dataclass(frozen=True)
class CompilePaths(JobDir):
    """The shared files (``JobDir``) plus the compiler's report, log and scratch space."""

    @classmethod
    def for_job(cls, name: str, home: Path | None = None) -> CompilePaths:
        return cls(compile_jobs_root(home) / name)

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def compiler_log(self) -> Path:
        return self.logs / "compiler.log"

    @property
    def work(self) -> Path:
        return self.root / "work"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LocalCompileJob(_Model):
    """What ``kubeinfer up`` hands the runner (rendered by the same pure plan as on a cluster)."""

    name: str
    #: ``KUBEINFER_*`` env of the compiler (``render.compile_plan``).
    env: dict[str, str]
    #: Restarts after a failure that may pass (the Job's backoffLimit).
    retries: int = Field(default=2, ge=0)
    active_deadline_s: int | None = None
    model: str = ""
    target: str = ""
    output_uri: str = ""
    #: Hash of the spec: a running job is only ever joined by the same spec.
    run_hash: str
    #: The manifest file it came from (for the messages).
    source: str = ""


class CompilePhase(StrEnum):
    STARTING = "Starting"
    COMPILING = "Compiling"
    COMPLETE = "Complete"
    FAILED = "Failed"
    #: Stopped by ``kubeinfer down`` (or Ctrl-C): ``up`` starts it again.
    STOPPED = "Stopped"

    @property
    def finished(self) -> bool:
        return self in (CompilePhase.COMPLETE, CompilePhase.FAILED, CompilePhase.STOPPED)


class CompileState(_Model):
    name: str
    runner_pid: int
    runner_start_time: int | None = None
    phase: CompilePhase = CompilePhase.STARTING
    reason: str = ""
    message: str = ""
    model: str = ""
    target: str = ""
    output_uri: str = ""
    #: The compiler process now running (None between attempts).
    pid: int | None = None
    start_time: int | None = None
    restarts: int = 0
    exit_code: int | None = None
    #: The successful report's main fields (the whole report is ``report.json``).
    artifact_uri: str = ""
    backend: str = ""
    chosen: str = ""
    speedup: float | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    updated_at: float = 0.0


def write_compile_job(paths: CompilePaths, job: LocalCompileJob) -> None:
    write_model(paths.job, job)


def read_compile_job(paths: CompilePaths) -> LocalCompileJob | None:
    return read_model(paths.job, LocalCompileJob)


def write_compile_state(paths: CompilePaths, state: CompileState) -> None:
    write_model(paths.state, state)


def read_compile_state(paths: CompilePaths) -> CompileState | None:
    return read_model(paths.state, CompileState)


def read_report(path: Path) -> CompileReport | None:
    """A compiler's report file; None while missing, half-written or not a report."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return parse_report(text, CompileReport)


def known_compile_jobs(home: Path | None = None) -> list[CompilePaths]:
    return known_job_dirs(compile_jobs_root(home), CompilePaths)


def forget(paths: CompilePaths) -> None:
    """Remove the job's local state (its artifact stays under its output URI)."""
    forget_dir(paths)
