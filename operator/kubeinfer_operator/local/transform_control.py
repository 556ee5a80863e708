"""What the CLI does to local TransformJob runners: hand a job over, start, watch, stop.

The CLI and a runner share only the job's folder (``transform_state``) and
signals: ``up`` writes ``job.json`` and starts the runner; ``status`` reads
``state.json`` and the workers' progress files; ``down`` sends SIGTERM (then
SIGKILL) and makes sure no child it recorded is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from kubeinfer_operator.errors import LocalRunError
from kubeinfer_operator.local.process import signal_group, spawn
from kubeinfer_operator.local.state import process_alive
from kubeinfer_operator.local.transform_manifest import LoadedJob
from kubeinfer_operator.local.transform_state import (
    JobPaths,
    JobPhase,
    JobState,
    LocalJob,
    read_job,
    read_job_state,
    read_progress,
    runner_alive,
    write_job,
    write_job_state,
)
from kubeinfer_operator.local.transform_view import JobProgress, job_progress


def local_job(item: LoadedJob, source: str) -> LocalJob:
    plan = item.plan
    spec = item.job.spec
    return LocalJob(name=item.name, env=plan.env, instance_count=plan.instance_count,
                    max_failed_records=plan.max_failed_records,
                    retries=plan.backoff_limit_per_index,
                    active_deadline_s=plan.active_deadline_s, model=plan.model_description,
                    output_uri=plan.env.get("KUBEINFER_OUTPUT_URI", spec.output.uri),
                    run_hash=plan.run_hash, source=source)


def runner_argv(paths: JobPaths) -> list[str]:
    return [sys.executable, "-m", "kubeinfer_operator.local.transform_runner",
            "--state-dir", str(paths.root)]


def start_runner(paths: JobPaths, job: LocalJob, *, detach: bool) -> subprocess.Popen[bytes]:
    """Write the job and start its runner in its own session (it outlives a detached ``up``)."""
    paths.logs.mkdir(parents=True, exist_ok=True)
    paths.state.unlink(missing_ok=True)  # a previous run's result is not this run's
    write_job(paths, job)
    return spawn(runner_argv(paths), env=os.environ, log_path=paths.runner_log,
                 die_with_parent=not detach)


@dataclass(frozen=True)
class JobView:
    paths: JobPaths
    state: JobState | None
    running: bool
    progress: JobProgress


def view(paths: JobPaths, now: float | None = None) -> JobView:
    state = read_job_state(paths)
    running = paths.running()
    if state is None:
        return JobView(paths, None, running, JobProgress())
    current = {w.index: read_progress(paths.progress_file(w.index)) for w in state.workers}
    return JobView(paths, state, running,
                   job_progress(state, current, time.time() if now is None else now))


def running_spec(paths: JobPaths) -> LocalJob | None:
    """The job a live runner runs (None when no runner holds the lock)."""
    return read_job(paths) if paths.running() else None


def _kill_children(state: JobState | None, timeout: float) -> None:
    if state is None:
        return
    alive = [(pid, start) for pid, start in state.pids() if process_alive(pid, start)]
    for pid, _ in alive:
        signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process_alive(p, s) for p, s in alive):
        time.sleep(0.05)
    for pid, start in alive:
        if process_alive(pid, start):
            signal_group(pid, signal.SIGKILL)


def stop_job(paths: JobPaths, *, timeout: float = 30.0,
             proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Stop the job's runner and every process it started; False when none was running.

    The job's state stays (phase Stopped): a later ``up`` resumes it.
    """
    if not paths.running():
        return False
    deadline = time.monotonic() + timeout
    state = read_job_state(paths)
    while (state is None or not runner_alive(state)) and paths.running() and (
            time.monotonic() < deadline):
        time.sleep(0.05)  # a runner too young to have written its state
        state = read_job_state(paths)
    pid = proc.pid if proc is not None else (state.runner_pid if runner_alive(state) and state
                                             else None)
    if pid is None:
        raise LocalRunError(f"TransformJob {paths.name} is locked by a runner whose pid is "
                            f"unknown; stop it by hand (see {paths.runner_log})")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    while paths.running() and time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        time.sleep(0.05)
    if paths.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        while paths.running() and time.monotonic() - killed < 10:
            time.sleep(0.05)
    if proc is not None:
        proc.wait()
    latest = read_job_state(paths)
    _kill_children(latest or state, timeout=max(1.0, deadline - time.monotonic()))
    if latest is not None and not latest.phase.finished:
        # Killed before it could say so itself.
        latest.phase, latest.reason = JobPhase.STOPPED, "Stopped"
        latest.message = "Stopped; kubeinfer up -f FILE resumes it (done shards are kept)"
        latest.finished_at = time.time()
        write_job_state(paths, latest)
    return True


def wait_started(paths: JobPaths, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    """Whether the runner came up (wrote its state) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_job_state(paths)
        if state is not None and state.runner_pid == proc.pid:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False
