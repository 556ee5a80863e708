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

import shutil
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kubeinfer_operator.local.paths import kubeinfer_home
from kubeinfer_operator.local.state import lock_file_held, process_alive, write_atomic
from kubeinfer_operator.reconcile.transform_observe import parse_report
from kubeinfer_runtime.contract.compile import CompileReport


def compile_jobs_root(home: Path | None = None) -> Path:
    return (home or kubeinfer_home()) / "compile-jobs"


def compile_cache_root(home: Path | None = None) -> Path:
    """Shared by local compilations: tuning records, and artifacts by content."""
    return (home or kubeinfer_home()) / "compile-cache"


@dataclass(frozen=True)
class CompilePaths:
    root: Path

    @classmethod
    def for_job(cls, name: str, home: Path | None = None) -> CompilePaths:
        return cls(compile_jobs_root(home) / name)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def job(self) -> Path:
        return self.root / "job.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def report(self) -> Path:
        return self.root / "report.json"

    @property
    def lock(self) -> Path:
        return self.root / "runner.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def compiler_log(self) -> Path:
        return self.logs / "compiler.log"

    @property
    def runner_log(self) -> Path:
        return self.logs / "runner.log"

    @property
    def work(self) -> Path:
        return self.root / "work"

    def running(self) -> bool:
        """True while a live runner holds the job's lock."""
        return lock_file_held(self.lock)


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
    write_atomic(paths.job, job.model_dump_json(indent=2))


def read_compile_job(paths: CompilePaths) -> LocalCompileJob | None:
    try:
        return LocalCompileJob.model_validate_json(paths.job.read_bytes())
    except (OSError, ValidationError):
        return None


def write_compile_state(paths: CompilePaths, state: CompileState) -> None:
    write_atomic(paths.state, state.model_dump_json(indent=2))


def read_compile_state(paths: CompilePaths) -> CompileState | None:
    try:
        return CompileState.model_validate_json(paths.state.read_bytes())
    except (OSError, ValidationError):
        return None


def read_report(path: Path) -> CompileReport | None:
    """A compiler's report file; None while missing, half-written or not a report."""
    try:
        text = path.read_text()
    except OSError:
        return None
    return parse_report(text, CompileReport)


def known_compile_jobs(home: Path | None = None) -> list[CompilePaths]:
    root = compile_jobs_root(home)
    if not root.is_dir():
        return []
    return [CompilePaths(c) for c in sorted(root.iterdir())
            if c.is_dir() and (CompilePaths(c).state.exists() or CompilePaths(c).job.exists())]


def runner_alive(state: CompileState | None) -> bool:
    return state is not None and process_alive(state.runner_pid, state.runner_start_time)


def forget(paths: CompilePaths) -> None:
    """Remove the job's local state (its artifact stays under its output URI)."""
    shutil.rmtree(paths.root, ignore_errors=True)
