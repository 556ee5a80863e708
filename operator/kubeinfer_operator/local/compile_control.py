"""What the CLI does to local CompilationJob runners: hand a job over, start, watch, stop.

The CLI and a runner share only the job's folder (``compile_state``) and
signals: ``up`` writes ``job.json`` and starts the runner; ``status`` reads
``state.json``; ``down`` sends SIGTERM (then SIGKILL) and makes sure the
compiler it recorded is not left running.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from kubeinfer_operator.local import job_control
from kubeinfer_operator.local.compile_manifest import LoadedCompileJob
from kubeinfer_operator.local.compile_state import (
    CompilePaths,
    CompilePhase,
    CompileState,
    LocalCompileJob,
    compile_cache_root,
    read_compile_job,
    read_compile_state,
    write_compile_job,
    write_compile_state,
)
from kubeinfer_operator.local.process import signal_group
from kubeinfer_operator.local.state import process_alive
from kubeinfer_runtime.contract import ENV_PREFIX


def local_compile_job(item: LoadedCompileJob, source: str) -> LocalCompileJob:
    plan = item.plan
    # Every local compilation shares one tuning cache: a recompile runs no new trials.
    env = {**plan.env,
           f"{ENV_PREFIX}TUNING_CACHE_DIR": str(compile_cache_root() / "tuning")}
    return LocalCompileJob(name=item.name, env=env, retries=plan.backoff_limit,
                           active_deadline_s=plan.active_deadline_s,
                           model=plan.model_description, target=plan.target,
                           output_uri=plan.output_uri, run_hash=plan.run_hash, source=source)


def runner_argv(paths: CompilePaths) -> list[str]:
    return [sys.executable, "-m", "kubeinfer_operator.local.compile_runner",
            "--state-dir", str(paths.root)]


def start_runner(paths: CompilePaths, job: LocalCompileJob, *,
                 detach: bool) -> subprocess.Popen[bytes]:
    """Write the job and start its runner in its own session (it outlives a detached ``up``)."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.state.unlink(missing_ok=True)  # a previous run's result is not this run's
    paths.report.unlink(missing_ok=True)
    write_compile_job(paths, job)
    return job_control.spawn_runner(paths, runner_argv(paths), detach=detach)


@dataclass(frozen=True)
class CompileView:
    paths: CompilePaths
    state: CompileState | None
    running: bool


def view(paths: CompilePaths) -> CompileView:
    return CompileView(paths, read_compile_state(paths), paths.running())


def running_spec(paths: CompilePaths) -> LocalCompileJob | None:
    """The job a live runner runs (None when no runner holds the lock)."""
    return read_compile_job(paths) if paths.running() else None


def stop_job(paths: CompilePaths, *, timeout: float = 30.0,
             proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop the job's runner and its compiler; False when none was running."""
    stopped = job_control.stop_runner(paths, read_compile_state, "CompilationJob",
                                      timeout=timeout, proc=proc)
    if stopped is None:
        return False
    latest = stopped.latest or stopped.state
    if latest is not None and process_alive(latest.pid, latest.start_time):
        assert latest.pid is not None
        signal_group(latest.pid, signal.SIGKILL)  # its runner died before stopping it
    if latest is not None and not latest.phase.finished:
        latest.phase, latest.reason = CompilePhase.STOPPED, "Stopped"
        latest.message = "Stopped; kubeinfer up -f FILE compiles it again"
        latest.finished_at, latest.pid = time.time(), None
        write_compile_state(paths, latest)
    return True


def wait_started(paths: CompilePaths, proc: subprocess.Popen[bytes],
                 timeout: float = 10.0) -> bool:
    """Whether the runner came up (wrote its state) within ``timeout``."""
    return job_control.wait_started(paths, read_compile_state, proc, timeout)
