"""What the CLI does to local TransformJob runners: hand a job over, start, watch, stop.

The CLI and a runner share only the job's folder (``transform_state``) and
signals: ``up`` writes ``job.json`` and starts the runner; ``status`` reads
``state.json`` and the workers' progress files; ``down`` sends SIGTERM (then
SIGKILL) and makes sure no child it recorded is left.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from kubeinfer_operator.local import job_control
from kubeinfer_operator.local.process import signal_group
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
    return job_control.spawn_runner(paths, runner_argv(paths), detach=detach)


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
    stopped = job_control.stop_runner(paths, read_job_state, "TransformJob", timeout=timeout,
                                      proc=proc)
    if stopped is None:
        return False
    latest = stopped.latest
    _kill_children(latest or stopped.state,
                   timeout=max(1.0, stopped.deadline - time.monotonic()))
    if latest is not None and not latest.phase.finished:
        # Killed before it could say so itself.
        latest.phase, latest.reason = JobPhase.STOPPED, "Stopped"
        latest.message = "Stopped; kubeinfer up -f FILE resumes it (done shards are kept)"
        latest.finished_at = time.time()
        write_job_state(paths, latest)
    return True


def wait_started(paths: JobPaths, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    """Whether the runner came up (wrote its state) within ``timeout``."""
    return job_control.wait_started(paths, read_job_state, proc, timeout)
